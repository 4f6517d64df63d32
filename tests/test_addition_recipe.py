"""The addition attack's recipe (the embedded demo before the digits one), end to end, with --quick."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import unlisted_in_readme_file_table

from trl_banel.stats import clopper_pearson
from trl_banel_examples.tasks.addition import demo_summary_text

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "trl_banel_examples" / "tasks" / "addition_models"


@pytest.mark.slow  # the recipe's --quick run in a subprocess
@pytest.mark.skipif(not (MODELS / "attacker").exists(), reason="the addition models are not shipped in this checkout")
def test_quick_addition_recipe_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "addition_attack.py"), "--quick", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                           **{k: v for k, v in __import__("os").environ.items()}},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("pretrained success rate", "BaNEL success rate", "improvement", "reward evaluations (training)",
                "final acceptance rate"):
        assert row in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["nre"] <= result["budget"] == 100
    lines = (out / "evaluations.jsonl").read_text().splitlines()
    assert len(lines) == result["nre"]
    banel = result["banel"]
    assert banel["samples"] == 5000 and banel["rate"] == banel["successes"] / 5000
    assert (banel["low"], banel["high"]) == pytest.approx(clopper_pearson(banel["successes"], 5000))
    assert demo_summary_text(result) in proc.stdout  # what it printed is what docs/benchmarks.md renders
    assert (out / "success_rate.png").stat().st_size > 1000
    assert len(result["curve"]) >= 2 and result["curve"][0]["nre"] == 0

    # a quick run says what it checks and that its improvement is not meaningful, first and beside the figure
    assert proc.stdout.startswith("quick mode checks that the demo runs end to end")
    assert "(quick mode: not meaningful)" in proc.stdout and result["quick"] is True
    assert result["command"] == "python recipes/addition_attack.py --quick"  # --output_dir changes no number
    assert f"run report: {out / 'run_report.png'}" in proc.stdout and (out / "run_report.png").exists()
    # the console: one line per round and the summary, no metrics dict from the distillation steps
    rounds = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == len((out / "rounds.jsonl").read_text().splitlines()) >= 2
    assert not [line for line in proc.stdout.splitlines() if line.startswith("{")]

    # the README's table of files lists every file this run wrote
    assert not unlisted_in_readme_file_table(out)

    # the same command again on the finished output folder: refused at once, the trained model untouched
    model = out / "model.safetensors"
    trained = hashlib.sha256(model.read_bytes()).hexdigest()
    again = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "addition_attack.py"), "--quick", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert again.returncode != 0 and "holds a finished BaNEL run" in again.stderr, again.stderr[-3000:]
    assert "another output_dir" in again.stderr and "pretrained attacker" not in again.stdout
    assert hashlib.sha256(model.read_bytes()).hexdigest() == trained
    assert (out / "evaluations.jsonl").read_text().splitlines() == lines
