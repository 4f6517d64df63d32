"""How much of the distillation draw the ratio test rejects on tasks where every sample fails.

    python benchmarks/draw_rejection.py                      # hard attack and rare letters, seeds 0-2, 6 rounds
    python benchmarks/draw_rejection.py --quick --out /tmp/dr   # a smoke test (one task, seed, 2 rounds)

On a task whose generator essentially never succeeds, everything BaNEL's failure model is fitted on is a failure,
and so is (almost) everything the generator proposes: a region that rejects a large share of the generator's fresh
samples in the distillation draw is an arbitrary region, and maximum likelihood on the rest walks the generator off
the strings it did not sample (docs/benchmarks.md, "The hard attack"). This benchmark measures that share: BaNEL at
the posterior objective with the ratio test at tau = 0.97 (the hard attack: the addition attack's settings, which
were the hard attack's before benchmarks/round_variants.py; rare letters: its own settings) for a few rounds,
reading each distillation's `distill/acceptance_rate` (the share of its draw that passed the filter; known failures
are rejected too, but the draw's fresh samples are nearly all new on these tasks) and each round's fit log-ratio.

Writes OUT/draw_rejection.{json,md,png}.
"""

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from benchmarks.common import TASKS, banel_settings, parse_args, write_markdown  # noqa: E402
from benchmarks.round_variants import BASES  # noqa: E402
from trl_banel import BaNELConfig, BaNELTrainer  # noqa: E402


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: list(BASES), metadata={"help": "Tasks to run."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds."})
    rounds: int = field(default=6, metadata={"help": "Rounds (each ends with a distillation) per run."})
    out: str = field(default=str(ROOT / "benchmarks" / "results"), metadata={"help": "Results folder."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: hard attack, seed 0, 2 rounds."})


QUICK = dict(tasks=["hard_attack"], seeds=[0], rounds=2)


def run(task_name: str, seed: int, rounds: int) -> dict:
    task = TASKS[task_name]()
    generator, tok, oracle = task.load()
    settings = {**banel_settings(BASES[task_name], seed), "num_rounds": rounds, "stop_after_successes": None,
                "max_reward_evaluations": rounds * BASES[task_name]["evaluations_per_round"], "logging_steps": 1,
                "output_dir": tempfile.mkdtemp(prefix=f"draw_rejection_{task_name}_"), "disable_tqdm": True}
    trainer = BaNELTrainer(model=generator, reward_funcs=oracle, args=BaNELConfig(**settings), processing_class=tok,
                           train_dataset=Dataset.from_dict({"prompt": [""]}))
    trainer.train()
    accepted = [v for log in trainer.state.log_history for k, v in log.items() if k == "distill/acceptance_rate"]
    return {"task": task_name, "seed": seed, "rejected": [1 - a for a in accepted],
            "fit_log_ratio": [h.get("failure/fit_log_ratio") for h in trainer.history],
            "successes": len(trainer.ledger.successes),
            "settings": {k: getattr(trainer.args, k) for k in ("rejection_threshold", "distill_objective",
                                                               "distill_samples", "evaluations_per_round")}}


def main(args: Args) -> dict:
    torch.set_num_threads(1)
    runs = [run(t, s, args.rounds) for t in args.tasks for s in args.seeds]
    summary = {}
    for t in args.tasks:
        shares = [x for r in runs if r["task"] == t for x in r["rejected"]]
        summary[t] = {"min": min(shares), "median": float(np.median(shares)), "max": max(shares),
                      "distillations": len(shares), "seeds": args.seeds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"rounds": args.rounds, "summary": summary, "runs": runs}
    (out / "draw_rejection.json").write_text(json.dumps(result, indent=1))
    lines = ["# The distillation draw: the share the ratio test rejects when every sample fails", "",
             f"BaNEL at the posterior objective, tau = 0.97, {args.rounds} rounds per seed; each distillation's share "
             "of its draw that the filter rejected.", "",
             "| task | seeds | distillations | rejected: min | median | max | successes found |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for t, s in summary.items():
        found = sum(r["successes"] for r in runs if r["task"] == t)
        lines.append(f"| {t} | {len(s['seeds'])} | {s['distillations']} | {s['min']:.0%} | {s['median']:.0%} | "
                     f"{s['max']:.0%} | {found} |")
    write_markdown(out / "draw_rejection.md", lines)
    plot(runs, out / "draw_rejection.png")
    return result


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    colours = {t: f"C{i}" for i, t in enumerate(dict.fromkeys(r["task"] for r in runs))}
    for r in runs:
        ax.plot(range(1, len(r["rejected"]) + 1), r["rejected"], marker="o", color=colours[r["task"]],
                label=r["task"] if r["seed"] == runs[0]["seed"] else None, alpha=0.8)
    ax.set(xlabel="distillation", ylabel="share of the draw rejected", ylim=(0, 1),
           title="Ratio test (tau = 0.97) on the distillation draw, every sample a failure")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(parse_args(Args, QUICK))
