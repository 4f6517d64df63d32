"""The run report: one figure of a finished run, drawn from the files in its `output_dir` (no oracle call).

    python -m trl_banel report runs/my_run          # writes runs/my_run/run_report.png

The trainer draws it at the end of `train()`. It reads the ledger (`evaluations.jsonl`: what every reward evaluation
returned, in the order they were paid for), its journal (`evaluations.calls.jsonl`: the calls a crash cut short, whose
evaluations were charged and never recorded) and the per-round log (`rounds.jsonl`, written by the trainer as the
rounds end), so it works the same for a run launched by `accelerate launch`, a resumed run, an interrupted run or a run
that crashed, and states the rounds, the evaluations spent and those lost as the run's record (`banel_run.json`) does.
Nothing is written but the figure: the files of a run still going are only read.
"""

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass

from transformers import TrainerCallback

from .journal import LostEvaluation, lost_items, read_json_lines, replay, unanswered
from .stats import clopper_pearson

logger = logging.getLogger(__name__)

LEDGER_FILE = "evaluations.jsonl"  # the ledger's file name (trl_banel.ledger.LEDGER_FILENAME)
JOURNAL_FILE = "evaluations.calls.jsonl"  # its journal (trl_banel.ledger.journal_path)
RUN_FILE = "banel_run.json"  # the run's record when train() returned (trl_banel.runs.RUN_FILENAME)
ROUNDS_FILENAME = "rounds.jsonl"
REPORT_FILENAME = "run_report.png"


@dataclass
class RoundRate:
    """The success rate of one round's evaluated candidates, with its Clopper-Pearson interval."""

    round: int
    nre: int  # reward evaluations spent at the end of the round
    evaluated: int
    successes: int
    low: float
    high: float

    @property
    def rate(self) -> float:
        return self.successes / self.evaluated


def rates_by_round(evaluations: list[dict], confidence: float = 0.95) -> list[RoundRate]:
    """Group the ledger's evaluations (in the order they were paid for) by round."""
    out: list[RoundRate] = []
    for nre, e in enumerate(evaluations, 1):
        if not out or out[-1].round != e["round"]:
            out.append(RoundRate(e["round"], nre, 0, 0, 0.0, 1.0))
        r = out[-1]
        r.nre, r.evaluated, r.successes = nre, r.evaluated + 1, r.successes + bool(e["success"])
    for r in out:
        r.low, r.high = clopper_pearson(r.successes, r.evaluated, confidence)
    return out


@dataclass
class RunSummary:
    """What a run's files say it did: the figures its report states."""

    rounds: int  # rounds run (the next round's index)
    spent: int  # reward evaluations charged: recorded plus lost
    recorded: int  # evaluations with a reward in the ledger
    lost: int  # charged, reward never recorded (in flight at a crash)
    successes: int
    interrupted: str | None = None  # the signal that stopped the run's last train(), if one did

    def line(self) -> str:
        lost = f" ({self.lost:,} lost in a crash: charged, reward unknown)" if self.lost else ""
        stopped = f"; interrupted ({self.interrupted})" if self.interrupted else ""
        return (f"{self.rounds} round{'' if self.rounds == 1 else 's'}, {self.spent:,} reward evaluations spent"
                f"{lost}, {self.successes} success{'' if self.successes == 1 else 'es'}{stopped}")


def lost_evaluations(output_dir: str, evaluations: list[dict]) -> list[LostEvaluation]:
    """The evaluations charged and never recorded, from the journal: those a start found lost (its `lost` lines), and
    those of calls still open (a crash the run was not restarted from; the next start will charge them). Read-only."""
    open_calls, lost, _ = replay(read_json_lines(os.path.join(output_dir, JOURNAL_FILE), repair=False))
    recorded = {(e["prompt"], e["completion"]) for e in evaluations}
    for call, intent in open_calls.items():
        lost += lost_items(unanswered(intent, lambda p, c: (p, c) in recorded), intent["round"], call)
    return lost


def run_summary(output_dir: str) -> RunSummary:
    """The rounds, evaluations spent and lost, and successes of the run in `output_dir`, from its ledger, journal and
    per-round log (not from `banel_run.json`, which a crash leaves out of date; its `interrupted` is taken only when
    the ledger has not grown since it was written)."""
    return _summary(output_dir, read_json_lines(os.path.join(output_dir, LEDGER_FILE), repair=False),
                    read_json_lines(os.path.join(output_dir, ROUNDS_FILENAME), repair=False))


def _summary(output_dir: str, evaluations: list[dict], rounds: list[dict]) -> RunSummary:
    """[`run_summary`] from the ledger's and the per-round log's lines, already read."""
    lost = lost_evaluations(output_dir, evaluations)
    last = max([r["round"] for r in rounds] + [e["round"] for e in evaluations] + [x.round for x in lost],
               default=-1)
    summary = RunSummary(rounds=last + 1, spent=len(evaluations) + len(lost), recorded=len(evaluations),
                         lost=len(lost), successes=sum(bool(e["success"]) for e in evaluations))
    record = os.path.join(output_dir, RUN_FILE)
    if os.path.isfile(record):
        with open(record, encoding="utf-8") as f:
            finished = json.load(f)
        if finished.get("spent") == summary.spent:
            summary.interrupted = finished.get("interrupted")
    return summary


def plot_run_report(output_dir: str, path: str | None = None) -> str:
    r"""
    Draw the report of a BaNEL run from its `output_dir` and return the figure's path.

    The title states what [`run_summary`] reads: rounds, evaluations spent (recorded and lost) and successes. Four
    panels: the successes found against reward evaluations (NRE); the success rate of all the evaluations so far with
    its 95% Clopper-Pearson band, and each round's rate; the filter's acceptance rate (and what
    it rejected) per round; the failure fit's margin (mean `log p_fail - log q` over its negatives after the fit) and
    the generator's per-token entropy per round. Everything comes from `evaluations.jsonl` and `rounds.jsonl`.

    Args:
        output_dir (`str`): the run's `output_dir`.
        path (`str`, *optional*): where to write the figure; defaults to `output_dir/run_report.png`.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: runs on servers with no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    evaluations = read_json_lines(os.path.join(output_dir, LEDGER_FILE), repair=False)
    rounds = read_json_lines(os.path.join(output_dir, ROUNDS_FILENAME), repair=False)
    if not evaluations and not rounds:
        raise FileNotFoundError(f"{output_dir} holds neither {LEDGER_FILE} nor {ROUNDS_FILENAME}: is it the "
                                "output_dir of a BaNEL run?")
    path = path or os.path.join(output_dir, REPORT_FILENAME)
    summary = _summary(output_dir, evaluations, rounds)
    found = summary.successes
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_found, ax_rate), (ax_accept, ax_fit) = axes
    _plot_found(ax_found, evaluations, found, summary.lost)
    per_round = rates_by_round(evaluations)
    _plot_rates(ax_rate, per_round)
    _plot_rounds(ax_accept, ax_fit, rounds)
    for ax in (ax_accept, ax_fit):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_found.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"BaNEL run {os.path.basename(os.path.abspath(output_dir))}: {summary.line()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_found(ax, evaluations: list[dict], found: int, lost: int = 0):
    """Successes found against NRE (the evaluations with a reward, in the order they were paid for): the run's
    output."""
    x, y, total = [0], [0], 0
    for nre, e in enumerate(evaluations, 1):
        if e["success"]:
            x += [nre, nre]
            y += [total, total + 1]
            total += 1
    x.append(len(evaluations))
    y.append(total)
    ax.plot(x, y, color="C2", lw=2)
    ax.set_title(f"successes found: {found} in {len(evaluations):,} evaluations"
                 + (f" (+{lost:,} lost)" if lost else ""))
    ax.set_xlabel("reward evaluations (NRE)")
    ax.set_ylabel("successes found (cumulative)")
    ax.set_ylim(bottom=0, top=max(1, total) * 1.1)
    if not total:
        ax.text(0.5, 0.5, "no success yet", ha="center", va="center", transform=ax.transAxes, color="grey")


def _plot_rates(ax, per_round: list):
    """The success rate of everything evaluated so far, with its 95% Clopper-Pearson band, against NRE; each round's
    rate as a thin line under it. No per-round error bars: over a hundred rounds without a success they drew a
    barcode; the cumulative band says what those rounds bound (without a success, its top is the upper bound)."""
    if per_round:
        nre = [r.nre for r in per_round]
        cum_s = cum_n = 0
        cum, cum_low, cum_high = [], [], []
        for r in per_round:
            cum_s, cum_n = cum_s + r.successes, cum_n + r.evaluated
            low, high = clopper_pearson(cum_s, cum_n)
            cum.append(cum_s / cum_n)
            cum_low.append(low)
            cum_high.append(high)
        rate = [r.rate for r in per_round]
        ax.plot(nre, rate, color="C0", lw=0.8, alpha=0.6, marker="o" if len(per_round) <= 40 else None, ms=3,
                label="each round's evaluations")
        ax.plot(nre, cum, color="C3", lw=1.8, label="all evaluated so far (band: 95% Clopper-Pearson)")
        ax.fill_between(nre, cum_low, cum_high, color="C3", alpha=0.2)
        if not cum_s:
            ax.text(0.98, 0.95, f"no success in {cum_n:,}: rate < {cum_high[-1]:.2g} (95%)", ha="right", va="top",
                    transform=ax.transAxes, fontsize=9, color="C3")
        # scaled to the estimates and the run's final band: the wide bands of the first rounds run off the top
        ax.set_ylim(0, min(1.02, 1.3 * max(max(rate), max(cum), cum_high[-1], 0.02)))
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title("success rate of the evaluated candidates")
    ax.set_xlabel("reward evaluations (NRE)")
    ax.set_ylabel("success rate")


def _per_round_line(ax, rounds: list[dict], key: str, label: str, color: str) -> bool:
    points = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
    if points:
        ax.plot(*zip(*points), marker="o", ms=3, color=color, label=label)
    return bool(points)


def _plot_rounds(ax_accept, ax_fit, rounds: list[dict]):
    """Per round: the filter's acceptance rate and what it rejected; the failure fit's margin and the generator's
    entropy."""
    if rounds:
        _per_round_line(ax_accept, rounds, "acceptance_rate", "accepted", "C0")
        known = [{"round": r["round"], "k": r["known_rejected"] / r["proposed"]} for r in rounds
                 if r.get("proposed") and "known_rejected" in r]
        if known:
            ax_accept.plot([k["round"] for k in known], [k["k"] for k in known], marker="o", ms=3, color="C7",
                           label="rejected: known failures")
        _per_round_line(ax_accept, rounds, "filter/ratio_rejected_rate",
                        "rejected by the ratio test (fresh proposals)", "C1")
        ax_accept.set_ylim(-0.02, 1.02)
        ax_accept.legend(fontsize=8)
        drawn = _per_round_line(ax_fit, rounds, "failure/fit_log_ratio", "failure-fit margin (log p_fail - log q)",
                                "C4")
        drawn |= _per_round_line(ax_fit, rounds, "generator/entropy", "generator entropy (per token)", "C5")
        if drawn:
            ax_fit.legend(fontsize=8)
    else:
        for ax in (ax_accept, ax_fit):
            ax.text(0.5, 0.5, f"no {ROUNDS_FILENAME} in this directory", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    ax_accept.set_title("posterior filter, per round")
    ax_accept.set_xlabel("round")
    ax_accept.set_ylabel("share of the proposals")
    ax_fit.set_title("failure fit and generator, per round")
    ax_fit.set_xlabel("round")
    ax_fit.set_ylabel("nats")


class RunReportCallback(TrainerCallback):
    """Writes each round of `trainer.history` to `output_dir/rounds.jsonl` and draws the run report after training.

    Added by the trainer; only the main process writes. Rounds already in the file (a resumed run) are not repeated.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.path = os.path.join(trainer.args.output_dir, ROUNDS_FILENAME)
        self.report_path: str | None = None
        self._last_round = max((r["round"] for r in read_json_lines(self.path)), default=-1)

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        new = [r for r in self.trainer.history if r["round"] > self._last_round]
        if new:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(self.path, "a") as f:
                for record in new:
                    f.write(json.dumps(record, default=float) + "\n")
            self._last_round = new[-1]["round"]

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.on_step_end(args, state, control)
        try:
            self.report_path = plot_run_report(args.output_dir)
        except Exception as e:  # a figure must never cost the user a finished run
            logger.warning("Could not draw the run report in %s: %s", args.output_dir, e)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trl_banel report",
                                     description="Draw the report figure of a BaNEL run from its output_dir.")
    parser.add_argument("output_dir", help="the run's output_dir (holds evaluations.jsonl and rounds.jsonl)")
    parser.add_argument("--out", default=None, help=f"figure path; default: OUTPUT_DIR/{REPORT_FILENAME}")
    args = parser.parse_args(argv)
    path = plot_run_report(args.output_dir, args.out)
    print(f"{args.output_dir}: {run_summary(args.output_dir).line()}", file=sys.stderr)  # stdout: the path alone
    print(path)
