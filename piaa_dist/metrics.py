"""Rank and linear correlation for personalized IAA, and paired confidence intervals.

Conventions:

* ``srocc`` is Spearman's rank correlation with **average ranks for ties** (what
  ``scipy.stats.spearmanr`` computes): the Pearson correlation of the two rank vectors.
* **Degenerate rule**: when either input is constant (including a single element) the
  correlation is undefined (0/0); these functions return ``0.0`` then — a model that predicts
  the same score for every image ranks nothing, which is "no better than chance", not NaN
  poisoning an average over users and repeats.
* Non-finite values (NaN/inf, e.g. from a diverged model) are an error, not silently ranked.
* **Ceilings rule** (:func:`ceilings`, the one implementation behind both the synthetic
  world's ``world.json`` and ``evaluate``'s ``ceilings``): a user whose observed ratings are
  all equal (or who has fewer than two) has no ranking to match, so their SROCC against *any*
  predictor is undefined. Such a user is **left out** of the averages and **counted** in
  ``constant_users``. A constant *predictor* (e.g. an average-user score that does not vary
  over the user's images) is not a reason to leave a user out: it scores ``0.0`` by the
  degenerate rule above.

Inputs may be numpy arrays, torch tensors (any device; detached) or sequences of numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np


def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().to("cpu").double().numpy()
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


def _pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_array(pred, "pred"), _as_array(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in length: {p.size} vs {t.size}")
    return p, t


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2:
        return 0.0
    da, db = a - a.mean(), b - b.mean()
    sa, sb = float(np.sqrt(np.dot(da, da))), float(np.sqrt(np.dot(db, db)))
    # Constant input (exactly, or up to rounding of the mean) → the documented 0.0.
    if sa <= 1e-12 * max(1.0, float(np.abs(a).max())) or sb <= 1e-12 * max(
        1.0, float(np.abs(b).max())
    ):
        return 0.0
    r = float(np.dot(da, db) / (sa * sb))
    return float(min(1.0, max(-1.0, r)))


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (``scipy.stats.rankdata`` 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values in sorted order.
    new_run = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [x.size]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def srocc(pred: Any, target: Any) -> float:
    """Spearman rank-order correlation (average ranks for ties).

    Args:
        pred: predicted scores, shape ``[N]``.
        target: true scores, shape ``[N]``.

    Returns:
        Correlation in ``[-1, 1]``; ``0.0`` if either input is constant or ``N < 2``.

    Raises:
        ValueError: different lengths or non-finite values.
    """
    p, t = _pair(pred, target)
    if p.size < 2:
        return 0.0
    return _pearson(rankdata(p), rankdata(t))


def plcc(pred: Any, target: Any) -> float:
    """Pearson linear correlation; ``0.0`` if either input is constant or ``N < 2``.

    Raises:
        ValueError: different lengths or non-finite values.
    """
    p, t = _pair(pred, target)
    return _pearson(p, t)


def mean_ci95(diffs: Any) -> tuple[float, float, float]:
    """Mean and two-sided 95% t-interval of the mean, for paired differences.

    Use it on per-user differences (method A − method B, each user's mean over repeats):
    the comparison is significant when the whole interval lies above zero.

    Args:
        diffs: ``[n]`` paired differences.

    Returns:
        ``(mean, low, high)``. With ``n == 1`` the interval is undefined and
        ``(mean, nan, nan)`` is returned (so ``low > 0`` is False); with zero spread it is
        ``(mean, mean, mean)``.

    Raises:
        ValueError: empty input or non-finite values.
    """
    from scipy import stats

    d = _as_array(diffs, "diffs")
    n = d.size
    if n == 0:
        raise ValueError("mean_ci95 needs at least one difference")
    mean = float(d.mean())
    if n == 1:
        return mean, float("nan"), float("nan")
    sem = float(d.std(ddof=1)) / np.sqrt(n)
    half = float(stats.t.ppf(0.975, df=n - 1)) * sem
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Ceilings:
    """What perfect knowledge scores against observed ratings, averaged over users.

    Attributes:
        oracle: mean over users of SROCC(the user's noise-free score, their ratings): the best
            any model of that user can reach. None when no user counts.
        average_user: mean over users of SROCC(the population-average user's noise-free
            score, their ratings): what a perfect generic (GIAA) model reaches without
            personalization. None when no user counts.
        users: users in the averages.
        constant_users: users left out because their ratings are all equal (see the module's
            ceilings rule).
    """

    oracle: float | None
    average_user: float | None
    users: int
    constant_users: int

    def to_dict(self) -> dict[str, Any]:
        """``{"oracle", "average_user", "users", "constant_users"}`` (JSON-ready)."""
        return asdict(self)

    def combine(self, other: "Ceilings") -> "Ceilings":
        """The ceilings over both sets of users (disjoint), as if computed at once."""
        n = self.users + other.users

        def mean(a: float | None, b: float | None) -> float | None:
            if not n:
                return None
            return ((a or 0.0) * self.users + (b or 0.0) * other.users) / n

        return Ceilings(mean(self.oracle, other.oracle), mean(self.average_user, other.average_user),
                        n, self.constant_users + other.constant_users)


def srocc_by_group(groups: Any, pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`srocc` within each group, vectorized (millions of ratings, no Python loop).

    Same conventions as :func:`srocc` (average ranks for ties; a group where either side is
    constant, or with fewer than two elements, scores ``0.0``); tests check it equals
    :func:`srocc` group by group.

    Args:
        groups: ``[R]`` group label of each element (any sortable labels, e.g. user IDs).
        pred, target: ``[R]`` values.

    Returns:
        ``(labels, rho)``: the sorted distinct groups and their correlations.
    """
    p, t = _pair(pred, target)
    labels, g = np.unique(np.asarray(groups), return_inverse=True)
    g = g.reshape(-1)
    if g.size != p.size:
        raise ValueError(f"groups and values differ in length: {g.size} vs {p.size}")
    size = np.bincount(g, minlength=len(labels)).astype(np.float64)
    # Ranks centred exactly (the mean rank of a group of n is (n-1)/2), so a constant side
    # gives exactly zero spread.
    rp = _grouped_ranks(g, p) - (size[g] - 1.0) / 2.0
    rt = _grouped_ranks(g, t) - (size[g] - 1.0) / 2.0
    spp = np.bincount(g, rp * rp, minlength=len(labels))
    stt = np.bincount(g, rt * rt, minlength=len(labels))
    spt = np.bincount(g, rp * rt, minlength=len(labels))
    den = np.sqrt(spp * stt)
    ok = den > 0
    rho = np.zeros(len(labels))
    rho[ok] = np.clip(spt[ok] / den[ok], -1.0, 1.0)
    return labels, rho


def _grouped_ranks(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    """0-based average ranks of ``x`` within each group ``g``."""
    n = len(x)
    order = np.lexsort((x, g))
    gs, xs = g[order], x[order]
    pos = np.arange(n)
    new_group = np.r_[True, gs[1:] != gs[:-1]]
    within = pos - np.maximum.accumulate(np.where(new_group, pos, 0))
    new_run = new_group | np.r_[True, xs[1:] != xs[:-1]]
    run = np.cumsum(new_run) - 1
    run_len = np.bincount(run)
    ranks = np.empty(n)
    ranks[order] = within[new_run][run] + (run_len[run] - 1) / 2.0
    return ranks


def ceilings_by_group(groups: Any, latent: Any, average_latent: Any, observed: Any) -> Ceilings:
    """:func:`ceilings` over ratings grouped by user, vectorized (the same rule, tested equal).

    Args:
        groups: ``[R]`` the user of each rating.
        latent, average_latent, observed: ``[R]`` as in :func:`ceilings`.
    """
    obs = _as_array(observed, "observed")
    labels, oracle = srocc_by_group(groups, latent, obs)
    _, average = srocc_by_group(groups, average_latent, obs)
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    g = g.reshape(-1)
    # The ceilings rule: a user whose observed ratings are all equal (or < 2) is left out.
    lo = np.full(len(labels), np.inf)
    hi = np.full(len(labels), -np.inf)
    np.minimum.at(lo, g, obs)
    np.maximum.at(hi, g, obs)
    counts = np.bincount(g, minlength=len(labels))
    kept = (counts >= 2) & (hi > lo)
    n = int(kept.sum())
    return Ceilings(
        oracle=float(oracle[kept].mean()) if n else None,
        average_user=float(average[kept].mean()) if n else None,
        users=n,
        constant_users=int(len(labels) - n),
    )


def ceilings(per_user: Iterable[tuple[Any, Any, Any]]) -> Ceilings:
    """Oracle and average-user ceilings over users (the module's ceilings rule).

    Args:
        per_user: one ``(latent, average_latent, observed)`` triple of equal-length arrays per
            user: each rating's noise-free score for its own user, for the population-average
            user, and the observed rating.

    Returns:
        The :class:`Ceilings`; users whose observed ratings are all equal are left out and
        counted in ``constant_users``.

    Raises:
        ValueError: a user's three arrays differ in length, or hold non-finite values.
    """
    oracle: list[float] = []
    average: list[float] = []
    constant = 0
    for latent, average_latent, observed in per_user:
        obs = _as_array(observed, "observed")
        lat, avg = _as_array(latent, "latent"), _as_array(average_latent, "average_latent")
        if not (lat.size == avg.size == obs.size):
            raise ValueError(
                f"latent, average_latent and observed differ in length: {lat.size}, {avg.size}, {obs.size}"
            )
        if obs.size < 2 or np.ptp(obs) == 0.0:
            constant += 1
            continue
        oracle.append(srocc(lat, obs))
        average.append(srocc(avg, obs))
    return Ceilings(
        oracle=float(np.mean(oracle)) if oracle else None,
        average_user=float(np.mean(average)) if average else None,
        users=len(oracle),
        constant_users=constant,
    )
