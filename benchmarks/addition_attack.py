"""BaNEL against the baselines on the addition attack, at the same NRE budget (the paper's Table, CPU-small).

    python benchmarks/addition_attack.py --sweep                 # tune the baselines' knobs on one seed (first)
    python benchmarks/addition_attack.py                         # 5 seeds x 6 methods at 7,500 NRE each
    python benchmarks/addition_attack.py --methods banel nsr     # a subset (e.g. one process per method)
    python benchmarks/addition_attack.py --quick --out /tmp/q    # a smoke test (one seed, budget 200)
    python benchmarks/addition_attack.py --methods banel_no_replay banel_no_known   # the ablation (asked by name)
    python benchmarks/addition_attack.py --summarize             # only rebuild the summary from the cached runs

Methods: the pretrained attacker; BaNEL (the round hand-picked for this task, trl_banel_examples.tasks.addition.
BENCHMARK_ROUND; the demo now runs the package's defaults);
GRPO with the sparse reward alone; GRPO + RND bonus; GRPO + SimHash count bonus; NSR (every failure gets advantage
-1). The ablation rows, run only when named: BaNEL at the task's settings without success replay
(`banel_no_replay`) and without exact known-failure rejection (`banel_no_known`). Every baseline's oracle calls go
through the same RewardLedger as BaNEL's (hard budget, free exact repeats, jsonl log).

For each (method, seed): the final sampler's success rate on `eval_samples` fresh samples (Clopper-Pearson), the
success curve against NRE (`curve_samples` per point, every `curve_every` NRE), and the best curve point's sampler
re-estimated on `eval_samples` fresh samples. Oracle calls of all estimates are counted and reported, never charged
to the training budget. Each run is written to OUT/runs/addition.json (one file, a record per `{method}_seed{seed}`,
written under a lock: `benchmarks.common.RunCache`) as soon as it ends and skipped when present (restartable,
splittable between processes); the summary (json, md, png) is rebuilt from all its records at the end.
What this benchmark shares with benchmarks/sparse.py (the runner, settings, grids, caching) is benchmarks/common.py.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (BANEL_VARIANTS, DEFAULT_KNOBS, GRPO_COMMON, METHODS, SWEEP_GRID, addition_task,  # noqa: E402,F401
                               RunCache, cached_run, load_runs, parse_args, run_identity,
                               run_sweep as sweep_methods, seed_curves)
from benchmarks.common import run_one as run_task  # noqa: E402
from trl_banel_examples.plotting import plot_success_curves  # noqa: E402
from trl_banel_examples.tasks.addition import MODELS_DIR  # noqa: E402


ALL_METHODS = METHODS + list(BANEL_VARIANTS)


@dataclass
class Args:
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "Methods to run."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Seeds to run."})
    budget: int = field(default=7500, metadata={"help": "Training reward evaluations (NRE) per run."})
    eval_samples: int = field(default=100_000, metadata={"help": "Samples of the final and best-point estimates."})
    curve_every: int = field(default=500, metadata={"help": "NRE between two points of the success curve."})
    curve_samples: int = field(default=5000, metadata={"help": "Samples per curve point (also selects the best)."})
    out: str = field(default=str(ROOT / "benchmarks" / "results"), metadata={"help": "Results folder."})
    models_dir: str = field(default=str(MODELS_DIR), metadata={"help": "The addition task's target/ and attacker/."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: one seed, budget 200, small estimates."})
    sweep: bool = field(default=False, metadata={"help": "Sweep the baselines' knobs on sweep_seed instead."})
    summarize: bool = field(default=False, metadata={"help": "Only rebuild the summary from the cached runs."})
    sweep_seed: int = field(default=100, metadata={"help": "Seed of the sweep (kept apart from the reported seeds)."})
    sweep_budget: int | None = field(default=None, metadata={"help": "NRE per sweep run (None: budget)."})
    sweep_eval_samples: int = field(default=20_000, metadata={"help": "Samples of a sweep run's final estimate."})
    max_rounds_factor: float = field(default=2.0, metadata={
        "help": "A run also stops after factor * budget / (NRE per step) steps (GRPO: per generation batch) or rounds "
                "(BaNEL: per evaluations_per_round), whether or not the budget is spent: a policy collapsed onto a "
                "few known completions spends almost nothing per step (exact repeats are free) and would run on."})
    threads: int = field(default=1, metadata={"help": "torch threads (tiny models run fastest on one)."})


QUICK = dict(seeds=[0], budget=200, eval_samples=2000, curve_every=50, curve_samples=300, sweep_budget=100,
             sweep_eval_samples=500)


# ------------------------------------------------------------------------------------------------------ one run
def run_one(method: str, seed: int, args: Args, knobs: dict, budget: int, eval_samples: int, workdir: str) -> dict:
    return run_task(addition_task(args.models_dir), method, seed, knobs, budget, eval_samples, args.curve_every,
                    args.curve_samples, args.max_rounds_factor, workdir)


# ------------------------------------------------------------------------------------------------------ summary
def _stats(rates: list[float], base: float | None) -> dict:
    mean = float(np.mean(rates))
    return {"mean": mean, "median": float(np.median(rates)), "std": float(np.std(rates)),  # population std (ddof=0)
            "improvement": mean / base if base else None}


def summarise(runs: dict, args: Args, sweep: dict | None) -> dict:
    base = None
    if runs.get("pretrained"):
        base = float(np.mean([r["final"]["rate"] for r in runs["pretrained"]]))
    methods = {}
    for name in ALL_METHODS:
        rs = sorted(runs.get(name, []), key=lambda r: r["seed"])
        if not rs:
            continue
        rates = [r["final"]["rate"] for r in rs]
        entry = {"seeds": [r["seed"] for r in rs], "success_rates": rates, **_stats(rates, base),
                 "settings": rs[0]["settings"]}
        entry["final"] = {k: [r["final"].get(k) for r in rs] for k in ("rate", "low", "high", "samples", "nre",
                                                                          "oracle_calls")}
        if name != "pretrained":
            entry["final"]["steps"] = [r["final"]["steps"] for r in rs]
            entry["final"]["successes_found_in_training"] = [r["final"]["successes_found_in_training"] for r in rs]
            best_rates = [r["best"]["estimate"]["rate"] for r in rs]
            entry["best"] = {
                "success_rates": best_rates, **_stats(best_rates, base),
                "low": [r["best"]["estimate"]["low"] for r in rs], "high": [r["best"]["estimate"]["high"] for r in rs],
                "samples": [r["best"]["estimate"]["samples"] for r in rs],
                "nre_at_best": [r["best"]["point"]["nre"] for r in rs],
                "selection_rate": [r["best"]["point"]["rate"] for r in rs],
                "selection_oracle_calls": [r["best"]["selection_oracle_calls"] for r in rs],
                "fresh_oracle_calls": [r["best"]["fresh_oracle_calls"] for r in rs],
            }
            entry["minutes"] = [r["minutes"] for r in rs]
        methods[name] = entry
    return {"budget": args.budget, "eval_samples": args.eval_samples, "curve_every": args.curve_every,
            "curve_samples": args.curve_samples, "methods": methods, "sweep": sweep}


def write_outputs(summary: dict, runs: dict, out: str):
    with open(os.path.join(out, "addition_attack.json"), "w") as f:
        json.dump(summary, f, indent=1)
    ms = summary["methods"]
    fmt = lambda x: "n/a" if x is None else f"{x:.5f}"  # noqa: E731
    imp = lambda x: "n/a" if x is None else f"{x:.1f}x"  # noqa: E731
    lines = [f"# Addition attack: BaNEL against baselines ({summary['budget']:,} reward evaluations per run)", "",
             f"Final sampler's success rate per seed on {summary['eval_samples']:,} fresh samples; mean, median and "
             "population std (ddof=0) over seeds; improvement = mean / pretrained mean. `best` = the curve point "
             f"with the best {summary['curve_samples']:,}-sample estimate (every {summary['curve_every']} NRE), "
             f"re-estimated on {summary['eval_samples']:,} fresh samples; its selection and fresh oracle calls are "
             "listed (never charged to the training budget).", "",
             "| method | mean | median | std | improvement | best: mean | best: improvement | seeds | NRE spent "
             "(mean) | 95% CI width (mean) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in ms.items():
        best = m.get("best", {})
        width = np.mean([hi - lo for lo, hi in zip(m["final"]["low"], m["final"]["high"])])
        lines.append(f"| {name} | {fmt(m['mean'])} | {fmt(m['median'])} | {fmt(m['std'])} | {imp(m['improvement'])} | "
                     f"{fmt(best.get('mean'))} | {imp(best.get('improvement'))} | {len(m['success_rates'])} | "
                     f"{np.mean(m['final']['nre']):.0f} | {width:.5f} |")
    lines += ["", "Notes: every run stops at the budget, or after `max_steps` (GRPO family) or `num_rounds` (BaNEL) "
              "if a policy collapsed onto a few known completions stops spending it (exact repeats are free). The "
              "`pretrained` row is one independent estimate per seed. "
              "NSR gives every failure advantage -1 and every success 0 (pure NSR; `nsr_positive_weight`). The "
              "bonuses (RND, counts) never call the oracle. BaNEL's `best` re-samples the best point's generator "
              "through its posterior filter with the final ledger's known failures.",
              "", "## Evaluation oracle calls (not charged)", "",
              "| method | final estimates | best: selection (curve) | best: fresh estimate |",
              "| --- | --- | --- | --- |"]
    for name, m in ms.items():
        if "best" in m:
            lines.append(f"| {name} | {sum(m['final']['oracle_calls'])} | {sum(m['best']['selection_oracle_calls'])} "
                         f"| {sum(m['best']['fresh_oracle_calls'])} |")
    lines += ["", "## Settings", ""]
    for name, m in ms.items():
        lines.append(f"- **{name}**: `{json.dumps(m['settings'], default=str)}`")
    if summary.get("sweep"):
        lines += ["", "## Sweep (one seed, kept apart from the reported seeds; the chosen knobs are used above)", ""]
        for name, s in summary["sweep"].items():
            tried = "; ".join(f"{json.dumps(r['knobs'])}: {r['rate']:.5f}" for r in s["results"])
            lines.append(f"- **{name}** (seed {s['seed']}, budget {s['budget']}, criterion: {s['criterion']}) chose "
                         f"`{json.dumps(s['chosen'])}` from {tried}")
    with open(os.path.join(out, "addition_attack.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    # curves: per method, the seed mean at each NRE grid point (last measurement at or before it), seed min-max band
    curves = {name: [{k: p[k] for k in ("nre", "rate", "low", "high")} for p in pts]
              for name, pts in seed_curves(runs, spread=(0, 100), center="mean").items()}
    base = ms.get("pretrained", {}).get("mean")
    plot_success_curves(curves, os.path.join(out, "addition_attack.png"), baseline=base,
                        title="Addition attack: success rate vs NRE (seed mean, min-max band)")
    print("\n" + "\n".join(lines[: 6 + len(ms)]))


# ------------------------------------------------------------------------------------------------------ drivers
def chosen_knobs(out: str) -> tuple[dict, dict | None]:
    path = os.path.join(out, "addition_attack_sweep.json")
    if not os.path.exists(path):
        return dict(DEFAULT_KNOBS), None
    sweep = json.loads(Path(path).read_text())
    return {**DEFAULT_KNOBS, **{m: s["chosen"] for m, s in sweep.items()}}, sweep


def run_sweep(args: Args):
    budget = args.sweep_budget or args.budget
    path = os.path.join(args.out, "sweep_runs", f"addition_budget{budget}.json")
    sweep = sweep_methods(
        args.methods,
        lambda method, knobs, work: run_one(method, args.sweep_seed, args, {**DEFAULT_KNOBS[method], **knobs}, budget,
                                            args.sweep_eval_samples, os.path.join(args.out, "work", work)),
        path, args.sweep_seed, budget, args.sweep_eval_samples)
    path = os.path.join(args.out, "addition_attack_sweep.json")
    old = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    Path(path).write_text(json.dumps({**old, **sweep}, indent=1))


def main(args: Args):
    torch.set_num_threads(args.threads)
    unknown = set(args.methods) - set(ALL_METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {ALL_METHODS}")
    os.makedirs(args.out, exist_ok=True)
    if args.sweep:
        return run_sweep(args)
    knobs, sweep = chosen_knobs(args.out)
    cache = RunCache(os.path.join(args.out, "runs", "addition.json"))
    task = None if args.summarize else addition_task(args.models_dir)
    for seed in [] if args.summarize else args.seeds:
        for method in [m for m in ALL_METHODS if m in args.methods]:
            key = f"{method}_seed{seed}"
            if cache.get(key) is None:
                print(f"[run] {method} seed {seed}", flush=True)
            chosen = knobs.get("banel" if method in BANEL_VARIANTS else method, {})
            r, made = cached_run(cache, key, run_identity(task, method, chosen), lambda: run_one(
                method, seed, args, chosen, args.budget, args.eval_samples,
                os.path.join(args.out, "work", f"{method}_seed{seed}")))
            if made:
                print(f"[run] {method} seed {seed}: {r['final']['rate']:.5f} in {r['minutes']:.1f} min", flush=True)
    runs = load_runs(cache)
    write_outputs(summarise(runs, args, sweep), runs, args.out)


def parse(argv=None) -> Args:
    return parse_args(Args, QUICK, argv)


if __name__ == "__main__":
    main(parse())
