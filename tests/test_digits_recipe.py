"""recipes/digits_0_to_6.py: BaNEL on the shipped digits task, with the before/after picture."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_holds_the_budget_and_draws_the_picture(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "digits_0_to_6.py"), "--quick", "--output_dir",
                           str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    ledger = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines() if line.strip()]
    assert result["budget"] == 50 and 0 < result["nre"] <= 50
    assert result["pretrained"]["samples"] == 500 and result["sixes_in_grid"]["of"] == 8
    assert result["settings"]["distill_objective"] == "exact"  # the task's settings, not the package defaults
    assert len({(r.get("prompt"), r.get("completion")) for r in ledger if "completion" in r}) == result["nre"]
    assert (out / "digits_grid.png").stat().st_size > 10_000 and (out / "success_rate.png").exists()
    # a finished run is never overwritten
    again = subprocess.run([sys.executable, str(ROOT / "recipes" / "digits_0_to_6.py"), "--quick", "--output_dir",
                            str(out)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert again.returncode != 0 and "evaluations" in (again.stderr + again.stdout)


def test_sample_images_gives_the_oracles_verdict():
    from trl_banel.tasks import digits

    generator, tok, oracle = digits.load_digits_task()
    images, p6, success = digits.sample_images(generator, tok, oracle, 32, seed=5)
    assert images.shape == (32, 64) and np.array_equal(success, p6 >= digits.SUCCESS_PROBABILITY)
    # the verdict is the oracle's: re-score the same images through the reward function's text path
    texts = [digits.image_to_text(img) for img in images]
    well_formed = p6 > 0  # malformed images are drawn blank with P(6) = 0
    rewards = np.array(oracle(completions=texts))
    assert np.array_equal(rewards[well_formed] == 1.0, success[well_formed])
    assert (images[~success].sum(1) > 0).mean() > 0.9  # the pretrained generator draws (zeros), not blanks
