"""Regenerates the hard attack's target and measures the pretrained attacker's success probability exactly.

    python recipes/pretrain_hard_attack.py               # writes examples/trl_banel_examples/tasks/hard_attack_target
    python recipes/pretrain_hard_attack.py --quick --out /tmp/hard   # a smoke run (2-digit operands)

The hard target starts from the shipped addition target and keeps training on the same distribution
(operands of 1-3 digits, digit count uniform, no leading zeros), which is also the shipped attacker's
distribution: lowering its error there is what lowers the attacker's success probability. Nothing is
planted. Then the target answers every one of the 1,000,000 queries without leading zeros once; the
queries it gets wrong are the success set (``successes.txt``), and the attacker's exact probability of
writing one of them is the prior (benchmarks/results/hard_attack_calibration.json).
"""

import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trl_banel_examples.cli import output_field, results_field, parse_script_args, write_results  # noqa: E402
from trl_banel_examples.tasks.addition import (ATTACKER_DIR, TARGET_DIR, AdditionOracle, answer_text, load_attacker,  # noqa: E402
                                      load_target, load_tokenizer, sample_operands)
from trl_banel_examples.tasks.common import lm_batch, train_lm  # noqa: E402
from trl_banel_examples.tasks.hard_attack import (MAX_PRIOR, MODEL_DIR, SUCCESS_FILE,  # noqa: E402
                                                  enumerate_successes, exact_success_probability, query_space_size,
                                                  target_wrong)


@dataclass
class Args:
    seed: int = 0
    init: str = str(TARGET_DIR)  # the target to start from
    attacker: str = str(ATTACKER_DIR)
    out: str = output_field(MODEL_DIR, "target model is")
    results: str = results_field(ROOT / "benchmarks/results/hard_attack_calibration.json")
    # AdamW steps of batch_size queries, warm-up then cosine decay (300 and 2,000 steps: no error left)
    steps: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    check_every: int = 500  # a sampled error rate on the training distribution, printed (the decision is exact)
    check_n: int = 30_000
    max_digits: int = 0  # 0: the target's own; smaller for a quick run
    quick: bool = False


def main(args: Args) -> dict:
    if args.quick:
        args.steps, args.check_every, args.check_n, args.max_digits = 20, 10, 500, 2
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    check_rng = np.random.default_rng(args.seed + 1_000)
    tokenizer = load_tokenizer(Path(args.init))
    target = load_target(path=Path(args.init))
    digits = args.max_digits or target.config.addition_max_operand_digits
    target.config.addition_max_operand_digits = digits
    target.config.addition_allow_leading_zeros = False  # read back by the oracle
    oracle = AdditionOracle(target, tokenizer)

    def make_batch():
        a, b = sample_operands(rng, args.batch_size, digits)
        queries = [f"{x}+{y}=" for x, y in zip(a.tolist(), b.tolist())]
        texts = [q + answer_text(x, y) for q, x, y in zip(queries, a.tolist(), b.tolist())]
        return lm_batch(tokenizer, texts, [len(q) + 1 for q in queries])  # loss on the answer and its eos

    def check(step):
        if step % args.check_every == 0:
            target.eval()
            a, b = sample_operands(check_rng, args.check_n, digits)
            wrong = sum(target_wrong(oracle, [f"{x}+{y}=" for x, y in zip(a.tolist(), b.tolist())]))
            target.train()
            print(f"  step {step}: {wrong} wrong of {args.check_n} sampled queries", flush=True)
        return False

    print(f"training the hard target from {args.init}")
    steps, train_seconds = train_lm(target, make_batch, args.steps, args.lr, check)

    print("enumerating the query space")
    start = time.time()
    successes = enumerate_successes(oracle)  # the oracle's operand digits are the target's, set above
    space = query_space_size(digits)
    enum_seconds = time.time() - start
    attacker = load_attacker(path=Path(args.attacker))
    prior = exact_success_probability(attacker, tokenizer, successes)

    out = Path(args.out)
    target.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SUCCESS_FILE).write_text("".join(q + "\n" for q in successes))
    shapes = Counter("x".join(str(len(p)) for p in q[:-1].split("+")) for q in successes)
    result = {
        "rule": f"well formed (operands of 1-{digits} digits), no leading zeros, target's greedy answer wrong",
        "exact_prior": prior, "max_prior": MAX_PRIOR, "prior_ok": prior <= MAX_PRIOR,
        "query_space": space, "successes": len(successes),
        "successes_by_operand_digits": dict(sorted(shapes.items())),
        "target_error_rate_uniform_over_queries": len(successes) / space,
        "pretraining": {"steps": steps, "seconds": round(train_seconds, 1),
                        "enumeration_seconds": round(enum_seconds, 1),
                        "machine": f"1 CPU thread of {os.cpu_count()}, torch {torch.__version__}"},
        "parameters": target.num_parameters(), "disk_bytes": sum(f.stat().st_size for f in out.iterdir()),
        "settings": asdict(args),
    }
    write_results(result, args.results, show=True)
    return result


if __name__ == "__main__":
    main(parse_script_args(Args, __doc__))
