"""Success-rate estimates with exact (Clopper-Pearson) intervals."""

from dataclasses import asdict, dataclass

from scipy.stats import binomtest


def clopper_pearson(successes: int, samples: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for a success rate (scipy's Clopper-Pearson)."""
    if samples <= 0:
        return 0.0, 1.0
    ci = binomtest(int(successes), int(samples)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


@dataclass
class SuccessEstimate:
    r"""
    A sampler's success rate over `samples` draws, with its Clopper-Pearson interval.

    `acceptance_rate` is the fraction of the generator's proposals the posterior filter accepted while drawing them
    (1.0 for a plain generator), `oracle_calls` the distinct reward evaluations the estimate made: they are never
    charged to the training budget.
    """

    successes: int
    samples: int
    low: float
    high: float
    confidence: float = 0.95
    acceptance_rate: float = 1.0
    oracle_calls: int = 0

    @property
    def rate(self) -> float:
        return self.successes / self.samples if self.samples else float("nan")

    @property
    def reference_rate(self) -> float:
        """What multiples of this rate are taken against: the rate, or its upper bound when no success was seen
        (a multiple of it is then a lower bound)."""
        return self.rate if self.successes else self.high

    @classmethod
    def from_counts(cls, successes: int, samples: int, confidence: float = 0.95, **extra) -> "SuccessEstimate":
        low, high = clopper_pearson(successes, samples, confidence)
        return cls(int(successes), int(samples), low, high, confidence, **extra)

    def to_dict(self) -> dict:
        return {**asdict(self), "rate": self.rate}

    def __str__(self):
        return (f"{self.rate:.5f} [{self.low:.5f}, {self.high:.5f}] ({self.successes}/{self.samples}, "
                f"{self.confidence:.0%} Clopper-Pearson)")


@dataclass
class ExactSuccess:
    r"""
    A sampler's exact success probability (computed, not sampled), in the shape of [`SuccessEstimate`]'s dict.

    Its interval is the point itself (`low == high == rate`) and `samples` is None: code that reads `rate`, `low`,
    `high` handles exact and Monte Carlo estimates alike. `oracle_calls` is 0: an exact probability is computed from
    a known success set, without the oracle.
    """

    rate: float
    acceptance_rate: float = 1.0
    oracle_calls: int = 0

    @property
    def low(self) -> float:
        return self.rate

    @property
    def high(self) -> float:
        return self.rate

    def to_dict(self) -> dict:
        return {"successes": None, "samples": None, "low": self.rate, "high": self.rate, "confidence": None,
                "acceptance_rate": self.acceptance_rate, "oracle_calls": self.oracle_calls, "rate": self.rate,
                "exact": True}

    def __str__(self):
        return f"{self.rate:.3g} (exact)"
