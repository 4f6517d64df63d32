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
from trl_banel.journal import read_json_lines
from trl_banel.report import REPORT_FILENAME, ROUNDS_FILENAME, rates_by_round
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


def test_a_torn_last_line_is_skipped_and_only_its_owner_cuts_it(tmp_path):
    path = tmp_path / "x.jsonl"
    torn = json.dumps({"a": 1}) + "\n" + '{"a": '
    path.write_text(torn)
    assert read_json_lines(str(path), repair=False) == [{"a": 1}]
    assert path.read_text() == torn, "a reader of another run's file wrote to it"
    assert read_json_lines(str(path)) == [{"a": 1}]
    assert path.read_text() == json.dumps({"a": 1}) + "\n"


def test_drawn_from_files_alone(tmp_path):
    with open(tmp_path / "evaluations.jsonl", "w") as f:
        for r in range(6):
            for i in range(10):
                f.write(json.dumps(evaluation(r, i < r)) + "\n")
    path = plot_run_report(str(tmp_path))  # no rounds.jsonl: the ledger's panels alone
    assert path == str(tmp_path / REPORT_FILENAME) and Path(path).stat().st_size > 20_000
    with pytest.raises(FileNotFoundError, match="evaluations.jsonl"):
        plot_run_report(str(tmp_path / "empty"))


@pytest.mark.slow  # two runs and `python -m trl_banel report` in a subprocess
def test_a_run_writes_its_rounds_and_report(tmp_path, char_tokenizer, skewed_model, capsys):
    oracle = RecordingOracle(success=lambda c: c == "bird")
    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle, args=config(tmp_path, disable_tqdm=False),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    trainer.train()
    out = tmp_path / "out"
    rounds = read_json_lines(str(out / ROUNDS_FILENAME))
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
    rounds = [r["round"] for r in read_json_lines(str(resumed / ROUNDS_FILENAME))]
    assert rounds == list(range(more.round)) and more.round > trainer.round

    # the command line draws it again from the directory alone
    (out / REPORT_FILENAME).unlink()
    proc = subprocess.run([sys.executable, "-m", "trl_banel", "report", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(out / REPORT_FILENAME) and (out / REPORT_FILENAME).exists()


def test_the_report_of_an_interrupted_run_states_its_record(tmp_path, char_tokenizer, skewed_model, capsys):
    """Rounds, evaluations spent and lost, successes: the report says what banel_run.json and the ledger say, for a
    run that a crash (one call lost) and then Ctrl-C cut short."""
    import os
    import signal

    from trl_banel.ledger import RewardLedger
    from trl_banel.report import main, run_summary

    out = tmp_path / "out"
    out.mkdir()
    # a crash during a reward call of an earlier start: its two items are charged, never recorded
    lost_call = {"call": 0, "round": 0,
                 "items": [{"prompt": "", "completion": "qq"}, {"prompt": "", "completion": "q"}]}
    (out / "evaluations.calls.jsonl").write_text(json.dumps(lost_call) + "\n")
    calls = []

    def oracle(prompts, completions, **kwargs):
        calls.append(completions)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return [1.0 if c == "bird" else 0.0 for c in completions]

    trainer = BaNELTrainer(model=skewed_model, reward_funcs=oracle,
                           args=config(tmp_path, save_strategy="steps", max_reward_evaluations=60),
                           train_dataset=UNCONDITIONAL, processing_class=char_tokenizer)
    trainer.train()
    assert trainer.interrupted == "SIGINT"
    record = json.loads((out / "banel_run.json").read_text())
    summary = run_summary(str(out))
    assert (summary.rounds, summary.spent, summary.lost, summary.successes, summary.interrupted) == (
        record["rounds"], record["spent"], record["lost"], record["successes"], record["interrupted"])
    assert record["lost"] == 2 and record["rounds"] == 3 and 2 < record["spent"] < 60 and record["successes"] >= 1
    capsys.readouterr()
    main([str(out)])
    said = capsys.readouterr().err
    assert (f"3 rounds, {record['spent']} reward evaluations spent (2 lost in a crash" in said
            and f"{record['successes']} success" in said and "interrupted (SIGINT)" in said), said

    # a crash the run was not restarted from: the open call is charged as the next start will charge it
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    (crashed / "banel_run.json").unlink()
    open_call = {"call": 99, "round": 3, "items": [{"prompt": "", "completion": "zz"}]}
    with open(crashed / "evaluations.calls.jsonl", "a") as f:
        f.write(json.dumps(open_call) + "\n")
    summary = run_summary(str(crashed))
    ledger = RewardLedger(str(crashed / "evaluations.jsonl"), budget=60)  # settles the open call
    assert (summary.spent, summary.lost, summary.rounds) == (ledger.spent, len(ledger.lost), 4)
    assert summary.interrupted is None


def test_many_rounds_without_a_success_draw_no_barcode(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    with open(tmp_path / "evaluations.jsonl", "w") as f:
        for r in range(150):
            for _ in range(50):
                f.write(json.dumps(evaluation(r, False)) + "\n")
    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: drawn.append(fig) or close(fig))  # keep the report's figure
    plot_run_report(str(tmp_path))
    (fig,) = drawn
    (ax,) = [ax for ax in fig.axes if ax.get_title() == "success rate of the evaluated candidates"]
    assert not ax.containers, "error bars per round"
    upper = clopper_pearson(0, 7500)[1]
    assert any(f"rate < {upper:.2g}" in t.get_text() for t in ax.texts)
    assert ax.get_ylim()[1] < 0.05  # scaled to the run's bound, not to one round's interval
