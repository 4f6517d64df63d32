"""The embedded demo: a generator of zeros learns to draw sixes it was never shown, with BaNEL, on a CPU, in minutes.

    python recipes/digits_0_to_6.py            # 7,500 evaluations at most (about 11 CPU minutes, 4-32 over seeds)
    python recipes/digits_0_to_6.py --quick    # a smoke test of the whole pipeline (under a minute)

The task ships with the examples package (trl_banel_examples.tasks.digits, installed by `pip install -e ./examples`):
a small causal LM draws 8x8 images as 64 pixel tokens and was pretrained on zeros only; the oracle pays 1 when a
classifier trained on all ten digits gives the image a probability of at least 0.9 of being a 6. The pretrained
generator drew no six in 200,000 samples (a success probability below 1.8e-5, the 95% upper bound;
benchmarks/results/digits_calibration.json). BaNEL at the package's defaults, with the task's budget, lengths,
batch sizes and stop rule (trl_banel_examples.tasks.digits.BANEL_SETTINGS), learns from the failures, and from the
first successes on, from those.

Writes OUTPUT_DIR/digits_grid.png (samples of the generator before and after training, each with the classifier's
P(6), successes framed in green), success_rate.png, result.json, the ledger and the trained generator. Any
BaNELConfig or TrainingArguments field can be passed as a flag.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import set_seed  # noqa: E402

from trl_banel import BaNELConfig, BaNELTrainer  # noqa: E402
from trl_banel.callbacks import SuccessCurveCallback  # noqa: E402
from trl_banel_examples.cli import hardware, parse_recipe, retyped_command  # noqa: E402
from trl_banel_examples.plotting import plot_success_curves  # noqa: E402
from trl_banel.runs import refuse_rerun  # noqa: E402
from trl_banel.stats import SuccessEstimate  # noqa: E402
from trl_banel_examples.tasks.digits import (BANEL_SETTINGS, CALIBRATED_PRIOR, demo_summary_text,  # noqa: E402
                                             estimate_success_rate, improvement_over_prior, load_digits_task,
                                             plot_digit_grid, sample_images)


@dataclass
class DigitsArguments:
    quick: bool = field(default=False, metadata={"help": "A smoke test of the pipeline (under a minute): 50 "
                                                 "evaluations, too few for BaNEL to find a six."})
    eval_samples: int = field(default=10_000, metadata={"help": "Samples for the pretrained and final estimates."})
    grid: int = field(default=24, metadata={"help": "Images per row group of the picture (before / after)."})
    curve_every: int = field(default=5, metadata={"help": "Estimate the success rate every N rounds for the plot."})
    curve_samples: int = field(default=1000, metadata={"help": "Samples per point of the success curve."})
    threads: int = field(default=1, metadata={"help": "torch threads (tiny models run fastest on one)."})


# The task's settings (budget, lengths, batch sizes, stop rule; the default round decides the rest, measured at them:
# benchmarks/results/defaults, task `digits`) plus where and how to run; every one can be overridden.
TASK_DEFAULTS = dict(output_dir="runs/digits_0_to_6", use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                     **BANEL_SETTINGS, logging_steps=10, seed=0)
QUICK = dict(max_reward_evaluations=50, evaluations_per_round=25, eval_samples=500, curve_every=1,
             curve_samples=100, grid=8)
QUICK_NOTE = ("quick mode checks that the demo runs end to end (shipped models, training, ledger, estimates, "
              "picture) with {budget} reward evaluations: far too few for BaNEL to find a six, so the improvement "
              "figure it prints is not meaningful. The demo itself: python recipes/digits_0_to_6.py (about 11 CPU "
              "minutes).")


def main(args: DigitsArguments, config: BaNELConfig, command: str = "python recipes/digits_0_to_6.py") -> dict:
    torch.set_num_threads(args.threads)
    set_seed(config.seed)
    refuse_rerun(config.output_dir, None)  # a finished run is never overwritten: say so before any work
    os.makedirs(config.output_dir, exist_ok=True)
    if args.quick:
        print(QUICK_NOTE.format(budget=config.max_reward_evaluations) + "\n")
    start = time.time()
    generator, tokenizer, oracle = load_digits_task()
    before = sample_images(generator, tokenizer, oracle, args.grid, seed=config.seed + 1)
    pre_est, _ = estimate_success_rate(generator, tokenizer, oracle, n=args.eval_samples, seed=config.seed + 2)
    prior = SuccessEstimate.from_counts(*CALIBRATED_PRIOR)
    print(f"pretrained generator: {pre_est} (the shipped calibration: {prior})")

    trainer = BaNELTrainer(model=generator, reward_funcs=oracle, args=config, processing_class=tokenizer,
                           train_dataset=Dataset.from_dict({"prompt": [""]}))
    curve = SuccessCurveCallback(trainer, every_rounds=args.curve_every, num_samples=args.curve_samples)
    trainer.add_callback(curve)
    trainer.train()
    trainer.save_model()
    final = trainer.estimate_success_rate(args.eval_samples)  # BaNEL's sampler: the known failures rejected
    after = sample_images(trainer.accelerator.unwrap_model(trainer.model), tokenizer, oracle, args.grid,
                          seed=config.seed + 3)

    grid_path = os.path.join(config.output_dir, "digits_grid.png")
    plot_digit_grid({
        f"pretrained on zeros only (sixes: {pre_est.successes:,} of {pre_est.samples:,} samples)": before,
        f"after BaNEL, {trainer.ledger.spent:,} reward evaluations (sixes: {final.successes:,} of {final.samples:,})":
            after}, grid_path)
    plot_path = os.path.join(config.output_dir, "success_rate.png")
    plot_success_curves({"BaNEL": curve.points}, plot_path, title="Digits 0-to-6: BaNEL",
                        baseline=prior.reference_rate)
    improvement = improvement_over_prior(final.rate, prior)
    result = {
        "command": command, "task": "digits", "quick": args.quick, "seed": config.seed, "hardware": hardware(),
        "pretrained": pre_est.to_dict(), "calibrated_prior": prior.to_dict(), "banel": final.to_dict(),
        "improvement": improvement[0], "improvement_over": improvement[1], "nre": trainer.ledger.spent,
        "budget": config.max_reward_evaluations, "successes_found": len(trainer.ledger.successes),
        "evaluation_calls": curve.evaluation_calls + final.oracle_calls, "stop_reason": trainer.stop_reason,
        "curve": curve.points, "minutes": (time.time() - start) / 60,
        "sixes_in_grid": {"before": int(before[2].sum()), "after": int(after[2].sum()), "of": args.grid},
        "settings": {k: getattr(config, k) for k in TASK_DEFAULTS if k not in ("output_dir", "report_to")},
    }
    with open(os.path.join(config.output_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n" + demo_summary_text(result))
    print(f"\npicture: {grid_path}\nsuccess rate against NRE: {plot_path}\n"
          f"run report: {os.path.join(config.output_dir, 'run_report.png')}\n"
          f"result: {os.path.join(config.output_dir, 'result.json')}\n"
          f"ledger: {os.path.join(config.output_dir, 'evaluations.jsonl')}\nmodel: {config.output_dir}")
    return result


def parse(argv=None):
    return parse_recipe(DigitsArguments, __doc__, TASK_DEFAULTS, QUICK, argv)


if __name__ == "__main__":
    main(*parse(), command=retyped_command("recipes/digits_0_to_6.py", sys.argv[1:]))
