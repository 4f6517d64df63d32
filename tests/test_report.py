"""The run report: per-round log, figure, and the function that draws it from a finished output_dir."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer import UNCONDITIONAL, RecordingOracle, config

from trl_banel import BaNELTrainer, plot_run_report
from trl_banel.report import REPORT_FILENAME, ROUNDS_FILENAME, rates_by_round, read_jsonl
from trl_banel.stats import clopper_pearson

ROOT = Path(__file__).resolve().parents[1]


def evaluation(round_, success):
    return {"prompt": "", "completion": f"{round_}-{success}", "reward": float(success), "success": success,
            "round": round_}


def test_rates_by_round_follow_the_ledger_order():
    ledger = [evaluation(0, False)] * 3 + [evaluation(1, True), evaluation(1, False)] + [evaluation(3, True)]
    rates = rates_by_round(ledger)
    assert [(r.round, r.nre, r.evaluated, r.successes) for r in rates] == [(0, 3, 3, 0), (1, 5, 2, 1), (3, 6, 1, 1)]
    assert (rates[1].low, rates[1].high) == clopper_pearson(1, 2) and rates[1].rate == 0.5


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"a": ')
    assert read_jsonl(str(path)) == [{"a": 1}]


def test_drawn_from_files_alone(tmp_path):
    with open(tmp_path / "evaluations.jsonl", "w") as f:
        for r in range(6):
            for i in range(10):
                f.write(json.dumps(evaluation(r, i < r)) + "\n")
    path = plot_run_report(str(tmp_path))  # no rounds.jsonl: the ledger's panels alone
    assert path == str(tmp_path / REPORT_FILENAME) and Path(path).stat().st_size > 20_000
    with pytest.raises(FileNotFoundError, match="evaluations.jsonl"):
        plot_run_report(str(tmp_path / "empty"))


def test_a_run_writes_its_rounds_and_report(tmp_path, char_tokenizer, skewed_model, capsys):
    oracle = RecordingOracle(success=lambda c: c == "bird")
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=config(tmp_path, disable_tqdm=False),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    trainer.train()
    out = tmp_path / "out"
    rounds = read_jsonl(str(out / ROUNDS_FILENAME))
    assert [r["round"] for r in rounds] == [h["round"] for h in trainer.history] == list(range(trainer.round))
    assert rounds[-1]["nre"] == trainer.ledger.spent and "acceptance_rate" in rounds[0]
    assert (out / REPORT_FILENAME).stat().st_size > 20_000
    console = capsys.readouterr().out
    assert f"run report: {out / REPORT_FILENAME}" in console
    # the console's "(+n)" counts successes paid for, not repeats of a known success answered free by the ledger
    new = [int(m) for m in re.findall(r"^round \d+ \| .* \(\+(\d+)\)", console, re.M)]
    assert len(new) == trainer.round and sum(new) == len(trainer.ledger.successes) >= 1

    # a run resumed on these files (as after a crash, with a bigger budget) appends its own rounds, not the loaded ones
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("evaluations.jsonl", ROUNDS_FILENAME):
        shutil.copy(out / name, resumed / name)
    more = BaNELTrainer(model=skewed_model, reward_funcs=oracle,
                        args=config(tmp_path, output_dir=str(resumed), max_reward_evaluations=40),
                        train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    more.train()
    rounds = [r["round"] for r in read_jsonl(str(resumed / ROUNDS_FILENAME))]
    assert rounds == list(range(more.round)) and more.round > trainer.round

    # the command line draws it again from the directory alone
    (out / REPORT_FILENAME).unlink()
    proc = subprocess.run([sys.executable, "-m", "trl_banel", "report", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(out / REPORT_FILENAME) and (out / REPORT_FILENAME).exists()
