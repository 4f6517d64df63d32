"""benchmarks/snippet_time.py times the README's snippet as a user copies it: the same code the README shows."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import snippet_time  # noqa: E402
from test_readme import readme_block  # noqa: E402


def test_it_times_the_readme_snippet_exactly_as_written():
    code = snippet_time.snippet()
    assert code == readme_block("## Use") and "max_reward_evaluations=500," in code


def test_a_run_is_timed_in_a_fresh_process_and_a_failing_one_is_not_reported_as_a_time():
    run = snippet_time.timed_run("print('round 0 | NRE 1/1')\nprint('round 1 | NRE 1/1')\n")
    assert run["seconds"] > 0 and run["rounds"] == 2
    with pytest.raises(RuntimeError, match="exit 3"):
        snippet_time.timed_run("raise SystemExit(3)")
