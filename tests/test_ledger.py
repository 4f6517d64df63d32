"""The reward ledger: budget, cache, durable log, torn writes."""

import contextlib
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
    assert out == [None, 0.0] and ledger.spent == 1 and ledger.lookup("p", "a") is None


def test_reload_restores_everything_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = RewardLedger(str(path), budget=10)
    ledger.evaluate(["p"] * 3, ["a", "b", "c"], lambda idx: [0.0, 2.0, 0.0], 0)
    with open(path, "a") as f:
        f.write('{"prompt": "p", "completion": "d", "rew')  # a crash mid-write
    again = RewardLedger(str(path), budget=10)
    assert again.spent == 3 and again.lookup("p", "a").success is False and again.lookup("p", "b").success is True
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


# -- the write-ahead journal: a call cut short by a crash is charged once and never re-bought silently -------------
class Crash(BaseException):
    """A process dying mid-call: not an Exception, so nothing gets to write an end line."""


def test_a_call_in_flight_at_a_crash_is_charged_and_never_sent_again(tmp_path):
    path = str(tmp_path / "l.jsonl")
    ledger = RewardLedger(path, budget=5)
    ledger.evaluate(["p"], ["a"], lambda idx: [0.0], 0)
    paid = []

    def dies(idx):
        paid.extend(idx)
        raise Crash()

    with pytest.raises(Crash):
        ledger.evaluate(["p", "p"], ["b", "c"], dies, 1)
    again = RewardLedger(path, budget=5)
    assert again.spent == 3 and again.remaining == 2 and [r.completion for r in again.records] == ["a"]
    assert {(r.completion, r.round) for r in again.newly_lost} == {("b", 1), ("c", 1)}
    assert again.lookup("p", "b") is None, "a lost call must not become a failure"
    calls = []
    assert again.evaluate(["p"] * 3, ["b", "c", "d"], lambda idx: calls.append(idx) or [0.0] * len(idx), 2) == \
        [None, None, 0.0]
    assert calls == [[2]], "a lost item was sent again"
    # the charge is durable: a third start neither forgets it nor reports it again
    third = RewardLedger(path, budget=5)
    assert third.spent == 4 and not third.newly_lost and len(third.lost) == 2


def test_retrying_lost_items_charges_them_again_for_good(tmp_path):
    path = str(tmp_path / "l.jsonl")
    with pytest.raises(Crash):
        RewardLedger(path, budget=4).evaluate(["p"], ["b"], lambda idx: (_ for _ in ()).throw(Crash()), 0)
    ledger = RewardLedger(path, budget=4)
    assert ledger.evaluate(["p"], ["b"], lambda idx: [1.0], 1, retry_lost=True) == [1.0]
    assert ledger.spent == 2 and not ledger.unrecorded_lost()
    reloaded = RewardLedger(path, budget=4)
    assert reloaded.spent == 2 and reloaded.lookup("p", "b").success  # the lost call stays charged


def test_a_failing_reward_function_is_not_charged(tmp_path):
    path = str(tmp_path / "l.jsonl")

    def broken(idx):
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        RewardLedger(path, budget=4).evaluate(["p"], ["b"], broken, 0)
    ledger = RewardLedger(path, budget=4)
    assert ledger.spent == 0 and not ledger.lost
    assert ledger.evaluate(["p"], ["b"], lambda idx: [0.0], 1) == [0.0]  # and may be asked again


def test_a_crash_after_the_rewards_were_recorded_charges_nothing_more(tmp_path, monkeypatch):
    path = str(tmp_path / "l.jsonl")
    ledger = RewardLedger(path, budget=4)

    def crash(call, how):
        raise Crash()

    monkeypatch.setattr(ledger.journal, "end", crash)
    with pytest.raises(Crash):
        ledger.evaluate(["p", "p"], ["a", "b"], lambda idx: [0.0, None], 0)
    again = RewardLedger(path, budget=4)
    # "a" was recorded; "b" was answered None, but the crash came before the call was closed: charged (it may have
    # been paid), the conservative side
    assert again.spent == 2 and [r.completion for r in again.records] == ["a"]
    assert [r.completion for r in again.lost] == ["b"]


def test_a_torn_intent_was_never_sent_and_is_dropped(tmp_path):
    path = tmp_path / "l.jsonl"
    RewardLedger(str(path), budget=4).evaluate(["p"], ["a"], lambda idx: [0.0], 0)
    journal = tmp_path / "l.calls.jsonl"
    with open(journal, "a") as f:
        f.write('{"call": 1, "round": 1, "items": [{"prompt": "p", "comp')  # the crash came before the fsync returned
    ledger = RewardLedger(str(path), budget=4)
    assert ledger.spent == 1 and not ledger.lost and journal.read_text().endswith("\n")


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=5),
                          st.sampled_from(["ok", "before_call", "in_call", "after_record"])),
                max_size=10), st.integers(1, 9))
def test_property_budget_holds_over_any_sequence_of_crashes(tmp_path_factory, steps, budget):
    """With an oracle that always answers, crashes at any point of a call (after the intent, inside the call, after
    the rewards were recorded) and restarts: items handed to the oracle never exceed the budget nor repeat, each is
    recorded or charged as lost, and no acknowledged evaluation is ever lost."""
    path = str(tmp_path_factory.mktemp("ledger") / "l.jsonl")
    passed, acknowledged = [], []
    for comps, how in steps:
        ledger = RewardLedger(path, budget=budget)  # every step is a new start, after whatever happened before
        assert [(r.completion, r.reward) for r in ledger.records] == acknowledged

        def oracle(idx, comps=comps, how=how):
            if how == "before_call":
                raise Crash()
            passed.extend(comps[i] for i in idx)
            if how == "in_call":
                raise Crash()
            return [0.0] * len(idx)

        if how == "after_record":
            ledger.journal.end = lambda call, end: (_ for _ in ()).throw(Crash())
        with contextlib.suppress(Crash):
            ledger.evaluate(["p"] * len(comps), comps, oracle, 0)
        acknowledged = [(r.completion, r.reward) for r in ledger.records]
        assert len(passed) == len(set(passed)) <= budget
    final = RewardLedger(path, budget=budget)
    recorded, lost = {r.completion for r in final.records}, {r.completion for r in final.lost}
    assert set(passed) <= recorded | lost and not recorded & lost
    assert final.spent == len(recorded) + len(lost) <= budget


# -- one live process per ledger ------------------------------------------------------------------------------------
def test_a_ledger_held_by_another_live_process_is_refused_until_that_process_dies(tmp_path):
    """Two runs on one ledger would each pay for the same evaluations (the ranks of a multi-process run outlive a
    killed launcher): a second process is refused by name, and a SIGKILL leaves no stale lock."""
    import signal
    import subprocess
    import sys
    import time

    from trl_banel.ledger import LedgerInUseError

    path = tmp_path / "l.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trl_banel.ledger import RewardLedger; "
         f"RewardLedger({str(path)!r}, budget=3); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LedgerInUseError, match=f"pid {holder.pid}"):
            RewardLedger(str(path), budget=3)
        assert not path.exists() or path.read_text() == "", "the refused ledger wrote something"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    ledger = RewardLedger(str(path), budget=3)
    assert ledger.evaluate(["p"], ["a"], lambda idx: [1.0], 0) == [1.0]
    assert RewardLedger(str(path), budget=3).spent == 1, "the same process may open its own ledger again"


def test_a_file_system_without_locks_runs_unguarded_and_says_so(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with caplog.at_level("WARNING"):
        ledger = RewardLedger(str(tmp_path / "l.jsonl"), budget=2)
    assert ledger.evaluate(["p"], ["a"], lambda idx: [0.0], 0) == [0.0]
    assert "would not be refused" in caplog.text
