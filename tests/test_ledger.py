"""The reward ledger: budget, cache, durable log, torn writes."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_banel.ledger import RewardLedger


def counting_oracle(rewards_of):
    calls = []

    def oracle(prompts, completions):
        def call(idx):
            calls.extend(completions[i] for i in idx)
            return [rewards_of(completions[i]) for i in idx]

        return call

    return oracle, calls


def test_budget_is_a_hard_cap_even_for_a_partial_batch(tmp_path):
    ledger = RewardLedger(str(tmp_path / "l.jsonl"), budget=5)
    make, calls = counting_oracle(lambda c: 0.0)
    comps = [f"c{i}" for i in range(8)]
    rewards = ledger.evaluate([""] * 8, comps, make([""] * 8, comps), round=0)
    assert ledger.spent == 5 and len(calls) == 5
    assert rewards[:5] == [0.0] * 5 and rewards[5:] == [None] * 3
    more = [f"d{i}" for i in range(3)]
    assert ledger.evaluate([""] * 3, more, make([""] * 3, more), round=1) == [None] * 3
    assert len(calls) == 5


def test_repeats_are_answered_from_the_ledger(tmp_path):
    ledger = RewardLedger(str(tmp_path / "l.jsonl"), budget=10)
    make, calls = counting_oracle(lambda c: 1.0 if c == "b" else 0.0)
    comps = ["a", "b", "a", "a"]
    assert ledger.evaluate(["p"] * 4, comps, make(["p"] * 4, comps), 0) == [0.0, 1.0, 0.0, 0.0]
    assert calls == ["a", "b"]
    comps2 = ["b", "c"]
    assert ledger.evaluate(["p"] * 2, comps2, make(["p"] * 2, comps2), 1) == [1.0, 0.0]
    assert calls == ["a", "b", "c"]
    # the same completion for another prompt is a different evaluation
    ledger.evaluate(["q"], ["a"], make(["q"], ["a"]), 1)
    assert calls[-1] == "a" and ledger.spent == 4
    lines = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["completion"], r["round"], r["success"]) for r in lines] == [
        ("p", "a", 0, False), ("p", "b", 0, True), ("p", "c", 1, False), ("q", "a", 1, False)]
    assert [r.completion for r in ledger.successes] == ["b"]


def test_none_is_not_charged_nor_recorded(tmp_path):
    ledger = RewardLedger(str(tmp_path / "l.jsonl"), budget=10)
    comps = ["a", "b"]
    out = ledger.evaluate(["p", "p"], comps, lambda idx: [None, 0.0], 0)
    assert out == [None, 0.0] and ledger.spent == 1 and not ledger.is_known_failure("p", "a")


def test_reload_restores_everything_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = RewardLedger(str(path), budget=10)
    ledger.evaluate(["p"] * 3, ["a", "b", "c"], lambda idx: [0.0, 2.0, 0.0], 0)
    with open(path, "a") as f:
        f.write('{"prompt": "p", "completion": "d", "rew')  # a crash mid-write
    again = RewardLedger(str(path), budget=10)
    assert again.spent == 3 and again.is_known_failure("p", "a") and not again.is_known_failure("p", "b")
    assert path.read_text().count("\n") == 3 and path.read_text().endswith("\n")
    again.evaluate(["p"], ["d"], lambda idx: [0.0], 1)
    assert RewardLedger(str(path), budget=10).spent == 4


def test_corruption_before_the_last_line_is_refused(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('garbage\n{"prompt": "p", "completion": "a", "reward": 0, "success": false, "round": 0}\n')
    with pytest.raises(ValueError, match="line 1 is corrupt"):
        RewardLedger(str(path), budget=10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("eval"), st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=6)),
    st.tuples(st.just("torn"), st.integers(1, 40)),
    st.tuples(st.just("reload"), st.just(0)),
), max_size=12), st.integers(1, 9))
def test_property_no_acknowledged_record_is_lost_or_double_counted(tmp_path_factory, ops, budget):
    path = tmp_path_factory.mktemp("ledger") / "l.jsonl"
    ledger = RewardLedger(str(path), budget=budget)
    acknowledged = set()
    paid = []
    for op, arg in ops:
        if op == "eval":
            comps = arg

            def oracle(idx, comps=comps):
                paid.extend(comps[i] for i in idx)
                return [0.0] * len(idx)

            ledger.evaluate(["p"] * len(comps), comps, oracle, 0)
            acknowledged |= {r.completion for r in ledger.records}
        elif op == "torn":
            full = '{"prompt": "p", "completion": "zz", "reward": 0.0, "success": false, "round": 0}\n'
            with open(path, "a") as f:
                f.write(full[: min(arg, len(full) - 1)])  # never the full line: a crash before the newline
            ledger = RewardLedger(str(path), budget=budget)
        else:
            ledger = RewardLedger(str(path), budget=budget)
        assert {r.completion for r in ledger.records} == acknowledged
        assert len(paid) == len(set(paid)) == ledger.spent <= budget
