"""What the benchmarks share (`addition_attack.py`, `sparse.py`, `efficiency.py` import it; no script loads another).

- the methods and the GRPO family's settings, default knobs and sweep grids;
- `Task`: how to load a task (generator, tokenizer, oracle), how to estimate a sampler's success rate on it (Monte
  Carlo with Clopper-Pearson, or exact), its GRPO completion length and the BaNEL round these benchmarks ran on it
  (the task module's `BENCHMARK_ROUND`; `defaults.py` keeps only its budget, lengths, batch sizes and stop rules);
- `run_one`: one (method, seed) run at a given NRE budget, with its success curve, best-point tracking and final and
  best-point estimates; `RunCache` keeps a task's runs in one JSON file (locked, atomic writes) and `cached_run`
  skips a run it holds; `run_sweep` sweeps the knobs on a seed kept apart;
- summary statistics (median, interquartile range, seeds above 10x / 100x the pretrained rate, improvement over the
  best baseline) and the success-against-NRE curves over seeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from datasets import Dataset
from transformers import HfArgumentParser, TrainerCallback, set_seed
from trl import GRPOConfig, GRPOTrainer

from trl_banel import BaNELConfig, BaNELTrainer
from trl_banel_examples.baselines import (BudgetedReward, NSRConfig, NSRTrainer, PolicySuccessCurveCallback, RNDBonus,
                                 SimHashCountBonus, StopOnBudgetCallback)
from trl_banel.callbacks import SuccessCurveCallback
from trl_banel_examples.cli import apply_quick
from trl_banel.ledger import LEDGER_FILENAME
from trl_banel.stats import ExactSuccess, SuccessEstimate
from trl_banel_examples.tasks.common import weights_hash

ROOT = Path(__file__).resolve().parents[1]

METHODS = ["pretrained", "banel", "grpo", "grpo_rnd", "grpo_counts", "nsr"]
BASELINES = ["grpo", "grpo_rnd", "grpo_counts", "nsr"]
# BaNEL at the task's settings with one part switched off (the ablation on a task that is not exactly computable);
# run only when asked for by name (`--methods banel_no_replay`), each reported as its own row
BANEL_VARIANTS = {"banel_no_replay": {"success_replay": 0.0}, "banel_no_known": {"reject_known_failures": False}}


def is_banel(method: str) -> bool:
    return method == "banel" or method in BANEL_VARIANTS

# how every benchmark run is executed (not a task's or a method's setting)
RUN_SETTINGS = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no")
# GRPO-family settings for a tiny model; the swept knobs (learning rate, bonus weight) come from the sweep file, the
# completion length from the task.
GRPO_COMMON = dict(num_generations=16, per_device_train_batch_size=64, max_completion_length=12, beta=0.0,
                   temperature=1.0, loss_type="dapo", scale_rewards="group", num_iterations=1,
                   lr_scheduler_type="constant", warmup_steps=0, use_cpu=True, bf16=False,
                   gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=50,
                   disable_tqdm=True)
DEFAULT_KNOBS = {"grpo": {"learning_rate": 3e-4}, "nsr": {"learning_rate": 3e-4},
                 "grpo_rnd": {"learning_rate": 3e-4, "bonus_weight": 0.3},
                 "grpo_counts": {"learning_rate": 3e-4, "bonus_weight": 0.3}, "banel": {}}
SWEEP_GRID = {
    "grpo": [{"learning_rate": lr} for lr in (1e-4, 3e-4, 1e-3)],
    "nsr": [{"learning_rate": lr} for lr in (1e-4, 3e-4, 1e-3)],
    "grpo_rnd": [{"learning_rate": lr, "bonus_weight": w} for lr in (1e-4, 3e-4, 1e-3) for w in (0.1, 1.0)],
    "grpo_counts": [{"learning_rate": lr, "bonus_weight": w} for lr in (1e-4, 3e-4, 1e-3) for w in (0.1, 1.0)],
    # the same tuning effort as the bonus baselines: two knobs, six runs (tau and the distillation learning rate)
    "banel": [{"rejection_threshold": t, "learning_rate": lr} for t in (0.9, 0.97, 0.99) for lr in (3e-4, 1e-3)],
}
# what a sparse run records of each round (trainer.history): the filter's rejections and the generator
ROUND_TRACE = ("round", "nre", "successes", "acceptance_rate", "known_rejected", "proposed",
               "filter/ratio_rejected_rate", "generator/entropy", "generator/distinct", "distill/acceptance_rate",
               "distill/rejected_fresh_rate", "filter/off_support_rate", "round/places_filled",
               "distill/known_other_tokens_rate")
_NOT_SETTINGS = ("output_dir", "report_to", "logging_steps", "disable_tqdm", "save_strategy")


def banel_settings(task_settings: dict, seed: int = 0) -> dict:
    """A BaNELConfig's keyword arguments for a benchmark run: how runs execute, then the task's settings."""
    return {**RUN_SETTINGS, **task_settings, "logging_steps": 10, "seed": seed}


# ------------------------------------------------------------------------------------------------------ tasks
@dataclass
class Task:
    """A task as the runner sees it.

    `load()` returns `(generator, tokenizer, oracle)`, a fresh pretrained generator each time. `estimate(model, tok,
    oracle, n, seed)` estimates a plain sampler's success rate and `estimate_banel(trainer, n)` BaNEL's (its
    posterior sampler); both return a `SuccessEstimate` or an `ExactSuccess` (whose `n` and seed are ignored).
    `max_completion_length` is GRPO's; `banel` is the task's BaNEL settings. `eval_samples` and `curve_samples` are
    its default estimate sizes (unused when exact). `calibration`: a results file whose `prior` is a larger Monte
    Carlo estimate of the pretrained generator, used as its estimate when it has at least the samples asked for.
    `blind(oracle)`: the success rate of a uniform draw over the task's well-formed outputs, a reference (see
    `blind_search`): `{"rate", "low", "high", "exact", "space", "successes", "what"}` (`space` and `successes` None
    when the space is not enumerated).
    """

    name: str
    load: Callable[[], tuple]
    estimate: Callable
    estimate_banel: Callable
    max_completion_length: int
    banel: dict
    exact: bool = False
    eval_samples: int = 100_000
    curve_samples: int = 5000
    calibration: Optional[Path] = None
    blind: Optional[Callable] = None
    prompts: tuple = ("",)  # the training prompts (unconditional tasks: one empty prompt)


def addition_task(models_dir: Optional[Path] = None) -> Task:
    from trl_banel_examples.tasks.addition import (BENCHMARK_ROUND, MODELS_DIR, estimate_success_rate,
                                                   load_addition_task)

    def estimate(model, tok, oracle, n, seed):
        return estimate_success_rate(model, tok, oracle, n, seed=seed)[0]

    return Task("addition", lambda: load_addition_task(models_dir=Path(models_dir or MODELS_DIR)), estimate,
                lambda trainer, n: trainer.estimate_success_rate(n), 12, dict(BENCHMARK_ROUND))


def hard_attack_task() -> Task:
    """The hard attack: every estimate is exact (the enumerated success set), without sampling or oracle calls."""
    from trl_banel_examples.tasks import hard_attack

    successes = hard_attack.load_successes()

    def estimate(model, tok, oracle, n=None, seed=None):
        return ExactSuccess(hard_attack.exact_success_probability(model, tok, successes))

    def estimate_banel(trainer, n=None):
        if len(trainer.failures):
            raise ValueError("the exact estimate of BaNEL's sampler needs its failure models cleared "
                             "(keep_failure_models=False, measured after a distillation)")
        generator = trainer.accelerator.unwrap_model(trainer.model)
        failures = [r.completion for r in trainer.ledger.records if not r.success]
        rate, accepted = hard_attack.posterior_success_probability(
            generator, trainer.processing_class, successes, failures, trainer.args.max_completion_length)
        return ExactSuccess(rate, acceptance_rate=accepted)

    def blind(oracle):
        return exact_blind(len(successes), hard_attack.query_space_size(oracle.max_operand_digits),
                           "uniform over the well-formed queries, no leading zeros")

    return Task("hard_attack", hard_attack.load_hard_attack_task, estimate, estimate_banel, 12,
                dict(hard_attack.BENCHMARK_ROUND), exact=True, eval_samples=0, curve_samples=0, blind=blind)


def digits_task() -> Task:
    """Digits 0-to-6: Monte Carlo estimates (about 5 ms per image on one thread), Clopper-Pearson intervals.

    10,000 samples per final estimate: at the pretrained rate (0 in 200,000, below 1.8e-5) they would see none, so a
    gain is told against the calibration's upper bound (reference_rate); a generator at 100x that bound shows ~18."""
    from trl_banel_examples.tasks import digits

    def estimate(model, tok, oracle, n, seed):
        est, _ = digits.estimate_success_rate(model, tok, oracle, n, batch_size=min(n, 2048), seed=seed)
        est.oracle_calls = n
        return est

    oracle = digits.DigitsOracle(digits.DigitClassifier.load())  # the shipped classifier, as the task's oracle's
    draws = iter(range(1_000_000))

    def estimate_banel(trainer, n):
        """BaNEL's sampler when its only filter is the known failures (no failure model active, as after a
        distillation): the generator's samples whose text the ledger holds as a failure are dropped. Drawn with the
        package's KV-cached sampler (much faster than generate()); scored by the classifier, as the oracle does."""
        if len(trainer.failures):
            return trainer.estimate_success_rate(n)
        from trl_banel_examples.tasks.common import sample_token_ids

        generator = trainer.accelerator.unwrap_model(trainer.model)
        tok = trainer.processing_class
        known = {r.completion for r in trainer.ledger.records if not r.success}
        seed, kept, proposed, successes = 60_000 + 1000 * trainer.args.seed + next(draws), 0, 0, 0
        # at most 5n images (about 4 minutes at n = 10,000): a sampler whose proposals are nearly all known failures
        # (0.02% kept: the defaults' digits runs) gets an estimate on fewer samples, not 40 minutes of drawing
        while kept < n and proposed < 5 * n:
            want = min(2048, max(n - kept, 1))
            for tokens in sample_token_ids(generator, tok, want, digits.PIXELS + 1, want, seed=seed + proposed):
                fresh = np.array([t not in known for t in tok.batch_decode(tokens, skip_special_tokens=True)])
                rows = len(fresh) if fresh.sum() <= n - kept else int(np.searchsorted(np.cumsum(fresh), n - kept)) + 1
                fresh, proposed = fresh[:rows], proposed + rows  # up to the n-th kept sample
                images, ok = digits.ids_to_images(tokens[:rows], tok)
                kept += int(fresh.sum())
                use = fresh & ok
                if use.any():
                    successes += int(digits.is_success(oracle.classifier.probabilities(images[use])).sum())
        generator.train(trainer.model.training)
        return SuccessEstimate.from_counts(successes, kept, acceptance_rate=kept / max(proposed, 1), oracle_calls=kept)

    def blind(oracle):
        est = digits.uniform_image_success_rate(oracle.classifier)
        return {"rate": est.rate, "low": est.low, "high": est.high, "exact": False, "samples": est.samples,
                "space": None, "successes": None, "what": "images with every pixel's intensity uniform over 0-16"}

    return Task("digits", digits.load_digits_task, estimate, estimate_banel, digits.PIXELS + 1,
                dict(digits.BENCHMARK_ROUND), eval_samples=10_000, curve_samples=1000,
                calibration=ROOT / "benchmarks" / "results" / "digits_calibration.json", blind=blind)


def exact_blind(successes: int, space: int, what: str) -> dict:
    """`Task.blind`'s record for an enumerated output space: `successes` of its `space` outputs pay."""
    rate = successes / space
    return {"rate": rate, "low": rate, "high": rate, "exact": True, "space": space, "successes": successes,
            "what": what}


def blind_search(reference: dict, budget: int) -> dict:
    """What a blind search would buy at `budget` NRE: `reference` (a `Task.blind` record) plus the expected successes
    among `budget` distinct uniform draws and the probability of at least one.

    A reference, not a method: it is told the output format and nothing else, and learns nothing. On an enumerated
    space the draws are without replacement (hypergeometric); otherwise the space is vast next to the budget and they
    are independent at the estimated rate (binomial)."""
    from scipy.stats import hypergeom

    if reference["space"] is not None:
        n = min(budget, reference["space"])
        p_none = float(hypergeom.pmf(0, reference["space"], reference["successes"], n))
        expected = n * reference["successes"] / reference["space"]
    else:
        p_none, expected = float((1 - reference["rate"]) ** budget), budget * reference["rate"]
    return {**reference, "budget": budget, "expected_successes": expected, "p_at_least_one": 1 - p_none}


def with_models(task: Task, models: Path) -> Task:
    """The digits task with another generator and classifier (e.g. a candidate generator) and their calibration."""
    from trl_banel_examples.tasks.digits import load_digits_task

    models = Path(models).resolve()
    if not (models / "generator").is_dir() or not (models / "classifier").is_dir():
        raise ValueError(f"--digits_models {models}: expected generator/ and classifier/ folders in it")
    return dataclasses.replace(task, load=functools.partial(load_digits_task, models_dir=models),
                               calibration=models.parent / "calibration.json")


def letters_task() -> Task:
    """Rare letters: exact estimates of the generator's success probability (every success string enumerated). BaNEL's
    estimate is its generator's, the model it saves (its proposals avoid the tried prefixes and known failures, which
    only raises their rate)."""
    from trl_banel_examples.tasks import letters

    def estimate(model, tok, oracle, n=None, seed=None):
        return ExactSuccess(letters.exact_success_probability(model, tok, oracle.min_a))

    def estimate_banel(trainer, n=None):
        generator = trainer.accelerator.unwrap_model(trainer.model)  # its config keeps the task's min_a
        min_a = generator.config.letters_min_a
        return ExactSuccess(letters.exact_success_probability(generator, trainer.processing_class, min_a))

    def blind(oracle):
        return exact_blind(letters.success_count(oracle.min_a), letters.valid_string_count(),
                           f"uniform over the {letters.LENGTH}-letter strings of {letters.LETTERS}")

    return Task("letters", letters.load_letters_task, estimate, estimate_banel, letters.LENGTH + 1,
                dict(letters.BENCHMARK_ROUND), exact=True, eval_samples=0, curve_samples=0, blind=blind)


TASKS = {"hard_attack": hard_attack_task, "digits": digits_task, "letters": letters_task, "addition": addition_task}


# ------------------------------------------------------------------------------------------------------ one run
class StopWhenIdleCallback(TrainerCallback):
    """Stops a GRPO run after `patience` consecutive steps that spent no reward evaluation: the policy only repeats
    completions already evaluated (free), so it has converged and would spend nothing more."""

    def __init__(self, budgeted: BudgetedReward, patience: int):
        self.budgeted, self.patience, self.idle, self.last = budgeted, patience, 0, 0
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        spent = self.budgeted.ledger.spent
        self.idle = self.idle + 1 if spent == self.last else 0
        self.last = spent
        if self.idle >= self.patience:
            control.should_training_stop = self.stopped = True


def run_pretrained(task: Task, seed: int, eval_samples: int) -> dict:
    start = time.time()
    set_seed(seed)
    model, tok, oracle = task.load()
    calibration = json.loads(task.calibration.read_text()) if task.calibration else {}
    weights, prior = weights_hash(model), calibration.get("prior")
    if prior and calibration.get("generator_weights") != weights:
        raise ValueError(f"{task.calibration} was measured on another generator (weights "
                         f"{calibration.get('generator_weights')}, this one's are {weights}): re-measure it "
                         f"with the task's recipe (recipes/pretrain_{task.name}.py)")
    if prior and prior["n"] >= eval_samples:  # the calibration's larger sample (same generator, same rule)
        low, high = prior["ci95_clopper_pearson"]
        est = SuccessEstimate(successes=prior["successes"], samples=prior["n"], low=low, high=high, confidence=0.95,
                              oracle_calls=0)
        source = str(task.calibration.relative_to(ROOT)) if task.calibration.is_relative_to(ROOT) else None
    else:
        est, source = task.estimate(model, tok, oracle, eval_samples, 40_000 + seed), None
    return {"method": "pretrained", "seed": seed, "task": task.name, "settings": {}, "source": source,
            "final": {**est.to_dict(), "nre": 0}, "weights": weights, "minutes": (time.time() - start) / 60}


def run_one(task: Task, method: str, seed: int, knobs: dict, budget: int, eval_samples: int, curve_every: int,
            curve_samples: int, max_rounds_factor: float, workdir: str, idle_steps: Optional[int] = None,
            pretrained: Optional[dict] = None) -> dict:
    """One run of `method` on `task` from the pretrained generator, at `budget` NRE.

    Returns the run's record: settings, final estimate (`eval_samples`), success curve (`curve_samples` every
    `curve_every` NRE), the best curve point re-estimated on fresh samples, NRE, successes found, minutes.
    `idle_steps`: a GRPO run also stops after that many steps without a new evaluation. `pretrained` (a
    `run_pretrained` record): a GRPO-family policy that never saw a success and whose weights still hash to the
    pretrained generator's reuses its estimate instead of paying for a new one.
    """
    if method == "pretrained":
        return run_pretrained(task, seed, eval_samples)
    set_seed(seed)
    start, cpu_start = time.time(), time.process_time()
    estimating = [0.0]  # seconds spent estimating (curve, final, best), apart from training

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.time()
            try:
                return fn(*a, **k)
            finally:
                estimating[0] += time.time() - t0
        return wrapper

    task = dataclasses.replace(task, estimate=timed(task.estimate), estimate_banel=timed(task.estimate_banel))
    generator, tok, oracle = task.load()
    big_seed = 10_000 + seed  # the final and best-point estimates draw from seeds no curve point uses
    shutil.rmtree(workdir, ignore_errors=True)  # a run restarts from the pretrained generator: its old ledger goes
    os.makedirs(workdir, exist_ok=True)
    reused = []
    if is_banel(method):
        settings = {**banel_settings(task.banel, seed), **knobs, **BANEL_VARIANTS.get(method, {}),
                    "max_reward_evaluations": budget}
        default_per_round = BaNELConfig.__dataclass_fields__["evaluations_per_round"].default
        per_round = settings.get("evaluations_per_round", default_per_round)
        settings["num_rounds"] = math.ceil(max_rounds_factor * budget / per_round)
        settings.update(output_dir=workdir, logging_steps=10_000, disable_tqdm=True)
        trainer = BaNELTrainer(model=generator, reward_funcs=oracle, args=BaNELConfig(**settings),
                               processing_class=tok, train_dataset=Dataset.from_dict({"prompt": list(task.prompts)}))
        every = max(1, curve_every // per_round)
        curve = SuccessCurveCallback(trainer, every, curve_samples, estimate=task.estimate_banel, keep_best=True)
        trainer.add_callback(curve)
        trainer.train()
        final = task.estimate_banel(trainer, eval_samples)
        nre, successes_found = trainer.ledger.spent, len(trainer.ledger.successes)
        # the best point's generator, sampled through the posterior (rejecting the ledger's known failures)
        trainer.failures.clear()
        trainer.accelerator.unwrap_model(trainer.model).load_state_dict(curve.best_state)
        fresh = task.estimate_banel(trainer, eval_samples)
        steps = trainer.state.global_step
        stop_reason = trainer.stop_reason
        # the step size's record (distill_target_kl): what each distillation moved, and the rate it chose next
        step_sizes = [{k: h[k] for k in ("round", "distill/kl_step", "distill/kl_target", "distill/learning_rate",
                                                 "distill/backoff", "distill/kl_after_backoff") if k in h}
                      for h in trainer.history if "distill/kl_step" in h]
        # the mechanism round by round: what the filter rejected (known failures, the ratio test) and the generator
        rounds = [{k: h[k] for k in ROUND_TRACE if k in h} for h in trainer.history]
        phase_seconds = {k: round(v, 2) for k, v in trainer.phase_seconds.items()}
        settings = {k: v for k, v in settings.items() if k not in _NOT_SETTINGS}
    else:
        budgeted = BudgetedReward(oracle, budget, os.path.join(workdir, LEDGER_FILENAME))
        reward_funcs, weights = [budgeted], [1.0]
        if method == "grpo_rnd":
            reward_funcs, weights = [budgeted, RNDBonus(seed=seed)], [1.0, knobs["bonus_weight"]]
        elif method == "grpo_counts":
            reward_funcs, weights = [budgeted, SimHashCountBonus(beta=knobs["bonus_weight"], seed=seed)], [1.0, 1.0]
        gen_batch = GRPO_COMMON["per_device_train_batch_size"]
        max_steps = math.ceil(max_rounds_factor * budget / gen_batch)
        settings = {**GRPO_COMMON, "learning_rate": knobs["learning_rate"], "max_steps": max_steps, "seed": seed,
                    "reward_weights": weights}
        if task.max_completion_length != GRPO_COMMON["max_completion_length"]:
            settings["max_completion_length"] = task.max_completion_length
        config_cls, trainer_cls = (NSRConfig, NSRTrainer) if method == "nsr" else (GRPOConfig, GRPOTrainer)
        config = config_cls(output_dir=workdir, **settings)
        counter = iter(range(1_000_000))

        def estimate(model, n, s):
            unchanged = pretrained is not None and weights_hash(model) == pretrained["weights"]
            if unchanged and not budgeted.ledger.successes:
                reused.append(n)  # the same weights as the pretrained generator, and nothing learned from a success
                return _as_estimate(pretrained["final"])
            return task.estimate(model, tok, oracle, n, s)

        curve = PolicySuccessCurveCallback(
            budgeted, lambda m: estimate(m, curve_samples, 30_000 + 1000 * seed + next(counter)),
            every_nre=curve_every, path=os.path.join(workdir, "success_curve.json"))
        callbacks = [StopOnBudgetCallback(budgeted), curve]
        idle = StopWhenIdleCallback(budgeted, idle_steps) if idle_steps else None
        callbacks += [idle] if idle else []
        trainer = trainer_cls(model=generator, reward_funcs=reward_funcs, args=config, processing_class=tok,
                              train_dataset=Dataset.from_dict({"prompt": [task.prompts[i % len(task.prompts)]
                                                                          for i in range(4096)]}),
                              callbacks=callbacks)
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        reused.clear()
        final = estimate(model, eval_samples, big_seed)
        final_reused = bool(reused)
        fresh = estimate(curve.best_model(model), eval_samples, 20_000 + seed)
        nre, successes_found, steps = budgeted.ledger.spent, len(budgeted.ledger.successes), trainer.state.global_step
        phase_seconds, step_sizes, rounds = None, [], []
        stop_reason = ("budget spent" if budgeted.exhausted else f"{idle_steps} idle steps" if idle and idle.stopped
                       else f"max_steps={max_steps}")
        settings = {k: v for k, v in settings.items() if k not in _NOT_SETTINGS}
        settings.update({"bonus": {"grpo_rnd": "RNDBonus", "grpo_counts": "SimHashCountBonus"}.get(method),
                         **{k: v for k, v in knobs.items() if k != "learning_rate"}})
        if method == "nsr":
            settings["nsr_positive_weight"] = config.nsr_positive_weight
    record = {
        "method": method, "seed": seed, "settings": settings,
        "final": {**final.to_dict(), "nre": nre, "steps": steps, "successes_found_in_training": successes_found},
        "best": {"point": curve.best_point, "estimate": fresh.to_dict(),
                 "selection_oracle_calls": curve.evaluation_calls, "fresh_oracle_calls": fresh.oracle_calls},
        "curve": curve.points, "minutes": (time.time() - start) / 60,
    }
    # the sparse benchmark's extra fields (the addition benchmark's records keep their shape)
    if pretrained is not None:
        record.update(task=task.name, stop_reason=stop_reason, phase_seconds=phase_seconds,
                      estimate_minutes=estimating[0] / 60, cpu_minutes=(time.process_time() - cpu_start) / 60,
                      reused_pretrained_estimate=not is_banel(method) and final_reused, step_sizes=step_sizes,
                      rounds=rounds)
    return record


def _as_estimate(d: dict):
    if d.get("exact"):
        return ExactSuccess(d["rate"], d.get("acceptance_rate", 1.0), 0)
    return SuccessEstimate(d["successes"], d["samples"], d["low"], d["high"], d["confidence"],
                           d["acceptance_rate"], 0)


def write_markdown(path, lines: list[str]) -> None:
    """A benchmark's markdown summary: written to `path` and printed."""
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    print(text, end="")


def parse_args(args_cls, quick: dict, argv=None):
    """A benchmark's typed arguments from the command line; with `--quick`, `quick`'s values for those not given."""
    (args,) = HfArgumentParser(args_cls).parse_args_into_dataclasses(argv)
    if args.quick:
        apply_quick(argv, quick, args)
    return args


# ------------------------------------------------------------------------------------------------------ caching
def _natural(key: str) -> tuple:
    """`banel_seed2` before `banel_seed10`: the digit runs of a key compared as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key))


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive `fcntl.flock` on `folder` itself (no lock file): one writer of its caches at a time, across
    processes. Released when the block ends, or when the process dies."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


TRACES, TRACE_DIGITS = ("rounds", "step_sizes"), 4  # a record's per-round traces, kept to 4 significant digits


def packed_traces(record):
    """`record` as its file holds it: each per-round trace (`TRACES`: a list of dicts, one per round) as one list per
    key (`{"columns": {key: [value or None per round]}}`) with its floats cut to `TRACE_DIGITS` significant digits.
    Read by eye and plotted, the traces were most of a run file's bytes, most of them their keys repeated every round;
    the results and estimates stay whole. [`unpacked_traces`] undoes it (less the digits)."""
    if not isinstance(record, dict):
        return record

    def trim(value):
        return float(f"{value:.{TRACE_DIGITS}g}") if isinstance(value, float) else value

    def pack(trace):
        if not isinstance(trace, list) or not all(isinstance(r, dict) for r in trace):
            return trace
        keys = list(dict.fromkeys(k for r in trace for k in r))
        return {"columns": {k: [trim(r[k]) if k in r else None for r in trace] for k in keys}}

    return {k: pack(v) if k in TRACES else v for k, v in record.items()}


def unpacked_traces(record):
    """A record read from its file: each packed trace back as one dict per round (a key absent from a round stays
    absent)."""
    if not isinstance(record, dict):
        return record
    out = dict(record)
    for key in TRACES:
        trace = record.get(key)
        if isinstance(trace, dict) and set(trace) == {"columns"}:
            columns = trace["columns"]
            n = max((len(v) for v in columns.values()), default=0)
            out[key] = [{k: v[i] for k, v in columns.items() if v[i] is not None} for i in range(n)]
    return out


class RunCache:
    """The cached runs of one benchmark task: ONE JSON file, a dict of run records by key (`banel_seed3`,
    `defaults_seed0`, `pretrained`), one record per line (compact), keys in natural order.

    A write re-reads the file under `folder_lock` and replaces it atomically (a temporary file, fsynced, then
    `os.replace`), so processes running other seeds of the same task add their records without losing one another's,
    and a reader (who takes no lock) sees the file whole, before or after a write."""

    def __init__(self, path):
        self.path = Path(path)

    def load(self) -> dict:
        held = json.loads(self.path.read_text()) if self.path.exists() else {}
        return {k: unpacked_traces(r) for k, r in held.items()}

    def get(self, key: str) -> Optional[dict]:
        return self.load().get(key)

    def put(self, key: str, record: dict) -> None:
        self.merge({key: record}, keep=lambda key, old, new: False)

    def merge(self, records: dict, keep: Callable[[str, dict, dict], bool]) -> list[str]:
        """Adds `records` to the file; of a key already there, the held record stays when it is the same or when
        `keep(key, held, new)`. Returns the keys written (the file is not rewritten when there are none)."""
        with folder_lock(self.path.parent):
            held = self.load()
            written = [k for k, r in records.items() if k not in held or held[k] != r and not keep(k, held[k], r)]
            held.update({k: records[k] for k in written})
            if written:
                self._write(held)
        return written

    def remove(self, drop: Callable[[str, dict], bool]) -> list[str]:
        """Removes the records for which `drop(key, record)`; returns their keys (the file is rewritten only then)."""
        with folder_lock(self.path.parent):
            held = self.load()
            gone = [k for k, r in held.items() if drop(k, r)]
            if gone:
                self._write({k: r for k, r in held.items() if k not in gone})
        return gone

    def _write(self, records: dict) -> None:
        lines = [f"{json.dumps(k)}: {json.dumps(packed_traces(records[k]), separators=(',', ':'))}"
                 for k in sorted(records, key=_natural)]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write("{\n" + ",\n".join(lines) + "\n}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # the file is whole or as it was
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def run_identity(task: "Task", method: str, knobs: dict) -> dict:
    """What a cached run must have been made with to be reused: its knobs and, for BaNEL, the task's settings (the
    budget aside: it is checked, or set, by each script), so a run made before the task's settings changed is
    redone."""
    settings = {k: v for k, v in task.banel.items() if k != "max_reward_evaluations"} if is_banel(method) else {}
    return {**settings, **knobs, **BANEL_VARIANTS.get(method, {})}


def cached_run(cache: RunCache, key: str, knobs: dict, make: Callable[[], dict]) -> tuple[dict, bool]:
    """The run `key` of `cache` if it was made with `knobs`, else `make()` written there. Returns (run, made).

    A run made with other knobs (e.g. before the sweep chose them) is replaced (git history keeps the old one)."""
    run = cache.get(key)
    if run is not None:
        stale = {k: v for k, v in knobs.items() if run.get("settings", {}).get(k) != v}
        if not stale:
            return run, False
        print(f"[run] {key}: made with other settings, re-running with {stale}", flush=True)
    run = json.loads(json.dumps(make()))  # what the file holds
    cache.put(key, run)
    return run, True


def load_runs(cache: RunCache) -> dict:
    """The run records of `cache`, grouped by method (in key order)."""
    runs = {}
    for r in cache.load().values():
        runs.setdefault(r["method"], []).append(r)
    return runs


def run_sweep(methods: list[str], run: Callable[[str, dict, str], dict], path: str, seed: int, budget: int,
              eval_samples: int, grid: dict = SWEEP_GRID, identity: Optional[dict] = None) -> dict:
    """Each method's grid on one seed kept apart; `run(method, knobs, workdir)` makes one run, cached in the
    `RunCache` file `path` (key `{method}_{knobs}`) and reused only if its settings hold `identity` too (e.g. the
    generator's weights hash: a sweep made on another generator is redone, not reused).

    Chooses the knobs with the best final success rate (the best curve point breaks ties, then the first)."""
    cache = RunCache(path)
    sweep = {}
    for method in [m for m in methods if m in grid]:
        results = []
        for knobs in grid[method]:
            tag = "_".join(f"{k}{v:g}" for k, v in knobs.items())
            key = f"{method}_{tag}"
            if cache.get(key) is None:
                print(f"[sweep] {method} {knobs}", flush=True)
            r, _ = cached_run(cache, key, identity or {}, lambda: run(method, knobs, f"sweep_{key}"))
            results.append({"knobs": knobs, "rate": r["final"]["rate"], "low": r["final"]["low"],
                            "high": r["final"]["high"], "best_point_rate": r["best"]["point"]["rate"],
                            "nre": r["final"]["nre"], "minutes": r["minutes"]})
        chosen = max(results, key=lambda x: (x["rate"], x["best_point_rate"]))["knobs"]  # first (smallest) on ties
        sweep[method] = {"seed": seed, "budget": budget, "eval_samples": eval_samples,
                         "criterion": "final success rate on eval_samples fresh samples", "chosen": chosen,
                         "results": results}
        print(f"[sweep] {method}: chose {chosen}", flush=True)
    return sweep


# ------------------------------------------------------------------------------------------------------ summary
def reference_rate(pretrained: dict) -> float:
    """The rate multiples are taken against: the estimate, or its 95% upper bound when the estimate is 0 (the
    summaries' dict form of `SuccessEstimate.reference_rate`)."""
    return pretrained["rate"] if pretrained["rate"] > 0 else pretrained["high"]


def seed_stats(rates: list[float], reference: Optional[float]) -> dict:
    """Median, quartiles, interquartile range and mean over seeds; seeds at >= 10x and >= 100x `reference`."""
    q25, median, q75 = (float(x) for x in np.percentile(rates, [25, 50, 75]))
    out = {"median": median, "q25": q25, "q75": q75, "iqr": q75 - q25, "mean": float(np.mean(rates)),
           "min": float(min(rates)), "max": float(max(rates)), "n": len(rates)}
    if reference:
        out.update(seeds_10x=sum(r >= 10 * reference for r in rates),
                   seeds_100x=sum(r >= 100 * reference for r in rates),
                   median_vs_pretrained=median / reference)
    return out


def improvement_over_best_baseline(method_rates: list[float], baselines: dict) -> dict:
    """`median(method) / median(best baseline)`, the best baseline being the one with the highest median.

    `baselines`: per baseline, `{"rates": [...], "high": [...]}` (per-seed estimates and 95% upper bounds). When the
    best baseline's median estimate is 0 the ratio is taken against the median of its upper bounds (a lower bound on
    the improvement); when that is 0 too (an exact 0) the ratio is None and `exactly_zero` is True."""
    if not baselines or not method_rates:
        return {"best_baseline": None, "ratio": None}
    name = max(baselines, key=lambda b: (float(np.median(baselines[b]["rates"])), -list(baselines).index(b)))
    median = float(np.median(baselines[name]["rates"]))
    against, denominator = ("estimate", median) if median > 0 else \
        ("upper bound", float(np.median(baselines[name]["high"])))
    mine = float(np.median(method_rates))
    ratio = mine / denominator if denominator > 0 else None
    return {"best_baseline": name, "against": against, "denominator": denominator, "ratio": ratio,
            "exactly_zero": denominator == 0}


def summarise_task(runs: dict, pretrained: Optional[dict], baselines: list[str] = BASELINES) -> dict:
    """A task's summary from its run records: per method, per-seed lists and seed statistics of the final and the
    best-point estimates, and each method's improvement over the best *other* baseline (BaNEL's over the best)."""
    reference = reference_rate(pretrained) if pretrained else None
    methods = {}
    for name in sorted(runs, key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m)):
        rs = runs[name]
        if name == "pretrained" or not rs:
            continue
        rs = sorted(rs, key=lambda r: r["seed"])
        final = [r["final"]["rate"] for r in rs]
        best = [r["best"]["estimate"]["rate"] for r in rs]
        methods[name] = {
            "seeds": [r["seed"] for r in rs], "final": final, "best": best,
            "final_low": [r["final"]["low"] for r in rs], "final_high": [r["final"]["high"] for r in rs],
            "best_low": [r["best"]["estimate"]["low"] for r in rs],
            "best_high": [r["best"]["estimate"]["high"] for r in rs],
            "successes_found": [r["final"]["successes_found_in_training"] for r in rs],
            "nre": [r["final"]["nre"] for r in rs], "minutes": [r["minutes"] for r in rs],
            "estimate_minutes": [r.get("estimate_minutes") for r in rs],
            "cpu_minutes": [r.get("cpu_minutes") for r in rs],
            "reused_pretrained_estimate": [bool(r.get("reused_pretrained_estimate")) for r in rs],
            "stop_reason": [r.get("stop_reason") for r in rs],
            "settings": rs[0]["settings"],
            "summary": {"final": seed_stats(final, reference), "best": seed_stats(best, reference)},
        }
    for name, m in methods.items():
        for which in ("final", "best"):
            others = {b: {"rates": methods[b][which], "high": methods[b][f"{which}_high"]}
                      for b in baselines if b in methods and b != name}
            m["summary"][which]["vs_best_baseline"] = improvement_over_best_baseline(m[which], others)
    return {"methods": methods}


def seed_curves(runs: dict, spread: tuple[float, float] = (25, 75), center: str = "median") -> dict:
    """Per method, the success curve over seeds: at each NRE where some seed measured, each seed's last point at or
    before it; the centre (median or mean) and the spread (percentiles, or min-max with `spread=(0, 100)`)."""
    curves = {}
    for name, rs in runs.items():
        if name == "pretrained" or not rs:
            continue
        grid = sorted({p["nre"] for r in rs for p in r["curve"]})
        pts = []
        for x in grid:
            vals = [max([p for p in r["curve"] if p["nre"] <= x], key=lambda p: (p["nre"], p.get("step", 0)))["rate"]
                    for r in rs if any(p["nre"] <= x for p in r["curve"])]
            mid = float(np.median(vals)) if center == "median" else float(np.mean(vals))
            low, high = (float(np.percentile(vals, q)) for q in spread)
            pts.append({"nre": x, "rate": mid, "low": low, "high": high, "seeds": len(vals)})
        curves[name] = pts
    return curves
