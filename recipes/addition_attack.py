"""The embedded demo: BaNEL attacks a tiny addition model, on a CPU, in minutes.

    python recipes/addition_attack.py            # the default budget (fits in about 10 minutes on 2 cores)
    python recipes/addition_attack.py --quick    # a smoke test in under 2 minutes
    python recipes/addition_attack.py --max_reward_evaluations 7500   # the paper's budget

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
from trl import TrlParser  # noqa: E402

from trl_banel import BaNELConfig, BaNELTrainer  # noqa: E402
from trl_banel.callbacks import SuccessCurveCallback  # noqa: E402
from trl_banel.plotting import plot_success_curves  # noqa: E402
from trl_banel.runs import refuse_rerun  # noqa: E402
from trl_banel.stats import SuccessEstimate  # noqa: E402
from trl_banel.tasks.addition import classify_query, estimate_success_rate, load_addition_task  # noqa: E402


@dataclass
class DemoArguments:
    quick: bool = field(default=False, metadata={"help": "A smoke test: tiny budget and estimates (< 2 minutes)."})
    eval_samples: int = field(default=100_000, metadata={"help": "Samples for the pretrained and final estimates."})
    curve_every: int = field(default=5, metadata={"help": "Estimate the success rate every N rounds for the plot."})
    curve_samples: int = field(default=2000, metadata={"help": "Samples per point of the success curve."})
    threads: int = field(default=1, metadata={"help": "torch threads (tiny models run fastest on one)."})


# Defaults for this task (measured: see README "The addition attack"); every one can be overridden by a flag.
TASK_DEFAULTS = dict(
    output_dir="runs/addition_attack", use_cpu=True, bf16=False, report_to="none", save_strategy="no",
    max_reward_evaluations=7500, evaluations_per_round=50, num_candidates=512, max_completion_length=12,
    rejection_threshold=0.97, failure_epochs=20, failure_learning_rate=3e-3, failure_batch_size=16,
    distill_every=1, distill_samples=512, distill_steps=8, per_device_train_batch_size=64, learning_rate=1e-3,
    logging_steps=10, seed=0,
    # the round these settings were measured with on this task (the package's defaults since differ): a fixed
    # 20-epoch fit with no margin, clipping or warm-up, no held-out share, regions dropped at each distillation
    failure_margin=0.0, failure_max_grad_norm=0.0, failure_warmup_steps=0, failure_heldout_fraction=0.0,
    keep_failure_models=False,
)
QUICK = dict(max_reward_evaluations=100, evaluations_per_round=25, eval_samples=5000, curve_every=2,
             curve_samples=500)


def main(demo: DemoArguments, config: BaNELConfig) -> dict:
    torch.set_num_threads(demo.threads)
    set_seed(config.seed)
    # a finished run in output_dir is never overwritten: say so now, not after the pretrained estimate (train() would
    # refuse too)
    refuse_rerun(config.output_dir, None)
    os.makedirs(config.output_dir, exist_ok=True)
    start = time.time()
    attacker, tokenizer, oracle = load_addition_task()

    pre = estimate_success_rate(attacker, tokenizer, oracle, n=demo.eval_samples, seed=config.seed + 1)
    pre_est = SuccessEstimate.from_counts(pre.successes, pre.n)
    print(f"pretrained attacker: {pre_est}  (leading-zero queries: {pre.leading_zero / pre.n:.4%})")

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
    rows = [
        ("pretrained success rate", f"{pre_est.rate:.5f} [{pre_est.low:.5f}, {pre_est.high:.5f}] (n={pre_est.samples})"),
        ("BaNEL success rate", f"{final.rate:.5f} [{final.low:.5f}, {final.high:.5f}] (n={final.samples})"),
        ("improvement", f"{improvement:.1f}x"),
        ("reward evaluations (training)", f"{trainer.ledger.spent} of {config.max_reward_evaluations}"),
        ("successes found in training", f"{len(trainer.ledger.successes)}"),
        ("final acceptance rate", f"{final.acceptance_rate:.3f}"),
        ("evaluation-only oracle calls", f"{curve.evaluation_calls + final.oracle_calls} (not charged)"),
        ("wall time", f"{minutes:.1f} min"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print("\nsuccessful queries found, by kind:")
    for kind, queries in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"  {kind:<14} {len(queries):>5}  e.g. {', '.join(queries[:5])}")

    plot_path = os.path.join(config.output_dir, "success_rate.png")
    plot_success_curves({"BaNEL": curve.points}, plot_path, title="Addition attack: BaNEL",
                        baseline=pre_est.rate)
    result = {
        "pretrained": pre_est.to_dict(), "banel": final.to_dict(), "improvement": improvement,
        "nre": trainer.ledger.spent, "budget": config.max_reward_evaluations, "curve": curve.points,
        "successes_by_kind": {k: len(v) for k, v in groups.items()}, "minutes": minutes,
        "settings": {k: getattr(config, k) for k in TASK_DEFAULTS if k not in ("output_dir", "report_to")},
    }
    with open(os.path.join(config.output_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nplot: {plot_path}\nledger: {os.path.join(config.output_dir, 'evaluations.jsonl')}\n"
          f"model: {config.output_dir}")
    return result


def parse(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = TrlParser((DemoArguments, BaNELConfig))
    parser.set_defaults(**TASK_DEFAULTS)
    demo, config = parser.parse_args_and_config(argv)
    if demo.quick:
        explicit = {a.lstrip("-").split("=")[0] for a in argv if a.startswith("--")}
        for k, v in QUICK.items():
            if k not in explicit:
                setattr(demo if hasattr(demo, k) else config, k, v)
        config._validate()
    return demo, config


if __name__ == "__main__":
    main(*parse())
