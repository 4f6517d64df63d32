"""The code is clean under ruff with the project's configuration (pyproject.toml: 119 columns), in the suite so that
CI checks it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: it is in the test extra (pip install -e '.[test]')")
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def test_ruff_catches_a_long_line(tmp_path):
    """The check can fail: the same configuration flags a line over 119 columns."""
    bad = tmp_path / "bad.py"
    bad.write_text(f"x = {'1' * 120}\n")
    proc = subprocess.run([shutil.which("ruff") or sys.executable, "check", "--no-cache", "--config",
                           str(ROOT / "pyproject.toml"), str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "E501" in proc.stdout
