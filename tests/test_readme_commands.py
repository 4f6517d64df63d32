"""Every command the README and docs/ show is run by a test (in a reduced form where the full one takes hours or
GPUs)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_scripts() -> set[str]:
    """Repository scripts the README and docs/ tell a reader to run (`python x.py`, `accelerate launch ... x.py`)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages)
    paths = set(re.findall(r"(?:python|accelerate launch[^\n`]*?) ((?:recipes|benchmarks|scripts)/\w+\.py)", text))
    return {p for p in paths if (ROOT / p).exists()}


def test_every_readme_script_is_run_by_a_test():
    scripts = readme_scripts()
    assert {"recipes/digits_0_to_6.py", "recipes/addition_attack.py", "scripts/readme_results.py",
            "benchmarks/sparse.py", "recipes/gsm8k_hard.py", "benchmarks/defaults.py"} <= scripts
    tests = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_readme_commands.py"}
    this = Path(__file__).read_text()

    def run_somewhere(path: str) -> bool:
        folder, name = path.split("/")
        quoted = (f'"{folder}" / "{name}"', f'"{path}"', f"{folder}/{name}")
        return any(q in text for text in [*tests.values(), this] for q in quoted)

    assert not [p for p in sorted(scripts) if not run_somewhere(p)]
    assert "python -m trl_banel report" in (ROOT / "README.md").read_text()
    assert '"-m", "trl_banel", "report"' in tests["test_report.py"]
