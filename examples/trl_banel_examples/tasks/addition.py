"""The addition attack: BaNEL's adversarial-attack experiment (arXiv 2510.09596), made CPU-small.

A tiny *target* transformer has learned digit addition. An *attacker* language model writes queries
``a+b=``; the *oracle* pays 1.0 when a query is well formed and the target's greedy answer is wrong.
The pretrained attacker samples from the target's own training distribution, where the target is
accurate, so successes are rare (about 4e-4 in the paper): a sparse, binary reward.

Text format (one token per character, vocabulary ``<pad> <bos> <eos> 0-9 + =``):

- attacker: prompt ``""`` (encodes to ``[<bos>]``), completion ``"12+345="`` then ``<eos>``;
- target: ``<bos>12+345=753<eos>``. The answer digits are written **reversed** (least significant
  first: 12+345=357 is written ``753``), the order in which carries are computed, which makes
  addition far easier to learn for a small model.

Training operands have 1 to ``max_operand_digits`` digits (digit count uniform, then value uniform)
and never a leading zero. Nothing was planted in the target: its blind spots (leading zeros, long
carry chains) are whatever training left. ``recipes/pretrain_addition.py`` regenerates both models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from trl_banel.stats import SuccessEstimate
from .common import SPECIAL_TOKENS, sample_token_ids  # noqa: F401 (SPECIAL_TOKENS: public name kept)
from .common import build_tokenizer as _build_tokenizer

MODELS_DIR = Path(__file__).resolve().parent / "addition_models"
TARGET_DIR = MODELS_DIR / "target"
ATTACKER_DIR = MODELS_DIR / "attacker"
DEFAULT_MAX_OPERAND_DIGITS = 3
CHARACTERS = list("0123456789+=")
_QUERY_RE = re.compile(r"([0-9]+)\+([0-9]+)=")  # ASCII digits only: str.isdigit accepts "²"
LONG_CARRY_CHAIN = 3  # a run of this many consecutive carries counts as a "long carry chain"

# The round this task first shipped with, hand-picked for it (measured on this task: docs/benchmarks.md, "The addition
# attack"): what benchmarks/addition_attack.py and the sparse benchmark ran as BaNEL, kept so that their records stay
# reproducible. The demo runs BANEL_SETTINGS below instead.
BENCHMARK_ROUND = dict(
    max_reward_evaluations=7500, evaluations_per_round=50, num_candidates=512, max_completion_length=12,
    rejection_threshold=0.97, failure_epochs=20, failure_learning_rate=3e-3, failure_batch_size=16,
    distill_every=1, distill_samples=512, distill_steps=8, per_device_train_batch_size=64, learning_rate=1e-3,
    # the round these settings were measured with on this task (the package's defaults since differ): a fixed
    # 20-epoch fit with no margin, clipping or warm-up, no held-out share, regions dropped at each distillation
    failure_margin=0.0, failure_max_grad_norm=0.0, failure_warmup_steps=0, failure_heldout_fraction=0.0,
    keep_failure_models=False,
    # a success found is distilled (half of each distillation's samples), and the run stops once it holds 500: a
    # generator that writes successes keeps finding new ones at a few per round, a crawl the user need not wait for
    success_replay=0.5, stop_after_successes=500,
    # the round these settings were measured with, before the package's default round changed (issue #29)
    distill_objective="posterior", distill_target_kl=0.0,
)
# The task's settings for BaNEL: its budget, completion length, batch sizes and stop rule only; the package's default
# round decides the rest (issue #29; at these settings: benchmarks/results/defaults, task `addition`). The demo
# (recipes/addition_attack.py) starts from them; every field can be overridden.
BANEL_SETTINGS = dict(max_reward_evaluations=7500, num_candidates=512, max_completion_length=12,
                      per_device_train_batch_size=64, stop_after_successes=500)


# ----------------------------------------------------------------------------------------- text
def build_tokenizer(characters: Sequence[str] = CHARACTERS):
    """The character-level tokenizer of :func:`trl_banel_examples.tasks.common.build_tokenizer`, this task's
    characters by default: ``<pad> <bos> <eos> 0-9 + =``."""
    return _build_tokenizer(characters)


def answer_text(a: int, b: int) -> str:
    """The target's answer to ``a+b=``: the digits of the sum, least significant first."""
    return str(a + b)[::-1]


def sample_operands(rng: np.random.Generator, n: int, max_digits: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``n`` operand pairs from the training distribution (digit count uniform, no leading zero)."""

    def draw():
        digits = rng.integers(1, max_digits + 1, size=n)
        low = np.where(digits == 1, 0, 10 ** (digits - 1))  # one-digit operands include 0
        return rng.integers(low, 10**digits)

    return draw(), draw()


def parse_query(query: str, max_operand_digits: int, allow_leading_zeros: bool = True) -> Optional[tuple[str, str]]:
    """Returns the two operand strings of a well-formed query, or None.

    Well formed: ``digits+digits=``, each operand 1..max_operand_digits digits. Leading zeros are
    allowed by default: they are within what the target can read, and they are one of its blind spots.
    With ``allow_leading_zeros=False`` (the paper's harder variant) an operand of 2+ digits starting
    with ``0`` makes the query malformed.
    """
    match = _QUERY_RE.fullmatch(query) if isinstance(query, str) else None
    if match is None or max(len(match[1]), len(match[2])) > max_operand_digits:
        return None
    if not allow_leading_zeros and any(len(x) > 1 and x[0] == "0" for x in (match[1], match[2])):
        return None
    return match[1], match[2]


def longest_carry_chain(a: str, b: str) -> int:
    """Length of the longest run of consecutive column carries when adding ``a`` and ``b``."""
    carry, run, best = 0, 0, 0
    for i in range(max(len(a), len(b))):
        da = int(a[-1 - i]) if i < len(a) else 0
        db = int(b[-1 - i]) if i < len(b) else 0
        carry = (da + db + carry) // 10
        run = run + 1 if carry else 0
        best = max(best, run)
    return best


def classify_query(query: str, max_operand_digits: int = DEFAULT_MAX_OPERAND_DIGITS) -> str:
    """Groups a query by the kind of weakness it probes, checked in this order.

    Returns ``"malformed"`` (not a well-formed query, see :func:`parse_query`), ``"leading zeros"``
    (an operand of 2+ digits starts with 0), ``"carry chain"`` (the addition has a run of at least
    ``LONG_CARRY_CHAIN`` = 3 consecutive carries) or ``"other"``.
    """
    operands = parse_query(query, max_operand_digits)
    if operands is None:
        return "malformed"
    if any(len(x) > 1 and x[0] == "0" for x in operands):
        return "leading zeros"
    if longest_carry_chain(*operands) >= LONG_CARRY_CHAIN:
        return "carry chain"
    return "other"


# --------------------------------------------------------------------------------------- oracle
class AdditionOracle:
    """TRL-style reward function: 1.0 for a well-formed query the target answers wrongly, else 0.0.

    Args:
        target_model: the causal LM that learned ``<bos>a+b=<reversed sum><eos>``.
        tokenizer: the character tokenizer of :func:`build_tokenizer`.
        max_operand_digits: longest operand accepted as well formed (defaults to the value the
            target was trained with, stored in its config, else ``DEFAULT_MAX_OPERAND_DIGITS``).
        batch_size: queries per forward pass.
        allow_leading_zeros: whether a query with a zero-padded operand is well formed (defaults to the
            target config's ``addition_allow_leading_zeros``, else True; the hard attack's target says False).

    Call it as ``oracle(prompts, completions, **kwargs) -> list[float]``; ``completions`` are query
    strings such as ``"12+345="`` (``prompts`` is ignored). Malformed completions score 0.0.
    """

    def __init__(self, target_model, tokenizer, max_operand_digits: Optional[int] = None, batch_size: int = 1024,
                 allow_leading_zeros: Optional[bool] = None):
        self.model = target_model.eval()
        self.tokenizer = tokenizer
        self.max_operand_digits = max_operand_digits or getattr(
            target_model.config, "addition_max_operand_digits", DEFAULT_MAX_OPERAND_DIGITS
        )
        if allow_leading_zeros is None:
            allow_leading_zeros = getattr(target_model.config, "addition_allow_leading_zeros", True)
        self.allow_leading_zeros = bool(allow_leading_zeros)
        self.batch_size = batch_size
        self.__name__ = "addition_oracle"  # TRL names reward columns after the function's __name__

    def __call__(self, prompts=None, completions: Sequence[str] = (), **kwargs) -> list[float]:
        rewards = [0.0] * len(completions)
        wellformed = []
        for i, completion in enumerate(completions):
            operands = parse_query(completion, self.max_operand_digits, self.allow_leading_zeros)
            if operands is not None:
                wellformed.append((i, completion, answer_text(int(operands[0]), int(operands[1]))))
        for start in range(0, len(wellformed), self.batch_size):
            chunk = wellformed[start : start + self.batch_size]
            correct = self.answers_correctly([q for _, q, _ in chunk], [a for _, _, a in chunk])
            for (i, _, _), ok in zip(chunk, correct):
                rewards[i] = 0.0 if ok else 1.0
        return rewards

    @torch.inference_mode()
    def answers_correctly(self, queries: Sequence[str], answers: Sequence[str]) -> list[bool]:
        """Whether the target's greedy answer to each query is ``answer`` followed by ``<eos>``.

        Greedy decoding emits the right answer exactly when, fed ``query + answer + <eos>`` (teacher
        forcing), the argmax at every answer position, the ``<eos>`` one included, is the next token;
        so one padded forward pass replaces a whole ``generate`` loop.
        """
        if not queries:
            return []
        tok = self.tokenizer
        seqs = [s + [tok.eos_token_id] for s in tok([q + a for q, a in zip(queries, answers)]).input_ids]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        check = torch.zeros_like(ids, dtype=torch.bool)  # positions whose next token is answer/eos
        for row, (seq, q) in enumerate(zip(seqs, queries)):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            check[row, len(seq) - 2 - len(answers[row]) : len(seq) - 1] = True
        device = self.model.device
        # Right padding: causal attention keeps the real tokens' logits independent of the pads.
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        hits = (logits[:, :-1].argmax(-1).cpu() == ids[:, 1:]) | ~check[:, :-1]
        return hits.all(dim=1).tolist()


# ------------------------------------------------------------------------------ sampling, loading
def sample_queries(model, tokenizer, n: int, batch_size: int = 4096, temperature: float = 1.0,
                   seed: int = 0, max_new_tokens: Optional[int] = None) -> list[str]:
    """Samples ``n`` unconditional completions (prompt ``""`` = ``[<bos>]``), decoded without specials.

    The draw is :func:`trl_banel_examples.tasks.common.sample_token_ids`: seeded, so reproducible.
    """
    digits = getattr(model.config, "addition_max_operand_digits", DEFAULT_MAX_OPERAND_DIGITS)
    max_new_tokens = max_new_tokens or 2 * digits + 4  # a longest query, its eos, one spare
    out = []
    for tokens in sample_token_ids(model, tokenizer, n, max_new_tokens, batch_size, temperature, seed):
        out.extend(tokenizer.batch_decode(tokens, skip_special_tokens=True))
    return out


def estimate_success_rate(attacker, tokenizer, oracle: AdditionOracle, n: int = 100_000, batch_size: int = 4096,
                          temperature: float = 1.0, seed: int = 0) -> tuple[SuccessEstimate, dict]:
    """Samples ``n`` queries from ``attacker`` and scores every one with ``oracle`` (``n`` oracle calls).

    Returns the estimate (Clopper-Pearson interval) and how many queries left the training distribution:
    ``leading_zero`` and ``malformed`` counts.
    """
    queries = sample_queries(attacker, tokenizer, n, batch_size=batch_size, temperature=temperature, seed=seed)
    rewards = oracle(None, queries)
    kinds = [classify_query(q, oracle.max_operand_digits) for q in queries]
    estimate = SuccessEstimate.from_counts(int(sum(rewards)), n, oracle_calls=n)
    return estimate, {"leading_zero": kinds.count("leading zeros"), "malformed": kinds.count("malformed")}


def demo_summary_text(result: dict) -> str:
    """The demo's printed summary (``recipes/addition_attack.py``), from its ``result.json``; the example output in
    docs/benchmarks.md is rendered by this too."""
    pre, final = result["pretrained"], result["banel"]
    rows = [
        ("pretrained success rate", f"{pre['rate']:.5f} [{pre['low']:.5f}, {pre['high']:.5f}] (n={pre['samples']})"),
        ("BaNEL success rate",
         f"{final['rate']:.5f} [{final['low']:.5f}, {final['high']:.5f}] (n={final['samples']})"),
        ("improvement",
         f"{result['improvement']:.1f}x" + (" (quick mode: not meaningful)" if result["quick"] else "")),
        ("reward evaluations (training)", f"{result['nre']} of {result['budget']}"),
        ("successes found in training", f"{result['successes_found']}"),
        ("final acceptance rate", f"{final['acceptance_rate']:.3f}"),
        ("evaluation-only oracle calls", f"{result['evaluation_calls']} (not charged)"),
        ("wall time", f"{result['minutes']:.1f} min ({result['hardware']})"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    examples = result["successes_examples"]
    if examples:
        lines += ["", "successful queries found in training, by kind:"]
        for kind, count in sorted(result["successes_by_kind"].items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {kind:<14} {count:>5}  e.g. {', '.join(examples[kind])}")
    else:
        lines += ["", "successful queries found in training: none"]
    return "\n".join(lines)


def _load_model(path: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).to(device).eval()


def load_tokenizer(path: Path = TARGET_DIR):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_target(device: str = "cpu", path: Path = TARGET_DIR):
    """The shipped target model (no training: it is read from the package folder)."""
    return _load_model(path, device)


def load_attacker(device: str = "cpu", path: Path = ATTACKER_DIR):
    """The shipped pretrained attacker, the starting policy of an attack run."""
    return _load_model(path, device)


def load_addition_task(device: str = "cpu", models_dir: Path = MODELS_DIR):
    """Returns ``(attacker_model, tokenizer, oracle)`` for the shipped addition task."""
    models_dir = Path(models_dir)
    tokenizer = load_tokenizer(models_dir / "attacker")
    oracle = AdditionOracle(load_target(device, models_dir / "target"), tokenizer)
    return load_attacker(device, models_dir / "attacker"), tokenizer, oracle
