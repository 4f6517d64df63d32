"""Is the ratio test's region about failures? One failure fit on the digits generator's own samples, and what its
region holds.

    python benchmarks/region_specificity.py                       # the shipped generator, 3 fits (~5 CPU min)
    python benchmarks/region_specificity.py --quick --out /tmp/rs  # a smoke test

BaNEL's region after one round is `{y : log p_fail(y) - log q(y) > log(1 / tau)}`, `p_fail` fitted from `q` on the
round's negatives. On digits every sample of the zero-generator is a failure, so the region does its job if it holds
images like the negatives (the generator's zeros) and not the sixes the search is after. This script fits one failure
model on `negatives` samples of the generator (as a round does, from the generator's weights) and measures, for each
set of images, the share inside the region and the median log-ratio:

- the fitted negatives, and fresh samples of the generator (held-out failures: what the next round proposes);
- sixes a zero-generator draws: the sixes the generator digits first shipped with drew in 150,000 samples
  (`benchmarks/results/digits_v1/`, cached in `OUT/region_sixes.json`). It put 0.7% of its mass off its training
  zeros, the shipped one 0.01%, so these are images a generator of zeros can reach, rare under the shipped one, as
  the sixes a search would reach;
- the dataset's zeros, sixes and other digits (scikit-learn's `load_digits`).

Fits: the digits round's own (`trl_banel_examples.tasks.digits.POSTERIOR_SETTINGS`: LoRA, 20 epochs of 16, lr 3e-3) on
one round's 50 negatives and on 500 (as `cumulative_negatives` would after 10 rounds), and the strong fit of DESIGN.md
section 6 (a full copy, 300 full-batch epochs, lr 1e-3, gradients clipped at 1).

Writes OUT/region_specificity.{json,md,png}.
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import parse_args, write_markdown  # noqa: E402
from trl_banel.failure import FailureModels  # noqa: E402
from trl_banel.sampler import Candidate, Sampler  # noqa: E402
from trl_banel_examples.tasks import digits  # noqa: E402
from trl_banel_examples.tasks.common import sample_token_ids, weights_hash  # noqa: E402

FIRST_GENERATOR = ROOT / "benchmarks" / "results" / "digits_v1" / "models"  # draws a six in ~20,000 samples


@dataclass
class Args:
    models: str = field(default=str(digits.MODELS_DIR), metadata={
        "help": "Digits models folder (generator/, classifier/); default: the shipped ones."})
    fits: list[str] = field(default_factory=lambda: ["round", "round_500", "strong"],
                            metadata={"help": "Fits to measure: round, round_500, strong (tiny: the smoke test's)."})
    fresh: int = field(default=2000, metadata={"help": "Fresh generator samples (held-out failures)."})
    six_samples: int = field(default=150_000, metadata={"help": "First-generator samples searched for sixes."})
    tau: float = field(default=0.97, metadata={"help": "The ratio test's threshold."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "Seeds: each draws its own negatives and starts its own fit (a LoRA adapter's init is random)."})
    out: str = field(default=str(ROOT / "benchmarks" / "results"), metadata={"help": "Results folder."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: one small fit, few samples."})


QUICK = dict(fits=["tiny"], fresh=64, six_samples=4096, seeds=[0])

# name: (negatives, failure_model, epochs, learning rate, batch size, max grad norm)
FITS = {
    "round": (50, "adapter", 20, 3e-3, 16, None),
    "round_500": (500, "adapter", 20, 3e-3, 16, None),
    "strong": (50, "copy", 300, 1e-3, 64, 1.0),
    "tiny": (16, "adapter", 3, 3e-3, 16, None),
}
FIT_LABELS = {"round": "the round's fit, 50 negatives", "round_500": "the round's fit, 500 negatives",
              "strong": "strong fit (copy, 300 full-batch epochs), 50", "tiny": "tiny (smoke test)"}


def draw(generator, tok, n: int, seed: int, batch_size: int = 4096) -> list[str]:
    """`n` unconditional samples of `generator`, as texts."""
    return [t for b in sample_token_ids(generator, tok, n, digits.PIXELS + 1, min(batch_size, n), seed=seed)
            for t in tok.batch_decode(b, skip_special_tokens=True)]


def zero_generator_sixes(n: int, cache: Path) -> dict:
    """The sixes the first digits generator draws in `n` samples (seed 12345), cached in `cache` (slow: ~10 CPU min
    per 150,000)."""
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached["samples"] == n:
            return cached
    generator, tok, oracle = digits.load_digits_task(models_dir=FIRST_GENERATOR)
    sixes = []
    for b in sample_token_ids(generator, tok, n, digits.PIXELS + 1, min(4096, n), seed=12345):
        texts = tok.batch_decode(b, skip_special_tokens=True)
        sixes += [t for t, r in zip(texts, oracle(completions=texts)) if r == 1.0]
    out = {"samples": n, "seed": 12345, "generator_weights": weights_hash(generator), "sixes": sixes}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=1))
    return out


def collate(tok, texts: list[str]):
    """The texts as the trainer scores them (prompt `<bos>`, completion ended by `<eos>`), by the sampler's own
    collation."""
    cands = [Candidate("", "", t, tok(text=t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], 0,
                       [tok.bos_token_id]) for t in texts]
    return Sampler.collate(SimpleNamespace(tokenizer=tok), cands)


def measure(generator, tok, fit: str, sets: dict, negatives: list[str], tau: float, seed: int) -> dict:
    """Fit one failure model on `negatives` from `generator`'s weights; each set's share in the region."""
    _, mode, epochs, lr, batch_size, clip = FITS[fit]
    torch.manual_seed(seed)  # a LoRA adapter's A matrix starts random: seeded, a rerun measures the same fit
    failures = FailureModels(generator, mode)
    failures.add()
    start = time.time()
    result = failures.fit(collate(tok, negatives), epochs, lr, batch_size, max_grad_norm=clip, seed=seed,
                          min_log_ratio=math.log(1 / tau))
    out = {"fit": fit, "negatives": len(negatives), "fit_log_ratio": result.log_ratio, "fit_steps": result.steps,
           "fit_seconds": time.time() - start, "sets": {}}
    for name, texts in {"fitted negatives": negatives, **sets}.items():
        if not texts:
            continue
        log_q, log_p = failures.score(collate(tok, texts), 512)
        ratio = (log_p[0] - log_q).numpy()
        out["sets"][name] = {"n": len(texts), "in_region": float(np.mean(ratio > math.log(1 / tau))),
                             "median_log_ratio": float(np.median(ratio)),
                             "median_log_q": float(np.median(log_q.numpy()))}
    failures.clear()
    return out


def main(args: Args) -> dict:
    torch.set_num_threads(1)
    unknown = set(args.fits) - set(FITS)
    if unknown:
        raise ValueError(f"unknown fits {sorted(unknown)}; choose from {list(FITS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator, tok, oracle = digits.load_digits_task(models_dir=Path(args.models))
    images, labels = digits.load_dataset()
    fresh = draw(generator, tok, args.fresh, seed=10_000)
    sixes = zero_generator_sixes(args.six_samples, out / "region_sixes.json")
    sets = {"fresh samples": fresh, "sixes a zero-generator draws": sixes["sixes"],
            "dataset zeros": [digits.image_to_text(x) for x in images[labels == 0]],
            "dataset sixes": [digits.image_to_text(x) for x in images[labels == 6]],
            "dataset other digits": [digits.image_to_text(x) for x in images[(labels != 0) & (labels != 6)]]}
    fits = []
    for fit in args.fits:
        for seed in args.seeds:
            negatives = draw(generator, tok, FITS[fit][0], seed=seed)
            fits.append({**measure(generator, tok, fit, sets, negatives, args.tau, seed), "seed": seed})
            print(f"[fit] {fit} seed {seed}: {fits[-1]['fit_seconds']:.0f} s", flush=True)
    result = {"models": os.path.relpath(args.models, ROOT) if Path(args.models).is_relative_to(ROOT) else args.models,
              "generator_weights": weights_hash(generator), "tau": args.tau, "seeds": args.seeds,
              "fresh_successes": int(sum(oracle(completions=fresh))), "sixes": {k: v for k, v in sixes.items()
                                                                                if k != "sixes"},
              "fits": fits, "summary": summarise(fits)}
    (out / "region_specificity.json").write_text(json.dumps(result, indent=1))
    write_markdown(out / "region_specificity.md", table(result))
    plot(result, out / "region_specificity.png")
    return result


def summarise(fits: list[dict]) -> dict:
    """Per fit and set, over seeds: the mean, least and greatest share inside the region, and the median log-ratio."""
    by_fit = {}
    for f in fits:
        by_fit.setdefault(f["fit"], []).append(f)

    def over_seeds(ms: list[dict]) -> dict:
        shares = [m["in_region"] for m in ms]
        return {"n": ms[0]["n"], "in_region": float(np.mean(shares)), "in_region_min": min(shares),
                "in_region_max": max(shares),
                "median_log_ratio": float(np.median([m["median_log_ratio"] for m in ms])),
                "median_log_q": ms[0]["median_log_q"]}

    return {fit: {"fit_log_ratio": float(np.mean([f["fit_log_ratio"] for f in runs])), "seeds": len(runs),
                  "sets": {name: over_seeds([f["sets"][name] for f in runs]) for name in runs[0]["sets"]}}
            for fit, runs in by_fit.items()}


def table(result: dict) -> list[str]:
    summary = result["summary"]
    names = list(dict.fromkeys(n for f in summary.values() for n in f["sets"]))
    lines = ["# The ratio test's region after one failure fit on the digits generator's own samples", "",
             f"Share of each set with `log p_fail - log q > log(1/{result['tau']})`: the mean over "
             f"{len(result['seeds'])} seeds (each its own negatives and fit), [least-greatest], and the median "
             f"log-ratio in nats. Generator: {result['models']}; the fresh samples held {result['fresh_successes']} "
             f"successes; {result['sixes']['samples']:,} samples of the first digits generator gave the "
             "zero-generator's sixes.", "",
             "| fit | fit log-ratio | " + " | ".join(f"{n} (n)" for n in names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for fit, f in summary.items():
        cells = [f"{s['in_region']:.0%} [{s['in_region_min']:.0%}-{s['in_region_max']:.0%}] "
                 f"({s['median_log_ratio']:+.1f}; {s['n']})" if s else "-" for s in (f["sets"].get(n) for n in names)]
        lines.append(f"| {FIT_LABELS[fit]} | {f['fit_log_ratio']:.2f} | " + " | ".join(cells) + " |")
    first = next(iter(summary.values()))["sets"]
    lines += ["", "Median log q of each set (nats): " + ", ".join(
        f"{n} {s['median_log_q']:.0f}" for n, s in first.items()) + "."]
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    names = list(dict.fromkeys(n for f in summary.values() for n in f["sets"]))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(summary)
    for i, (fit, f) in enumerate(summary.items()):
        sets = [f["sets"].get(n) for n in names]
        mean = np.array([s["in_region"] if s else np.nan for s in sets])
        spread = np.array([[m - s["in_region_min"], s["in_region_max"] - m] if s else [0, 0]
                           for s, m in zip(sets, mean)]).T
        ax.bar(np.arange(len(names)) + i * width, mean, width, yerr=spread, capsize=2, label=FIT_LABELS[fit])
    ax.set_xticks(np.arange(len(names)) + width * (len(summary) - 1) / 2, names, rotation=15, fontsize=8)
    ax.set(ylabel="share inside the region", ylim=(0, 1),
           title=f"Ratio-test region (tau = {result['tau']}) after one fit on the generator's own zeros")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(parse_args(Args, QUICK))
