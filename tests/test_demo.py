"""The embedded demo (recipes/digits_0_to_6.py), end to end, as the README's first command runs it (with --quick)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import unlisted_in_readme_file_table

from trl_banel.stats import clopper_pearson
from trl_banel_examples.tasks import digits

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "digits_0_to_6.py"


def run_demo(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEMO), "--quick", "--output_dir", str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow  # the demo's --quick run in a subprocess
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["nre"] <= result["budget"] == 50
    lines = (out / "evaluations.jsonl").read_text().splitlines()
    assert len(lines) == result["nre"]
    banel = result["banel"]
    assert banel["samples"] == 500 and banel["rate"] == banel["successes"] / 500
    assert (banel["low"], banel["high"]) == pytest.approx(clopper_pearson(banel["successes"], 500))
    # the package's default round: the demo sets the task's budget, lengths, batch sizes and stop rule, and where it
    # runs, but no mechanism field
    run_fields = {"use_cpu", "bf16", "save_strategy", "logging_steps", "seed"}
    assert set(result["settings"]) == set(digits.BANEL_SETTINGS) | run_fields, result["settings"]
    assert result["settings"]["max_completion_length"] == digits.BANEL_SETTINGS["max_completion_length"]
    assert digits.demo_summary_text(result) in proc.stdout  # what it printed is what the README renders
    assert (out / "digits_grid.png").stat().st_size > 10_000 and (out / "success_rate.png").stat().st_size > 1000
    assert len(result["curve"]) >= 2 and result["curve"][0]["nre"] == 0

    # a quick run says what it checks and that its improvement is not meaningful, first and beside the figure
    assert proc.stdout.startswith("quick mode checks that the demo runs end to end")
    assert "(quick mode: not meaningful)" in proc.stdout and result["quick"] is True
    assert result["command"] == "python recipes/digits_0_to_6.py --quick"  # --output_dir changes no number
    assert f"run report: {out / 'run_report.png'}" in proc.stdout and (out / "run_report.png").exists()
    rounds = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == len((out / "rounds.jsonl").read_text().splitlines()) >= 2
    assert not [line for line in proc.stdout.splitlines() if line.startswith("{")]

    # the README's table of files lists every file this run wrote
    assert not unlisted_in_readme_file_table(out)

    # the same command again on the finished output folder: refused at once, the trained model untouched
    model = out / "model.safetensors"
    trained = hashlib.sha256(model.read_bytes()).hexdigest()
    again = run_demo(out)
    assert again.returncode != 0 and "holds a finished BaNEL run" in again.stderr, again.stderr[-3000:]
    assert "pretrained generator" not in again.stdout
    assert hashlib.sha256(model.read_bytes()).hexdigest() == trained
    assert (out / "evaluations.jsonl").read_text().splitlines() == lines


def test_the_demos_calibrated_prior_is_the_calibration_files():
    prior = json.loads((ROOT / "benchmarks" / "results" / "digits_calibration.json").read_text())["prior"]
    assert digits.CALIBRATED_PRIOR == (prior["successes"], prior["n"])


def test_a_prior_without_success_is_taken_at_its_upper_bound():
    """A calibration that saw no six (0 of n) gives a lower bound on the gain, and the summary says so."""
    from trl_banel.stats import SuccessEstimate

    assert digits.improvement_over_prior(0.5, SuccessEstimate.from_counts(5, 100_000)) == (pytest.approx(1e4), "rate")
    none = SuccessEstimate.from_counts(0, 200_000)
    gain, over = digits.improvement_over_prior(0.5, none)
    assert over == "upper" and gain == pytest.approx(0.5 / none.high) and 0 < none.high < 2e-5
    result = json.loads((ROOT / "benchmarks" / "results" / "demo" / "result.json").read_text())
    text = digits.demo_summary_text({**result, "calibrated_prior": none.to_dict(), "improvement": gain,
                                     "improvement_over": over})
    assert f"{gain:,.0f}x over the calibrated rate's 95% upper bound (at least)" in text
    assert "0.0e+00 [0.0e+00, 1.8e-05] (n=200,000)" in text


def test_sample_images_gives_the_oracles_verdict():
    generator, tok, oracle = digits.load_digits_task()
    images, p6, success = digits.sample_images(generator, tok, oracle, 32, seed=5)
    assert images.shape == (32, 64) and np.array_equal(success, p6 >= digits.SUCCESS_PROBABILITY)
    # the verdict is the oracle's: re-score the same images through the reward function's text path
    texts = [digits.image_to_text(img) for img in images]
    well_formed = p6 > 0  # malformed images are drawn blank with P(6) = 0
    rewards = np.array(oracle(completions=texts))
    assert np.array_equal(rewards[well_formed] == 1.0, success[well_formed])
    assert (images[~success].sum(1) > 0).mean() > 0.9  # the pretrained generator draws (zeros), not blanks
