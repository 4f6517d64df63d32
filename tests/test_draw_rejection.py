"""benchmarks/draw_rejection.py: the share of the distillation draw the ratio test rejects, measured, not typed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a benchmark's --quick run
def test_quick_run_measures_the_share_each_distillation_rejected(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "draw_rejection.py"), "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "draw_rejection.json").read_text())
    (run,) = result["runs"]
    assert run["task"] == "hard_attack" and len(run["rejected"]) == 2
    # every sample is a failure and tau = 0.97: the fitted region rejects part of the draw, never all of it
    assert all(0 < r < 1 for r in run["rejected"]), run
    assert (tmp_path / "draw_rejection.png").stat().st_size > 0 and "| hard_attack |" in (
        tmp_path / "draw_rejection.md").read_text()


def test_the_committed_results_back_the_documented_figures():
    result = json.loads((ROOT / "benchmarks" / "results" / "draw_rejection.json").read_text())
    page = (ROOT / "docs" / "benchmarks.md").read_text()  # the hard attack's section
    for task in ("hard_attack", "letters", "digits"):
        s = result["summary"][task]
        assert f"{100 * s['min']:.0f}-{100 * s['max']:.0f}%" in page, (task, s)
