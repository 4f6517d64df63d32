"""The code is clean under ruff with the project's configuration (pyproject.toml: 119 columns), in the suite so that
CI checks it; the tests check behaviour through public names only; the package imports no example code."""

import ast
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


def private_names(source: str) -> list[tuple[int, str]]:
    """(line, name) of each private attribute read or assigned, by dot or by getattr/setattr/hasattr/delattr with a
    literal name; not an object's own (`self._x`, or `super()._hook` in a subclass that extends the hook), not
    dunders, not `os._exit`. (Imports of a module's private helpers, unit-tested as such, are not attribute
    accesses.)"""
    def private(name):
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and private(node.attr):
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "os")
            inherited = (isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
                         and node.value.func.id == "super")
            if not (own or inherited):
                found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            name = node.args[1]
            mine = isinstance(node.args[0], ast.Name) and node.args[0].id == "self"
            if (func in ("getattr", "setattr", "hasattr", "delattr") and isinstance(name, ast.Constant)
                    and isinstance(name.value, str) and private(name.value) and not mine):
                found.append((node.lineno, name.value))
    return sorted(found)


# where no code reads or assigns another object's private attribute: the package, and everything that uses it
CHECKED_FOLDERS = ("trl_banel", "tests", "benchmarks", "recipes", "scripts", "examples")


def test_no_code_reads_or_assigns_another_objects_private_attribute():
    offending = []
    for folder in CHECKED_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).as_posix()
            if "results" in path.relative_to(ROOT).parts:
                continue
            offending += [f"{folder}/{rel}:{line}: {name}" for line, name in private_names(path.read_text())]
    assert not offending, "use public names:\n" + "\n".join(offending)


def test_the_private_name_check_can_fail():
    source = ("x = trainer._state\ntrainer.ledger._add = spy\nmonkeypatch.setattr(t, '_f', g)\ngetattr(t, '_g')\n"
              "self._mine = os._exit = type(x).__name__\nsetattr(t, 'public', 1)\nsuper()._save(d)\n"
              "getattr(self, '_own', None)\n")
    assert private_names(source) == [(1, "_state"), (2, "_add"), (3, "_f"), (4, "_g")]


def long_functions(source: str, limit: int = 50) -> list[tuple[str, int]]:
    """(name, lines) of each function longer than `limit` lines, from its `def` to its last line."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= limit]


def test_no_function_in_the_package_is_over_50_lines():
    """A reader holds a step of the round in mind: no function of the package runs over 50 lines."""
    offending = [f"{path.relative_to(ROOT)}: {name} ({n} lines)" for path in sorted((ROOT / "trl_banel").rglob("*.py"))
                 for name, n in long_functions(path.read_text())]
    assert not offending, "split these:\n" + "\n".join(offending)


def test_the_function_length_check_can_fail():
    body = "\n".join(f"    x{i} = {i}" for i in range(50))
    assert long_functions(f"def short():\n    pass\n\n\ndef long():\n{body}\n") == [("long", 51)]


def imported_modules(source: str) -> set[str]:
    """The absolute modules a source imports (`import a.b`, `from a.b import c`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def test_the_package_is_the_method():
    """The tasks, baselines and script helpers are the examples' distribution (examples/): the method imports none of
    them and ships no package data (its wheel holds no model weights)."""
    offending = [f"{path.relative_to(ROOT)}: {module}" for path in sorted((ROOT / "trl_banel").rglob("*.py"))
                 for module in imported_modules(path.read_text()) if module.split(".")[0] == "trl_banel_examples"]
    assert not offending, offending
    moved = ("tasks", "baselines", "plotting.py", "cli.py")
    assert not [name for name in moved if (ROOT / "trl_banel" / name).exists()]
    assert "package-data" not in (ROOT / "pyproject.toml").read_text()
    assert imported_modules("from trl_banel_examples.tasks import digits\nimport trl_banel_examples.cli") == {
        "trl_banel_examples.tasks", "trl_banel_examples.cli"}
