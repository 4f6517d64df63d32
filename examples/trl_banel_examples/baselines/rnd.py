"""Random Network Distillation (Burda et al., 2018) as a novelty bonus for TRL reward functions.

A completion is embedded as a vector of hashed character n-gram counts; a frozen, randomly initialised network maps it
to a target, and a predictor trained online on the completions it scores tries to match it. The bonus is the
prediction error, divided by a running standard deviation of the errors (as the original RND normalises its intrinsic
reward). The bonus never calls the reward oracle: it costs no reward evaluation.
"""

import math
import zlib
from functools import lru_cache

import torch
from torch import nn

from trl_banel.oracle import message_text


@lru_cache(maxsize=200_000)
def _ngram_buckets(text: str, dim: int, ngram_sizes: tuple[int, ...]) -> tuple[tuple[int, float], ...]:
    marked = "\x02" + text + "\x03"  # begin/end markers: n-grams also say where in the string they sit
    counts: dict[int, float] = {}
    total = 0
    for n in ngram_sizes:
        for i in range(len(marked) - n + 1):
            h = zlib.crc32(f"{n}\x00{marked[i:i + n]}".encode())
            bucket, sign = h % dim, 1.0 if (h >> 31) & 1 else -1.0  # signed hashing: collisions cancel on average
            counts[bucket] = counts.get(bucket, 0.0) + sign
            total += 1
    scale = 1.0 / math.sqrt(max(total, 1))
    return tuple((b, v * scale) for b, v in counts.items())


def ngram_features(completions, dim: int = 256, ngram_sizes: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
    r"""
    Hashed, signed character n-gram counts of each completion (with begin/end markers), scaled by 1/sqrt(#n-grams):
    a `(len(completions), dim)` float tensor. Deterministic across processes (CRC32, not Python's salted `hash`).
    """
    out = torch.zeros(len(completions), dim)
    for row, c in enumerate(completions):
        for bucket, value in _ngram_buckets(message_text(c), dim, tuple(ngram_sizes)):
            out[row, bucket] = value
    return out


class RunningMeanStd:
    """Running mean and variance over batches (parallel-update formula), as RND normalises with."""

    def __init__(self, epsilon: float = 1e-4):
        self.mean, self.var, self.count = 0.0, 1.0, epsilon

    def update(self, x: torch.Tensor):
        x = x.detach().double().flatten()
        if x.numel() == 0:
            return
        b_mean, b_var, b_count = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean += delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))


def _mlp(dim_in: int, hidden: int, dim_out: int, layers: int) -> nn.Sequential:
    mods, d = [], dim_in
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.LeakyReLU()]
        d = hidden
    mods.append(nn.Linear(d, dim_out))
    return nn.Sequential(*mods)


class RNDBonus:
    r"""
    A TRL reward function: the RND novelty bonus of each completion (a float, higher = more novel). Costs no reward
    evaluation. Put it next to the sparse reward, e.g. `reward_funcs=[budgeted_oracle, RNDBonus()]` with
    `GRPOConfig(reward_weights=[1.0, coef])`.

    Args:
        dim (`int`): size of the hashed n-gram representation.
        ngram_sizes (`tuple[int]`): character n-gram lengths.
        hidden (`int`), out_dim (`int`): width of the networks and size of the target embedding.
        learning_rate (`float`): Adam learning rate of the predictor.
        update_steps (`int`): predictor steps on each scored batch (after the batch's bonuses are computed).
        normalize (`bool`): divide the error by the running standard deviation of all errors seen so far.
        max_bonus (`float`): clip the normalised bonus to `[0, max_bonus]` (keeps it finite when the running standard
            deviation is ~0).
        seed (`int`): initialisation of both networks (the global RNG is left untouched).
    """

    def __init__(self, dim: int = 256, ngram_sizes: tuple[int, ...] = (1, 2, 3), hidden: int = 128, out_dim: int = 64,
                 learning_rate: float = 1e-3, update_steps: int = 1, normalize: bool = True, max_bonus: float = 10.0,
                 seed: int = 0):
        self.dim, self.ngram_sizes = dim, tuple(ngram_sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.target = _mlp(dim, hidden, out_dim, 2).requires_grad_(False)
            self.predictor = _mlp(dim, hidden, out_dim, 3)
        self.optimizer = torch.optim.Adam(self.predictor.parameters(), lr=learning_rate)
        self.update_steps = update_steps
        self.normalize = normalize
        self.max_bonus = max_bonus
        self.error_stats = RunningMeanStd()
        self.__name__ = "rnd_bonus"

    def errors(self, completions) -> torch.Tensor:
        """Raw prediction errors (mean squared error per completion), without training."""
        x = ngram_features(completions, self.dim, self.ngram_sizes)
        with torch.no_grad():
            return (self.predictor(x) - self.target(x)).pow(2).mean(dim=1)

    def train_on(self, completions):
        x = ngram_features(completions, self.dim, self.ngram_sizes)
        with torch.no_grad():
            y = self.target(x)
        for _ in range(self.update_steps):
            loss = (self.predictor(x) - y).pow(2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def __call__(self, prompts=None, completions=(), **kwargs) -> list[float]:
        if len(completions) == 0:
            return []
        err = self.errors(completions)
        bonus = err
        if self.normalize:
            self.error_stats.update(err)
            bonus = err / (self.error_stats.std + 1e-8)
        bonus = bonus.clamp(0.0, self.max_bonus)
        self.train_on(completions)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric("rnd/raw_error", err.mean().item())
        return bonus.tolist()
