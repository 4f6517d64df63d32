"""The default round on tasks nobody tuned it on: `BaNELConfig()` defaults, with only the budget, lengths, batch sizes
and stop rules set, on the pre-registered evaluation tasks of the task family and on the four shipped tasks.

    python benchmarks/defaults.py                                     # evaluation tasks, defaults, every seed
    python benchmarks/defaults.py --group evaluation --variant no_known   # reject_known_failures=False
    python benchmarks/defaults.py --group tuning --variant kl0.3_exact      # a candidate round, tuning set only
    python benchmarks/defaults.py --group shipped --tasks letters     # a shipped task at the defaults
    python benchmarks/defaults.py --summarize                         # tables and plot from the cached runs
    python benchmarks/defaults.py --import_runs DIR                   # merge runs made elsewhere, then summarize
    python benchmarks/defaults.py --prune sgd --tasks letters         # a candidate's runs leave the results folder
    python benchmarks/defaults.py --quick --out /tmp/d                # smoke test: one task, one seed, 100 NRE

The tasks and seeds are fixed in benchmarks/preregistration.json, committed before any tuning. Candidate rounds
(`CANDIDATES`: mechanism overrides) run on the tuning set only; on an evaluation task this script runs the defaults
(and their `no_known` and `support1e-2` variants) and nothing else. Each run is cached in OUT/runs/{task}.json (one
file per task, a record per `{variant}_seed{seed}`, written under a lock so that processes running other seeds of a
task add theirs: `benchmarks.common.RunCache`) with the fingerprint of the BaNELConfig defaults it ran under: a run
made before the defaults changed is redone. `--import_runs DIR` merges the runs of DIR (one file per run, as
OUT/runs/{task}/{variant}_seed{seed}.json were before, or one file per task) into OUT: a run is taken unless OUT
holds its key already (a held run of former defaults gives way to an imported one of the current defaults) or pruned
it, and each taken one is printed. `--prune VARIANT` removes a variant's runs for the results folder's size limit and
notes each in OUT/pruned.json with the commit that holds it (a worktree made before the prune still has them).
Success probabilities are exact (family tasks, letters, hard attack) or Monte Carlo (addition, digits).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import task_family  # noqa: E402
from benchmarks.common import (TASKS, RunCache, blind_search, parse_args, reference_rate, run_one,  # noqa: E402
                               run_pretrained, unpacked_traces, write_markdown)
from trl_banel import BaNELConfig  # noqa: E402
from trl_banel.ledger import LEDGER_FILENAME  # noqa: E402
from trl_banel.journal import read_json_lines  # noqa: E402

PREREGISTRATION = ROOT / "benchmarks" / "preregistration.json"
# what a task may set: the budget, lengths, batch sizes and stop rules; everything else (the round's size too) is the
# default round's
TASK_FIELDS = {"max_reward_evaluations", "num_candidates", "max_completion_length",
               "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
               "scoring_batch_size", "num_rounds", "max_idle_rounds", "stop_after_successes"}
# variants that may run on the evaluation tasks
EVALUATION_VARIANTS = {"defaults": {}, "no_known": {"reject_known_failures": False},
                       # the opt-in guard of the pretrained support, chosen on the tuning set (candidate support1e-2)
                       "support1e-2": {"support_min_p": 1e-2}}
# candidate rounds: mechanism overrides, tried on the tuning set only
CANDIDATES = {
    "replay": {"learning_rate": 1e-3, "success_replay": 0.5},
    "exact_replay": {"learning_rate": 1e-3, "distill_objective": "exact", "success_replay": 0.5},
    "exact_replay_noratio": {"learning_rate": 1e-3, "distill_objective": "exact", "success_replay": 0.5,
                             "rejection_threshold": 1e-30},
    # the step size set by a target KL per distillation (StepSize), from a start between the two sizes' rates
    "kl0.1_exact": {"learning_rate": 1e-4, "distill_target_kl": 0.1, "distill_objective": "exact",
                    "success_replay": 0.5},
    "kl0.3_exact": {"learning_rate": 1e-4, "distill_target_kl": 0.3, "distill_objective": "exact",
                    "success_replay": 0.5},
    "kl0.3_noratio": {"learning_rate": 1e-4, "distill_target_kl": 0.3, "distill_objective": "exact",
                      "success_replay": 0.5, "rejection_threshold": 1e-30},
    # the chosen round with a KL(generator || pretrained) term: does it keep the seeds that fell below the prior?
    "kl0.1_exact_klref": {"learning_rate": 1e-4, "distill_target_kl": 0.1, "distill_objective": "exact",
                          "success_replay": 0.5, "distill_kl_coef": 0.1},
    # the default round with prefix evidence (the ratio test rejects nothing on the tuning tasks: is novelty on
    # prefixes what finds a first success?)
    "evidence1": {"evidence_pseudo_count": 1.0},
    # the default round with a distillation that moved the generator by more than 3x the target KL pulled back to
    # about the target (the eval runs' step sizes: one distillation in ten moved it > 0.5 nats, up to 11); 0.3 nats at
    # the target of 0.1 (its first runs set it as distill_backoff_kl=0.3, since renamed); the defaults since revision 3
    "backoff0.3": {"distill_backoff_factor": 3.0},
    # the default round with a KL(generator || pretrained) term: on the evaluation runs at the defaults, the seeds
    # that ended below the prior spent 85-100% of their last evaluations on malformed outputs (the pretrained
    # generator: 0-14%), which the reverse KL to the pretrained generator penalises most
    "klref0.1": {"distill_kl_coef": 0.1},
    "klref0.3": {"distill_kl_coef": 0.3},
    "klref1": {"distill_kl_coef": 1.0},
    # the default round with proposals off the pretrained generator's support rejected (a token below support_min_p
    # times the pretrained top token's probability): the seeds below the prior left the format, a KL term to the
    # pretrained generator kept the format by pinning the generator; this keeps the search on it without a pull
    "support1e-3": {"support_min_p": 1e-3},
    "support1e-2": {"support_min_p": 1e-2},
    # the drift of long runs without a success (docs/default_round.md, revision 4): each exact distillation's step
    # at most the posterior's own distance from the generator, -log Z; without the ratio test (known failures only);
    # and Adam with a larger epsilon (a fresh Adam's first step moves every parameter by about the learning rate
    # whatever its gradient's size: never-sampled tokens' rows move at full rate on gradients near 0)
    "bound": {"distill_posterior_bound": True},
    "bound_noratio": {"distill_posterior_bound": True, "rejection_threshold": 1e-30},
    "bound_noratio_eps1e-4": {"distill_posterior_bound": True, "rejection_threshold": 1e-30, "adam_epsilon": 1e-4},
    "bound_eps1e-4": {"distill_posterior_bound": True, "adam_epsilon": 1e-4},
    # the same without the ratio test, proposing at a higher temperature: the search broadened by the proposal
    # distribution rather than by moving the generator (before a first success, the default round finds the count
    # tasks' successes by the drift that flattens the generator, and the same drift sinks the letters and the attack)
    "bound_noratio_eps1e-4_t1.5": {"distill_posterior_bound": True, "rejection_threshold": 1e-30,
                                   "adam_epsilon": 1e-4, "temperature": 1.5},
    # half the step (a quarter of the target KL) twice as often: the same displacement where each distillation moves
    # the generator the same way (the count tasks' steady rise), half the spread where their directions are noise
    # (the long runs' random walk in log success probability, whose downward drift goes with the spread); the
    # defaults since commit b6bfaef (docs/default_round.md)
    "kl0.025_per25": {"distill_target_kl": 0.025, "evaluations_per_round": 25},
    # the drift of long runs without a success under plain SGD: a fresh Adam's first steps move every parameter by
    # about the learning rate whatever its gradient (sign descent), SGD in proportion to it (the step size still set
    # by the target KL)
    "sgd": {"optim": "sgd"},
    # measured: with the cap at 1e-2 SGD moved rare letters by ~0.003 nats a distillation, a tenth of the target;
    # uncapped, the target sets its step as it sets Adam's
    "sgd_uncapped": {"optim": "sgd", "distill_max_learning_rate": 1e3},
    # each half of it alone, against the defaults above: which one does the work
    "kl0.1_per25": {"distill_target_kl": 0.1},
    "kl0.025_per50": {"evaluations_per_round": 50},
    # the digits idle stop (every proposal a known failure within ~150 evaluations, each step held to 0.025 nats):
    # the step's target grows 4x with each consecutive idle round, up to the posterior's distance -log Z; runs that
    # never idle are unchanged by it. The defaults since 2026-12-07 (docs/default_round.md, "Steps that grow ...")
    "idle_growth4": {"distill_idle_kl_growth": 4.0},
}
SHIPPED = ["addition", "letters", "digits", "hard_attack"]
GRPO_RATES = (1e-4, 3e-4, 1e-3)  # GRPO's sweep on the tuning set (benchmarks/common.py's GRPO settings otherwise)
CURVE_EVERY = 500  # NRE between curve points (the best point is read from them)


@dataclass
class Args:
    group: str = field(default="evaluation", metadata={"help": "Task group.",
                                                       "choices": ["evaluation", "tuning", "shipped"]})
    variant: str = field(default="defaults", metadata={
        "help": f"'defaults', 'no_known' (reject_known_failures=False), 'support1e-2' (support_min_p=1e-2), or on "
                f"the tuning set or the shipped tasks a candidate: "
                f"{', '.join(CANDIDATES)}"})
    tasks: list[str] = field(default_factory=list, metadata={"help": "Tasks of the group to run (default: all)."})
    seeds: list[int] = field(default_factory=list, metadata={"help": "Seeds (default: the group's, pre-registered)."})
    out: str = field(default=str(ROOT / "benchmarks" / "results" / "defaults"), metadata={"help": "Results folder."})
    summarize: bool = field(default=False, metadata={"help": "Only rebuild the summary from the cached runs."})
    import_runs: str = field(default="", metadata={
        "help": "A folder of runs made elsewhere (old layout: TASK/VARIANT_seedN.json files; or TASK.json files) to "
                "merge into the results, keeping each run whose key they do not hold and none that was pruned; then "
                "summarize."})
    prune: list[str] = field(default_factory=list, metadata={
        "help": "Variants whose runs leave the results folder (of --tasks, or of every task), each noted in "
                "pruned.json with the commit that holds it so that no later import brings it back; then "
                "summarize."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: one tuning task, one seed, 100 NRE."})
    budget: int = field(default=0, metadata={"help": "NRE per run (0: pre-registered; shipped tasks: their own)."})
    threads: int = field(default=1, metadata={"help": "torch threads (tiny models run fastest on one)."})


QUICK = dict(group="tuning", tasks=["tune_count_char"], seeds=[100], budget=100)


def preregistration() -> dict:
    return json.loads(PREREGISTRATION.read_text())


def variant_settings(group: str, variant: str) -> dict:
    """The overrides of a variant, refusing a candidate round on anything but the tuning set. GRPO: `grpo_lr{rate}`
    (its sweep, tuning set only) or `grpo` (the rate the sweep chose; `{}` here, resolved by `grpo_learning_rate`)."""
    if variant == "grpo":
        return {}
    if variant.startswith("grpo_lr"):
        if group != "tuning":
            raise ValueError(f"--variant {variant!r} is GRPO's sweep: it runs on the tuning set only "
                             "(the evaluation tasks run --variant grpo, at the rate the sweep chose)")
        return {"learning_rate": float(variant[len("grpo_lr"):])}
    if variant in EVALUATION_VARIANTS:
        return dict(EVALUATION_VARIANTS[variant])
    if variant not in CANDIDATES:
        raise ValueError(f"--variant {variant!r}: valid are {sorted(EVALUATION_VARIANTS) + sorted(CANDIDATES)}, "
                         f"grpo and grpo_lr<rate> ({', '.join(f'grpo_lr{lr:g}' for lr in GRPO_RATES)})")
    if group == "evaluation":
        raise ValueError(f"--variant {variant!r} is a candidate round: it runs on the tuning set and the shipped "
                         "tasks only (pre-registered evaluation tasks are judged at the defaults)")
    return dict(CANDIDATES[variant])


# Fields whose defaults do not change what a run does, hashed as their earlier default (None: left out) so that a
# change to them does not redo every run: when a checkpoint is saved, and gradient checkpointing (None and False are
# both off). A run of benchmarks/defaults.py reproduced its cached result exactly after these changed.
_NOT_THE_ROUND = {"save_every_minutes": None, "gradient_checkpointing": False,
                  "dataloader_pin_memory": True,  # off since (nothing to pin), at its old value: runs unchanged
                  "support_min_p": None,  # added off (0): left out while it is off
                  "distill_posterior_bound": None,  # added off: left out while it is off
                  "distill_max_learning_rate": None}  # added at the former constant (1e-2): left out while it is


# Raised whenever the round's code changes what a run at the defaults does (the fields alone cannot say so):
# 2 = proposals sized to the need, distillation draws of what the steps consume, idle = fewer than half the places
# filled (issue #31); 3 = a distillation that moved the generator beyond 3x the target KL pulled back to about the
# target (`distill_backoff_factor`); 4 = the exact objective estimates from its proposals the mass of a known
# failure's text spelt by other tokens (the rare-letters collapse).
ROUND_REVISION = 4


def defaults_fingerprint() -> str:
    """A hash of every BaNELConfig default that can change a run, and of `ROUND_REVISION`: a cached run made under
    other defaults, or by an earlier round, is redone."""
    defaults = {f.name: repr(f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(BaNELConfig) if f.name not in _NOT_THE_ROUND}
    defaults.update({name: repr(value) for name, value in _NOT_THE_ROUND.items() if value is not None})
    if ROUND_REVISION > 1:  # revision 1 is every run made before the revision was counted (their hashes stay valid)
        defaults["round_revision"] = repr(ROUND_REVISION)
    return hashlib.sha256(json.dumps(defaults, sort_keys=True).encode()).hexdigest()[:16]


def task_settings(settings: dict) -> dict:
    """A task's settings less any mechanism field (the default round decides those)."""
    return {k: v for k, v in settings.items() if k in TASK_FIELDS}


def load_task(group: str, name: str, cache: Path | None = None):
    """`(benchmarks.common.Task, prior, blind reference)` of a task of the group."""
    if group == "shipped":
        task = TASKS[name]()
        task.banel = task_settings(task.banel)
        results = ROOT / "benchmarks" / "results"
        if name == "addition":  # the attacker's calibration: 90 successes in 100,000 samples
            prior = json.loads((results / "addition_calibration.json").read_text())["attacker_success_rate"]["rate"]
        else:
            prior = reference_rate(RunCache(results / "sparse_runs" / f"{name}.json").get("pretrained")["final"])
        blind = task.blind(task.load()[2]) if task.blind else None
        return task, prior, blind
    built = built_family_task(group, name, cache)
    return task_family.as_benchmark_task(built), built.prior, built.blind()


def built_family_task(group: str, name: str, cache: Path | None = None):
    """The family task `name` of the pre-registered `group`, built (or loaded from its cache)."""
    entries = {e["name"]: e for e in preregistration()[group]}
    if name not in entries:
        raise ValueError(f"task {name!r} is not in the {group} set: {sorted(entries)}")
    return task_family.build(task_family.specs_from([entries[name]])[0], cache=cache)


def malformed_shares(group: str, name: str, workdir: str) -> list[float] | None:
    """A family run's share of malformed outputs per `CURVE_EVERY` evaluations, read from its ledger (`None` for a
    shipped task or a run without a ledger)."""
    ledger = Path(workdir) / LEDGER_FILENAME
    if group == "shipped" or not ledger.exists():
        return None
    built = built_family_task(group, name)
    return task_family.malformed_shares(built.spec, built.words, ledger_completions(ledger), CURVE_EVERY)


def ledger_completions(ledger: Path) -> list[str]:
    """A ledger file's completions, in order, read as the package reads it: lines end at a newline only, since a
    byte-level tokenizer decodes to any character and `str.splitlines` also splits at `\x85` or `\u2028` (a subword
    run's ledger held one, and the benchmark crashed after the run)."""
    return [record["completion"] for record in read_json_lines(str(ledger), repair=False)]


def run(group: str, name: str, variant: str, seed: int, budget: int, runs: Path) -> dict:
    cache, key = RunCache(runs / f"{name}.json"), f"{variant}_seed{seed}"
    fingerprint = defaults_fingerprint()
    record = cache.get(key)
    if record is not None and record.get("defaults_fingerprint") == fingerprint and record["budget"] == budget:
        return record
    task, prior, blind = load_task(group, name)
    overrides = variant_settings(group, variant)
    budget = budget or task.banel.get("max_reward_evaluations", 7500)
    workdir = os.path.join(tempfile.gettempdir(), f"defaults_{name}_{variant}_{seed}")
    if variant.startswith("grpo"):
        knobs = overrides or {"learning_rate": grpo_learning_rate(runs)}
        record = run_one(task, "grpo", seed, knobs, budget, task.eval_samples, CURVE_EVERY, task.curve_samples, 2.0,
                         workdir, idle_steps=20, pretrained=run_pretrained(task, seed, 0))
        overrides = knobs
    else:
        record = run_one(task, "banel", seed, overrides, budget, task.eval_samples, CURVE_EVERY, task.curve_samples,
                         2.0, workdir, pretrained={"final": {}})
    best_curve = max((p["rate"] for p in record["curve"]), default=0.0)
    record.update(task=name, group=group, variant=variant, budget=budget, prior=prior, blind=blind,
                  defaults_fingerprint=fingerprint, overrides=overrides, best_curve_rate=best_curve,
                  malformed=malformed_shares(group, name, workdir))
    if group != "shipped":  # which build of the task: a rebuild on another machine can differ (docs/default_round.md)
        record["pretrained_weights"] = built_family_task(group, name).calibration["weights"]
    record = json.loads(json.dumps(record, default=str))  # what the file holds
    cache.put(key, record)
    return record


def is_run(record) -> bool:
    return isinstance(record, dict) and {"task", "variant", "seed", "final", "defaults_fingerprint"} <= set(record)


PRUNED_FILE = "pruned.json"  # beside runs/: {task: {key: the commit that holds the record}}


def pruned(runs: Path) -> dict[str, dict[str, str]]:
    path = runs.parent / PRUNED_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def prune_runs(runs: Path, variants: list[str], tasks: list[str]) -> dict[str, list[str]]:
    """Removes the records of `variants` from the task files of `runs` (of `tasks`, or all), for the results folder's
    size limit, and notes each key with the commit that still holds it (HEAD: prune committed records) in
    `PRUNED_FILE`, which [`import_runs`] honours. Returns the keys removed, by task."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    notes, removed = pruned(runs), {}
    for path in sorted(runs.glob("*.json")):
        if tasks and path.stem not in tasks:
            continue
        cache = RunCache(path)
        gone = cache.remove(lambda key, record: record.get("variant") in variants)
        if gone:
            removed[path.stem] = gone
            notes.setdefault(path.stem, {}).update({key: commit for key in gone})
            print(f"pruned {path.stem}: {', '.join(gone)} (in git at {commit})", flush=True)
    (runs.parent / PRUNED_FILE).write_text(json.dumps(notes, indent=1, sort_keys=True) + "\n")
    return removed


def import_runs(source: Path, runs: Path) -> dict:
    """Merges the run records found under `source` (any `*.json` below it: one run per file, the layout before
    `RunCache`, or a task's file of runs) into the task files of `runs`. A record is taken unless `runs` holds its key
    (`{variant}_seed{seed}` of its task) already; a held record made under former defaults gives way to one made
    under the current defaults (what running it here would do); a record pruned from `runs` ([`prune_runs`]) is not
    taken back. Prints each record taken and a count of those left out; returns the keys taken, by task."""
    if not source.is_dir():
        raise ValueError(f"--import_runs {source}: not a folder")
    found: dict[str, dict] = {}
    for path in sorted(source.rglob("*.json")):
        content = json.loads(path.read_text())
        records = [content] if is_run(content) else (
            [r for r in content.values() if is_run(r)] if isinstance(content, dict) else [])
        for r in map(unpacked_traces, records):  # a task's file packs its records' traces
            found.setdefault(r["task"], {})[f"{r['variant']}_seed{r['seed']}"] = (path, r)
    current, gone = defaults_fingerprint(), pruned(runs)
    for task, records in found.items():
        for key in set(records) & set(gone.get(task, {})):
            del records[key]
            print(f"left out {task} {key}: pruned (in git at {gone[task][key]})", flush=True)

    def keep(key, held, new):  # the held record stays unless only the imported one is of the current defaults
        return not (new["defaults_fingerprint"] == current != held.get("defaults_fingerprint"))

    taken, left = {}, 0
    for task, records in sorted(found.items()):
        cache = RunCache(runs / f"{task}.json")
        held = cache.load()
        written = cache.merge({k: r for k, (_, r) in records.items()}, keep)
        taken[task], left = written, left + len(records) - len(written)
        for key in written:
            how = "replaced a run of former defaults" if key in held else "new"
            print(f"imported {task} {key} from {records[key][0]} ({how})", flush=True)
    print(f"imported {sum(map(len, taken.values()))} run(s) from {source}; {left} already held", flush=True)
    return taken


def grpo_learning_rate(runs: Path) -> float:
    """The GRPO rate its sweep chose: the best median final multiple over the tuning tasks' `grpo_lr*` runs (the
    smallest rate on ties)."""
    tuning = {e["name"] for e in preregistration()["tuning"]}
    held = {name: RunCache(runs / f"{name}.json").load() for name in tuning}
    scores = {}
    for lr in GRPO_RATES:
        finals = [r["final"]["rate"] / r["prior"] for name in tuning for key, r in held[name].items()
                  if re.fullmatch(rf"grpo_lr{re.escape(f'{lr:g}')}_seed\d+", key)]
        if finals:
            scores[lr] = float(np.median(finals))
    if not scores:
        raise ValueError("no GRPO sweep runs on the tuning set: run --group tuning --variant grpo_lr<rate> first "
                         f"(rates {', '.join(f'{lr:g}' for lr in GRPO_RATES)})")
    return max(sorted(scores), key=lambda lr: scores[lr])


def half_empty_streak(record: dict) -> int | None:
    """The most consecutive rounds of a run that filled fewer than half of their places (`None`: not recorded)."""
    filled = [r.get("round/places_filled") for r in record.get("rounds") or []]
    if not filled or any(f is None for f in filled):
        return None
    longest = current = 0
    for f in filled:
        current = current + 1 if f < 0.5 else 0
        longest = max(longest, current)
    return longest


def malformed_cell(shares: list) -> str:
    known = [x for x in shares if x is not None]
    return f"{np.median(known):.0%}" if known else ""


def summarize(out: Path) -> dict:
    """Per (task, variant): each seed's final and best multiple of the pretrained probability and the criteria."""
    rows = []
    for task_file in sorted((out / "runs").glob("*.json"), key=lambda p: p.stem):
        by_variant: dict[str, list] = {}
        for r in RunCache(task_file).load().values():
            variant = r["variant"]
            if variant in EVALUATION_VARIANTS and r["defaults_fingerprint"] != defaults_fingerprint():
                variant += f" (former defaults {r['defaults_fingerprint'][:6]})"  # kept until rerun, labelled
            by_variant.setdefault(variant, []).append(r)
        for variant, records in sorted(by_variant.items()):
            records.sort(key=lambda r: r["seed"])
            prior = records[0]["prior"]
            blind = records[0].get("blind")
            expected = blind_search(blind, records[0]["budget"])["expected_successes"] if blind else None
            final = [r["final"]["rate"] / prior for r in records]
            best = [max(r["best_curve_rate"], r["final"]["rate"]) / prior for r in records]
            # below pretrained: the final's 95% upper bound under the prior (exact estimates: the value itself, with
            # a relative 1e-6 for float rounding: an unchanged generator scored in other batches is not "below")
            below = [r["final"]["high"] < prior * (1 - 1e-6) for r in records]
            rows.append({
                "task": task_file.stem, "group": records[0]["group"], "variant": variant, "prior": prior,
                "budget": records[0]["budget"], "blind_expected_successes": expected,
                "qualifies": expected is not None and expected >= 3,
                "seeds": [r["seed"] for r in records], "final_x": final, "best_x": best,
                "successes_found": [r["final"]["successes_found_in_training"] for r in records],
                "nre": [r["final"]["nre"] for r in records], "minutes": [r["minutes"] for r in records],
                "stop_reason": [r.get("stop_reason") for r in records],
                "seeds_100x": sum(f >= 100 for f in final), "below_pretrained": sum(below),
                "final_below_half_best": sum(f < 0.5 * b for f, b in zip(final, best)),
                "median_x": float(np.median(final)), "overrides": records[0]["overrides"],
                "half_empty_streak": max((s for s in map(half_empty_streak, records) if s is not None),
                                         default=None),
                "malformed_last": [r["malformed"][-1] if r.get("malformed") else None for r in records],
            })
    summary = {"defaults_fingerprint": defaults_fingerprint(), "rows": rows}
    (out / "defaults.json").write_text(json.dumps(summary, indent=1))
    lines = ["Final success probability over the pretrained one (x), per seed; exact for the family, letters and the "
             "hard attack. `qualifies`: a blind search expects >= 3 successes within the budget.", "",
             "`half-empty`: the most rounds in a row, over the seeds, that filled fewer than half of their evaluation "
             "places (a run stops after 5; blank: recorded before runs logged it).", "",
             "`malformed`: the median over the seeds of the share of a run's last 500 evaluations spent on outputs "
             "that are not well-formed (they fail every rule; blank: not recorded).", "",
             "| task | variant | prior | blind expects | seeds >= 100x | below prior | final < best/2 | median | "
             "each seed | successes found | half-empty | malformed | min/run |", "|" + "---|" * 13]
    for r in rows:
        exp = "" if r["blind_expected_successes"] is None else f"{r['blind_expected_successes']:.3g}"
        lines.append(f"| {r['task']} | {r['variant']} | {r['prior']:.2g} | {exp} | {r['seeds_100x']}/"
                     f"{len(r['seeds'])} | {r['below_pretrained']} | {r['final_below_half_best']} | "
                     f"{r['median_x']:.3g}x | {', '.join(f'{x:.2g}' for x in r['final_x'])} | "
                     f"{', '.join(map(str, r['successes_found']))} | "
                     f"{'' if r.get('half_empty_streak') is None else r['half_empty_streak']} | "
                     f"{malformed_cell(r['malformed_last'])} | {np.median(r['minutes']):.1f} |")
    write_markdown(out / "defaults.md", lines)
    plot(rows, out / "defaults.png")
    return summary


def plot(rows: list[dict], path: Path) -> None:
    from trl_banel_examples.plotting import plt  # the Agg backend: files only

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    for i, r in enumerate(rows):
        ax.scatter(np.maximum(r["final_x"], 1e-12), [i] * len(r["final_x"]), s=18, alpha=0.7,
                   color="tab:green" if r["qualifies"] else "tab:gray")
    ax.axvline(1, color="k", lw=0.8, label="pretrained")
    ax.axvline(100, color="tab:red", lw=0.8, ls="--", label="100x")
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), [f"{r['task']} ({r['variant']})" for r in rows], fontsize=8)
    ax.set_xlabel("final success probability / pretrained\n(green: a blind search expects >= 3 successes)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.import_runs:
        import_runs(Path(args.import_runs), out / "runs")
    elif args.prune:
        prune_runs(out / "runs", args.prune, args.tasks)
    elif not args.summarize:
        prereg = preregistration()
        variant_settings(args.group, args.variant)  # refuse a candidate off the tuning set before any work
        names = args.tasks or (SHIPPED if args.group == "shipped" else [e["name"] for e in prereg[args.group]])
        seeds = args.seeds or prereg["tuning_seeds" if args.group == "tuning" else "evaluation_seeds"]
        budget = args.budget or (0 if args.group == "shipped" else prereg["budget"])
        for name in names:
            for seed in seeds:
                r = run(args.group, name, args.variant, seed, budget, out / "runs")
                print(f"{name} {args.variant} seed {seed}: {r['final']['rate'] / r['prior']:.3g}x "
                      f"({r['final']['successes_found_in_training']} successes found, {r['minutes']:.1f} min)",
                      flush=True)
    return summarize(out)


if __name__ == "__main__":
    main(parse_args(Args, QUICK))
