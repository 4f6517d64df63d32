"""Count-based exploration bonus with SimHash pseudo-counts (Tang et al., 2017, "#Exploration").

A completion's hashed character n-gram vector (see `rnd.ngram_features`) is projected on `k` fixed random Gaussian
directions; the signs are its k-bit SimHash code, so similar completions share a code. Codes are counted in a
count-min sketch and the bonus is `beta / sqrt(n)`, with `n` the code's count after the current batch is added. The
bonus never calls the reward oracle: it costs no reward evaluation.
"""

import math

import numpy as np
import torch

from .rnd import ngram_features

_PRIME = (1 << 61) - 1  # a Mersenne prime for the count-min rows' universal hashes


class CountMinSketch:
    """Approximate counts of integer keys: `depth` rows of `width` counters; a key's count is its minimum counter."""

    def __init__(self, width: int = 1 << 16, depth: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.width, self.depth = width, depth
        self.a = [int(x) for x in rng.integers(1, _PRIME, size=depth)]
        self.b = [int(x) for x in rng.integers(0, _PRIME, size=depth)]
        self.table = np.zeros((depth, width), dtype=np.int64)

    def _cols(self, key: int) -> list[int]:
        return [((a * key + b) % _PRIME) % self.width for a, b in zip(self.a, self.b)]

    def add(self, key: int, count: int = 1):
        for row, col in enumerate(self._cols(key)):
            self.table[row, col] += count

    def count(self, key: int) -> int:
        return int(min(self.table[row, col] for row, col in enumerate(self._cols(key))))


class SimHashCountBonus:
    r"""
    A TRL reward function: `beta / sqrt(n(code(y)))` for each completion `y`, where `n` counts the completions seen so
    far (this batch included) that share `y`'s SimHash code. Costs no reward evaluation. Use it next to the sparse
    reward, e.g. `reward_funcs=[budgeted_oracle, SimHashCountBonus()]`, `GRPOConfig(reward_weights=[1.0, 1.0])`.

    Args:
        beta (`float`): bonus scale (the bonus of a never-seen code is `beta`).
        bits (`int`): SimHash code length k (at most 62); fewer bits = coarser cells, more generalisation.
        dim (`int`), ngram_sizes (`tuple[int]`): the hashed n-gram representation.
        width (`int`), depth (`int`): count-min sketch size.
        seed (`int`): the random projection and the sketch's hashes.
    """

    def __init__(self, beta: float = 1.0, bits: int = 32, dim: int = 256, ngram_sizes: tuple[int, ...] = (1, 2, 3),
                 width: int = 1 << 16, depth: int = 4, seed: int = 0):
        if not 1 <= bits <= 62:
            raise ValueError(f"bits must be in [1, 62], got {bits}.")
        self.beta, self.bits, self.dim, self.ngram_sizes = beta, bits, dim, tuple(ngram_sizes)
        gen = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(dim, bits, generator=gen)
        self.sketch = CountMinSketch(width, depth, seed)
        self.__name__ = "count_bonus"

    def codes(self, completions) -> list[int]:
        signs = (ngram_features(completions, self.dim, self.ngram_sizes) @ self.projection) > 0
        weights = 1 << torch.arange(self.bits, dtype=torch.int64)
        return (signs.long() * weights).sum(dim=1).tolist()

    def __call__(self, prompts=None, completions=(), **kwargs) -> list[float]:
        codes = self.codes(completions)
        for code in codes:  # the whole batch is counted first: identical completions get identical bonuses
            self.sketch.add(code)
        bonus = [self.beta / math.sqrt(max(self.sketch.count(code), 1)) for code in codes]
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and bonus:
            log_metric("count/distinct_codes_in_batch", float(len(set(codes))))
        return bonus
