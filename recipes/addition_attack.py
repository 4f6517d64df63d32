"""The embedded demo: BaNEL attacks a tiny addition model from the examples package, on a CPU, in minutes.

    python recipes/addition_attack.py            # the paper's budget of 7,500 evaluations (about 3 min, 2 CPU cores)
    python recipes/addition_attack.py --quick    # a smoke test of the whole pipeline in about 1 minute

A target transformer learned digit addition (answers written reversed); an attacker LM writes queries `a+b=`; the
oracle pays 1 when the target's greedy answer is wrong. The pretrained attacker almost never succeeds. BaNEL learns
from the failures alone. Any BaNELConfig or TrainingArguments field can be passed as a flag.
"""

import json
import os
import sys
import time
from collections import defaultdict
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
from trl_banel_examples.tasks.addition import (BANEL_SETTINGS, classify_query, demo_summary_text,  # noqa: E402
                                     estimate_success_rate, load_addition_task)


@dataclass
class DemoArguments:
    quick: bool = field(default=False, metadata={"help": "A smoke test of the pipeline (about 1 minute): 100 "
                                                 "evaluations, too few for BaNEL to improve on the attacker."})
    eval_samples: int = field(default=100_000, metadata={"help": "Samples for the pretrained and final estimates."})
    curve_every: int = field(default=5, metadata={"help": "Estimate the success rate every N rounds for the plot."})
    curve_samples: int = field(default=2000, metadata={"help": "Samples per point of the success curve."})
    threads: int = field(default=1, metadata={"help": "torch threads (tiny models run fastest on one)."})


# Defaults for this task: the task's budget, lengths, batch sizes and stop rule (trl_banel_examples.tasks.addition.
# BANEL_SETTINGS; the package's default round decides the rest, measured at them: benchmarks/results/defaults, task
# `addition`) plus where and how to run; every one can be overridden by a flag.
TASK_DEFAULTS = dict(
    output_dir="runs/addition_attack", use_cpu=True, bf16=False, report_to="none", save_strategy="no",
    **BANEL_SETTINGS, logging_steps=10, seed=0,
)
QUICK = dict(max_reward_evaluations=100, evaluations_per_round=25, eval_samples=5000, curve_every=2,
             curve_samples=500)


QUICK_NOTE = ("quick mode checks that the demo runs end to end (shipped models, training, ledger, estimates, "
              "plots) with {budget} reward evaluations: far too few for BaNEL to move the attacker, so the "
              "improvement figure it prints is not meaningful. The demo itself: python recipes/addition_attack.py "
              "(about 3 minutes on 2 CPU cores).")


def main(demo: DemoArguments, config: BaNELConfig, command: str = "python recipes/addition_attack.py") -> dict:
    torch.set_num_threads(demo.threads)
    set_seed(config.seed)
    # a finished run in output_dir is never overwritten: say so now, not after the pretrained estimate (train() would
    # refuse too)
    refuse_rerun(config.output_dir, None)
    os.makedirs(config.output_dir, exist_ok=True)
    if demo.quick:
        print(QUICK_NOTE.format(budget=config.max_reward_evaluations) + "\n")
    start = time.time()
    attacker, tokenizer, oracle = load_addition_task()

    pre_est, kinds = estimate_success_rate(attacker, tokenizer, oracle, n=demo.eval_samples, seed=config.seed + 1)
    print(f"pretrained attacker: {pre_est}  (leading-zero queries: {kinds['leading_zero'] / pre_est.samples:.4%})")

    trainer = BaNELTrainer(model=attacker, reward_funcs=oracle, args=config, processing_class=tokenizer,
                           train_dataset=Dataset.from_dict({"prompt": [""]}))
    curve = SuccessCurveCallback(trainer, every_rounds=demo.curve_every, num_samples=demo.curve_samples)
    trainer.add_callback(curve)
    trainer.train()
    trainer.save_model()  # the trained attacker, beside the ledger
    final = trainer.estimate_success_rate(demo.eval_samples)
    minutes = (time.time() - start) / 60

    groups = defaultdict(list)
    for r in trainer.ledger.successes:
        groups[classify_query(r.completion)].append(r.completion)
    improvement = final.rate / pre_est.rate if pre_est.rate > 0 else float("inf")
    plot_path = os.path.join(config.output_dir, "success_rate.png")
    plot_success_curves({"BaNEL": curve.points}, plot_path, title="Addition attack: BaNEL",
                        baseline=pre_est.rate)
    result = {
        "command": command, "quick": demo.quick, "seed": config.seed, "hardware": hardware(),
        "pretrained": pre_est.to_dict(), "banel": final.to_dict(), "improvement": improvement,
        "nre": trainer.ledger.spent, "budget": config.max_reward_evaluations,
        "successes_found": len(trainer.ledger.successes),
        "evaluation_calls": curve.evaluation_calls + final.oracle_calls, "curve": curve.points,
        "successes_by_kind": {k: len(v) for k, v in groups.items()},
        "successes_examples": {k: v[:5] for k, v in groups.items()}, "minutes": minutes,
        "stop_reason": trainer.stop_reason,
        "settings": {k: getattr(config, k) for k in TASK_DEFAULTS if k not in ("output_dir", "report_to")},
    }
    with open(os.path.join(config.output_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n" + demo_summary_text(result))
    report = os.path.join(config.output_dir, "run_report.png")
    print(f"\nsuccess rate against NRE: {plot_path}\nrun report: {report}\n"
          f"result: {os.path.join(config.output_dir, 'result.json')}\n"
          f"ledger: {os.path.join(config.output_dir, 'evaluations.jsonl')}\nmodel: {config.output_dir}")
    return result


def parse(argv=None):
    return parse_recipe(DemoArguments, __doc__, TASK_DEFAULTS, QUICK, argv)


if __name__ == "__main__":
    main(*parse(), command=retyped_command("recipes/addition_attack.py", sys.argv[1:]))
