"""srocc / plcc against scipy, the degenerate-input rule, the paired 95% CI and the ceilings rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from piaa_dist.metrics import Ceilings, ceilings, mean_ci95, plcc, rankdata, srocc


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


def test_ceilings_leave_out_and_count_users_whose_ratings_are_all_equal():
    rng = np.random.default_rng(1)
    obs = rng.integers(1, 6, size=30).astype(float)
    lat = obs + rng.normal(0, 0.5, size=30)
    avg = rng.normal(size=30)
    got = ceilings([
        (lat, avg, obs),
        (lat[:10], np.full(10, 2.0), obs[:10]),     # constant predictor: kept, scores 0
        (lat[:10], avg[:10], np.full(10, 4.0)),     # constant ratings: left out, counted
        ([1.0], [2.0], [3.0]),                      # one rating: left out, counted
    ])
    assert got.users == 2 and got.constant_users == 2
    assert got.oracle == pytest.approx((srocc(lat, obs) + srocc(lat[:10], obs[:10])) / 2)
    assert got.average_user == pytest.approx((srocc(avg, obs) + 0.0) / 2)
    assert got.to_dict() == {"oracle": got.oracle, "average_user": got.average_user,
                             "users": 2, "constant_users": 2}
    assert ceilings([]) == Ceilings(None, None, 0, 0)
    with pytest.raises(ValueError, match="differ in length"):
        ceilings([([1.0, 2.0], [1.0, 2.0], [1.0, 2.0, 3.0])])
    with pytest.raises(ValueError, match="non-finite"):
        ceilings([([1.0, float("nan")], [1.0, 2.0], [1.0, 2.0])])


def test_grouped_srocc_and_ceilings_equal_the_per_user_functions():
    """The vectorized versions (scale worlds: millions of ratings) follow the same rules."""
    from piaa_dist.metrics import ceilings, ceilings_by_group, srocc_by_group

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, size=600)
    x = rng.normal(size=600)
    y = rng.integers(1, 6, size=600).astype(float)  # many ties
    x[groups == 3] = 1.0  # a constant predictor: 0.0, user kept
    y[groups == 4] = 2.0  # constant ratings: 0.0, user left out of ceilings
    groups = np.r_[groups, 99]  # a single rating: 0.0, left out of ceilings
    x, y = np.r_[x, 0.5], np.r_[y, 3.0]
    avg = x + rng.normal(size=x.size)
    labels, rho = srocc_by_group(groups, x, y)
    assert list(labels) == sorted(set(groups.tolist()))
    for g, r in zip(labels, rho):
        m = groups == g
        assert r == pytest.approx(srocc(x[m], y[m]), abs=1e-12), g
    assert rho[labels == 3][0] == 0.0 and rho[labels == 99][0] == 0.0
    per_user = [(x[groups == g], avg[groups == g], y[groups == g]) for g in labels]
    want, got = ceilings(per_user), ceilings_by_group(groups, x, avg, y)
    assert (got.users, got.constant_users) == (want.users, want.constant_users) == (len(labels) - 2, 2)
    assert got.oracle == pytest.approx(want.oracle, abs=1e-12)
    assert got.average_user == pytest.approx(want.average_user, abs=1e-12)
    half = groups < 20  # users never span the halves: combining equals computing at once
    both = ceilings_by_group(groups[half], x[half], avg[half], y[half]).combine(
        ceilings_by_group(groups[~half], x[~half], avg[~half], y[~half]))
    assert both.users == got.users and both.oracle == pytest.approx(got.oracle, abs=1e-12)
