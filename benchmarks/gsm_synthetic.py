"""BaNEL at the package defaults against GRPO on the synthetic GSM hard set (recipes/gsm_synthetic.py), on a CPU.

    python benchmarks/gsm_synthetic.py --sweep                       # GRPO's learning rate, on the tuning question
    python benchmarks/gsm_synthetic.py                               # 5 questions x seeds 0-2, BaNEL and GRPO
    python benchmarks/gsm_synthetic.py --methods banel --question_ids 0 --seeds 0    # one piece of it
    python benchmarks/gsm_synthetic.py --summarize                   # only rebuild the tables from the cached runs

Each hard question is a task: the recipe's prompt (the conversation through the model's chat template), the recipe's
reward bound to the question's target, Monte Carlo estimates with Clopper-Pearson intervals. The pretrained rate of a
question is the one `recipes/gsm_synthetic.py` measured (`benchmarks/results/gsm_synthetic/prior.json`, 3,700
samples): the multiples are taken against it, or against its 95% upper bound when no sample succeeded.

- **BaNEL**: `BaNELConfig()` defaults; only the budget and the completion length (96 tokens) are set.
- **GRPO**: the sparse reward through the same budgeted ledger (`BudgetedReward`), the benchmarks' GRPO settings
  (`benchmarks/common.GRPO_COMMON`), its learning rate swept on the tuning question (seed 100) with `--sweep` before
  the evaluation runs use it. The tuning question is question 3, the one the prior put above 1e-3 (6 of 3,700
  samples): the likeliest to show GRPO a success, so the one where its learning rate can matter; the other five are
  the evaluation questions.

Each run is cached in `OUT/runs/q{ID}.json` (`benchmarks.common.RunCache`, a record per `{method}_seed{N}`) as soon as
it ends and skipped when present (a BaNEL run made under other package defaults, by `benchmarks/defaults.py`'s
fingerprint, is redone), so the benchmark can be run in pieces and resumed; `OUT/comparison.{json,md,png}` are rebuilt
from the cached runs at the end.
"""

import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trl_banel.stats import SuccessEstimate  # noqa: E402
from trl_banel_examples.tasks.common import weights_hash  # noqa: E402

from benchmarks.common import (DEFAULT_KNOBS, RunCache, Task, cached_run, parse_args, reference_rate,  # noqa: E402
                               run_one, run_sweep)
from benchmarks.defaults import defaults_fingerprint  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gsm_synthetic"
MAX_COMPLETION_LENGTH = 96  # a four-step solution is about 50 tokens (the prior was measured at 96)
METHODS = ["banel", "grpo"]
FORMER = "banel (former defaults)"  # BaNEL runs made under former package defaults, shown apart until rerun
GRPO_GRID = {"grpo": [{"learning_rate": lr} for lr in (1e-4, 3e-4, 1e-3)]}


@dataclass
class Args:
    question_ids: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 5], metadata={
        "help": "Hard-set questions to evaluate on (not the tuning question)."})
    tuning_question: int = field(default=3, metadata={"help": "The hard-set question GRPO's sweep runs on."})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "banel and/or grpo."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of every method."})
    budget: int = field(default=500, metadata={"help": "Training reward evaluations (NRE) per run."})
    eval_samples: int = field(default=1000, metadata={"help": "Samples of a trained generator's final estimate."})
    curve_samples: int = field(default=200, metadata={"help": "Samples per success-curve point."})
    max_rounds_factor: float = field(default=2.0, metadata={
        "help": "A run also stops after factor * budget / (NRE per round or step) rounds or steps."})
    idle_steps: int = field(default=20, metadata={"help": "GRPO stops after this many steps without a new NRE."})
    sweep: bool = field(default=False, metadata={"help": "Sweep GRPO's learning rate on the tuning question."})
    sweep_seed: int = field(default=100, metadata={"help": "Seed of the sweep (kept apart from the reported seeds)."})
    summarize: bool = field(default=False, metadata={"help": "Only rebuild the tables from the cached runs."})
    model_dir: str | None = field(default=None, metadata={
        "help": "The GSM model's folder (default: recipes/gsm_synthetic.py's cached build, built if missing)."})
    prior: str = field(default=str(RESULTS / "prior.json"), metadata={
        "help": "The hard set's measured prior (recipes/gsm_synthetic.py writes it): the questions and their rates."})
    out: str = field(default=str(RESULTS), metadata={"help": "Results folder."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: one question, one seed, tiny budget."})
    threads: int = field(default=1, metadata={"help": "torch threads (a 1.9M-parameter model runs fastest on one)."})


QUICK = dict(question_ids=[0], seeds=[0], budget=8, eval_samples=16, curve_samples=8)


@functools.cache
def load_recipes():
    """recipes/gsm_synthetic.py and recipes/gsm8k_hard.py as modules, loaded once."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gsm_synthetic_recipe", ROOT / "recipes" / "gsm_synthetic.py")
    gsm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gsm)
    return gsm, gsm.load_gsm8k_recipe()


def hard_questions(prior_path: Path) -> list[dict]:
    """The hard set as measured: each question's text, target and pretrained estimate (prior.json's `hard`)."""
    return json.loads(prior_path.read_text())["hard"]


def question_task(question: dict, model_dir: str) -> Task:
    """One hard question as a benchmark task (see the module docstring)."""
    gsm, recipe = load_recipes()
    target = question["target"]

    def oracle(prompts, completions, **kwargs):
        return recipe.gsm_hard_reward(prompts, completions, [target] * len(completions))

    def load():
        model, tok = gsm.load(model_dir)
        return model, tok, oracle

    def estimate(model, tok, oracle, n, seed):
        completions = gsm.sample_completions(model, tok, question["question"], n, MAX_COMPLETION_LENGTH, seed=seed)
        return SuccessEstimate.from_counts(int(sum(gsm.score(question["question"], completions, target))), n,
                                           oracle_calls=n)

    def estimate_banel(trainer, n):
        return trainer.estimate_success_rate(n, posterior=False)  # the generator, as the recipe estimates it

    prompt = recipe.make_prompt(question["question"])
    return Task(f"q{question['id']}", load, estimate, estimate_banel, MAX_COMPLETION_LENGTH,
                {"max_completion_length": MAX_COMPLETION_LENGTH}, eval_samples=1000, curve_samples=200,
                prompts=(prompt,))


def pretrained_record(question: dict, weights: str) -> dict:
    """The pretrained generator's estimate, from the measured prior (no new samples)."""
    est = SuccessEstimate.from_counts(question["successes"], question["samples"], oracle_calls=0)
    return {"method": "pretrained", "seed": 0, "settings": {}, "weights": weights,
            "final": {**est.to_dict(), "nre": 0}, "source": "benchmarks/results/gsm_synthetic/prior.json"}


def make_run(task: Task, method: str, seed: int, knobs: dict, args: Args, pretrained: dict) -> dict:
    record = run_one(task, method, seed, knobs, args.budget, args.eval_samples, args.budget, args.curve_samples,
                     args.max_rounds_factor, os.path.join(os.path.dirname(os.path.abspath(args.out)), "work",
                                                          "gsm_synthetic", f"{task.name}_{method}_{seed}"),
                     idle_steps=args.idle_steps, pretrained=pretrained)
    record["settings"].update(budget=args.budget, eval_samples=args.eval_samples,
                              generator_weights=pretrained["weights"], **defaults_identity(method))
    return record


def defaults_identity(method: str) -> dict:
    """BaNEL runs at the package defaults carry their fingerprint (benchmarks/defaults.py): a run made under former
    defaults is redone."""
    return {"banel_defaults": defaults_fingerprint()} if method == "banel" else {}


def grpo_knobs(args: Args, questions: list[dict], model_dir: str) -> dict:
    """GRPO's learning rate: the sweep's choice on the tuning question (run with --sweep), else the default."""
    path = os.path.join(args.out, "sweep.json")
    if args.sweep:
        tuning = questions[args.tuning_question]
        task = question_task(tuning, model_dir)
        pretrained = pretrained_record(tuning, weights_hash(task.load()[0]))
        sweep = run_sweep(["grpo"], lambda method, knobs, work: make_run(task, method, args.sweep_seed, knobs, args,
                                                                         pretrained),
                          os.path.join(args.out, "runs", "sweep.json"), args.sweep_seed, args.budget,
                          args.eval_samples, grid=GRPO_GRID,
                          identity={"generator_weights": pretrained["weights"], "budget": args.budget})
        sweep["grpo"]["question"] = tuning["id"]
        Path(path).write_text(json.dumps(sweep, indent=1) + "\n")
        return sweep["grpo"]["chosen"]
    if os.path.exists(path):
        return json.loads(Path(path).read_text())["grpo"]["chosen"]
    return DEFAULT_KNOBS["grpo"]


def run_all(args: Args, questions: list[dict], model_dir: str):
    knobs = {"banel": {}, "grpo": grpo_knobs(args, questions, model_dir)}
    if args.sweep:
        return
    if args.tuning_question in args.question_ids:
        others = [q["id"] for q in questions if q["id"] != args.tuning_question]
        raise ValueError(f"question {args.tuning_question} is the sweep's tuning question; evaluate on {others}")
    for qid in args.question_ids:
        question = questions[qid]
        task = question_task(question, model_dir)
        pretrained = pretrained_record(question, weights_hash(task.load()[0]))
        cache = RunCache(os.path.join(args.out, "runs", f"{task.name}.json"))
        cache.put("pretrained", pretrained)
        for method in args.methods:
            for seed in args.seeds:
                identity = {**knobs[method], "budget": args.budget, "eval_samples": args.eval_samples,
                            "generator_weights": pretrained["weights"], **defaults_identity(method)}
                print(f"[run] {task.name} {method} seed {seed}", flush=True)
                run, made = cached_run(cache, f"{method}_seed{seed}", identity,
                                       lambda: make_run(task, method, seed, knobs[method], args, pretrained))
                print(f"[run] {task.name} {method} seed {seed}: {run['final']['rate']:.4f} after "
                      f"{run['final']['nre']} NRE, {run['final']['successes_found_in_training']} successes found, "
                      f"{run['minutes']:.1f} min{'' if made else ' (cached)'}", flush=True)


# ------------------------------------------------------------------------------------------------------ summary
def summarise(args: Args, questions: list[dict]) -> dict:
    rows = []
    for question in (q for q in questions if q["id"] != args.tuning_question):
        cache = RunCache(os.path.join(args.out, "runs", f"q{question['id']}.json"))
        runs = cache.load()
        if not runs:
            continue
        pretrained = runs["pretrained"]["final"]
        reference = reference_rate(pretrained)
        row = {"question": question["id"], "target": question["target"], "pretrained": pretrained,
               "reference_rate": reference, "methods": {}}
        for label, rs in method_groups(runs):
            row["methods"][label] = method_row(rs, reference)
        rows.append(row)
    summary = {"budget": args.budget, "eval_samples": args.eval_samples, "questions": rows}
    sweep = os.path.join(args.out, "sweep.json")
    summary["sweep"] = json.loads(Path(sweep).read_text()) if os.path.exists(sweep) else None
    for method in (*METHODS, FORMER):
        done = [r["methods"][method]["median_multiple"] for r in rows if method in r["methods"]]
        if done or method in METHODS:
            summary[f"{method}_questions_10x"] = f"{sum(m >= 10 for m in done)}/{len(done)}"
    return summary


def method_groups(runs: dict) -> list[tuple[str, list[dict]]]:
    """Each method's runs by seed; BaNEL's made under former package defaults apart, as `FORMER` (kept until rerun,
    and not counted in the methods' summary)."""
    groups = []
    current = defaults_identity("banel")["banel_defaults"]
    for method in METHODS:
        rs = sorted((r for r in runs.values() if r.get("method") == method), key=lambda r: r["seed"])
        if method == "banel":
            groups.append((FORMER, [r for r in rs if r["settings"].get("banel_defaults") != current]))
            rs = [r for r in rs if r["settings"].get("banel_defaults") == current]
        groups.append((method, rs))
    return [(label, rs) for label, rs in groups if rs]


def method_row(rs: list[dict], reference: float) -> dict:
    """One method's seeds on a question: finals, multiples of the pretrained rate, what each run spent."""
    # a policy that never saw a success and kept the pretrained weights is the pretrained generator: 1x
    multiples = [1.0 if r.get("reused_pretrained_estimate") else r["final"]["rate"] / reference for r in rs]
    return {"seeds": [r["seed"] for r in rs], "final": [r["final"]["rate"] for r in rs],
            "final_counts": [f"{r['final']['successes']}/{r['final']['samples']}" for r in rs],
            "final_high": [r["final"]["high"] for r in rs],
            "unchanged": [bool(r.get("reused_pretrained_estimate")) for r in rs],
            "multiple": multiples, "median_multiple": float(np.median(multiples)),
            "successes_found": [r["final"]["successes_found_in_training"] for r in rs],
            "nre": [r["final"]["nre"] for r in rs], "minutes": [r["minutes"] for r in rs],
            "cpu_minutes": [r.get("cpu_minutes") for r in rs], "settings": rs[0]["settings"],
            "stop_reason": [r.get("stop_reason") for r in rs]}


def write_outputs(summary: dict, out: str):
    os.makedirs(out, exist_ok=True)
    Path(out, "comparison.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# Synthetic GSM hard set: BaNEL at its defaults against GRPO (measured on a CPU)", "",
             "Regenerate: `python benchmarks/gsm_synthetic.py` (`--sweep` first for GRPO's learning rate). "
             f"{summary['budget']:,} reward evaluations per run; the trained generator's rate from "
             f"{summary['eval_samples']:,} fresh samples (95% Clopper-Pearson), against the pretrained rate of "
             "`prior.md` (its 95% upper bound when no sample succeeded). A final of 0 in 1,000 samples cannot tell "
             "a generator below the prior from one at it (its upper bound is 3.7e-3); a GRPO policy that saw no "
             "success keeps the pretrained weights (its estimate is the prior's, marked *unchanged*, 1x).", "",
             "| question | pretrained | method | final per seed (successes / samples) | x pretrained per seed | "
             "median | successes found | NRE | minutes per run (median) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary["questions"]:
        pre = row["pretrained"]
        for method, m in row["methods"].items():
            finals = ", ".join("unchanged" if u else c for c, u in zip(m["final_counts"], m["unchanged"]))
            multiples = ", ".join(f"{x:.3g}" for x in m["multiple"])
            lines.append(f"| {row['question']} | {pre['successes']}/{pre['samples']} | {method} | {finals} | "
                         f"{multiples} | {m['median_multiple']:.3g} | {', '.join(map(str, m['successes_found']))} | "
                         f"{', '.join(map(str, m['nre']))} | {np.median(m['minutes']):.1f} |")
    lines += ["", "Questions with the median seed >= 10x the pretrained rate: "
              + "; ".join(f"{m} {summary[f'{m}_questions_10x']}" for m in (*METHODS, FORMER)
                          if f"{m}_questions_10x" in summary), ""]
    if summary["sweep"]:
        for method, sw in summary["sweep"].items():
            tried = "; ".join(f"{json.dumps(r['knobs'])}: {r['rate']:.3g}" for r in sw["results"])
            lines.append(f"GRPO's sweep (tuning question, seed {sw['seed']}, budget {sw['budget']}) chose "
                         f"`{json.dumps(sw['chosen'])}` from {tried}.")
    Path(out, "comparison.md").write_text("\n".join(lines) + "\n")
    plot(summary, os.path.join(out, "comparison.png"))
    print("\n".join(lines))


def plot(summary: dict, path: str):
    from trl_banel_examples.plotting import plt  # the Agg backend: files only

    fig, ax = plt.subplots(figsize=(7, 4))
    shown = ((FORMER, "lightsteelblue", -0.2), ("banel", "tab:blue", 0.0), ("grpo", "tab:gray", 0.2))
    for method, color, offset in shown:
        labelled = False
        for i, row in enumerate(summary["questions"]):
            m = row["methods"].get(method)
            if m:
                ax.scatter([i + offset] * len(m["multiple"]), np.maximum(m["multiple"], 1e-3), color=color,
                           label=None if labelled else method)
                labelled = True
    ax.axhline(1, color="black", lw=0.8)
    ax.axhline(10, color="black", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(summary["questions"])), [f"q{r['question']}" for r in summary["questions"]])
    ax.set_ylabel("final rate / pretrained (per seed)")
    ax.set_title(f"Synthetic GSM hard set, {summary['budget']} NRE per run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args):
    torch.set_num_threads(args.threads)
    gsm, _ = load_recipes()
    model_dir = args.model_dir or str(gsm.ensure_model())
    questions = hard_questions(Path(args.prior))
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    if not args.summarize:
        run_all(args, questions, model_dir)
    if not args.sweep:
        write_outputs(summarise(args, questions), args.out)


if __name__ == "__main__":
    main(parse_args(Args, QUICK))
