"""benchmarks/efficiency.py end to end at toy sizes: every figure the issue asks for is produced and consistent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import RUN_SETTINGS
from benchmarks.defaults import TASK_FIELDS

ROOT = Path(__file__).resolve().parents[1]
RUN_FIELDS = set(RUN_SETTINGS) | {"logging_steps", "seed", "disable_tqdm"}


@pytest.mark.slow
def test_efficiency_benchmark_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")])}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "efficiency.py"), "--quick", "--ks", "1", "--nre", "50",
           "--repeats", "1",
           "--out", str(tmp_path)]
    # a ledger left in a work folder by an earlier run must not be resumed (it would re-spend nothing): the folders
    # are emptied first, else these corrupt ledgers would stop the run
    for run in ("addition_banel", "addition_grpo"):
        (tmp_path / "work" / "efficiency" / run).mkdir(parents=True)
        (tmp_path / "work" / "efficiency" / run / "evaluations.jsonl").write_text("not json\nnot json\n")
    # the results file a run replaces: its round breakdown is quoted beside the new one
    old_breakdown = {"propose": 0.41, "filter": 0.44, "oracle": 0.02, "failure_fit": 1.42, "distill": 0.24,
                     "other": 0.05, "total": 2.58}
    (tmp_path / "efficiency.json").write_text(json.dumps({"models": {"addition": {"banel": {
        "round_breakdown": old_breakdown}}}}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "efficiency.json").read_text())
    for key in ("filter_ratio", "memory_ratio_adapter", "memory_ratio_copy", "round_breakdown",
                "banel_vs_grpo_wall_ratio"):
        assert set(result[key]) == {"addition", "family_bpe", "random_llama"}, key
    for name, m in result["models"].items():
        assert 0 < result["filter_ratio"][name]["1"] < 5
        # every memory probe holds at least what it must: the generator's float32 weights, gradients and AdamW's
        # two moments, and in copy mode a full copy of the weights besides (at these toy sizes the differences
        # between adapter and copy are otherwise allocator noise: the full benchmark's 34M-parameter model is where
        # the ratios mean something)
        mem, weights_mib = m["memory"], m["parameters"] * 4 / 2**20
        assert mem["policy_mib"] >= 4 * weights_mib and mem["1"]["adapter_mib"] >= 4 * weights_mib
        assert mem["1"]["copy_mib"] >= 5 * weights_mib
        assert mem["1"]["memory_ratio_copy"] == pytest.approx(mem["1"]["copy_mib"] / mem["policy_mib"])
        # both trainers spent exactly the same reward evaluations
        assert m["banel"]["nre"] == m["grpo"]["nre"] == (16 if name == "random_llama" else 50)
        assert m["banel"]["rounds"] >= (1 if name == "random_llama" else 2) and m["grpo"]["steps"] >= 1
        # BaNEL at its defaults: the run sets no mechanism field
        assert not set(m["banel"]["config"]) - TASK_FIELDS - RUN_FIELDS
        b = m["banel"]["round_breakdown"]
        assert all(b[p] > 0 for p in ("propose", "filter", "failure_fit", "distill"))
        assert b["total"] == pytest.approx(sum(v for k, v in b.items() if k != "total"))
        fit = m["banel"]["failure_fit"]  # what the fit's seconds bought
        assert fit["fit_steps"] > 0 and fit["fit_log_ratio"] > 0
    md = (tmp_path / "efficiency.md").read_text()
    assert "filter_ratio" in md and "banel_vs_grpo_wall_ratio" in md
    assert "| addition | previous | 0.41 | 0.44 | 0.02 | 1.42 | 0.24 | 0.05 | 2.58 | n/a | n/a |" in md
    assert result["previous"] == {"addition": {"round_breakdown": old_breakdown, "failure_fit": None}}
    assert (tmp_path / "efficiency.png").stat().st_size > 0
