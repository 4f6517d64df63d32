"""A crash never loses a paid-for evaluation, and a resumed run re-spends nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_banel.ledger import RewardLedger

SCRIPT = Path(__file__).parent / "scripts" / "tiny_banel_run.py"


def run(out, count_file, **env):
    full_env = {**os.environ, "COUNT_FILE": str(count_file), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                **{k: str(v) for k, v in env.items()}}
    return subprocess.run([sys.executable, str(SCRIPT), str(out)], env=full_env, capture_output=True, text=True,
                          timeout=600)


# (distill_every=1 and kills at random points: tests/test_crash.py)
@pytest.mark.slow  # a SIGKILLed subprocess, then its resume
@pytest.mark.parametrize("distill_every", [0])
def test_sigkill_mid_round_then_resume(tmp_path, distill_every):
    out, count = tmp_path / "run", tmp_path / "oracle_calls.tsv"
    # without distillation the regions accumulate and reject ~99% of the proposals: rounds fill fewer than half of
    # their 4 places, which the idle rule would stop on before the resumed run calls the oracle
    first = run(out, count, KILL_AT_CALL=4, DISTILL_EVERY=distill_every, MAX_IDLE_ROUNDS=30)
    assert first.returncode == -9, first.stderr[-2000:]
    ledger = out / "evaluations.jsonl"
    before = ledger.read_text().splitlines()
    assert len(before) >= 3, "the kill should come after some evaluations reached the disk"
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())

    second = run(out, count, DISTILL_EVERY=distill_every, MAX_IDLE_ROUNDS=30)
    assert second.returncode == 0, second.stderr[-3000:]
    after = ledger.read_text().splitlines()
    assert after[: len(before)] == before, "a record written before the kill was lost or changed"
    records = [json.loads(line) for line in after]
    keys = [(r["prompt"], r["completion"]) for r in records]
    assert len(keys) == len(set(keys)), "a (prompt, completion) was evaluated twice"
    paid = count.read_text().splitlines()
    assert len({line.split("\t")[0] for line in paid}) == 2, "both processes should have called the oracle"
    # the kill came as the 4th call began: its items are charged as lost (never recorded, never sent again)
    lost = RewardLedger(str(ledger), budget=30).lost
    assert len(lost) >= 1 and not {(r.prompt, r.completion) for r in lost} & set(keys)
    assert len(paid) == len(records) and len(records) + len(lost) <= 30
    world, spent, rounds, n_failure_models, _ = (out / "done.txt").read_text().split()
    assert int(spent) == len(records) + len(lost)
    if distill_every == 0:  # failure models accumulate: the resumed run rebuilt them from the checkpoint
        assert int(n_failure_models) == len({r["round"] for r in records})
