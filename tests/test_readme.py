"""The README is what a new user runs: keep it and CI honest."""

from dataclasses import fields
from pathlib import Path

from trl.trainer.base_config import _BaseConfig

from trl_banel import BaNELConfig

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q'
    assert command in readme and command in ci
    assert "pip install torch==2.13.0 -e . && python recipes/addition_attack.py" in readme


def test_every_banel_field_is_documented():
    readme = (ROOT / "README.md").read_text()
    base = {f.name for f in fields(_BaseConfig)}
    missing = [f.name for f in fields(BaNELConfig) if f.name not in base and f"`{f.name}`" not in readme]
    assert not missing, missing
