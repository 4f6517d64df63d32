"""Digits 0-to-6: the paper's MNIST task (arXiv 2510.09596) on scikit-learn's bundled 8x8 digits.

A small causal LM (the *generator*) draws 8x8 images pixel by pixel. It was pretrained on the zeros of
``sklearn.datasets.load_digits`` only. The *oracle* is a classifier trained on all ten digits: it pays 1.0
when its probability that the image is a 6 is at least ``SUCCESS_PROBABILITY`` (0.9; fixed before the prior
was measured, never tuned). A generator of zeros almost never draws a six, so the reward is sparse: the
shipped generator's success probability is measured by Monte Carlo in
``benchmarks/results/digits_calibration.json``.

Images as text: one character per pixel, row-major, the dataset's own 17 intensities ``0``-``16`` written
``0123456789abcdefg``. The quantisation is the dataset's (lossless): the classifier sees exactly what the
generator wrote, and 17 tokens keep the vocabulary tiny. Prompt ``""`` (``[<bos>]``), completion 64
characters then ``<eos>``; anything else is malformed and scores 0.0.

``recipes/pretrain_digits.py`` regenerates the generator and the classifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trl_banel.stats import SuccessEstimate
from .common import build_tokenizer, sample_token_ids

MODELS_DIR = Path(__file__).resolve().parent / "digits_models"
GENERATOR_DIR = MODELS_DIR / "generator"
CLASSIFIER_DIR = MODELS_DIR / "classifier"
PIXELS = 64
LEVELS = "0123456789abcdefg"  # intensity i is LEVELS[i], 0..16
SOURCE_DIGIT = 0
TARGET_DIGIT = 6
SUCCESS_PROBABILITY = 0.9  # the success rule: P(6 | image) >= this; fixed before any prior was measured
MAX_PRIOR = 2e-5
# The shipped generator's prior as measured by recipes/pretrain_digits.py (benchmarks/results/digits_calibration.json;
# a test keeps the two equal): successes among samples, P(6) >= 0.9. The demo reports gains against it, since the
# few thousand samples a demo can afford see no success.
CALIBRATED_PRIOR = (0, 200_000)  # none: its 95% upper bound, 1.8e-5, is what gains are taken against
# The round the task first shipped with: the addition attack's (trl_banel_examples.tasks.addition.BENCHMARK_ROUND) with
# completions of 64 pixels and <eos>, and smaller proposal/distillation batches (an image costs about 5x a query
# to sample); the posterior objective, the ratio test at tau = 0.97.
POSTERIOR_SETTINGS = dict(
    max_reward_evaluations=7500, evaluations_per_round=50, num_candidates=256, max_completion_length=PIXELS + 1,
    rejection_threshold=0.97, failure_epochs=20, failure_learning_rate=3e-3, failure_batch_size=16,
    distill_every=1, distill_samples=256, distill_steps=8, per_device_train_batch_size=64, learning_rate=1e-3,
    failure_margin=0.0, failure_max_grad_norm=0.0, failure_warmup_steps=0, failure_heldout_fraction=0.0,
    keep_failure_models=False, success_replay=0.5, stop_after_successes=500,
    # the round these settings were measured with, before the package's default round changed (issue #29)
    distill_objective="posterior", distill_target_kl=0.0,
)
# The round the sparse benchmark ran: that round with the exact distillation objective (the ratio test stays on). The
# generator puts 99.99% of its mass on the 142 zeros it was trained on: once they are known failures, the exact
# objective moves it off them, and the failure model's region (on the distillation's draw) off images like the ones
# that failed, onto the rest of its mass, where the sixes are. Chosen on seed 100, kept apart from the reported seeds,
# by final success rate (benchmarks/round_variants.py --task digits, benchmarks/results/digits_polished/, both at
# commit c242a55): 0.978 after 948 NRE, against 0.961 after 920 for the first round (the posterior objective) and 0.958
# after 1,181 for the exact objective without the ratio test (the settings of the generator this task first shipped
# with, in benchmarks/results/digits_v1/ at commit c242a55; on this one it found no six on seed 0 in 7,500 NRE).
# What the sparse benchmark ran as BaNEL on this task (kept so that its records stay reproducible).
BENCHMARK_ROUND = dict(POSTERIOR_SETTINGS, distill_objective="exact")
# The task's settings for BaNEL: its budget, completion length, batch sizes and stop rule only; the package's default
# round decides the rest (issue #29; at these settings: benchmarks/results/defaults, task `digits`, 10 of 10 seeds
# >= 100x). The demo (recipes/digits_0_to_6.py) starts from them; every field can be overridden.
BANEL_SETTINGS = dict(max_reward_evaluations=7500, num_candidates=256, max_completion_length=PIXELS + 1,
                      per_device_train_batch_size=64, stop_after_successes=500)


# ----------------------------------------------------------------------------------------- images
def image_to_text(image) -> str:
    """An 8x8 (or flat 64) array of intensities 0..16 as 64 characters."""
    flat = np.asarray(image).reshape(-1)
    if flat.shape != (PIXELS,):
        raise ValueError(f"expected {PIXELS} pixels, got {flat.shape}")
    return "".join(LEVELS[int(v)] for v in flat)


def text_to_image(text) -> np.ndarray | None:
    """The 64 intensities a completion encodes (float32, 0..16), or None if it is malformed."""
    if not isinstance(text, str) or len(text) != PIXELS or any(c not in LEVELS for c in text):
        return None
    return np.array([LEVELS.index(c) for c in text], dtype=np.float32)


def load_dataset():
    """scikit-learn's bundled digits (1,797 images, no download): ``(images as (n, 64) float32, labels)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float32), data.target.astype(np.int64)


def build_digits_tokenizer():
    return build_tokenizer(LEVELS)


# ------------------------------------------------------------------------------------- classifier
class DigitClassifier(torch.nn.Module):
    """A small MLP on the 64 intensities (scaled to 0..1): the oracle's judge of which digit an image shows."""

    def __init__(self, hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        self.config = {"hidden": hidden, "dropout": dropout}
        self.net = torch.nn.Sequential(
            torch.nn.Linear(PIXELS, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, 10),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits over the ten digits for a (n, 64) batch of intensities 0..16."""
        return self.net(pixels / 16.0)

    @torch.inference_mode()
    def probabilities(self, pixels, batch_size: int = 65536) -> np.ndarray:
        """(n, 10) class probabilities for (n, 64) intensities."""
        self.eval()
        pixels = torch.as_tensor(np.asarray(pixels, dtype=np.float32)).reshape(-1, PIXELS)
        out = [torch.softmax(self(pixels[i : i + batch_size]), -1) for i in range(0, len(pixels), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, 10), dtype=np.float32)

    def save(self, path: Path):
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(self.config, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path = CLASSIFIER_DIR) -> "DigitClassifier":
        from safetensors.torch import load_file

        path = Path(path)
        model = cls(**json.loads((path / "config.json").read_text()))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.eval()


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = 300, lr: float = 1e-3,
                     weight_decay: float = 1e-4, batch_size: int = 128, seed: int = 0) -> DigitClassifier:
    """Trains :class:`DigitClassifier` on all ten digits (AdamW, cross-entropy)."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    x, y = torch.as_tensor(images), torch.as_tensor(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def is_success(probabilities: np.ndarray) -> np.ndarray:
    """The success rule on (n, 10) class probabilities: P(6) >= ``SUCCESS_PROBABILITY``."""
    return np.asarray(probabilities)[:, TARGET_DIGIT] >= SUCCESS_PROBABILITY


# ----------------------------------------------------------------------------------------- oracle
class DigitsOracle:
    """TRL-style reward function: 1.0 for a well-formed image the classifier calls a 6 with probability >= 0.9.

    ``oracle(prompts, completions, **kwargs) -> list[float]``; completions are 64-character strings
    (see :func:`text_to_image`), malformed ones score 0.0.
    """

    def __init__(self, classifier: DigitClassifier):
        self.classifier = classifier.eval()
        self.__name__ = "digits_oracle"  # TRL names reward columns after the function's __name__

    def __call__(self, prompts=None, completions: Sequence[str] = (), **kwargs) -> list[float]:
        rewards = [0.0] * len(completions)
        images = [(i, text_to_image(c)) for i, c in enumerate(completions)]
        images = [(i, img) for i, img in images if img is not None]
        if images:
            hits = is_success(self.classifier.probabilities(np.stack([img for _, img in images])))
            for (i, _), hit in zip(images, hits):
                rewards[i] = 1.0 if hit else 0.0
        return rewards


# --------------------------------------------------------------------------------------- estimate
def ids_to_images(tokens: torch.Tensor, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Sampled rows (``<bos>`` then the generated tokens) -> ``(images (n, 64), well_formed (n,))``.

    Works on token ids, without decoding: a second path to the same rule as the oracle's string parsing
    (the tests check they agree). The completion is what decoding without special tokens gives: the pixel
    tokens before the first ``<eos>``, special tokens among them skipped; it is well formed when there are
    exactly 64 of them.
    """
    level_of = torch.full((len(tokenizer),), -1, dtype=torch.long)
    for level, ch in enumerate(LEVELS):
        level_of[tokenizer.convert_tokens_to_ids(ch)] = level
    body = tokens.cpu()[:, 1:]
    levels = level_of[body]
    before_eos = (body == tokenizer.eos_token_id).long().cumsum(1) == 0
    keep = (levels >= 0) & before_eos
    ok = keep.sum(1) == PIXELS
    # the kept tokens in order: a stable sort puts them first, their positions ascending
    order = torch.sort((~keep).long(), dim=1, stable=True).indices
    pixels = levels.gather(1, order)[:, :PIXELS] if body.shape[1] >= PIXELS else levels.new_zeros((len(body), PIXELS))
    return pixels.clamp(min=0).float().numpy(), ok.numpy()


def estimate_success_rate(generator, tokenizer, oracle: DigitsOracle, n: int = 300_000, batch_size: int = 4096,
                          temperature: float = 1.0, seed: int = 0,
                          keep_images: bool = False) -> tuple[SuccessEstimate, dict]:
    """Monte Carlo: ``n`` images from ``generator``, scored in batches by the oracle's classifier and rule.

    Returns the estimate (Clopper-Pearson interval) and counts: ``malformed``, ``argmax`` (how many
    well-formed samples the classifier assigns to each digit) and ``max_p6`` (the highest P(6) seen); with
    ``keep_images``, also the well-formed images (``images``, (m, 64)) and their P(6) (``p6``, (m,)).
    """
    successes, malformed, argmax, max_p6 = 0, 0, np.zeros(10, dtype=np.int64), 0.0
    kept, kept_p6 = [np.zeros((0, PIXELS), np.float32)], [np.zeros(0)]
    for tokens in sample_token_ids(generator, tokenizer, n, PIXELS + 1, batch_size, temperature, seed):
        images, ok = ids_to_images(tokens, tokenizer)
        malformed += int((~ok).sum())
        if ok.any():
            probs = oracle.classifier.probabilities(images[ok])
            successes += int(is_success(probs).sum())
            argmax += np.bincount(probs.argmax(1), minlength=10)
            max_p6 = max(max_p6, float(probs[:, TARGET_DIGIT].max()))
            if keep_images:
                kept.append(images[ok])
                kept_p6.append(probs[:, TARGET_DIGIT])
    counts = {"malformed": malformed, "argmax": argmax.tolist(), "max_p6": max_p6}
    if keep_images:
        counts.update(images=np.concatenate(kept), p6=np.concatenate(kept_p6))
    return SuccessEstimate.from_counts(successes, n), counts


def uniform_image_success_rate(classifier: DigitClassifier, n: int = 200_000, seed: int = 0) -> SuccessEstimate:
    """A reference, not a generator: images whose 64 intensities are drawn uniformly from 0-16, scored by the
    oracle's rule. What a blind search over well-formed images (one told the format, nothing else) succeeds at."""
    images = np.random.default_rng(seed).integers(0, len(LEVELS), size=(n, PIXELS)).astype(np.float32)
    return SuccessEstimate.from_counts(int(is_success(classifier.probabilities(images)).sum()), n)


def improvement_over_prior(rate: float, prior: SuccessEstimate) -> tuple[float, str]:
    """``rate``'s multiple of the prior, and what it was taken over: the prior's rate, or its 95% upper bound
    (``"upper"``) when the prior saw no success: then the multiple is a lower bound."""
    return rate / prior.reference_rate, "rate" if prior.successes else "upper"


def demo_summary_text(result: dict) -> str:
    """The demo's printed summary (``recipes/digits_0_to_6.py``), from its ``result.json``; the README's example
    output is rendered by this too."""
    pre, prior, final = result["pretrained"], result["calibrated_prior"], result["banel"]

    def rate(e):
        return f"{e['rate']:.5f} [{e['low']:.5f}, {e['high']:.5f}] (n={e['samples']:,})"

    rows = [
        ("pretrained success rate", f"{rate(pre)}, measured now"),
        ("", f"{prior['rate']:.1e} [{prior['low']:.1e}, {prior['high']:.1e}] (n={prior['samples']:,}), shipped "
             "calibration"),
        ("BaNEL success rate", rate(final)),
        ("improvement", f"{result['improvement']:,.0f}x over the calibrated rate"
         + ("'s 95% upper bound (at least)" if result.get("improvement_over") == "upper" else "")
         + (" (quick mode: not meaningful)" if result["quick"] else "")),
        ("reward evaluations (training)", f"{result['nre']:,} of {result['budget']:,}"),
        ("successes found in training", f"{result['successes_found']:,}"),
        ("final acceptance rate", f"{final['acceptance_rate']:.3f}"),
        ("evaluation-only oracle calls", f"{result['evaluation_calls']:,} (not charged)"),
        ("wall time", f"{result['minutes']:.1f} min ({result['hardware']})"),
        ("sixes in the picture", f"{result['sixes_in_grid']['before']} of {result['sixes_in_grid']['of']} before, "
                                 f"{result['sixes_in_grid']['after']} of {result['sixes_in_grid']['of']} after"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def sample_images(generator, tokenizer, oracle: DigitsOracle, n: int, seed: int = 0):
    """``n`` images drawn from ``generator`` with the classifier's verdict: ``(images (n, 64), P(6) (n,),
    success (n,))``; a malformed image is drawn blank, with P(6) = 0."""
    (tokens,) = list(sample_token_ids(generator, tokenizer, n, PIXELS + 1, n, seed=seed))
    images, ok = ids_to_images(tokens, tokenizer)
    p6 = np.zeros(n)
    if ok.any():
        p6[ok] = oracle.classifier.probabilities(images[ok])[:, TARGET_DIGIT]
    images[~ok] = 0
    return images, p6, ok & (p6 >= SUCCESS_PROBABILITY)


def image_diversity(images: np.ndarray, pairs: int = 20_000, seed: int = 0) -> dict:
    """How varied a set of images is: ``{"images", "distinct", "median_l1"}``, the number of distinct images and the
    median L1 distance (summed over the 64 intensities, 0-16 each) between two of them drawn at random (``pairs``
    pairs of different indices; None for fewer than two images). A generator that redraws one image scores
    ``distinct`` 1 and ``median_l1`` 0; two of the dataset's sixes are about 140 apart."""
    images = np.asarray(images)
    distinct = len({row.tobytes() for row in images.astype(np.int8)})
    if len(images) < 2:
        return {"images": len(images), "distinct": distinct, "median_l1": None}
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(images), pairs)
    j = (i + rng.integers(1, len(images), pairs)) % len(images)  # never the image itself
    return {"images": len(images), "distinct": distinct,
            "median_l1": float(np.median(np.abs(images[i] - images[j]).sum(1)))}


def plot_digit_grid(groups: dict, path, per_row: int = 12) -> None:
    """Image groups (title -> :func:`sample_images`' triple) one under the other, each image titled with its P(6)
    and framed green when it is a success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_row = min(per_row, max(len(images) for images, _, _ in groups.values()))
    rows = [(title, i) for title, (images, _, _) in groups.items() for i in range(0, len(images), per_row)]
    fig, axes = plt.subplots(len(rows), per_row, figsize=(max(per_row * 0.8, 6), len(rows) * 1.25 + 0.4),
                             squeeze=False)
    for (title, start), line in zip(rows, axes):
        images, p6, success = groups[title]
        for j, ax in enumerate(line):
            ax.set_xticks([]), ax.set_yticks([])
            k = start + j
            if k >= len(images):
                ax.axis("off")
                continue
            ax.imshow(images[k].reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
            ax.set_title(f"{p6[k]:.2f}", fontsize=7, color="green" if success[k] else "black")
            for side in ax.spines.values():
                side.set(color="green" if success[k] else "lightgrey", linewidth=2 if success[k] else 0.5)
        if start == 0:
            label = line[0].annotate(title, (0, 1.35), xycoords="axes fraction", fontsize=9, ha="left", weight="bold")
            label.set_in_layout(False)  # a row title wider than its first image must not squeeze the grid
    fig.suptitle("above each image: the classifier's P(6); green: a success (P(6) >= 0.9)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95), h_pad=1.6)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------- generator
def make_generator(tokenizer, hidden: int = 64, layers: int = 3, heads: int = 4, seed: int = 0):
    """A small Llama for 64-pixel images (about 150k parameters with the defaults)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=PIXELS + 8,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def load_generator(device: str = "cpu", path: Path = GENERATOR_DIR):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(Path(path)).to(device).eval()


def load_digits_task(device: str = "cpu", models_dir: Path = MODELS_DIR):
    """Returns ``(generator, tokenizer, oracle)`` for the shipped digits 0-to-6 task."""
    from transformers import AutoTokenizer

    models_dir = Path(models_dir)
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "generator")
    oracle = DigitsOracle(DigitClassifier.load(models_dir / "classifier"))
    return load_generator(device, models_dir / "generator"), tokenizer, oracle
