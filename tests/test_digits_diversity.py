"""benchmarks/digits_diversity.py and trl_banel_examples.tasks.digits.image_diversity: how varied a generator's sixes
are."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trl_banel_examples.tasks import digits

ROOT = Path(__file__).resolve().parents[1]


def test_image_diversity_counts_copies_and_spread():
    data, labels = digits.load_dataset()
    sixes = data[labels == digits.TARGET_DIGIT]
    copies = digits.image_diversity(np.repeat(sixes[:1], 50, 0))
    assert copies == {"images": 50, "distinct": 1, "median_l1": 0.0}
    varied = digits.image_diversity(sixes)
    assert varied["distinct"] == len(sixes) and varied["median_l1"] > 50
    # two images at a known distance: every pair drawn is that pair
    a, b = np.zeros((1, 64), np.float32), np.full((1, 64), 2, np.float32)
    assert digits.image_diversity(np.concatenate([a, b]))["median_l1"] == 128
    assert digits.image_diversity(a)["median_l1"] is None


@pytest.mark.slow  # a benchmark's --quick run
def test_digits_diversity_quick_measures_the_pretrained_generator(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "digits_diversity.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "digits_diversity.json").read_text())
    pre = result["runs"]["pretrained"]
    assert pre["samples"] == 300 and pre["sixes"]["images"] == 0  # a generator of zeros draws no six
    assert 1 < pre["all_images"]["distinct"] <= 300 and result["dataset_sixes"]["distinct"] == 181
    assert "| pretrained" in (tmp_path / "digits_diversity.md").read_text()


@pytest.mark.slow  # a benchmark in a subprocess
def test_digits_diversity_names_a_folder_without_a_generator(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "digits_diversity.py"), "--runs",
                           f"nothing={tmp_path}", "--samples", "10", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode != 0 and f"nothing={tmp_path}" in proc.stderr
