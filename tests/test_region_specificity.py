"""benchmarks/region_specificity.py: what the ratio test's region holds after one failure fit, measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a benchmark's --quick run
def test_quick_run_measures_each_set_against_the_region(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "region_specificity.py"), "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "region_specificity.json").read_text())
    (fit,) = result["fits"]
    sets = fit["sets"]
    assert {"fitted negatives", "fresh samples", "dataset sixes", "dataset zeros"} <= set(sets)
    assert sets["dataset sixes"]["n"] == 181 and sets["fresh samples"]["n"] == 64
    # the fit did its job on what it was fitted on: its negatives sit in the region more than fresh samples do
    assert sets["fitted negatives"]["in_region"] > 0.8 > sets["fresh samples"]["in_region"]
    assert fit["fit_log_ratio"] > 0.03  # the ratio test's log(1 / 0.97)
    summary = result["summary"]["tiny"]  # over the seeds (one here)
    assert summary["seeds"] == 1
    assert summary["sets"]["fresh samples"]["in_region"] == sets["fresh samples"]["in_region"]
    assert result["sixes"]["samples"] == 4096 and (tmp_path / "region_sixes.json").exists()
    assert (tmp_path / "region_specificity.png").stat().st_size > 0
    assert "| tiny (smoke test) |" in (tmp_path / "region_specificity.md").read_text()
