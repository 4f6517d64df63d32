"""What each part of BaNEL's round contributes: the final configuration, then each part switched off, over seeds.

    python benchmarks/ablation.py                                   # letters task, every configuration, seeds 0-4
    python benchmarks/ablation.py --configs final --seeds 0 1 2 3 4 5 6 7 8 9
    python benchmarks/ablation.py --quick --out /tmp/ablation       # a smoke test (seconds)

The task is the rare-letters task (examples/trl_banel_examples/tasks/letters.py): a pretrained success probability
of 1.4e-5, known *exactly* for any generator, so every figure here is exact (no sampling noise, no oracle calls to
estimate it).

Configurations (each a set of BaNELConfig overrides on top of `TASK_SETTINGS`):
- defaults: the package's defaults (a fixed 20-epoch fit, failure models dropped at every distillation);
- strong_fit: a fit to a margin of 1 nat (full batches of 64 at 1e-3, clipping, warm-up, at most 300 epochs);
- keep_regions: the 3 most recent failure models stay active across distillations (the ratio test filters the
  proposals the oracle sees);
- strong_keep: both; strong_keep_cumulative: both, each fit on every negative so far;
- no_known: exact known-failure rejection off (the failure models alone must carry the method);
- no_filter: no ratio test and no known-failure rejection (self-distillation only);
- kl, kl_strong: a KL(generator || pretrained) term of weight 0.1 (1.0) in the distillation;
- baselined: the baselined distillation objective (every proposal weighted 1/Z - 1 or -1);
- baselined_kl: the baselined objective anchored by a KL(generator || pretrained) term of weight 1.0;
- strong_keep_cumulative_replay: strong_keep_cumulative with half of each distillation's samples replaced by the
  successes found so far (success_replay=0.5);
- copy300_every3: a full-copy failure model fitted for 300 full-batch epochs at 1e-3 (no margin stop), distilled
  every third round (DESIGN.md section 6: what fixed two failing seeds of a similar task outside this repo);
- strong_keep_replay: strong_keep with success replay and a stop at 500 successes (run at 7,500 NRE);
- evidence_distil: the package's round plus negative evidence on prefixes (evidence_pseudo_count=1: every proposal
  drawn with each tried next token discounted by 1 / (1 + n)), success replay and a stop at 500 successes;
- evidence: the same with the generator kept fixed until a first success (distill_before_success=False);
- evidence_distil_no_known: evidence_distil without exact known-failure rejection (the evidence alone);
- evidence_kl: evidence_distil with a KL(q || pretrained) term of 0.1 in the distillation;
- evidence_no_replay, replay_no_evidence: the task's settings (evidence_distil) without success replay, without
  prefix evidence;
- fit_epochs_1, _5, _50, _100: evidence_distil (20 epochs) with that many failure-model epochs per round: the
  compute-scaling curve (scaling.{json,md,png}, written when any of them has runs).

Each run is cached in OUT/runs/{config}_seed{seed}.json (restartable, splittable between processes); the summary
(ablation.json, .md, .png) is rebuilt from every cached run at the end.
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
from transformers import HfArgumentParser, TrainerCallback, set_seed  # noqa: E402

from benchmarks.common import write_markdown  # noqa: E402
from trl_banel import BaNELConfig, BaNELTrainer  # noqa: E402
from trl_banel_examples.tasks.letters import (BANEL_SETTINGS, exact_proposal_success_probability,  # noqa: E402
                                     exact_success_probability, load_letters_task)

# What the evidence_distil configuration adds to the task's base settings (together: the task's BANEL_SETTINGS).
EVIDENCE_DISTIL = {k: BANEL_SETTINGS[k] for k in ("evidence_pseudo_count", "success_replay", "stop_after_successes")}
# The base every configuration starts from (the rest are the package defaults): the task's settings without the
# evidence_distil parts, at a 2,000-NRE budget unless --budget says otherwise.
TASK_SETTINGS = dict(
    use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10_000,
    **{k: v for k, v in BANEL_SETTINGS.items() if k not in EVIDENCE_DISTIL},
)
TASK_SETTINGS["max_reward_evaluations"] = 2000
STRONG_FIT = dict(failure_margin=1.0, failure_epochs=300, failure_learning_rate=1e-3, failure_batch_size=64,
                  failure_max_grad_norm=1.0, failure_warmup_steps=10)
CONFIGS = {
    "defaults": {},
    "strong_fit": STRONG_FIT,
    "keep_regions": dict(keep_failure_models=True),
    "strong_keep": dict(**STRONG_FIT, keep_failure_models=True),
    "strong_keep_cumulative": dict(**STRONG_FIT, keep_failure_models=True, cumulative_negatives=True),
    "no_known": dict(reject_known_failures=False),
    "no_filter": dict(reject_known_failures=False, rejection_threshold=1e-30),
    "kl": dict(distill_kl_coef=0.1),
    "kl_strong": dict(distill_kl_coef=1.0),
    "baselined": dict(distill_objective="baselined"),
    "baselined_kl": dict(distill_objective="baselined", distill_kl_coef=1.0),
    # a success, once found, is distilled (half of each distillation's samples): kept instead of drifted away from
    "strong_keep_cumulative_replay": dict(**STRONG_FIT, keep_failure_models=True, cumulative_negatives=True,
                                          success_replay=0.5),
    # the strong fit with regions kept, success replay, and the stop the tasks' settings use (run at 7,500 NRE: the
    # sparse benchmark's budget)
    "strong_keep_replay": dict(**STRONG_FIT, keep_failure_models=True, success_replay=0.5, stop_after_successes=500),
    # negative evidence on prefixes shapes every proposal; the generator stays the prior until a first success,
    # then success replay distils what was found
    "evidence": dict(evidence_pseudo_count=1.0, distill_before_success=False, success_replay=0.5,
                     stop_after_successes=500),
    # the same with distillation from the start (the evidence then compounds with what the generator absorbed)
    "evidence_distil": EVIDENCE_DISTIL,  # the task's settings (trl_banel_examples.tasks.letters.BANEL_SETTINGS)
    # evidence_distil anchored to the pretrained generator: the compounding discount spreads the generator over
    # every token, strings of the wrong length included; a KL(q || pretrained) term keeps its support
    "evidence_kl": dict(evidence_pseudo_count=1.0, success_replay=0.5, stop_after_successes=500, distill_kl_coef=0.1),
    # the failure evidence alone: no exact known-failure rejection (a tried string is only discounted, k / (k + n))
    "evidence_distil_no_known": dict(evidence_pseudo_count=1.0, success_replay=0.5, stop_after_successes=500,
                                     reject_known_failures=False),
    # the task's settings with one part switched off: no success replay; no prefix evidence
    "evidence_no_replay": {**EVIDENCE_DISTIL, "success_replay": 0.0},
    "replay_no_evidence": {**EVIDENCE_DISTIL, "evidence_pseudo_count": 0.0},
    # the compute-scaling curve (the paper's Fig. 10): the task's settings with 1 to 100 epochs of failure-model fit
    # per round (evidence_distil itself is 20, the package default)
    **{f"fit_epochs_{n}": {**EVIDENCE_DISTIL, "failure_epochs": n} for n in (1, 5, 50, 100)},
    # DESIGN.md section 6's fix measured outside this repo: a full copy fitted for 300 full-batch epochs (no margin
    # stop), regions kept for 3 rounds by distilling every third round
    "copy300_every3": dict(failure_model="copy", failure_batch_size=64, failure_epochs=300,
                           failure_learning_rate=1e-3, distill_every=3),
}


@dataclass
class Args:
    configs: list[str] = field(default_factory=lambda: list(CONFIGS), metadata={"help": "Configurations to run."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds to run."})
    budget: int = field(default=2000, metadata={"help": "Training reward evaluations (NRE) per run."})
    out: str = field(default=str(ROOT / "benchmarks" / "results" / "ablation"), metadata={"help": "Results folder."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: budget 100, two configurations, seed 0."})
    threads: int = field(default=1, metadata={"help": "torch threads (tiny models run fastest on one)."})


class ExactCurve(TrainerCallback):
    """The generator's exact success probability after every distillation (free: no oracle call)."""

    def __init__(self, trainer, min_a):
        self.trainer, self.min_a, self.points = trainer, min_a, []

    def on_step_end(self, args, state, control, **kwargs):
        if not self.trainer.distilling:  # a distillation has just been applied
            # failure adapters, when present, are disabled outside their fit: the model computes the generator
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            p = exact_success_probability(model, self.trainer.processing_class, self.min_a)
            point = {"nre": self.trainer.ledger.spent, "round": self.trainer.round, "p": p}
            # what the oracle is offered, the evidence-discounted proposals (every 4th point: a few seconds each)
            if args.evidence_pseudo_count > 0 and len(self.points) % 4 == 0:
                point["proposal_p"] = exact_proposal_success_probability(
                    model, self.trainer.processing_class, self.min_a, self.trainer.evidence,
                    args.evidence_pseudo_count)
            self.points.append(point)


def run_one(config: str, seed: int, args: Args, workdir: Path) -> dict:
    torch.set_num_threads(args.threads)
    set_seed(seed)
    model, tokenizer, oracle = load_letters_task()
    prior = exact_success_probability(model, tokenizer, oracle.min_a)
    settings = {**TASK_SETTINGS, "max_reward_evaluations": args.budget, **CONFIGS[config]}
    cfg = BaNELConfig(output_dir=str(workdir), seed=seed, num_rounds=4 * args.budget // 50, **settings)
    trainer = BaNELTrainer(model, oracle, args=cfg, processing_class=tokenizer,
                           train_dataset=Dataset.from_dict({"prompt": [""]}))
    curve = ExactCurve(trainer, oracle.min_a)
    trainer.add_callback(curve)
    start = time.time()
    trainer.train()
    wall = time.time() - start
    final = exact_success_probability(trainer.accelerator.unwrap_model(trainer.model), tokenizer, oracle.min_a)
    best = max([final] + [p["p"] for p in curve.points])
    # the generator the trainer kept as its best (save_best_generator), chosen from training evaluations alone
    kept = final
    if trainer.best_generator is not None:
        from transformers import AutoModelForCausalLM

        kept = exact_success_probability(AutoModelForCausalLM.from_pretrained(trainer.best_generator["path"]),
                                         tokenizer, oracle.min_a)
    keys = ["failure/fit_log_ratio", "failure/fit_steps", "failure/heldout_rejected_rate", "failure/margin_reached",
            "filter/ratio_rejected_rate", "generator/entropy", "generator/distinct", "acceptance_rate"]
    means = {k: float(np.nanmean([h[k] for h in trainer.history if k in h])) for k in keys
             if any(k in h for h in trainer.history)}
    rounds = max(len(trainer.history), 1)
    return {
        "config": config, "seed": seed, "prior": prior, "final": final, "best": best,
        "improvement": final / prior, "best_improvement": best / prior, "kept": kept, "kept_improvement": kept / prior,
        "successes_found": len(trainer.ledger.successes),
        "nre": trainer.ledger.spent, "rounds": len(trainer.history), "wall_seconds": wall,
        "seconds_per_round": {k: v / rounds for k, v in trainer.phase_seconds.items()},
        "means": means, "curve": curve.points, "settings": {**settings, **CONFIGS[config]},
        "history": [{k: v for k, v in h.items() if k != "failure_losses"} for h in trainer.history],
    }


def summarize(out: Path) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    summary = {}
    for config in CONFIGS:
        rs = sorted((r for r in runs if r["config"] == config), key=lambda r: r["seed"])
        if not rs:
            continue
        imp = np.array([r["improvement"] for r in rs])
        summary[config] = {
            "seeds": [r["seed"] for r in rs], "final_improvement": imp.tolist(),
            "best_improvement": [r["best_improvement"] for r in rs],
            "median_improvement": float(np.median(imp)), "seeds_10x": int((imp >= 10).sum()),
            "seeds_100x": int((imp >= 100).sum()), "seeds_below_1x": int((imp < 1).sum()),
            "final_over_half_best": int(sum(r["final"] >= 0.5 * r["best"] for r in rs)),
            # runs from before save_best_generator have no "kept": their final generator is what they kept
            "kept_over_half_best": int(sum(max(r["final"], r.get("kept", 0.0)) >= 0.5 * r["best"] for r in rs)),
            "successes_found_median": float(np.median([r["successes_found"] for r in rs])),
            "seeds_with_success": int(sum(r["successes_found"] > 0 for r in rs)),
            "wall_seconds_median": float(np.median([r["wall_seconds"] for r in rs])),
            "seconds_per_round": {k: float(np.mean([r["seconds_per_round"].get(k, 0) for r in rs]))
                                  for k in rs[0]["seconds_per_round"]},
            "means": {k: float(np.nanmean([r["means"].get(k, np.nan) for r in rs])) for k in rs[0]["means"]},
            "settings": rs[0]["settings"],
        }
    (out / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| config | seeds | found a success | median improvement | >= 10x | >= 100x | < 1x | final >= best/2 | "
             "kept >= best/2 | fit log-ratio | fit steps | ratio-rejected | held-out rejected | entropy | s/round |",
             "|" + "---|" * 15]
    for config, s in summary.items():
        m = s["means"]
        lines.append(
            f"| {config} | {len(s['seeds'])} | {s['seeds_with_success']} | {s['median_improvement']:.3g}x "
            f"| {s['seeds_10x']} | {s['seeds_100x']} "
            f"| {s['seeds_below_1x']} | {s['final_over_half_best']} | {s['kept_over_half_best']} "
            f"| {m.get('failure/fit_log_ratio', float('nan')):.2f} "
            f"| {m.get('failure/fit_steps', float('nan')):.0f} "
            f"| {m.get('filter/ratio_rejected_rate', float('nan')):.3f} "
            f"| {m.get('failure/heldout_rejected_rate', float('nan')):.3f} "
            f"| {m.get('generator/entropy', float('nan')):.3f} "
            f"| {sum(s['seconds_per_round'].values()):.2f} |")
    write_markdown(out / "ablation.md", lines)
    _plot(runs, out / "ablation.png")
    summarize_scaling(runs, out)
    return summary


SCALING = {1: "fit_epochs_1", 5: "fit_epochs_5", 20: "evidence_distil", 50: "fit_epochs_50", 100: "fit_epochs_100"}


def first_success_nre(run: dict) -> int | None:
    return next((h["nre"] for h in run["history"] if h["successes"] > 0), None)


def summarize_scaling(runs: list[dict], out: Path) -> list[dict]:
    """The compute-scaling table and plot: improvement against failure-model epochs per round, same seeds."""
    rows = []
    for epochs, config in SCALING.items():
        rs = sorted((r for r in runs if r["config"] == config), key=lambda r: r["seed"])
        if not rs:
            continue
        firsts = [first_success_nre(r) for r in rs]
        rows.append({
            "epochs": epochs, "config": config, "seeds": [r["seed"] for r in rs],
            "improvement": [r["improvement"] for r in rs],
            "median_improvement": float(np.median([r["improvement"] for r in rs])),
            "seeds_with_success": sum(f is not None for f in firsts), "first_success_nre": firsts,
            "fit_steps": float(np.mean([r["means"].get("failure/fit_steps", np.nan) for r in rs])),
            "fit_log_ratio": float(np.mean([r["means"].get("failure/fit_log_ratio", np.nan) for r in rs])),
            "fit_seconds_per_round": float(np.mean([r["seconds_per_round"].get("failure_fit", 0) for r in rs])),
            "seconds_per_round": float(np.mean([sum(r["seconds_per_round"].values()) for r in rs])),
        })
    if not rows:
        return rows
    (out / "scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| fit epochs per round | seeds | found a success | median improvement | first success (NRE, median) "
             "| fit steps | fit log-ratio | fit s/round | s/round |", "|" + "---|" * 9]
    for row in rows:
        found = [f for f in row["first_success_nre"] if f is not None]
        lines.append(f"| {row['epochs']} | {len(row['seeds'])} | {row['seeds_with_success']} "
                     f"| {row['median_improvement']:.3g}x | {np.median(found) if found else float('nan'):.0f} "
                     f"| {row['fit_steps']:.0f} | {row['fit_log_ratio']:.2f} | {row['fit_seconds_per_round']:.2f} "
                     f"| {row['seconds_per_round']:.2f} |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.scatter([row["epochs"]] * len(row["improvement"]), row["improvement"], color="C0", alpha=0.5)
    ax.plot([r["epochs"] for r in rows], [r["median_improvement"] for r in rows], "o-", color="C1", label="median")
    ax.set(xscale="log", yscale="log", xlabel="failure-model epochs per round",
           ylabel="final improvement over pretrained", title="Rare letters: compute scaling (one dot per seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    plt.close(fig)
    return rows


def _plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    palette = plt.get_cmap("tab20")  # more configurations than the default cycle's 10 colours
    colors = {config: palette(i % 20) for i, config in enumerate(CONFIGS)}
    for r in runs:
        xs = [0] + [p["nre"] for p in r["curve"]]
        ys = [r["prior"]] + [p["p"] for p in r["curve"]]
        ax.plot(xs, ys, color=colors[r["config"]], alpha=0.6, label=r["config"])
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys())
    ax.set(yscale="log", xlabel="reward evaluations (NRE)", ylabel="exact success probability of the generator",
           title="Rare letters: BaNEL ablations, one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: Args):
    if args.quick:
        args.budget, args.configs, args.seeds = 100, ["defaults", "strong_keep"], [0]
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for config in args.configs:
        for seed in args.seeds:
            path = out / "runs" / f"{config}_seed{seed}.json"
            if path.exists():
                continue
            workdir = out / "work" / f"{config}_seed{seed}"
            if workdir.exists():
                import shutil

                shutil.rmtree(workdir)  # a leftover ledger would be resumed
            result = run_one(config, seed, args, workdir)
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{config} seed {seed}: {result['improvement']:.3g}x (best {result['best_improvement']:.3g}x), "
                  f"{result['successes_found']} successes, {result['wall_seconds']:.0f} s", flush=True)
    return summarize(out)


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
