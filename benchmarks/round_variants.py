"""Round variants over seeds on a sparse task with exact estimates: why BaNEL fell below the pretrained rate on the
hard attack, what keeps it above, and what the same change does on rare letters.

    python benchmarks/round_variants.py                           # the hard attack, every variant's cached seeds
    python benchmarks/round_variants.py --variants exact_noratio --seeds 0 1 2 3 4 5
    python benchmarks/round_variants.py --task letters --variants exact_noratio --seeds 0 1 2 3
    python benchmarks/round_variants.py --task digits --variants posterior exact_noratio --seeds 100
    python benchmarks/round_variants.py --quick --out /tmp/hv             # a smoke test (one seed, budget 100)

The hard attack (examples/trl_banel_examples/tasks/hard_attack.py) has 22 successes among 10^6 queries and a
pretrained success probability of 3.0e-6, known exactly for any generator, so every figure here is exact. No method
finds a success within 7,500 evaluations (benchmarks/sparse.py), so what a variant shows is what distillation does to
the generator while it only sees failures: the success probability of BaNEL's sampler (its generator conditioned on
avoiding the ledger's known failures) after the run, over the pretrained one.

Variants (BaNELConfig overrides on top of a base: for the hard attack the addition attack's settings,
trl_banel_examples.tasks.addition.BANEL_SETTINGS, which were the hard attack's until this benchmark; for rare
letters the task's own settings, trl_banel_examples.tasks.letters.BANEL_SETTINGS, with prefix evidence and success
replay; for digits the round it first shipped with, trl_banel_examples.tasks.digits.POSTERIOR_SETTINGS, whose
estimates are Monte Carlo, at the sparse benchmark's sample sizes):
- posterior: no override (maximum likelihood on posterior samples, the ratio test at tau = 0.97);
- evidence: prefix evidence (evidence_pseudo_count=1), the rare-letters task's search;
- evidence_kl: the same with a KL(generator || pretrained) term of 0.1;
- baselined: the baselined objective (success replay off: it needs the posterior objective);
- fixed: the generator kept fixed until a first success (distill_before_success=False);
- exact_noratio: the exact objective (trl_banel.exact_distillation) without the ratio test (tau = 1e-30): the hard
  attack's settings now (trl_banel_examples.tasks.hard_attack.BANEL_SETTINGS);
- exact: the exact objective with the base's ratio test (digits' settings now);
- exact_skip: that with skip_known_successes (a round's places go to completions the ledger does not hold).

Runs are made by benchmarks/common.run_one (as benchmarks/sparse.py makes them) and cached in
OUT/{task}_variants/runs/{variant}_seed{seed}.json; the summary (JSON and markdown) is rebuilt from every cached run
at the end.
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

from benchmarks.common import TASKS, parse_args, run_one, with_models  # noqa: E402
from trl_banel.stats import SuccessEstimate  # noqa: E402
from trl_banel_examples.tasks import addition, digits, letters  # noqa: E402

BASES = {"hard_attack": addition.BANEL_SETTINGS, "letters": letters.BANEL_SETTINGS,
         "digits": digits.POSTERIOR_SETTINGS}
CALIBRATIONS = {"hard_attack": "hard_attack_calibration.json", "letters": "letters_calibration.json",
                "digits": "digits_calibration.json"}

VARIANTS = {
    "posterior": {},
    "evidence": dict(evidence_pseudo_count=1.0),
    "evidence_kl": dict(evidence_pseudo_count=1.0, distill_kl_coef=0.1),
    "baselined": dict(distill_objective="baselined", success_replay=0.0),
    "fixed": dict(distill_before_success=False),
    "exact_noratio": dict(distill_objective="exact", rejection_threshold=1e-30),
    "exact": dict(distill_objective="exact"),  # the exact objective with the base's ratio test (its failure model)
    # that, with the rounds' places kept for completions the ledger does not hold (known successes skipped)
    "exact_skip": dict(distill_objective="exact", skip_known_successes=True),
}


@dataclass
class Args:
    task: str = field(default="hard_attack", metadata={"help": "Task: hard_attack, letters or digits.",
                                                       "choices": list(BASES)})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={"help": "Variants to run."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds to run (cached ones are kept)."})
    budget: int = field(default=7500, metadata={"help": "Training reward evaluations (NRE) per run."})
    out: str = field(default=str(ROOT / "benchmarks" / "results"), metadata={"help": "Results folder."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: seed 0, budget 100, one variant."})
    threads: int = field(default=1, metadata={"help": "torch threads (tiny models run fastest on one)."})
    digits_models: str | None = field(default=None, metadata={
        "help": "With --task digits: a models folder to run instead of the shipped one (benchmarks/sparse.py's "
                "option of the same name); its calibration is the calibration.json beside it."})


QUICK = dict(seeds=[0], budget=100, variants=["exact_noratio"])


def run_variant(variant: str, seed: int, args: Args, runs: Path) -> dict:
    """One cached run: the task's base settings with the variant's overrides, as benchmarks/sparse.py runs BaNEL."""
    path = runs / f"{variant}_seed{seed}.json"
    if path.exists():
        record = json.loads(path.read_text())
        if record["settings"]["max_reward_evaluations"] == args.budget:
            return record
    task = TASKS[args.task]()
    if args.digits_models:
        task = with_models(task, args.digits_models)
    task.banel.clear()
    task.banel.update(BASES[args.task])
    cached = ROOT / "benchmarks" / "results" / "sparse_runs" / f"{args.task}_pretrained.json"
    pretrained = json.loads(cached.read_text()) if cached.exists() else None
    # digits' estimates are Monte Carlo, at the sparse benchmark's sizes; the other tasks' are exact (0 samples)
    record = run_one(task, "banel", seed, VARIANTS[variant], args.budget, task.eval_samples, 500, task.curve_samples,
                     2.0, os.path.join(tempfile.gettempdir(), f"{args.task}_variants_{variant}_{seed}"),
                     pretrained=pretrained)  # given, the record has the sparse benchmark's fields (task, timings)
    record["settings"].update(budget=args.budget, eval_samples=task.eval_samples)  # as sparse.py records its runs
    path.write_text(json.dumps(record, indent=1, default=str))
    return record


def calibration_path(task: str, digits_models: str | None = None) -> Path:
    """The task's calibration file; with --digits_models, the calibration.json beside those models."""
    if digits_models:
        return Path(digits_models).resolve().parent / "calibration.json"
    return ROOT / "benchmarks" / "results" / CALIBRATIONS[task]


def task_prior(task: str, digits_models: str | None = None) -> float:
    """The pretrained success probability multiples are taken against: exact (hard attack, rare letters) or the
    calibration's Monte Carlo estimate (digits), its 95% upper bound when it saw no success."""
    calibration = json.loads(calibration_path(task, digits_models).read_text())
    if "exact_prior" in calibration:
        return calibration["exact_prior"]
    prior = calibration["prior"]
    return SuccessEstimate.from_counts(prior["successes"], prior["n"]).reference_rate


def summarize(runs: Path, prior: float) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        records = [json.loads(p.read_text()) for p in sorted(runs.glob(f"{variant}_seed*.json"))]
        if not records:
            continue
        final = [r["final"]["rate"] / prior for r in records]
        rows.append({"variant": variant, "seeds": [r["seed"] for r in records], "improvement": final,
                     "median": float(np.median(final)), "below_pretrained": sum(f < 1 for f in final),
                     "successes_found": sum(r["final"]["successes_found_in_training"] for r in records),
                     "minutes": float(np.median([r["minutes"] for r in records])),
                     "settings": VARIANTS[variant]})
    return rows


def markdown(rows: list[dict], prior: float, task: str, calibration: Path | None = None) -> str:
    where = calibration.relative_to(ROOT) if calibration and calibration.is_relative_to(ROOT) else calibration
    how = f"Monte Carlo, {where}; its 95% upper bound if it saw no success" if task == "digits" else "exact"
    lines = [f"{task}: pretrained success probability {prior:.3g} ({how}); final success probability of BaNEL's "
             "sampler over it.", "",
             "| variant | seeds | median | each seed | below pretrained | successes found | min/run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        each = ", ".join(f"{x:.3g}x" for x in r["improvement"])
        lines.append(f"| {r['variant']} | {len(r['seeds'])} | {r['median']:.3g}x | {each} | {r['below_pretrained']} "
                     f"| {r['successes_found']} | {r['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def main(args: Args):
    torch.set_num_threads(args.threads)
    out = Path(args.out) / f"{args.task}_variants"
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    prior = task_prior(args.task, args.digits_models)
    for variant in args.variants:
        for seed in args.seeds:
            record = run_variant(variant, seed, args, runs)
            print(f"{variant} seed {seed}: {record['final']['rate'] / prior:.3g}x", flush=True)
    rows = summarize(runs, prior)
    summary = {"task": args.task, "budget": args.budget, "prior": prior, "base": BASES[args.task], "rows": rows}
    (out / "variants.json").write_text(json.dumps(summary, indent=1))
    table = markdown(rows, prior, args.task, calibration_path(args.task, args.digits_models))
    (out / "variants.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main(parse_args(Args, QUICK))
