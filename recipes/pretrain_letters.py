"""Regenerates the rare-letters task's generator and measures its exact success probability.

    python recipes/pretrain_letters.py    # writes examples/trl_banel_examples/tasks/letters_model (about 2 minutes)
    python recipes/pretrain_letters.py --steps 50 --out /tmp/letters   # a seconds-long smoke run

The generator learns 8-letter strings from a random bigram chain in which ``a`` is rare; the success rule
(at least ``min_a`` ``a``s) is then set to the smallest count whose exact prior is at most 2e-5, and both are
stored in the model's config and in benchmarks/results/letters_calibration.json.
"""

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import torch  # noqa: E402

from trl_banel_examples.cli import output_field, results_field, parse_script_args, write_results  # noqa: E402
from trl_banel_examples.tasks.letters import MAX_PRIOR, MODEL_DIR, choose_min_a, pretrain_generator  # noqa: E402


@dataclass
class Args:
    seed: int = 0
    steps: int = 1500  # AdamW steps of 256 strings, cosine-decayed learning rate
    concentration: float = 1.0  # Dirichlet concentration of the chain's rows (below 1: a peaked generator)
    rare_weight: float = 0.2  # the rare letter's transition probabilities are scaled by this
    max_prior: float = MAX_PRIOR  # the success rule is the smallest a-count whose exact prior is at most this
    out: str = output_field(MODEL_DIR, "generator model is")
    results: str = results_field(ROOT / "benchmarks/results/letters_calibration.json")


def main(args: Args) -> dict:
    torch.set_num_threads(1)
    model, tokenizer, losses = pretrain_generator(seed=args.seed, steps=args.steps, concentration=args.concentration,
                                                rare_weight=args.rare_weight)
    min_a, prior = choose_min_a(model, tokenizer, args.max_prior)
    model.config.letters_min_a = min_a
    model.config.letters_prior = prior
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    result = {"min_a": min_a, "exact_prior": prior, "max_prior": args.max_prior, "final_loss": sum(losses[-50:]) / 50,
              "settings": asdict(args)}
    write_results(result, args.results, indent=2)
    print(f"min_a={min_a}: exact success probability of the pretrained generator {prior:.3g} "
          f"(at most {args.max_prior})")
    return result


if __name__ == "__main__":
    main(parse_script_args(Args, __doc__))
