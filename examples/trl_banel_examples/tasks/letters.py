"""Rare letters: a sparse task in BaNEL's own regime, small enough to measure exactly.

A tiny causal LM (the *generator*) writes 8-letter strings over ``a``-``h``. It was pretrained on a random bigram
chain in which ``a`` is rare. The *oracle* pays 1.0 for a string of exactly 8 letters holding at least ``min_a``
``a``s, where ``min_a`` is the smallest count that puts the pretrained generator's success probability at or below
``MAX_PRIOR`` (2e-5): within a few thousand reward evaluations a policy-gradient method expects to see no success
at all, while a failure model learns, from failures alone, where the generator's mass goes.

Every success string can be listed (a few thousand), so the success probability of a generator is computed
*exactly* (:func:`exact_success_probability`): no sampling noise in any comparison made on this task.

Text format: prompt ``""`` (encodes to ``[<bos>]``), completion ``"abhgcaed"`` then ``<eos>``.
``recipes/pretrain_letters.py`` regenerates the shipped generator.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .common import build_tokenizer, next_token_log_probs, sequence_log_probs

LETTERS = "abcdefgh"
LENGTH = 8
RARE = "a"
MAX_PRIOR = 2e-5
MODEL_DIR = Path(__file__).resolve().parent / "letters_model"
# The round the sparse benchmark ran as BaNEL on this task, hand-picked for it (chosen by the ablation,
# benchmarks/results/ablation_7500 at commit c242a55; benchmarks/results/sparse_runs/letters.json: 10 of 10 seeds find
# successes): the package's round of the time at a distillation learning rate for a 30k-parameter model, with negative
# evidence on prefixes (every proposal avoids the branches already tried), success replay, and a stop at 500 successes.
BENCHMARK_ROUND = dict(
    max_reward_evaluations=7500, evaluations_per_round=50, num_candidates=512, max_completion_length=9,
    per_device_train_batch_size=64, learning_rate=1e-3,
    evidence_pseudo_count=1.0, success_replay=0.5, stop_after_successes=500,
    # the round these settings were measured with, before the package's default round changed (issue #29)
    distill_objective="posterior", distill_target_kl=0.0,
)
# The task's settings for BaNEL: its budget, completion length, batch sizes and stop rule only; the package's default
# round decides the rest (issue #29; at these settings: benchmarks/results/defaults, task `letters`).
BANEL_SETTINGS = dict(max_reward_evaluations=7500, num_candidates=512, max_completion_length=9,
                      per_device_train_batch_size=64, stop_after_successes=500)


def source_chain(seed: int = 0, rare_weight: float = 0.2, concentration: float = 1.0) -> np.ndarray:
    """The pretraining distribution: a bigram chain, rows ``[start] + LETTERS``, columns ``LETTERS``.

    Rows are Dirichlet(``concentration``) draws (below 1: peaked rows, a generator with few typical strings) with the
    rare letter's column scaled by ``rare_weight`` and renormalised, so the chain has structure to learn and ``a`` is
    rare.
    """
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(len(LETTERS), concentration), size=len(LETTERS) + 1)
    p[:, LETTERS.index(RARE)] *= rare_weight
    return p / p.sum(1, keepdims=True)


def sample_source(chain: np.ndarray, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` strings of ``LENGTH`` letters from the bigram chain."""
    out = np.zeros((n, LENGTH), dtype=np.int64)
    state = np.zeros(n, dtype=np.int64)  # row 0 is the start state
    cum = chain.cumsum(1)
    for t in range(LENGTH):
        u = rng.random(n)[:, None]
        out[:, t] = (u > cum[state]).sum(1).clip(max=len(LETTERS) - 1)
        state = out[:, t] + 1
    return ["".join(LETTERS[i] for i in row) for row in out]


def is_success(completion: str, min_a: int) -> bool:
    return (isinstance(completion, str) and len(completion) == LENGTH and set(completion) <= set(LETTERS)
            and completion.count(RARE) >= min_a)


def success_strings(min_a: int) -> list[str]:
    """Every string the oracle pays for (``min_a`` of 5 gives 20,637 strings)."""
    others = [c for c in LETTERS if c != RARE]
    out = []
    for k in range(min_a, LENGTH + 1):
        for positions in itertools.combinations(range(LENGTH), k):
            for fill in itertools.product(others, repeat=LENGTH - k):
                chars, it = [], iter(fill)
                for i in range(LENGTH):
                    chars.append(RARE if i in positions else next(it))
                out.append("".join(chars))
    return out


def success_count(min_a: int) -> int:
    """How many strings the oracle pays for (``len(success_strings(min_a))``, counted without listing them)."""
    return sum(math.comb(LENGTH, k) * (len(LETTERS) - 1) ** (LENGTH - k) for k in range(min_a, LENGTH + 1))


def valid_string_count() -> int:
    """How many strings are well formed (``LENGTH`` letters of ``LETTERS``): the space a blind search draws from."""
    return len(LETTERS) ** LENGTH


class LettersOracle:
    """TRL-style reward function: 1.0 for an 8-letter string with at least `min_a` ``a``s, else 0.0."""

    def __init__(self, min_a: int):
        self.min_a = min_a
        self.__name__ = "letters_oracle"

    def __call__(self, prompts=None, completions: Sequence[str] = (), **kwargs) -> list[float]:
        return [1.0 if is_success(c, self.min_a) else 0.0 for c in completions]


def string_log_probs(model, tokenizer, strings: Sequence[str], batch_size: int = 8192) -> torch.Tensor:
    """Exact log-probability that the model, from the empty prompt, emits each string then EOS."""
    return sequence_log_probs(model, tokenizer, strings, batch_size)


def exact_success_probability(model, tokenizer, min_a: int) -> float:
    """The generator's exact probability of emitting a success (sum over every success string)."""
    return float(torch.logsumexp(string_log_probs(model, tokenizer, success_strings(min_a)), 0).exp())


def exact_proposal_success_probability(model, tokenizer, min_a: int, evidence, pseudo_count: float) -> float:
    """The exact probability that the evidence-discounted proposal distribution (``evidence_pseudo_count``) emits a
    success, before known failures are rejected (rejecting them only raises it): what the oracle is offered."""
    from trl_banel.evidence import proposal_log_probs

    strings = success_strings(min_a)
    log_probs, targets, mask = next_token_log_probs(model, tokenizer, strings)
    return float(torch.logsumexp(proposal_log_probs(log_probs, targets, mask, [""] * len(strings), evidence,
                                                    pseudo_count), 0).exp())


def choose_min_a(model, tokenizer, max_prior: float = MAX_PRIOR) -> tuple[int, float]:
    """The smallest ``min_a`` whose exact success probability is at most ``max_prior``, and that probability.

    Counted down from ``LENGTH`` (success sets grow fast as ``min_a`` falls), stopping at the first that exceeds it.
    """
    best = None
    for min_a in range(LENGTH, 0, -1):
        prior = exact_success_probability(model, tokenizer, min_a)
        if prior > max_prior:
            break
        best = (min_a, prior)
    if best is None:
        raise ValueError(f"no min_a puts the success probability under {max_prior}")
    return best


def make_generator(tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2 * LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pretrain_generator(seed: int = 0, steps: int = 1500, batch_size: int = 256, lr: float = 3e-3,
                       concentration: float = 1.0, rare_weight: float = 0.2):
    """Build the tokenizer and train a generator on the source chain; returns ``(model, tokenizer, losses)``."""
    tokenizer = build_tokenizer(LETTERS)
    model = make_generator(tokenizer, seed=seed)
    chain = source_chain(seed, rare_weight, concentration)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        strings = sample_source(chain, batch_size, rng)
        ids = torch.tensor([tokenizer(s)["input_ids"] + [tokenizer.eos_token_id] for s in strings])
        for group in opt.param_groups:  # cosine decay: a settled model, not one caught mid-step
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return model, tokenizer, losses


def load_letters_task(device: str = "cpu", path: Path = MODEL_DIR):
    """Returns ``(generator, tokenizer, oracle)`` for the shipped task (its ``min_a`` is stored in the config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, LettersOracle(model.config.letters_min_a)
