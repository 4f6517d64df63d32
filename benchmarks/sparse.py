"""BaNEL against the baselines on the sparse tasks (rare letters, the hard attack, digits 0-to-6), at one NRE budget.

    python benchmarks/sparse.py --sweep                         # tune the baselines' knobs on seed 100, per task
    python benchmarks/sparse.py                                 # every task x method x seed with the swept knobs
    python benchmarks/sparse.py --tasks hard_attack --methods banel   # a piece (e.g. one process per task/method)
    python benchmarks/sparse.py --quick --out /tmp/s            # a smoke test (one seed, budget 100, small estimates)
    python benchmarks/sparse.py --summarize                     # only rebuild the summary from the cached runs

Methods: BaNEL (the task module's `BENCHMARK_ROUND`, hand-picked per task), GRPO with the sparse reward, GRPO + RND,
GRPO + SimHash counts, NSR; every oracle call of training goes through the same budgeted ledger. Seeds: BaNEL 0-9, the
baselines 0-4 (`--seeds` sets both). Each baseline's learning rate (and bonus weight) is swept on seed 100, kept apart
(`--sweep`; BaNEL's tau and learning rate too with `--sweep_banel`).

Estimates: rare letters' are exact (the generator's probability of the enumerated success strings; for BaNEL its
generator's); the hard attack's are exact (the attacker's probability of the enumerated
success set; BaNEL's sampler is its generator conditioned on avoiding the ledger's known failures), with no sampling
and no oracle call; digits' are Monte Carlo (Clopper-Pearson). A GRPO-family policy that never saw a success and
whose weights still hash to the pretrained generator's reuses the pretrained estimate. None of these oracle calls is
charged to the training budget.

Runs stop at the budget, when converged (BaNEL: `max_idle_rounds`; GRPO family: `idle_steps` steps without a new
evaluation) or after `max_rounds_factor` x budget / (NRE per round or step). Each run is written to
OUT/sparse_runs/{task}.json (one file per task, a record per `{method}_seed{seed}` and the pretrained estimate under
`pretrained`, written under a lock: `benchmarks.common.RunCache`) as soon as it ends and skipped when present, so the
benchmark can be produced in pieces (one process per task, method or seed) and resumed; OUT/sparse.json, sparse.md and
sparse.png are rebuilt from every run made at this budget at the end (`--summarize`: only that). Shared with
benchmarks/addition_attack.py: benchmarks/common.py.
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

from trl_banel_examples.tasks.common import weights_hash  # noqa: E402

from benchmarks.common import (BASELINES, DEFAULT_KNOBS, SWEEP_GRID, TASKS, RunCache, blind_search,  # noqa: E402
                               cached_run, parse_args, reference_rate, run_identity, run_one, run_sweep, seed_curves,
                               summarise_task, with_models)

SPARSE_TASKS = ["letters", "hard_attack", "digits"]
SPARSE_METHODS = ["banel", *BASELINES]
BANEL_SEEDS = list(range(10))
BASELINE_SEEDS = list(range(5))


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: list(SPARSE_TASKS), metadata={"help": "Tasks to run."})
    methods: list[str] = field(default_factory=lambda: list(SPARSE_METHODS), metadata={"help": "Methods to run."})
    seeds: list[int] | None = field(default=None, metadata={
        "help": "Seeds for every method (default: BaNEL 0-9, the baselines 0-4)."})
    budget: int = field(default=7500, metadata={"help": "Training reward evaluations (NRE) per run."})
    eval_samples: int | None = field(default=None, metadata={
        "help": "Samples of the final and best-point estimates (default: the task's; unused when exact)."})
    curve_every: int = field(default=500, metadata={"help": "NRE between two points of the success curve."})
    curve_samples: int | None = field(default=None, metadata={
        "help": "Samples per curve point (also selects the best; default: the task's; unused when exact)."})
    out: str = field(default=str(ROOT / "benchmarks" / "results"), metadata={"help": "Results folder."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: one seed, budget 100, small estimates."})
    sweep: bool = field(default=False, metadata={"help": "Sweep the baselines' knobs on sweep_seed instead."})
    summarize: bool = field(default=False, metadata={"help": "Only rebuild the summary from the cached runs."})
    sweep_banel: bool = field(default=False, metadata={"help": "With --sweep: BaNEL's tau and learning rate too."})
    sweep_seed: int = field(default=100, metadata={"help": "Seed of the sweep (kept apart from the reported seeds)."})
    sweep_budget: int | None = field(default=None, metadata={"help": "NRE per sweep run (None: budget)."})
    sweep_eval_samples: int | None = field(default=None, metadata={
        "help": "Samples of a sweep run's final estimate (None: eval_samples)."})
    max_rounds_factor: float = field(default=2.0, metadata={
        "help": "A run also stops after factor * budget / (NRE per step) steps (GRPO) or rounds (BaNEL)."})
    idle_steps: int = field(default=20, metadata={
        "help": "A GRPO-family run stops after this many steps without a new reward evaluation (converged)."})
    threads: int = field(default=1, metadata={"help": "torch threads (tiny models run fastest on one)."})
    digits_models: str | None = field(default=None, metadata={
        "help": "A digits models folder (generator/ and classifier/, as recipes/pretrain_digits.py writes) to run "
                "instead of the shipped one; its calibration is the calibration.json beside it."})


QUICK = dict(seeds=[0], budget=100, eval_samples=300, curve_every=50, curve_samples=100, sweep_budget=50,
             sweep_eval_samples=100)


def eval_size(task, n: int | None, default: int) -> int:
    return 0 if task.exact else (n if n is not None else default)


def seeds_for(method: str, args: Args) -> list[int]:
    return args.seeds if args.seeds is not None else (BANEL_SEEDS if method == "banel" else BASELINE_SEEDS)


# ------------------------------------------------------------------------------------------------------ runs
def pretrained_run(task, args: Args, folder: str) -> dict:
    n = eval_size(task, args.eval_samples, task.eval_samples)

    want = {"eval_samples": n, "generator_weights": weights_hash(task.load()[0])}  # a new generator: a new estimate

    def make():
        print(f"[run] {task.name} pretrained estimate", flush=True)
        r = run_one(task, "pretrained", 0, {}, 0, n, 0, 0, 0, "")
        r["settings"] = want
        return r

    return cached_run(RunCache(os.path.join(folder, f"{task.name}.json")), "pretrained", want, make)[0]


def make_run(task, method, seed, knobs, budget, n, args: Args, pretrained: dict, work: str) -> dict:
    r = run_one(task, method, seed, knobs, budget, n, args.curve_every,
                eval_size(task, args.curve_samples, task.curve_samples), args.max_rounds_factor,
                os.path.join(args.out, "work", work), idle_steps=args.idle_steps, pretrained=pretrained)
    r["settings"].update(budget=budget, eval_samples=n, generator_weights=pretrained["weights"])
    return r


def chosen_knobs(path: str, task: str) -> tuple[dict, dict | None]:
    sweep = json.loads(Path(path).read_text()).get(task) if os.path.exists(path) else None
    return {**DEFAULT_KNOBS, **{m: s["chosen"] for m, s in (sweep or {}).items()}}, sweep


def sweep_task(task, args: Args, pretrained: dict):
    budget = args.sweep_budget or args.budget
    n = eval_size(task, args.sweep_eval_samples if args.sweep_eval_samples is not None else args.eval_samples,
                  task.eval_samples)
    methods = [m for m in args.methods if m != "banel" or args.sweep_banel]
    sweep = run_sweep(methods, lambda m, knobs, work: make_run(task, m, args.sweep_seed, {**DEFAULT_KNOBS[m], **knobs},
                                                               budget, n, args, pretrained, f"{task.name}_{work}"),
                      os.path.join(args.out, "sparse_sweep_runs", f"{task.name}_budget{budget}.json"), args.sweep_seed,
                      budget, n, SWEEP_GRID, identity={"generator_weights": pretrained["weights"]})
    path = os.path.join(args.out, "sparse_sweep.json")
    old = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    old[task.name] = {**old.get(task.name, {}), **sweep}
    Path(path).write_text(json.dumps(old, indent=1))


def run_task(task, args: Args, folder: str, pretrained: dict):
    knobs, _ = chosen_knobs(os.path.join(args.out, "sparse_sweep.json"), task.name)
    n = eval_size(task, args.eval_samples, task.eval_samples)
    seeds = sorted({s for m in args.methods for s in seeds_for(m, args)})
    cache = RunCache(os.path.join(folder, f"{task.name}.json"))
    for seed in seeds:  # seed-major: a partial benchmark has every method on its first seeds
        for method in [m for m in SPARSE_METHODS if m in args.methods and seed in seeds_for(m, args)]:
            key = f"{method}_seed{seed}"
            want = {**run_identity(task, method, knobs.get(method, {})), "budget": args.budget, "eval_samples": n,
                    "generator_weights": pretrained["weights"]}  # runs of an earlier generator are redone
            if cache.get(key) is None:
                print(f"[run] {task.name} {method} seed {seed}", flush=True)
            r, made = cached_run(cache, key, want, lambda: make_run(task, method, seed, knobs.get(method, {}),
                                                                    args.budget, n, args, pretrained,
                                                                    f"{task.name}_{key}"))
            if made:
                print(f"[run] {task.name} {method} seed {seed}: {r['final']['rate']:.3g} in {r['minutes']:.1f} min "
                      f"({r['stop_reason']})", flush=True)


# ------------------------------------------------------------------------------------------------------ summary
def load_task_runs(folder: str, task: str, budget: int) -> tuple[dict, dict | None]:
    """The task's run records made at `budget`, by method, and its pretrained record."""
    runs, pretrained = {}, None
    for r in RunCache(os.path.join(folder, f"{task}.json")).load().values():
        if r["method"] == "pretrained":
            pretrained = r
        elif r["settings"].get("budget") == budget:
            runs.setdefault(r["method"], []).append(r)
    return runs, pretrained


def blind_reference(task, budget: int, reference: float) -> dict | None:
    """The task's blind search at `budget` (benchmarks.common.blind_search), with its multiple of the pretrained
    rate `reference` (the rate, or its upper bound if 0)."""
    if task.blind is None:
        return None
    out = blind_search(task.blind(task.load()[2]), budget)
    return {**out, "vs_pretrained": out["rate"] / reference if reference else None}


def summarise(args: Args, folder: str, tasks_made: dict | None = None) -> tuple[dict, dict]:
    """The summary of every task with run files; `tasks_made`: the invocation's `Task`s by name (a task not in it is
    the shipped one), for the blind-search reference."""
    sweep_path = os.path.join(args.out, "sparse_sweep.json")
    tasks, all_runs = {}, {}
    for name in SPARSE_TASKS:  # every task with run files, not only this invocation's: pieces add up
        runs, pre = load_task_runs(folder, name, args.budget)
        if pre is None:
            continue
        entry = summarise_task(runs, pre["final"])
        est = pre["final"]
        task = (tasks_made or {}).get(name) or TASKS[name]()
        entry = {"pretrained": {"rate": est["rate"], "upper": est["high"], "low": est["low"],
                                "samples": est["samples"], "exact": bool(est.get("exact")),
                                "reference": reference_rate(est)}, **entry,
                 "blind_search": blind_reference(task, args.budget, reference_rate(est)),
                 "sweep": chosen_knobs(sweep_path, name)[1]}
        entry["timing"] = timing(entry["methods"], entry["sweep"], args.budget)
        tasks[name], all_runs[name] = entry, runs
    summary = {"budget": args.budget, "curve_every": args.curve_every, "quick": args.quick,
               "planned_seeds": {"banel": len(BANEL_SEEDS), "baselines": len(BASELINE_SEEDS)},
               "tasks": tasks}
    return summary, all_runs


def timing(methods: dict, sweep: dict | None, budget: int) -> dict:
    """Minutes per run (median over the runs made; wall clock, and CPU time of the process), and the CPU-hours the
    full benchmark would take at that pace (CPU time where recorded): the planned seeds per method plus each baseline's
    sweep grid. Wall time depends on what else the machine runs; CPU time much less."""
    per_run = {m: float(np.median([c if c is not None else w for c, w in zip(v["cpu_minutes"], v["minutes"])]))
               for m, v in methods.items()}
    wall = {m: float(np.median(v["minutes"])) for m, v in methods.items()}
    planned = {m: per_run[m] * ((len(BANEL_SEEDS) if m == "banel" else len(BASELINE_SEEDS))
                                + (len(SWEEP_GRID[m]) if m in BASELINES else 0)) for m in per_run}
    estimating = {m: float(np.median([x or 0.0 for x in v["estimate_minutes"]])) for m, v in methods.items()}
    return {"minutes_per_run_median": wall, "cpu_minutes_per_run_median": per_run,
            "estimate_minutes_per_run_median": estimating,
            "full_benchmark_cpu_hours_estimate": sum(planned.values()) / 60,
            # at another budget than the full one, scaled linearly to 7,500 NRE (training is about linear in NRE;
            # runs that stop early when converged make this an upper estimate)
            "full_benchmark_cpu_hours_at_7500_linear": sum(planned.values()) / 60 * 7500 / max(budget, 1),
            "minutes_spent": sum(sum(v["minutes"]) for v in methods.values())}


def fmt_rate(x) -> str:
    return "n/a" if x is None else "0" if x == 0 else f"{x:.3g}"


def write_outputs(summary: dict, all_runs: dict, out: str):
    with open(os.path.join(out, "sparse.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# Sparse tasks: BaNEL against baselines ({summary['budget']:,} reward evaluations per run)", ""]
    if summary["quick"]:
        lines += ["**Quick mode (smoke test): the budget is far too small for any figure here to mean anything.**", ""]
    lines += ["Per method: the final sampler's success rate over seeds (median, interquartile range), the seeds at "
              ">= 10x and >= 100x the pretrained rate (its 95% upper bound if the estimate is 0), the best curve "
              "point re-estimated on fresh samples, and the ratio of the median to the best baseline's median "
              "(against that baseline's 95% upper bound when its median is 0; for BaNEL the best of all baselines, "
              "for a baseline the best other one). Rare letters, hard attack: exact probabilities; digits: Monte "
              "Carlo (the pretrained generator's: the calibration's samples, "
              "benchmarks/results/digits_calibration.json).", ""]
    for name, t in summary["tasks"].items():
        pre = t["pretrained"]
        pre_text = (f"{fmt_rate(pre['rate'])} (exact)" if pre["exact"] else
                    f"{fmt_rate(pre['rate'])} [{fmt_rate(pre['low'])}, {fmt_rate(pre['upper'])}] "
                    f"(n={pre['samples']:,})")
        lines += [f"## {name}", "", f"Pretrained success rate: {pre_text}.", ""]
        blind = t.get("blind_search")
        if blind:
            if blind["exact"]:
                rate = f"{fmt_rate(blind['rate'])} ({blind['successes']:,} of {blind['space']:,}, exact)"
            else:
                rate = (f"{fmt_rate(blind['rate'])} [{fmt_rate(blind['low'])}, {fmt_rate(blind['high'])}] "
                        f"(n={blind['samples']:,})")
            lines += [f"Blind search, a reference and not a method ({blind['what']}: told the output format, nothing "
                      f"else, learning nothing): success rate {rate}, {blind['vs_pretrained']:.3g}x the pretrained"
                      f"{'' if pre['rate'] > 0 else ' (its 95% upper bound: a lower bound on the multiple)'}; "
                      f"{blind['budget']:,} distinct draws find {blind['expected_successes']:.3g} successes on "
                      f"average and at least one with probability {blind['p_at_least_one']:.3g}.", ""]
        lines += ["| method | seeds | final: median | IQR | >= 10x | >= 100x | best: median | vs best baseline | "
                  "vs blind search | successes found (median) | NRE (median) | min/run (median) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m, v in t["methods"].items():
            s, b = v["summary"]["final"], v["summary"]["best"]
            vs = s["vs_best_baseline"]
            ratio = "n/a" if vs.get("best_baseline") is None else (
                f"inf ({vs['best_baseline']} exactly 0)" if vs["exactly_zero"] else
                f"{vs['ratio']:.2g}x {vs['best_baseline']}" + (" (vs upper bound)" if vs["against"] != "estimate"
                                                               else ""))
            vs_blind = f"{s['median'] / blind['rate']:.3g}x" if blind and blind["rate"] > 0 else "n/a"
            lines.append(f"| {m} | {s['n']} | {fmt_rate(s['median'])} | {fmt_rate(s['q25'])}-{fmt_rate(s['q75'])} | "
                         f"{s.get('seeds_10x', 'n/a')} | {s.get('seeds_100x', 'n/a')} | {fmt_rate(b['median'])} | "
                         f"{ratio} | {vs_blind} | "
                         f"{np.median(v['successes_found']):.0f} | {np.median(v['nre']):.0f} | "
                         f"{np.median(v['minutes']):.2f} |")
        reused = {m: sum(v["reused_pretrained_estimate"]) for m, v in t["methods"].items()
                  if sum(v["reused_pretrained_estimate"])}
        tm = t["timing"]
        per_run = ", ".join(f"{m} {x:.1f} min wall / {tm['cpu_minutes_per_run_median'][m]:.1f} min CPU "
                            f"({tm['estimate_minutes_per_run_median'][m]:.1f} estimating)"
                            for m, x in tm["minutes_per_run_median"].items())
        lines += ["", f"Per run (median): {per_run}.", "",
                  f"Time: {tm['minutes_spent']:.1f} min of runs so far; at this pace the full {name} benchmark "
                  f"({summary['planned_seeds']['banel']} BaNEL seeds, {summary['planned_seeds']['baselines']} per "
                  f"baseline, each baseline's sweep) takes about {tm['full_benchmark_cpu_hours_estimate']:.1f} "
                  f"CPU-hours (budget {summary['budget']:,} NRE per run)"
                  + ("." if summary["budget"] == 7500 else
                     f"; scaled linearly to 7,500 NRE per run: about "
                     f"{tm['full_benchmark_cpu_hours_at_7500_linear']:.1f} CPU-hours."), ""]
        if reused:
            lines += [f"Runs that reused the pretrained estimate (no success seen, weights unchanged): {reused}.", ""]
        if t["sweep"]:
            lines += ["Sweep (seed kept apart; the chosen knobs are used above):", ""]
            for m, sw in t["sweep"].items():
                tried = "; ".join(f"{json.dumps(r['knobs'])}: {fmt_rate(r['rate'])}" for r in sw["results"])
                lines.append(f"- **{m}** (seed {sw['seed']}, budget {sw['budget']}) chose "
                             f"`{json.dumps(sw['chosen'])}` from {tried}")
            lines.append("")
    with open(os.path.join(out, "sparse.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(summary, all_runs, os.path.join(out, "sparse.png"))
    print("\n" + "\n".join(lines))


def plot(summary: dict, all_runs: dict, path: str):
    """Success rate against NRE, one panel per task: per method the median over seeds and the interquartile band."""
    from trl_banel_examples.plotting import plt  # the Agg backend: files only

    names = list(summary["tasks"])
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        curves = seed_curves(all_runs[name], spread=(25, 75), center="median")
        pre = summary["tasks"][name]["pretrained"]
        positive = [p[k] for pts in curves.values() for p in pts for k in ("rate", "low") if p[k] > 0]
        floor = min(positive + [pre["reference"]] + [1.0]) / 3
        for method in [m for m in SPARSE_METHODS if m in curves]:
            pts = curves[method]
            x = [p["nre"] for p in pts]
            line, = ax.plot(x, [max(p["rate"], floor) for p in pts], marker="o", ms=3,
                            label=f"{method} ({len(all_runs[name][method])} seeds)", drawstyle="steps-post")
            ax.fill_between(x, [max(p["low"], floor) for p in pts], [max(p["high"], floor) for p in pts],
                            color=line.get_color(), alpha=0.2, step="post")
        ax.axhline(max(pre["rate"], floor), color="grey", ls="--", label="pretrained")
        ax.set_yscale("log")
        ax.set_xlabel("reward evaluations (NRE)")
        ax.set_ylabel(f"success rate (log; floor {floor:.1g})")
        ax.set_title(f"{name}: median over seeds, IQR band" + (" (exact)" if pre["exact"] else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ driver
def main(args: Args):
    torch.set_num_threads(args.threads)
    for what, given, allowed in (("tasks", args.tasks, SPARSE_TASKS), ("methods", args.methods, SPARSE_METHODS)):
        unknown = set(given) - set(allowed)
        if unknown:
            raise ValueError(f"unknown {what} {sorted(unknown)}; choose from {allowed}")
    folder = os.path.join(args.out, "sparse_runs")
    tasks_made = {}
    for name in [] if args.summarize else args.tasks:
        task = TASKS[name]()
        if name == "digits" and args.digits_models:
            task = with_models(task, args.digits_models)
        tasks_made[name] = task
        pretrained = pretrained_run(task, args, folder)
        if args.sweep:
            sweep_task(task, args, pretrained)
        else:
            run_task(task, args, folder, pretrained)
    if not args.sweep:
        write_outputs(*summarise(args, folder, tasks_made), args.out)


def parse(argv=None) -> Args:
    return parse_args(Args, QUICK, argv)


if __name__ == "__main__":
    main(parse())
