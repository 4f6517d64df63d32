"""The hard addition attack: the paper's variant with leading zeros forbidden, against a stronger target.

Same attacker, same query format as :mod:`trl_banel_examples.tasks.addition`, two changes:

- a query is well formed only without leading zeros (``007+5=`` scores 0.0), which removes the shipped
  target's main blind spot;
- the target was trained further (``recipes/pretrain_hard_attack.py``), until the shipped attacker's
  probability of writing a query it answers wrongly is at most ``MAX_PRIOR`` (2e-5).

The query space is small (operands 0-999 without leading zeros: 1,000^2 = 1,000,000 queries), so the recipe
runs the target on *every* query once and stores the ones it gets wrong (``successes.txt`` beside the
target). Any attacker's success probability is then exact: the sum of its probabilities of those queries
(:func:`exact_success_probability`), no sampling noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from .addition import (ATTACKER_DIR, BANEL_SETTINGS as _ADDITION_BANEL_SETTINGS, BENCHMARK_ROUND as _ADDITION_ROUND,
                       AdditionOracle, answer_text, load_attacker, load_target, load_tokenizer)
from .common import sequence_log_probs

MODEL_DIR = Path(__file__).resolve().parent / "hard_attack_target"
SUCCESS_FILE = "successes.txt"
MAX_PRIOR = 2e-5
# The round the sparse benchmark ran as BaNEL on this task (kept so that its records stay reproducible): the addition
# attack's first round (same attacker, same query format) with the exact distillation objective and no ratio test.
# With the addition round as it was, every seed ended far below the pretrained rate (median 4e-8x over 4 seeds):
# distilling posterior samples whose ratio test rejected 31-52% of the generator's fresh samples (a region fitted on
# 50 negatives) walked the generator off the 22 successes. The exact objective moves it only off the known failures
# (benchmarks/round_variants.py at commit c242a55; at these settings: the sparse benchmark).
BENCHMARK_ROUND = dict(_ADDITION_ROUND, distill_objective="exact", rejection_threshold=1e-30)
# The task's settings for BaNEL: the addition attack's budget, lengths, batch sizes and stop rule; the package's
# default round decides the rest (at these settings: benchmarks/results/defaults, task `hard_attack`).
BANEL_SETTINGS = dict(_ADDITION_BANEL_SETTINGS)


def all_queries(max_operand_digits: int = 3) -> list[str]:
    """Every well-formed query without leading zeros, ``0+0=`` to ``999+999=`` for 3 digits."""
    values = [str(v) for v in range(10**max_operand_digits)]  # str() never pads: no leading zeros
    return [f"{a}+{b}=" for a in values for b in values]


def query_space_size(max_operand_digits: int = 3) -> int:
    """How many well-formed queries there are (``len(all_queries(max_operand_digits))``): the blind search's space."""
    return 10 ** (2 * max_operand_digits)


def target_wrong(oracle: AdditionOracle, queries: Sequence[str], chunk: int = 8192) -> list[bool]:
    """Whether the target's greedy answer to each well-formed query is wrong (one teacher-forced pass per chunk)."""
    wrong = []
    for start in range(0, len(queries), chunk):
        part = queries[start : start + chunk]
        answers = [answer_text(*map(int, q[:-1].split("+"))) for q in part]
        wrong.extend(not ok for ok in oracle.answers_correctly(part, answers))
    return wrong


def enumerate_successes(oracle: AdditionOracle, chunk: int = 8192) -> list[str]:
    """Every query the oracle pays for, found by running the target on the whole query space."""
    queries = all_queries(oracle.max_operand_digits)
    return [q for q, w in zip(queries, target_wrong(oracle, queries, chunk)) if w]


def exact_success_probability(attacker, tokenizer, successes: Sequence[str]) -> float:
    """The attacker's exact probability of writing one of ``successes`` (then ``<eos>``) from the empty prompt."""
    if not successes:
        return 0.0
    return float(torch.logsumexp(sequence_log_probs(attacker, tokenizer, successes), 0).exp())


def posterior_success_probability(generator, tokenizer, successes: Sequence[str], known_failures: Sequence[str] = (),
                                  max_completion_length: Optional[int] = None) -> tuple[float, float]:
    """Exact success probability of a generator filtered by known failures (BaNEL's sampler without failure models).

    BaNEL rejects a proposal whose text the ledger holds as a failure, so its sampler is the generator conditioned
    on not writing one of ``known_failures`` (F); the success set S is disjoint from F, so
    ``P(S | not F) = P(S) / (1 - P(F))``. Returns ``(P(S | not F), 1 - P(F))``, the second being the filter's
    acceptance rate. A failure text of ``max_completion_length`` tokens or more was a sample cut before its
    ``<eos>``: its probability is that of the prefix. (Exact up to completions holding a special token, which
    decode to the same text; the shipped attacker essentially never writes one.)
    """
    numerator = exact_success_probability(generator, tokenizer, successes)
    paid = set(successes)
    failures = sorted({f for f in known_failures if f not in paid})
    if not failures:
        return numerator, 1.0
    lengths = [len(ids) - 1 for ids in tokenizer(failures).input_ids]  # without <bos>
    cut = max_completion_length is not None
    ended = [f for f, n in zip(failures, lengths) if not cut or n < max_completion_length]
    prefixes = [f for f, n in zip(failures, lengths) if cut and n >= max_completion_length]
    log_p = [sequence_log_probs(generator, tokenizer, ended)] if ended else []
    if prefixes:
        log_p.append(sequence_log_probs(generator, tokenizer, prefixes, append_eos=False))
    p_failures = min(float(torch.logsumexp(torch.cat(log_p), 0).exp()), 1.0)
    accepted = 1.0 - p_failures
    return (numerator / accepted if accepted > 0 else float("nan")), accepted


def load_successes(path: Path = MODEL_DIR) -> list[str]:
    """The shipped target's enumerated success set (one query per line)."""
    return (Path(path) / SUCCESS_FILE).read_text().split()


def load_hard_attack_task(device: str = "cpu", target_path: Path = MODEL_DIR,
                          attacker_path: Optional[Path] = ATTACKER_DIR):
    """Returns ``(attacker_model, tokenizer, oracle)``: the shipped addition attacker against the hard target.

    The oracle forbids leading zeros (the target's config says so). The success set is
    ``load_successes(target_path)``.
    """
    tokenizer = load_tokenizer(Path(attacker_path))
    target = load_target(device, Path(target_path))
    oracle = AdditionOracle(target, tokenizer, allow_leading_zeros=False)
    oracle.__name__ = "hard_attack_oracle"
    return load_attacker(device, Path(attacker_path)), tokenizer, oracle
