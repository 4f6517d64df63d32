"""Reward functions that misbehave never produce a recorded failure."""

import asyncio
import math
import time

import pytest

from trl_banel.ledger import RewardFunctionError, RewardLedger
from trl_banel.oracle import RewardOracle


def run(oracle, completions, tmp_path):
    ledger = RewardLedger(str(tmp_path / "l.jsonl"), budget=100)
    return ledger, ledger.evaluate(["p"] * len(completions), completions,
                                   lambda idx: oracle(["p"] * len(idx), [completions[i] for i in idx]), 0)


@pytest.mark.parametrize("bad, match", [
    (lambda p, c, **k: [0.0, float("nan")], "index 1"),
    (lambda p, c, **k: [math.inf, 0.0], "index 0"),
    (lambda p, c, **k: ["zero", 0.0], "index 0"),
    (lambda p, c, **k: [0.0], "1 rewards for 2 completions"),
    (lambda p, c, **k: 0.0, "expected a list"),
])
def test_bad_values_raise_naming_the_function_and_record_nothing(tmp_path, bad, match):
    def my_reward(prompts, completions, **kwargs):
        return bad(prompts, completions)

    with pytest.raises(RewardFunctionError, match=match) as err:
        run(RewardOracle(my_reward, retries=0), ["a", "b"], tmp_path)
    assert "my_reward" in str(err.value)
    assert RewardLedger(str(tmp_path / "l.jsonl"), budget=100).spent == 0


def test_exceptions_are_retried_then_reported(tmp_path):
    attempts = []

    def flaky(prompts, completions, **kwargs):
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("oracle down")
        return [1.0] * len(completions)

    ledger, out = run(RewardOracle(flaky, retries=2, backoff=0.01), ["a"], tmp_path)
    assert out == [1.0] and len(attempts) == 3

    def dead(prompts, completions, **kwargs):
        raise ConnectionError("oracle down")

    with pytest.raises(RewardFunctionError, match="'dead' failed 2 time"):
        run(RewardOracle(dead, retries=1, backoff=0.01), ["b"], tmp_path)


def test_timeout_counts_as_a_failed_call(tmp_path):
    def slow(prompts, completions, **kwargs):
        time.sleep(1.0)
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match="reward_timeout"):
        run(RewardOracle(slow, retries=0, timeout=0.05), ["a"], tmp_path)


def test_none_async_and_weights(tmp_path):
    async def judge(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [None if c == "skip" else 1.0 for c in completions]

    def bonus(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    ledger, out = run(RewardOracle([judge, bonus], weights=[2.0, 1.0]), ["a", "skip"], tmp_path)
    assert out == [2.5, None]
    assert ledger.spent == 1 and ledger.lookup("p", "skip") is None


def test_message_text_reads_every_format_trl_passes():
    from trl_banel.oracle import message_text

    assert message_text("12+3=") == "12+3="
    assert message_text([{"role": "assistant", "content": "42"}]) == "42"
    assert message_text({"role": "assistant", "content": "42"}) == "42"
    assert message_text([{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"}]) == \
        "Be brief. Hi"
    assert message_text([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"},
                                                      {"type": "text", "text": "b"}]}]) == "ab"
    assert message_text([{"role": "tool", "content": {"x": 1}}]) == '{"x": 1}'
