"""How varied are the sixes a trained digits generator draws? Distinct images and spread among its successes.

    python benchmarks/digits_diversity.py                                   # the demo's saved generator (runs/demo)
    python benchmarks/digits_diversity.py --runs demo=runs/demo mine=runs/digits_0_to_6
    python benchmarks/digits_diversity.py --quick --out /tmp/dd             # a smoke test (the pretrained model)

A run's success rate says how often its generator draws a six, not how many different sixes: a generator that redraws
one image the classifier calls a six scores as well as one that draws many. For each saved generator (a run's
output_dir, as recipes/digits_0_to_6.py writes it) this samples `samples` images from the generator as saved (what a
user loads; BaNEL's sampler also drops the known failures, which changes little once it draws sixes), scores them with
the shipped classifier, and reports among the successes: how many, how many distinct, and the median L1 distance
between two of them (`trl_banel_examples.tasks.digits.image_diversity`), beside the dataset's 181 sixes.

Writes OUT/digits_diversity.{json,md,png} (the png: the first sixes each generator drew).
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from benchmarks.common import parse_args, write_markdown  # noqa: E402
from trl_banel_examples.cli import write_results  # noqa: E402
from trl_banel_examples.tasks import digits  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Args:
    runs: list[str] = field(default_factory=lambda: [f"demo={ROOT / 'runs' / 'demo'}"],
                            metadata={"help": "label=folder of a saved generator (a run's output_dir), one per run."})
    samples: int = field(default=5000, metadata={"help": "Images sampled from each generator."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (the same for every generator)."})
    grid: int = field(default=24, metadata={"help": "Sixes shown per generator in the png."})
    out: str = field(default=str(RESULTS), metadata={"help": "Results folder."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: the pretrained generator only, 300 samples."})


QUICK = dict(samples=300, grid=8)


def measure(generator, tokenizer, oracle, n: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """The generator's success rate on `n` samples and the diversity of its successes; their images and P(6)."""
    est, counts = digits.estimate_success_rate(generator, tokenizer, oracle, n, batch_size=min(n, 2048), seed=seed,
                                               keep_images=True)
    images, p6 = counts["images"], counts["p6"]
    success = p6 >= digits.SUCCESS_PROBABILITY  # the oracle's rule (digits.is_success) on P(6) alone
    return ({"samples": n, "success_rate": est.rate, "ci95": [est.low, est.high],
             "sixes": digits.image_diversity(images[success], seed=seed),
             "all_images": digits.image_diversity(images, seed=seed)}, images[success], p6[success])


def main(args: Args) -> dict:
    torch.set_num_threads(1)
    oracle = digits.DigitsOracle(digits.DigitClassifier.load())
    runs = [("pretrained", str(digits.GENERATOR_DIR))]
    if not args.quick:
        runs += [tuple(r.split("=", 1)) for r in args.runs]
    data, labels = digits.load_dataset()
    result = {"samples": args.samples, "seed": args.seed,
              "dataset_sixes": digits.image_diversity(data[labels == digits.TARGET_DIGIT], seed=args.seed), "runs": {}}
    groups = {}
    for label, folder in runs:
        if not (Path(folder) / "config.json").exists():
            raise FileNotFoundError(f"--runs {label}={folder}: no saved generator there (expected a run's "
                                    "output_dir with config.json)")
        generator = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        entry, sixes, p6 = measure(generator, tokenizer, oracle, args.samples, args.seed)
        result["runs"][label] = {"folder": os.path.relpath(folder, ROOT), **entry}
        if len(sixes):
            shown = sixes[: args.grid]
            groups[f"{label}: {entry['sixes']['distinct']:,} distinct among {entry['sixes']['images']:,} sixes"] = (
                shown, p6[: args.grid], np.ones(len(shown), bool))
    os.makedirs(args.out, exist_ok=True)
    write_results(result, os.path.join(args.out, "digits_diversity.json"))
    ds = result["dataset_sixes"]
    lines = ["# Digits: how varied are a generator's sixes?", "",
             f"{args.samples:,} samples per generator (seed {args.seed}), scored by the shipped classifier; among the "
             "successes (P(6) >= 0.9): how many distinct images, and the median L1 distance between two of them "
             f"(the dataset's {ds['images']} sixes: {ds['distinct']} distinct, median L1 {ds['median_l1']:.0f}). "
             "Command: `python benchmarks/digits_diversity.py`.", "",
             "| generator | success rate | sixes | distinct sixes | median L1 between two sixes | distinct images "
             "(all) |", "| --- | --- | --- | --- | --- | --- |"]
    for label, r in result["runs"].items():
        l1 = "n/a" if r["sixes"]["median_l1"] is None else f"{r['sixes']['median_l1']:.0f}"
        lines.append(f"| {label} (`{r['folder']}`) | {r['success_rate']:.4g} | {r['sixes']['images']:,} | "
                     f"{r['sixes']['distinct']:,} | {l1} | {r['all_images']['distinct']:,} |")
    write_markdown(os.path.join(args.out, "digits_diversity.md"), lines)
    if groups:
        digits.plot_digit_grid(groups, os.path.join(args.out, "digits_diversity.png"))
    return result


if __name__ == "__main__":
    main(parse_args(Args, QUICK))
