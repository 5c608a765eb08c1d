"""srocc / plcc against scipy, the degenerate-input rule, and the paired 95% CI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from piaa_dist.metrics import mean_ci95, plcc, rankdata, srocc


@pytest.mark.parametrize("seed", range(5))
def test_srocc_and_plcc_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 60))
    target = rng.integers(1, 6, size=n).astype(float)  # integer scores: many ties
    pred = np.round(target + rng.normal(0, 1.5, size=n), 1)  # ties in predictions too
    assert srocc(pred, target) == pytest.approx(stats.spearmanr(pred, target)[0], abs=1e-12)
    assert plcc(pred, target) == pytest.approx(stats.pearsonr(pred, target)[0], abs=1e-12)
    np.testing.assert_allclose(rankdata(pred), stats.rankdata(pred))


def test_torch_and_list_inputs():
    pred = torch.tensor([0.1, 0.4, 0.3, 0.9], dtype=torch.float32, requires_grad=True)
    target = [1, 3, 2, 5]
    assert srocc(pred, target) == pytest.approx(1.0)
    assert srocc(pred, [5, 3, 4, 1]) == pytest.approx(-1.0)
    assert -1.0 <= plcc(pred, target) <= 1.0


def test_degenerate_inputs_give_zero_and_bad_inputs_raise():
    target = np.array([1.0, 2.0, 3.0, 4.0])
    assert srocc(np.full(4, 0.5), target) == 0.0  # constant predictions
    assert plcc(np.full(4, 0.5), target) == 0.0
    assert srocc(target, np.full(4, 3.0)) == 0.0  # constant targets
    assert srocc([0.2], [3.0]) == 0.0  # a single pair
    with pytest.raises(ValueError, match="non-finite"):
        srocc([0.1, float("nan"), 0.3], [1, 2, 3])
    with pytest.raises(ValueError, match="length"):
        plcc([0.1, 0.2], [1, 2, 3])


def test_mean_ci95_matches_t_interval():
    rng = np.random.default_rng(0)
    d = rng.normal(0.05, 0.1, size=37)
    mean, lo, hi = mean_ci95(d)
    ref = stats.t.interval(0.95, df=len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert mean == pytest.approx(d.mean())
    assert (lo, hi) == pytest.approx(ref)
    assert mean_ci95([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2, 0.2))
    m, lo1, hi1 = mean_ci95([0.3])
    assert m == 0.3 and math.isnan(lo1) and math.isnan(hi1)
    with pytest.raises(ValueError):
        mean_ci95([])
