"""Each recipe's --help starts with one line that says what it does (its docstring's first line)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.py"))

SCRIPT = """
import contextlib, io, runpy, sys
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit:
            pass
    print(repr(buffer.getvalue().splitlines()[0]))
"""


@pytest.mark.slow  # every recipe's --help, each in a subprocess
def test_help_starts_with_what_the_recipe_does():
    assert len(RECIPES) >= 4
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, RECIPES)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_lines = [ast.literal_eval(line) for line in proc.stdout.splitlines() if line.startswith(("'", '"'))]
    for path, line in zip(RECIPES, first_lines, strict=True):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert line == doc.splitlines()[0] and line.endswith("."), (path.name, line)
