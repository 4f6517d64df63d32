import math

import pytest

from trl_banel.stats import SuccessEstimate, clopper_pearson


def test_clopper_pearson_known_values():
    low, high = clopper_pearson(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-6)
    low, high = clopper_pearson(5, 10)
    assert low == pytest.approx(0.18709, abs=1e-5) and high == pytest.approx(0.81291, abs=1e-5)
    low, high = clopper_pearson(4, 10_000)  # the paper's pretrained rate at n = 10k
    assert low < 4e-4 < high and high - low < 1e-3


def test_estimate():
    e = SuccessEstimate.from_counts(3, 1000, acceptance_rate=0.5, oracle_calls=700)
    assert e.rate == 0.003 and e.low < 0.003 < e.high
    d = e.to_dict()
    assert d["rate"] == 0.003 and d["oracle_calls"] == 700 and "0.00300" in str(e)
    assert math.isnan(SuccessEstimate.from_counts(0, 0).rate)
