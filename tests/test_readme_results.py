"""README and docs figures are rendered from results files: the check fails whenever the two disagree."""

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from types import MappingProxyType

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
readme_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_results)


def test_the_readme_agrees_with_the_results_files(capsys):
    assert readme_results.main(["--check"]) == 0, capsys.readouterr().out


@pytest.fixture
def copy_of_the_repo(tmp_path):
    """Every page that holds a generated block and every results file a block is rendered from, in a scratch root."""
    for page in readme_results.pages():
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    for block in readme_results.BLOCKS.values():
        for source in block.sources:
            for path in ROOT.glob(source):
                target = tmp_path / path.relative_to(ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    return tmp_path


def test_a_changed_result_makes_the_check_fail_until_the_readme_is_rewritten(copy_of_the_repo, capsys):
    root = copy_of_the_repo
    result_path = root / readme_results.DEMO_DIR / "result.json"
    result = json.loads(result_path.read_text())
    result["improvement"] = 1234.0
    result_path.write_text(json.dumps(result))
    addition = root / readme_results.DEFAULTS_RUNS / "addition.json"
    runs = json.loads(addition.read_text())
    runs["defaults_seed1"]["final"]["rate"] = 0.0  # the addition recipe's seed 1 now ends below 100x (whatever it was)
    addition.write_text(json.dumps(runs))
    digits = root / readme_results.DEFAULTS_RUNS / "digits.json"
    runs = json.loads(digits.read_text())
    runs["defaults_seed1"]["final"]["rate"] = 0.0  # and the digits demo's settings failed on one seed
    digits.write_text(json.dumps(runs))
    before = _block(root, "addition-demo-seeds")

    assert readme_results.main(["--check", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "+improvement                    1,234x over the calibrated rate" in out
    assert "out of date: README.md: demo, demo-seeds; docs/benchmarks.md: addition-demo-seeds; run:" in out
    assert readme_results.main(["--root", str(root)]) == 0  # rewrite
    assert readme_results.main(["--check", "--root", str(root)]) == 0
    assert "1,234x" in _block(root, "demo")
    after = _block(root, "addition-demo-seeds")
    assert after != before and "below 100x" in after and "0x" in after
    assert "ended at success rates 0.000-" in _block(root, "demo-seeds")


def test_a_changed_config_field_makes_the_check_fail_until_the_reference_is_rewritten(copy_of_the_repo, capsys,
                                                                                      monkeypatch):
    from trl_banel import BaNELConfig  # the class the configuration reference is rendered from

    root = copy_of_the_repo
    field = next(f for f in dataclasses.fields(BaNELConfig) if f.name == "max_reward_evaluations")
    monkeypatch.setattr(field, "default", 1234)
    monkeypatch.setattr(field, "metadata", MappingProxyType({**field.metadata, "help": "A changed help."}))
    row = "| `max_reward_evaluations` | `1234` | A changed help. |"
    assert readme_results.main(["--check", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"+{row}" in out and "out of date: docs/configuration.md: config-table; run:" in out
    assert readme_results.main(["--root", str(root)]) == 0  # rewrite
    assert readme_results.main(["--check", "--root", str(root)]) == 0
    assert row in _block(root, "config-table")


def _block(root: Path, name: str) -> str:
    text = (root / readme_results.BLOCKS[name].page).read_text()
    return text.split(f"<!-- generated: {name} -->")[1].split(f"<!-- /generated: {name} -->")[0]


def test_blocks_and_markers_must_match(copy_of_the_repo):
    page = readme_results.BLOCKS["defaults-table"].page
    text = (copy_of_the_repo / page).read_text()
    cut = text.replace("<!-- generated: defaults-table -->\n", "").replace(
        "<!-- /generated: defaults-table -->\n", "")
    with pytest.raises(ValueError, match=r"missing \['defaults-table'\]"):
        readme_results.regenerate(cut, copy_of_the_repo, page)
    # a block's markers on a page other than its own are refused, naming where it belongs
    with pytest.raises(ValueError, match=rf"unknown \['defaults-table'\] \(their pages: .*{page}"):
        readme_results.regenerate("<!-- generated: defaults-table -->\n<!-- /generated: defaults-table -->\n",
                                  copy_of_the_repo, "docs/another_page.md")
    demo_page = readme_results.BLOCKS["demo"].page
    (copy_of_the_repo / readme_results.DEMO_DIR / "result.json").unlink()
    with pytest.raises(FileNotFoundError, match="--rerun-demo"):
        readme_results.regenerate((copy_of_the_repo / demo_page).read_text(), copy_of_the_repo, demo_page)


def test_links_in_a_block_are_relative_to_its_page():
    text = "![a](benchmarks/results/x.png) [b](https://example.org/y) [c](#z) [d](docs/e.md)"
    assert readme_results.relink(text, "README.md") == text
    assert readme_results.relink(text, "docs/benchmarks.md") == (
        "![a](../benchmarks/results/x.png) [b](https://example.org/y) [c](#z) [d](e.md)")


def test_a_rerun_demo_keeps_its_results_and_leaves_the_model_and_the_ledger_in_its_run_folder(tmp_path, capsys):
    run, folder = tmp_path / "runs" / "demo", tmp_path / "benchmarks" / "results" / "demo"
    (run / "best_generator").mkdir(parents=True)
    names = ["result.json", "banel_run.json", "rounds.jsonl", "success_curve.json", "digits_grid.png",
             "run_report.png", "model.safetensors", "config.json", "evaluations.jsonl", "evaluations.calls.jsonl",
             "best_generator/model.safetensors"]
    for name in names:
        (run / name).write_text(name)
    folder.mkdir(parents=True)
    (folder / "evaluations.jsonl").write_text("the previous run's")  # replaced, not merged
    kept = readme_results.keep_results(run, folder)
    assert kept == ["banel_run.json", "digits_grid.png", "result.json", "rounds.jsonl", "run_report.png",
                    "success_curve.json"]
    assert sorted(p.name for p in folder.iterdir()) == kept and (folder / "result.json").read_text() == "result.json"
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == sorted(names)  # run untouched
    assert readme_results.DEMO_RUN_DIRS == {"demo": "runs/demo", "addition-demo": "runs/addition_demo"}
