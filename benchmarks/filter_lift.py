"""Does one failure model steer the posterior towards successes? The filter's lift, exactly, on the rare-letters task.

    python benchmarks/filter_lift.py                 # 10 draws per setting (about 5 minutes on one core)
    python benchmarks/filter_lift.py --quick --out /tmp/lift

One round in isolation: draw negatives from the pretrained generator q (on this task every sample is a failure, as in
a real round), fit a failure model p on them, and measure, exactly, what the ratio test does:

- `acceptance`: the share of fresh proposals it accepts (on `fresh` samples of q);
- `success_acceptance`: the share of q's success mass it accepts (every success string is scored: exact);
- `lift = success_acceptance / acceptance`: the factor by which the posterior's success probability exceeds q's.
  Above 1 the failure model steers towards successes; below 1 it steers away from them.

Settings: the package's default fit (20 epochs of batch 16 at 3e-3) and a fit to a margin of 1 nat (full batches
at 1e-3, clipping, warm-up), each on 50 negatives (a round) and 500 (ten rounds, as `cumulative_negatives` would).
Results: benchmarks/results/filter_lift.{json,md,png}.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import HfArgumentParser, set_seed  # noqa: E402

from benchmarks.common import write_markdown  # noqa: E402
from trl_banel import BaNELConfig, BaNELTrainer  # noqa: E402
from trl_banel.posterior import rejection_mask  # noqa: E402
from trl_banel.sampler import Candidate  # noqa: E402
from trl_banel_examples.tasks.letters import load_letters_task, success_strings  # noqa: E402

SETTINGS = {
    "default fit": dict(max_epochs=20, learning_rate=3e-3, batch_size=16),
    "fit to 1 nat": dict(max_epochs=300, learning_rate=1e-3, batch_size=64, margin=1.0, max_grad_norm=1.0,
                         warmup_steps=10),
}


@dataclass
class Args:
    draws: int = field(default=10, metadata={"help": "Independent negative sets per setting."})
    negatives: list[int] = field(default_factory=lambda: [50, 500], metadata={"help": "Negatives per fit."})
    fresh: int = field(default=20_000, metadata={"help": "Fresh proposals to measure the acceptance on."})
    tau: float = field(default=0.97, metadata={"help": "The ratio test's threshold."})
    out: str = field(default=str(ROOT / "benchmarks" / "results"), metadata={"help": "Results folder."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: 2 draws of 50 negatives."})


def as_candidates(trainer, strings):
    tok = trainer.processing_class
    return trainer.sampler.collate([Candidate(prompt="", prompt_text="", completion=s, row=0,
                                              completion_ids=tok(s, add_special_tokens=False)["input_ids"]
                                              + [tok.eos_token_id], prompt_ids=[tok.bos_token_id])
                                    for s in strings])


def main(args: Args) -> dict:
    if args.quick:
        args.draws, args.negatives, args.fresh = 2, [50], 2000
    torch.set_num_threads(1)
    set_seed(0)
    model, tok, oracle = load_letters_task()
    trainer = BaNELTrainer(model, oracle, processing_class=tok, train_dataset=Dataset.from_dict({"prompt": [""]}),
                           args=BaNELConfig(output_dir="/tmp/filter_lift", use_cpu=True, report_to="none",
                                            max_completion_length=9, seed=0, disable_tqdm=True))
    successes = as_candidates(trainer, success_strings(oracle.min_a))
    fresh = trainer.sampler.collate(trainer.sampler.propose(args.fresh))
    rows = []
    for name, fit in SETTINGS.items():
        for n in args.negatives:
            for draw in range(args.draws):
                negatives = trainer.sampler.collate(trainer.sampler.propose(n))
                trainer.failures.add()
                start = time.perf_counter()
                result = trainer.failures.fit(negatives, seed=draw, **fit)
                seconds = time.perf_counter() - start
                q_n, p_n = trainer.failures.score(negatives, 4096)  # the margin reached, exactly
                q_s, p_s = trainer.failures.score(successes, 4096)
                q_f, p_f = trainer.failures.score(fresh, 4096)
                trainer.failures.clear()
                mass = q_s.exp()
                success_acceptance = float((mass * ~rejection_mask(q_s, p_s, args.tau)[0]).sum() / mass.sum())
                acceptance = float((~rejection_mask(q_f, p_f, args.tau)[0]).float().mean())
                rows.append({"setting": name, "negatives": n, "draw": draw, "fit_steps": result.steps,
                             "fit_log_ratio": float((p_n[-1] - q_n).mean()), "fit_seconds": seconds,
                             "acceptance": acceptance, "success_acceptance": success_acceptance,
                             "lift": success_acceptance / acceptance if acceptance else float("nan")})
                print(f"{name}, {n} negatives, draw {draw}: lift {rows[-1]['lift']:.2f} (acceptance {acceptance:.2f},"
                      f" success mass accepted {success_acceptance:.2f}; {result.steps} steps, "
                      f"{rows[-1]['fit_log_ratio']:.2f} nats)", flush=True)
    summary = []
    for name in SETTINGS:
        for n in args.negatives:
            rs = [r for r in rows if r["setting"] == name and r["negatives"] == n]
            lifts = np.array([r["lift"] for r in rs])
            summary.append({"setting": name, "negatives": n, "draws": len(rs),
                            "lift_geometric_mean": float(np.exp(np.mean(np.log(lifts)))),
                            "lift_min": float(lifts.min()), "lift_max": float(lifts.max()),
                            "draws_lift_above_1": int((lifts > 1).sum()),
                            "acceptance_mean": float(np.mean([r["acceptance"] for r in rs])),
                            "fit_steps_mean": float(np.mean([r["fit_steps"] for r in rs])),
                            "fit_log_ratio_mean": float(np.mean([r["fit_log_ratio"] for r in rs])),
                            "fit_seconds_mean": float(np.mean([r["fit_seconds"] for r in rs]))})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "filter_lift.json").write_text(json.dumps({"summary": summary, "draws": rows, "settings": SETTINGS,
                                                       "tau": args.tau, "fresh": args.fresh}, indent=1) + "\n")
    lines = ["| fit | negatives | draws | lift (geometric mean) | min | max | draws with lift > 1 | acceptance | "
             "fit steps | fit log-ratio | fit seconds |", "|" + "---|" * 11]
    for s in summary:
        lines.append(f"| {s['setting']} | {s['negatives']} | {s['draws']} | {s['lift_geometric_mean']:.2f} | "
                     f"{s['lift_min']:.2f} | {s['lift_max']:.2f} | {s['draws_lift_above_1']} | "
                     f"{s['acceptance_mean']:.2f} | {s['fit_steps_mean']:.0f} | {s['fit_log_ratio_mean']:.2f} | "
                     f"{s['fit_seconds_mean']:.1f} |")
    write_markdown(out / "filter_lift.md", lines)
    _plot(rows, out / "filter_lift.png")
    return {"summary": summary}


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["setting"], r["negatives"]) for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, g in enumerate(groups):
        lifts = [r["lift"] for r in rows if (r["setting"], r["negatives"]) == g]
        ax.scatter([i] * len(lifts), lifts, alpha=0.7)
    ax.axhline(1.0, color="gray", linestyle="--")
    ax.set_xticks(range(len(groups)), [f"{s}\n{n} negatives" for s, n in groups])
    ax.set(yscale="log", ylabel="lift of the success probability (posterior / q)",
           title="One failure model on the rare-letters task: where does it steer the posterior?")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
