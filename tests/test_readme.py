"""The README is what a new user runs: keep it and CI honest."""

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from trl.trainer.base_config import _BaseConfig

from trl_banel import BaNELConfig

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 -e ".[test]" -e ./examples && python -m pytest -q'
    assert command in readme and command in ci
    # the README's command runs the fast tests; CI then runs the slow ones, which the README names as the full suite
    slow = "python -m pytest -q -m slow"
    assert f"{command} && {slow}" in ci and slow in readme
    assert "addopts = \"-ra -m 'not slow'\"" in (ROOT / "pyproject.toml").read_text()
    assert "pip install torch==2.13.0 -e . -e ./examples && python recipes/digits_0_to_6.py" in readme


def test_every_banel_field_is_documented():
    # the configuration reference lists each BaNEL field in a row of its own
    reference = (ROOT / "docs" / "configuration.md").read_text()
    base = {f.name for f in fields(_BaseConfig)}
    missing = [f.name for f in fields(BaNELConfig) if f.name not in base and f"| `{f.name}` |" not in reference]
    assert not missing, missing


def test_the_readme_is_short():
    # a README for users: what to do, and links to docs/ for the rest
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not `-` or `_`), spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (a `# comment` there is no heading, a link there no link)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(page), flags=re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(pages: list[Path]) -> tuple[list[str], int]:
    """Relative links and images of `pages` whose file, or whose heading in a Markdown file, does not exist; and how
    many relative links there are."""
    broken, count = [], 0
    for page in pages:
        text = re.sub(r"`[^`\n]*`", "", _prose(page))  # nor in a code span
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", link):  # a URL
                continue
            count += 1
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.is_file():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{page.name}: {link} (no such heading)")
    return broken, count


def test_every_relative_link_points_at_an_existing_file_and_heading():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert {"round.md", "guarantees.md", "benchmarks.md", "recipes.md", "configuration.md"} <= {p.name for p in pages}
    broken, count = broken_links(pages)
    assert count > 20 and not broken, broken


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## A heading: with `code`\n\n```bash\n# not a heading\n```\n")
    assert _anchors(tmp_path / "a.md") == {"top", "a-heading-with-code"}
    (tmp_path / "b.md").write_text("[x](a.md#a-heading-with-code) [y](a.md#not-a-heading) ![z](missing.png) "
                                   "[w](https://example.org) `[v](in_code.md)` [u](#top)\n\n# Top\n")
    assert broken_links([tmp_path / "b.md"]) == (["b.md: a.md#not-a-heading (no such heading)",
                                                  "b.md: missing.png (no such file)"], 4)


def readme_block(heading: str, language: str = "python") -> str:
    """The first fenced code block of `language` after `heading` in README.md."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"```{language}\n", readme.index(heading)) + len(language) + 4
    return readme[start : readme.index("```\n", start)]


@pytest.mark.slow  # the README's snippet run in a subprocess
def test_the_use_snippet_runs_as_written(tmp_path):
    # exactly the README's code, with a smaller budget (the only change), run as a new user would: a fresh process,
    # the working directory as output location, torch's own thread settings
    code = readme_block("## Use")
    assert code.count("max_reward_evaluations=500,") == 1
    (tmp_path / "snippet.py").write_text(code.replace("max_reward_evaluations=500,", "max_reward_evaluations=50,"))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples")]))
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "banel_addition"
    assert len((out / "evaluations.jsonl").read_text().splitlines()) == 50
    assert (out / "run_report.png").exists() and (out / "model.safetensors").exists()
    assert "arxiv" in (out / "README.md").read_text().lower()  # the model card cites the paper
    # two rounds of 25 at the defaults, then the printed successes
    assert "round 1 | NRE 50/50" in proc.stdout and proc.stdout.rstrip().endswith("]")
    # the console says only what matters: no warning of a dependency (FutureWarnings, transformers' logger), and
    # the package's own advice on a line of its own, not glued to the progress bar
    said = [line.strip() for line in re.split(r"[\r\n]+", proc.stderr) if line.strip()]
    bars = re.compile(r"^(Loading weights|reward evaluations|Writing model shards):\s+\d+%\|.*\]$")  # a bar alone
    others = [line for line in said if not bars.match(line) and "real_accelerator.py" not in line]  # DeepSpeed's
    assert all(line.startswith("No success in 50 reward evaluations.") for line in others), others
    assert "\nNo success in" in proc.stderr or "No success in" not in proc.stderr
