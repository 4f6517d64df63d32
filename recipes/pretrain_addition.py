"""Regenerates the addition task's target and attacker, then measures and writes their calibration.

    python recipes/pretrain_addition.py --seed 0 --out examples/trl_banel_examples/tasks/addition_models
    python recipes/pretrain_addition.py --quick --out /tmp/addition  # seconds-long smoke run

The target learns ``<bos>a+b=<reversed sum><eos>`` (loss on the answer only) until its held-out
exact match on its own distribution reaches ``1 - target_stop_error``; the attacker learns the
query strings ``<bos>a+b=<eos>`` of that same distribution. Nothing is planted: the target's blind
spots are measured, afterwards, on the model training produced.

Stopping the target at 99.9% is the calibration knob. Trained on, this target makes no error in
30,000 held-out queries by step ~1,500, which would leave the pretrained attacker (which samples
that same distribution) almost nothing to find; at 99.9% its success rate is near the paper's 4e-4.
"""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from trl_banel_examples.cli import output_field, results_field, parse_script_args  # noqa: E402
from trl_banel_examples.tasks.addition import (LONG_CARRY_CHAIN, MODELS_DIR, AdditionOracle, answer_text,  # noqa: E402
                                      build_tokenizer, estimate_success_rate, longest_carry_chain, sample_operands)
from trl_banel_examples.tasks.common import lm_batch as batch, train_lm  # noqa: E402


@dataclass
class Args:
    seed: int = 0
    out: str = output_field(MODELS_DIR, "target/ and attacker/ models are")
    results: str = results_field(ROOT / "benchmarks/results/addition_calibration",
                                 "Calibration results: PATH.json and PATH.md are written")
    quick: bool = False  # tiny models, a few seconds of training, small measurements (smoke test)
    threads: int = 1  # tiny ops gain nothing from more; two threads on shared cores can run 10x slower
    max_operand_digits: int = 3
    hidden: int = 64  # both models: Llama, hidden size, 4 heads, MLP 4x hidden
    target_layers: int = 2
    attacker_layers: int = 2
    batch_size: int = 256
    lr: float = 3e-3
    target_max_steps: int = 8_000
    target_stop_error: float = 1e-3  # stop once held-out exact match on its own distribution >= 99.9%
    eval_every: int = 50  # accuracy jumps fast (98% -> 99.9% within ~100 steps): check often
    eval_after: int = 500
    eval_n: int = 30_000
    attacker_steps: int = 3_000
    calibration_n: int = 100_000  # attacker samples for the success rate
    probe_n: int = 10_000  # target queries per blind-spot probe


def make_model(args: Args, layers: int, vocab_size: int, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=4 * args.max_operand_digits + 8, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.addition_max_operand_digits = args.max_operand_digits  # read back by the oracle
    return LlamaForCausalLM(config)


def exact_match(oracle, a, b, chunk=4096):
    """Fraction of the queries a[i]+b[i]= (operands as ints or strings) the target answers right, and n."""
    queries = [f"{x}+{y}=" for x, y in zip(a, b)]
    answers = [answer_text(int(x), int(y)) for x, y in zip(a, b)]
    ok = [hit for i in range(0, len(queries), chunk)
          for hit in oracle.answers_correctly(queries[i : i + chunk], answers[i : i + chunk])]
    return sum(ok) / len(ok), len(ok)


def main(args: Args):
    if args.quick:
        args.hidden, args.target_max_steps, args.attacker_steps, args.eval_every, args.eval_after = 16, 30, 30, 10, 0
        args.eval_n, args.calibration_n, args.probe_n, args.batch_size = 200, 500, 200, 32
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    eval_rng = np.random.default_rng(args.seed + 1_000)  # held-out draws, separate from training
    tokenizer, D = build_tokenizer(), args.max_operand_digits
    vocab_size = len(tokenizer)

    # ---- target: loss on the answer and its eos only; the query is given
    target = make_model(args, args.target_layers, vocab_size, tokenizer)
    oracle = AdditionOracle(target, tokenizer)
    held_a, held_b = sample_operands(eval_rng, args.eval_n, D)

    def target_batch():
        a, b = sample_operands(rng, args.batch_size, D)
        texts = [f"{x}+{y}={answer_text(x, y)}" for x, y in zip(a.tolist(), b.tolist())]
        return batch(tokenizer, texts, [len(f"{x}+{y}=") + 1 for x, y in zip(a.tolist(), b.tolist())])

    def target_done(step):
        if step < args.eval_after or step % args.eval_every:
            return False
        target.eval()
        acc, _ = exact_match(oracle, held_a.tolist(), held_b.tolist())
        target.train()
        print(f"  step {step} held-out exact match {acc:.5f}", flush=True)
        return 1 - acc <= args.target_stop_error

    print("training target")
    target_steps, target_time = train_lm(target, target_batch, args.target_max_steps, args.lr, target_done)
    target.eval()

    # ---- attacker: the query strings of the same distribution, loss on every token
    attacker = make_model(args, args.attacker_layers, vocab_size, tokenizer)

    def attacker_batch():
        a, b = sample_operands(rng, args.batch_size, D)
        return batch(tokenizer, [f"{x}+{y}=" for x, y in zip(a.tolist(), b.tolist())], [1] * len(a))

    print("training attacker")
    attacker_steps, attacker_time = train_lm(attacker, attacker_batch, args.attacker_steps, args.lr)
    attacker.eval()

    out = Path(args.out)
    for name, model in (("target", target), ("attacker", attacker)):
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)

    # ---- calibration, all on the trained models
    print("measuring calibration")
    probe_rng = np.random.default_rng(args.seed + 2_000)
    a, b = sample_operands(probe_rng, args.calibration_n, D)
    own_acc, own_n = exact_match(oracle, a.tolist(), b.tolist())
    # leading zeros: a draw from the distribution with one operand zero-padded to a longer width
    lz = []
    for x, y in zip(*sample_operands(probe_rng, args.probe_n, D)):
        pair = [str(x), str(y)]
        short = [i for i in (0, 1) if len(pair[i]) < D]
        if short:
            i = short[int(probe_rng.integers(len(short)))]
            pair[i] = pair[i].zfill(int(probe_rng.integers(len(pair[i]) + 1, D + 1)))
            lz.append(pair)
    lz_acc, lz_n = exact_match(oracle, [x for x, _ in lz], [y for _, y in lz])
    # long carry chains: rejection-sample the training distribution (needs D >= LONG_CARRY_CHAIN)
    chains = []
    while D >= LONG_CARRY_CHAIN and len(chains) < args.probe_n:
        a, b = sample_operands(probe_rng, 100_000, D)
        chains += [(x, y) for x, y in zip(map(str, a), map(str, b)) if longest_carry_chain(x, y) >= LONG_CARRY_CHAIN]
    chains = chains[: args.probe_n]
    cc_acc, cc_n = exact_match(oracle, [x for x, _ in chains], [y for _, y in chains]) if chains else (float("nan"), 0)

    start = time.time()
    est, kinds = estimate_success_rate(attacker, tokenizer, oracle, n=args.calibration_n, seed=args.seed)
    sample_time = time.time() - start
    n, low, high = est.samples, est.low, est.high

    def size(d):
        return sum(f.stat().st_size for f in (out / d).iterdir())

    result = {
        "seed": args.seed, "max_operand_digits": D, "answer_digits": "reversed (least significant first)",
        "target_exact_match_own_distribution": {"accuracy": own_acc, "n": own_n},
        "target_exact_match_leading_zeros": {"accuracy": lz_acc, "n": lz_n},
        "target_exact_match_long_carry_chain": {"accuracy": cc_acc, "n": cc_n,
                                                "rule": f">= {LONG_CARRY_CHAIN} consecutive carries"},
        "attacker_success_rate": {"rate": est.rate, "successes": est.successes, "n": n,
                                  "ci95_clopper_pearson": [low, high], "sampling_seconds": round(sample_time, 1)},
        "attacker_off_distribution": {"leading_zero_rate": kinds["leading_zero"] / n,
                                      "malformed_rate": kinds["malformed"] / n, "n": n},
        "parameters": {"target": target.num_parameters(), "attacker": attacker.num_parameters()},
        "pretraining": {"target_steps": target_steps, "target_seconds": round(target_time, 1),
                        "attacker_steps": attacker_steps, "attacker_seconds": round(attacker_time, 1),
                        "machine": f"{args.threads} CPU thread(s) of {os.cpu_count()}, torch {torch.__version__}"},
        "disk_bytes": {"target": size("target"), "attacker": size("attacker")},
        "args": asdict(args),
    }
    print(json.dumps(result, indent=1))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")

    def pct(x):
        return f"{100 * x:.3f}%"

    results.with_suffix(".md").write_text(
        f"# Addition task calibration (seed {args.seed}, operands 1-{D} digits, reversed answers)\n\n"
        "Regenerate: `python recipes/pretrain_addition.py --seed 0 "
        "--out examples/trl_banel_examples/tasks/addition_models`.\n\n"
        "| measure | value | n |\n| --- | --- | --- |\n"
        f"| target exact match, own distribution | {pct(own_acc)} | {own_n} |\n"
        f"| target exact match, leading-zero queries | {pct(lz_acc)} | {lz_n} |\n"
        f"| target exact match, long carry chains (>= {LONG_CARRY_CHAIN} consecutive carries) | {pct(cc_acc)} "
        f"| {cc_n} |\n"
        f"| **pretrained attacker success rate** (95% Clopper-Pearson) | **{est.rate:.2e}** [{low:.2e}, {high:.2e}], "
        f"{est.successes} successes | {n} |\n"
        f"| attacker leading-zero queries | {pct(kinds['leading_zero'] / n)} | {n} |\n"
        f"| attacker malformed queries | {pct(kinds['malformed'] / n)} | {n} |\n"
        f"| parameters, target / attacker | {target.num_parameters():,} / {attacker.num_parameters():,} | |\n"
        f"| pretraining time, target / attacker | {target_time:.0f} s ({target_steps} steps) / "
        f"{attacker_time:.0f} s ({attacker_steps} steps) on {args.threads} CPU thread(s) | |\n"
        f"| size on disk, target / attacker | {size('target') / 1e6:.2f} MB / {size('attacker') / 1e6:.2f} MB | |\n")
    return result


if __name__ == "__main__":
    main(parse_script_args(Args, __doc__))
