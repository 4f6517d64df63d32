"""Regenerates the digits 0-to-6 task (generator + classifier) and measures the generator's prior by Monte Carlo.

    python recipes/pretrain_digits.py                       # writes examples/trl_banel_examples/tasks/digits_models
    python recipes/pretrain_digits.py --polish_steps 0 --n 150000 --out DIR --results FILE   # the first generator
    python recipes/pretrain_digits.py --quick --out /tmp/digits --results /tmp/digits.json   # smoke run

1. The classifier (the oracle's judge) learns all ten digits of scikit-learn's bundled 8x8 digits on a
   stratified 80% split; its accuracy is measured on the other 20%.
2. The generator learns the zeros of the classifier's training split only, one token per pixel intensity; the
   held-out zeros' loss is recorded every ``check_every`` steps. With ``patience`` > 0 training stops once it
   has risen for that many checks in a row and the weights of the lowest held-out loss are kept; the default
   (0) trains the full ``steps``: a generator stopped early (patience 3 of 50-step checks: step 300, its
   held-out loss lowest at step 150) drew 25% malformed images and a prior of 1.4e-3 (30,000 samples), far
   above 2e-5, so the shipped one trains on until it draws clean zeros, close to its training zeros (the
   calibration file records both losses).
3. Polish: ``polish_steps`` more steps with every training zero in each batch. The first phase's random batches
   leave 0.7% of the generator's mass off its training zeros, and every six it can draw is there: the generator digits
   first shipped with stopped there (a prior of 4.7e-5 in 150,000 samples, above issue #14's 2e-5; in
   benchmarks/results/digits_v1/ at commit c242a55, the second command above). 1,000 full-batch steps at lr 1e-3 leave
   0.01%: a prior of 0 in 200,000 samples (upper bound 1.8e-5), the shipped generator. It was made from the first one
   with ``--init_generator`` that generator (``digits_v1/models/generator`` at that commit; the model has no dropout
   and the polish draws no batches, so the polish is deterministic from those weights).
4. ``n`` images are drawn from the generator and scored with the fixed rule P(6) >= 0.9; the rate, its
   Clopper-Pearson interval, what the classifier calls the samples, the exact mass on the zeros and the
   generator's weights hash go to benchmarks/results/digits_calibration.json.
"""

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

from trl_banel_examples.cli import output_field, results_field, parse_script_args, write_results  # noqa: E402
from trl_banel_examples.tasks.common import lm_batch, sequence_log_probs, train_lm, weights_hash  # noqa: E402
from trl_banel_examples.tasks.digits import (MAX_PRIOR, MODELS_DIR, SOURCE_DIGIT, SUCCESS_PROBABILITY, TARGET_DIGIT,  # noqa: E402
                                    DigitsOracle, build_digits_tokenizer, estimate_success_rate, image_to_text,
                                    is_success, load_dataset, load_generator, make_generator, train_classifier)


def zeros_mass(generator, tokenizer, texts) -> float:
    """The generator's exact probability of drawing one of `texts` (distinct images)."""
    return float(sequence_log_probs(generator, tokenizer, sorted(set(texts))).exp().sum())


@dataclass
class Args:
    seed: int = 0
    out: str = output_field(MODELS_DIR, "generator/ and classifier/ models are")
    results: str = results_field(ROOT / "benchmarks/results/digits_calibration.json")
    test_fraction: float = 0.2  # classifier's held-out share (stratified)
    classifier_epochs: int = 300
    steps: int = 3000  # generator: AdamW steps, warm-up then cosine decay (600 left 28% of its images malformed)
    check_every: int = 50  # held-out zeros' loss, for early stopping
    patience: int = 0  # 0: no early stopping
    polish_steps: int = 1000  # second phase: every training zero in each batch, fresh AdamW, cosine decay (0: none)
    polish_lr: float = 1e-3
    init_generator: str | None = None  # a saved first-phase generator: skip that phase, polish it
    batch_size: int = 64
    lr: float = 3e-3
    hidden: int = 64
    layers: int = 3
    n: int = 200_000  # generated images scored for the prior
    sample_batch: int = 10_000
    quick: bool = False


def main(args: Args) -> dict:
    if args.quick:
        args.classifier_epochs, args.steps, args.n = 20, 20, 2000
        args.hidden, args.layers, args.check_every, args.polish_steps = 16, 1, 10, 10
    torch.set_num_threads(1)
    from sklearn.model_selection import train_test_split

    images, labels = load_dataset()
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=args.test_fraction,
                                                        stratify=labels, random_state=args.seed)
    start = time.time()
    classifier = train_classifier(train_x, train_y, epochs=args.classifier_epochs, seed=args.seed)
    classifier_seconds = time.time() - start
    probs = classifier.probabilities(test_x)
    accuracy = float((probs.argmax(1) == test_y).mean())
    paid = is_success(probs)
    print(f"classifier held-out accuracy {accuracy:.4f} (n={len(test_y)})")

    tokenizer = build_digits_tokenizer()
    generator = make_generator(tokenizer, hidden=args.hidden, layers=args.layers, seed=args.seed)
    zeros = [image_to_text(img) for img in train_x[train_y == SOURCE_DIGIT]]
    heldout_zeros = [image_to_text(img) for img in test_x[test_y == SOURCE_DIGIT]]
    rng = np.random.default_rng(args.seed)
    history, best = [], {}

    def heldout_loss(texts):
        ids, mask, labels_ = lm_batch(tokenizer, texts, [1] * len(texts))
        generator.eval()
        with torch.no_grad():
            loss = generator(input_ids=ids, attention_mask=mask, labels=labels_).loss.item()
        generator.train()
        return loss

    def should_stop(step):
        if step % args.check_every:
            return False
        history.append({"step": step, "heldout_loss": heldout_loss(heldout_zeros), "train_loss": heldout_loss(zeros)})
        print(f"  step {step}: held-out zeros loss {history[-1]['heldout_loss']:.4f}, "
              f"training zeros {history[-1]['train_loss']:.4f}", flush=True)
        losses = [h["heldout_loss"] for h in history]
        if args.patience and losses[-1] == min(losses):
            best.update(step=step, state={k: v.clone() for k, v in generator.state_dict().items()})
        return args.patience > 0 and len(losses) > args.patience and all(
            losses[-i] > losses[-i - 1] for i in range(1, args.patience + 1))

    def make_batch():
        return lm_batch(tokenizer, [zeros[i] for i in rng.integers(len(zeros), size=args.batch_size)],
                        [1] * args.batch_size)

    if args.init_generator:  # the first phase's output, saved by an earlier run of this script
        generator = load_generator(path=args.init_generator).train()
        steps, generator_seconds = 0, 0.0
        print(f"first phase: {args.init_generator}")
    else:
        print(f"training the generator on {len(zeros)} zeros")
        steps, generator_seconds = train_lm(generator, make_batch, args.steps, args.lr, should_stop, log_every=0)
        if best:
            generator.load_state_dict(best["state"])
    kept = next((h for h in history if h["step"] == best.get("step")), None)
    first_phase_mass = zeros_mass(generator, tokenizer, zeros)
    polish_seconds = 0.0
    if args.polish_steps:
        # The first phase's batches, drawn with replacement, never hold the zeros in equal shares: the generator
        # keeps 0.7% of its mass off its training zeros, and every six it can draw is in that 0.7%. Full batches
        # (every zero, every step) aim it at the uniform mixture of the zeros itself.
        print(f"polishing: {args.polish_steps} full-batch steps at lr {args.polish_lr} "
              f"(mass on the training zeros {first_phase_mass:.5f})")
        full_batch = lm_batch(tokenizer, zeros, [1] * len(zeros))
        _, polish_seconds = train_lm(generator, lambda: full_batch, args.polish_steps, args.polish_lr, log_every=0)
    mass = {"first_phase": first_phase_mass, "final": zeros_mass(generator, tokenizer, zeros),
            "final_all_dataset_zeros": zeros_mass(generator, tokenizer, zeros + heldout_zeros)}
    print(f"mass on the training zeros: {mass['final']:.5f}")

    out = Path(args.out)
    generator.save_pretrained(out / "generator")
    tokenizer.save_pretrained(out / "generator")
    classifier.save(out / "classifier")

    print(f"scoring {args.n} generated images")
    start = time.time()
    estimate, counts = estimate_success_rate(generator, tokenizer, DigitsOracle(classifier), n=args.n,
                                             batch_size=args.sample_batch, seed=args.seed)
    sample_seconds = time.time() - start
    result = {
        "rule": f"well formed (64 pixels) and the classifier's P({TARGET_DIGIT}) >= {SUCCESS_PROBABILITY}",
        "prior": {"rate": estimate.rate, "successes": estimate.successes, "n": estimate.samples,
                  "ci95_clopper_pearson": [estimate.low, estimate.high], "seed": args.seed},
        "max_prior": MAX_PRIOR,
        "prior_ok": estimate.rate <= MAX_PRIOR and estimate.high <= 2 * MAX_PRIOR,
        "samples": {**counts, "seconds": round(sample_seconds, 1)},
        "classifier": {
            "heldout_accuracy": accuracy, "heldout_n": len(test_y), "train_n": len(train_y),
            "heldout_paid_sixes": f"{int(paid[test_y == TARGET_DIGIT].sum())}/{int((test_y == TARGET_DIGIT).sum())}",
            "heldout_paid_other_digits":
                f"{int(paid[test_y != TARGET_DIGIT].sum())}/{int((test_y != TARGET_DIGIT).sum())}",
            "parameters": sum(p.numel() for p in classifier.parameters()), "seconds": round(classifier_seconds, 1),
        },
        "generator": {"training_images": len(zeros), "heldout_images": len(heldout_zeros),
                      "kept": kept, "loss_history": history, "steps": steps, "seconds": round(generator_seconds, 1),
                      "first_phase": args.init_generator or "trained above", "polish_steps": args.polish_steps,
                      "polish_lr": args.polish_lr, "polish_seconds": round(polish_seconds, 1),
                      "mass_on_zeros": mass,
                      "parameters": generator.num_parameters()},
        "generator_weights": weights_hash(generator),  # the benchmarks reuse this prior for this generator only
        "disk_bytes": {d: sum(f.stat().st_size for f in (out / d).iterdir()) for d in ("generator", "classifier")},
        "machine": f"1 CPU thread of {os.cpu_count()}, torch {torch.__version__}",
        "settings": asdict(args),
    }
    write_results(result, args.results, show=True)
    return result


if __name__ == "__main__":
    main(parse_script_args(Args, __doc__))
