"""The meta-testing protocol: fine-tune on k rated images of an unseen user, rank the rest.

For every test user, every shot count k and every repeat r,
:func:`piaa_dist.data.stream.split_indices` draws a random split of the user's ratings into k
training images ("shots") and the rest as test images. The split is a pure function of
``(seed, user, k, r)``: never of the method, the order users are visited in, or anything
else, so every method is scored on exactly the same images.

Methods (all in one run, on the same splits):

* ``blg-piaa``: the meta-learner fine-tuned on the k shots;
* ``meta-no-adapt``: the meta-learner as is (what the prior alone knows about a new user);
* ``giaa-finetune``: the generic model (:mod:`piaa_dist.giaa`) fine-tuned on the same k shots;
* ``giaa-no-adapt``: the generic model as is;
* ``giaa-ridge``: a ridge regression on the k shots over the generic model's frozen backbone
  features (:func:`piaa_dist.protocol.ridge_fit`), its penalty chosen on validation users.

Fine-tuning budgets come from :func:`piaa_dist.protocol.finetune_budget` (the one function
``personalize`` and meta-training validation use too), per method and shot count:

* ``eval.protocol: shared`` (the paper's protocol): every fine-tuned method gets the same
  budget, ``eval.finetune_steps`` steps of ``eval.finetune_optimizer`` at ``eval.finetune_lr``,
  adapting the parameters ``meta.inner_params`` names (the head's rate scaled by
  ``meta.inner_head_lr_scale``, as in the inner loop). That budget is tuned for how the
  meta-learner adapts, and can be destructive for a prior never trained to be adapted so.
* ``eval.protocol: per-method`` (the default): each method gets its own setting from
  ``eval.finetune`` (``METHOD@K: OPTIMIZER lr=.. steps=.. params=head|all``). The ``evaluate``
  command fills it by :func:`search_finetuning`: the same grid (``eval.search_*``) and the
  same number of candidates for every fine-tuned method, each scored by mean SROCC on the
  **validation users** (training users held out of meta-training and of the GIAA model's
  training), never on test users. A method without a setting gets the shared budget.

In both, every split runs the same random stream (minibatch order, dropout masks) for every
method (:func:`finetune_seed`), on minibatches of ``eval.batch_size`` with BatchNorm as
``eval.finetune_bn`` says, and scores come from :class:`piaa_dist.protocol.Scorer`.

Metrics per (user, k, r): SROCC and PLCC between the predictions and the observed scores of
the test images. Aggregates (an :class:`piaa_dist.results.EvaluationResult`): ``srocc_mean``
averages the users' mean SROCC over repeats; ``srocc_std`` is the spread over repeats (sample
std across repeats of the per-repeat, user-averaged SROCC); ``paired`` gives, per k, the mean
over users of the per-user (mean over repeats) difference between ``blg-piaa`` and each other
method with a 95% t-interval. When the data carries the synthetic world's truth sidecar,
``ceilings`` gives what a perfect model of the user (``oracle``: the user's noise-free latent
scores) and of the average user (``average_user``) would score against the observed ratings,
by the one rule of :func:`piaa_dist.metrics.ceilings` (the synthetic world's own ceilings use
it too): users whose ratings are all equal are left out and counted.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from piaa_dist import metrics
from piaa_dist.config import JobConfig, config_to_dict
from piaa_dist.data.decode import decode_batch
from piaa_dist.data.stream import split_indices
from piaa_dist.metrics import mean_ci95, plcc, srocc
from piaa_dist.protocol import (
    RIDGE_METHODS,
    FinetuneBudget,
    Scorer,
    budget_of_setting,
    finetune_budget,
    score_targets,
)
from piaa_dist.results import EvaluationResult, FinetuneChoice, PairedDiff, ShotStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    """How a method is evaluated: which prior it starts from and whether it is fine-tuned."""

    prior: str  #: "meta" (the meta-learner) or "giaa" (the generic model)
    adapt: bool  #: fine-tune on the k shots before predicting


#: The methods :func:`evaluate` knows by name.
METHODS: dict[str, MethodSpec] = {
    "blg-piaa": MethodSpec("meta", True),
    "meta-no-adapt": MethodSpec("meta", False),
    "giaa-finetune": MethodSpec("giaa", True),
    "giaa-no-adapt": MethodSpec("giaa", False),
    # A per-user ridge regression on the GIAA model's frozen backbone features (closed form,
    # penalty chosen on validation users): the linear baseline of the PIAA literature.
    "giaa-ridge": MethodSpec("giaa", True),
}

#: The method every other method is compared against in ``paired``.
REFERENCE_METHOD = "blg-piaa"


@dataclass(frozen=True)
class SplitPrediction:
    """One method's predictions on one split (what :func:`evaluate`'s ``on_split`` receives).

    Attributes:
        method: the method's name.
        user: the user.
        shots: k.
        repeat: the repeat index r.
        seed: the fine-tuning stream's seed (:func:`finetune_seed`).
        train_indices / test_indices: positions in the user's ratings (``split_indices``).
        predictions: predicted ``score / 5`` of the test images, in ``test_indices`` order.
    """

    method: str
    user: str
    shots: int
    repeat: int
    seed: int
    train_indices: np.ndarray
    test_indices: np.ndarray
    predictions: np.ndarray

# Fewest test images a split must leave for a rank correlation to mean anything.
_MIN_TEST = 3


# ---------------------------------------------------------------------------------------------
# Building blocks


def finetune_seed(seed: int, user: str, k: int, repeat: int) -> int:
    """Seed of the fine-tuning random stream of one split (shared by every method, so methods
    differ only in their prior)."""
    entropy = [int(seed) & 0xFFFFFFFF, zlib.crc32(user.encode("utf-8")), int(k), int(repeat), 1]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def decode_user(ratings, image_size: int) -> torch.Tensor:
    """Decode all of a user's images (no augmentation, as at test time): ``[n,3,S,S]``."""
    return decode_batch(list(ratings.jpegs), image_size, False)


def _rank_metrics(pred: np.ndarray, target: np.ndarray) -> tuple[float, float, bool]:
    """(SROCC, PLCC, degenerate). Constant predictions carry no ranking: both count as 0."""
    if pred.size < 2 or np.ptp(pred) == 0.0 or np.ptp(target) == 0.0:
        return 0.0, 0.0, True
    s, p = float(srocc(pred, target)), float(plcc(pred, target))
    if not (math.isfinite(s) and math.isfinite(p)):
        return 0.0, 0.0, True
    return s, p, False


def ceilings(dataset, users: Sequence[str]) -> metrics.Ceilings | None:
    """What perfect knowledge scores against the observed ratings (synthetic data only).

    Applies :func:`piaa_dist.metrics.ceilings` (the rule the synthetic world's ``world.json``
    uses too: users whose ratings are all equal are left out and counted) to every rating of
    each user.

    Args:
        dataset: anything with ``load_user`` returning ratings with ``scores``, ``latent`` and
            ``average_latent``.
        users: users to average over (the test users).

    Returns:
        The ceilings, or None when there are no users or any user lacks the truth sidecar.
    """
    triples = []
    for user in users:
        r = dataset.load_user(user)
        if r.latent is None or r.average_latent is None:
            return None
        triples.append((r.latent, r.average_latent, r.scores))
    if not triples:
        return None
    return metrics.ceilings(triples)


def ceilings_ci95(truths: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
                  ) -> dict[str, tuple[float, float] | None]:
    """95% t-interval over users of the oracle and average-user ceilings.

    The per-user values are those :func:`piaa_dist.metrics.ceilings` averages (the same rule:
    users whose ratings are all equal are left out), so the interval is around the reported
    ceiling. None for a ceiling whose interval cannot be formed (fewer than two users).
    """
    per: dict[str, list[float]] = {"oracle": [], "average_user": []}
    for latent, average, observed in truths:
        obs = np.asarray(observed, dtype=np.float64)
        if obs.size < 2 or np.ptp(obs) == 0.0:
            continue
        per["oracle"].append(float(srocc(np.asarray(latent, dtype=np.float64), obs)))
        per["average_user"].append(float(srocc(np.asarray(average, dtype=np.float64), obs)))
    out: dict[str, tuple[float, float] | None] = {}
    for name, values in per.items():
        if len(values) < 2:
            out[name] = None
            continue
        _, lo, hi = mean_ci95(values)
        out[name] = (float(lo), float(hi))
    return out


def standard_models(
    meta: nn.Module | None, giaa: nn.Module | None, methods: Iterable[str]
) -> dict[str, nn.Module]:
    """Map method names to the prior each starts from (skipping methods whose prior is None)."""
    priors = {"meta": meta, "giaa": giaa}
    out: dict[str, nn.Module] = {}
    for name in methods:
        if name not in METHODS:
            raise ValueError(f"eval.methods: unknown method {name!r}; known: {sorted(METHODS)}")
        prior = priors[METHODS[name].prior]
        if prior is None:
            log.warning("method %s skipped: no %s model given", name, METHODS[name].prior)
            continue
        out[name] = prior
    return out


# ---------------------------------------------------------------------------------------------
# The protocol, one user at a time


@dataclass(frozen=True)
class UserOutcome:
    """What the protocol measured on one user: small and picklable (no images, no models).

    :func:`evaluate_user` makes one; :func:`merge_outcomes` turns the outcomes of all users
    into the :class:`~piaa_dist.results.EvaluationResult`. The split of the work is free: the
    orchestration layer evaluates users in other processes and merges here, with the same
    numbers as one :func:`evaluate` call.

    Attributes:
        user: the user.
        scores: method → k → ``(srocc, plcc)`` of each repeat, in repeat order (a k the user
            has too few ratings for is absent).
        degenerate: method → k → splits whose predictions or test ratings were constant.
        skipped: the shot counts the user has too few ratings for.
        truth: ``(latent, average_latent, observed)`` over all the user's ratings (for the
            ceilings), or None when the data carries no truth sidecar.
    """

    user: str
    scores: dict[str, dict[int, tuple[tuple[float, float], ...]]]
    degenerate: dict[str, dict[int, int]]
    skipped: tuple[int, ...]
    truth: tuple[np.ndarray, np.ndarray, np.ndarray] | None


def method_budgets(cfg: JobConfig, models: Mapping[str, nn.Module],
                   shots: Sequence[int]) -> dict[str, dict[int, FinetuneBudget]]:
    """method → k → its budget (:func:`~piaa_dist.protocol.finetune_budget` of the method at k)."""
    return {name: {int(k): finetune_budget(cfg, m, name, int(k)) for k in shots} for name, m in models.items()}


def _budget_at(budget: FinetuneBudget | Mapping[int, FinetuneBudget], k: int) -> FinetuneBudget:
    return budget if isinstance(budget, FinetuneBudget) else budget[int(k)]


def _adapts(name: str) -> bool:
    return METHODS[name].adapt if name in METHODS else not name.endswith("no-adapt")


def evaluate_user(
    cfg: JobConfig,
    ratings,
    models: Mapping[str, nn.Module],
    *,
    shots: Sequence[int],
    repeats: int,
    seed: int,
    budgets: Mapping[str, object] | None = None,
    on_split: Callable[[SplitPrediction], None] | None = None,
    on_repeat: Callable[[], None] | None = None,
) -> UserOutcome:
    """The protocol on one user: every repeat, every k, every method.

    Everything random is a function of ``(seed, user, k, repeat)``, so the outcome does not
    depend on which process evaluates the user or in which order users come.

    Args:
        cfg: job config (``data.image_size`` and the fine-tuning budget).
        ratings: the user's ratings (``Dataset.load_user``).
        models: method name → prior (see :func:`evaluate`).
        shots, repeats, seed: the protocol.
        budgets: method → k → :func:`~piaa_dist.protocol.finetune_budget` (computed by
            :func:`method_budgets` when None; a method may map to one budget for every k).
        on_split: called with every method's :class:`SplitPrediction`.
        on_repeat: called after each repeat (progress).

    Returns:
        The user's :class:`UserOutcome`.
    """
    user = ratings.user
    budgets = budgets if budgets is not None else method_budgets(cfg, models, shots)
    names = list(models)
    n = len(ratings.scores)
    scores = np.asarray(ratings.scores, dtype=np.float64)
    images = decode_user(ratings, cfg.data.image_size)
    targets = score_targets(scores)
    per: dict[str, dict[int, list[tuple[float, float]]]] = {name: {} for name in names}
    degenerate = {name: {k: 0 for k in shots} for name in names}
    skipped: list[int] = []
    # One scorer per method over all of this user's images: a method that does not adapt
    # is predicted once, a head-only one computes its backbone features once; each split
    # then reads off its test images.
    # A scorer per (method, k) when the budget depends on k; they share the prior's caches.
    base = {name: Scorer(m, _budget_at(budgets[name], shots[0] if shots else 0), images)
            for name, m in models.items()}
    scorers = {(name, k): base[name].with_budget(_budget_at(budgets[name], k)) for name in names for k in shots}
    for r in range(repeats):
        for k in shots:
            if n - k < _MIN_TEST:
                if r == 0:
                    skipped.append(k)
                    # One warning per k for all users comes from merge_outcomes: a long-tailed
                    # log has thousands of such users.
                    log.debug("user %s has %d ratings: too few for %d shots; skipped", user, n, k)
                continue
            tr, te = split_indices(n, k, seed=seed, user=user, repeat=r)
            support = (images[tr], targets[tr])
            ft_seed = finetune_seed(seed, user, k, r)
            for name in names:
                pred = scorers[name, k].score(support if _adapts(name) else None, seed=ft_seed)[te]
                if on_split is not None:
                    on_split(SplitPrediction(name, user, k, r, ft_seed, tr, te, pred))
                s, p, bad = _rank_metrics(pred, scores[te])
                degenerate[name][k] += int(bad)
                per[name].setdefault(k, []).append((s, p))
        if on_repeat is not None:
            on_repeat()
    truth = None
    if ratings.latent is not None and ratings.average_latent is not None:
        truth = (np.asarray(ratings.latent), np.asarray(ratings.average_latent), np.asarray(ratings.scores))
    return UserOutcome(
        user=user,
        scores={name: {k: tuple(v) for k, v in by_k.items()} for name, by_k in per.items()},
        degenerate=degenerate,
        skipped=tuple(skipped),
        truth=truth,
    )


def evaluate_users(
    cfg: JobConfig,
    dataset,
    models: Mapping[str, nn.Module],
    users: Sequence[str],
    *,
    shots: Sequence[int],
    repeats: int,
    seed: int,
    on_split: Callable[[SplitPrediction], None] | None = None,
    on_repeat: Callable[[], None] | None = None,
) -> list[UserOutcome]:
    """:func:`evaluate_user` on each of `users` (loaded from `dataset`), in order.

    The unit of work the orchestration layer runs remotely on a chunk of users.
    """
    budgets = method_budgets(cfg, models, shots)
    return [
        evaluate_user(cfg, dataset.load_user(user), models, shots=shots, repeats=repeats, seed=seed,
                      budgets=budgets, on_split=on_split, on_repeat=on_repeat)
        for user in users
    ]


def merge_outcomes(
    cfg: JobConfig,
    outcomes: Iterable[UserOutcome],
    *,
    methods: Sequence[str],
    users: Sequence[str],
    shots: Sequence[int],
    repeats: int,
    seed: int,
    seconds: float = 0.0,
) -> EvaluationResult:
    """The :class:`~piaa_dist.results.EvaluationResult` of per-user outcomes.

    A pure function of the outcomes (any order) and the protocol: the same numbers as
    :func:`evaluate` whatever process computed each outcome.

    Args:
        cfg: the job config (recorded in the result).
        outcomes: one per user of `users` (any order).
        methods: the method names, in the order they were evaluated.
        users: the users, in the order to report them (and to average the ceilings in).
        shots, repeats, seed: the protocol.
        seconds: wall time to record.

    Raises:
        ValueError: an outcome is missing or unexpected, or no user has enough ratings for any k.
    """
    shots = [int(k) for k in shots]
    names = list(methods)
    if len(set(users)) != len(users):
        raise ValueError("merge_outcomes: the users list names a user twice")
    by_user = {o.user: o for o in outcomes}
    if set(by_user) != set(users):
        missing = sorted(set(users) - set(by_user))[:5]
        extra = sorted(set(by_user) - set(users))[:5]
        raise ValueError(f"merge_outcomes: outcomes do not match the users (missing {missing}, unexpected {extra})")
    ordered = [by_user[u] for u in users]
    skipped = {k: tuple(o.user for o in ordered if k in o.skipped) for k in shots}
    for k, who in skipped.items():
        if who:
            log.warning("%d of %d users have too few ratings for %d shots (fewer than %d); skipped (e.g. %s)",
                        len(who), len(users), k, k + _MIN_TEST, ", ".join(who[:3]))
    if all(not o.scores[names[0]].get(k) for o in ordered for k in shots):
        raise ValueError(f"evaluate: none of the {len(users)} users has enough ratings for shots {shots}")

    methods_out: dict[str, dict[int, ShotStats]] = {}
    for name in names:
        methods_out[name] = {}
        for k in shots:
            table = {o.user: o.scores[name][k] for o in ordered if o.scores[name].get(k)}
            if not table:
                continue
            kept = sorted(table)
            arr = np.array([[sp[0] for sp in table[u]] for u in kept])  # [users, repeats]
            parr = np.array([[sp[1] for sp in table[u]] for u in kept])
            by_repeat = arr.mean(axis=0)  # user-averaged SROCC of each repeat
            pby_repeat = parr.mean(axis=0)
            ddof = 1 if repeats > 1 else 0
            methods_out[name][k] = ShotStats(
                srocc_mean=float(arr.mean(axis=1).mean()),
                srocc_std=float(by_repeat.std(ddof=ddof)),
                plcc_mean=float(parr.mean(axis=1).mean()),
                plcc_std=float(pby_repeat.std(ddof=ddof)),
                per_user={u: float(arr[i].mean()) for i, u in enumerate(kept)},
                per_user_plcc={u: float(parr[i].mean()) for i, u in enumerate(kept)},
                n_users=len(kept),
                degenerate=sum(o.degenerate[name][k] for o in ordered),
            )

    paired: dict[str, dict[int, PairedDiff]] = {}
    reference = REFERENCE_METHOD if REFERENCE_METHOD in methods_out else None
    if reference is not None:
        ref = methods_out[reference]
        for other in names:
            if other == reference:
                continue
            paired[other] = {
                k: _paired(ref[k].per_user, methods_out[other][k].per_user)
                for k in ref
                if k in methods_out[other]
            }

    truths = [o.truth for o in ordered]
    ceil = None if not truths or any(t is None for t in truths) else metrics.ceilings(truths)
    ceil_ci = None if ceil is None else ceilings_ci95(truths)
    return EvaluationResult(
        methods=methods_out,
        reference=reference,
        paired=paired,
        ceilings=ceil,
        ceilings_ci95=ceil_ci,
        users=tuple(users),
        skipped=skipped,
        shots=tuple(shots),
        repeats=repeats,
        seed=seed,
        config=config_to_dict(cfg),
        seconds=round(seconds, 2),
    )


def evaluate(
    cfg: JobConfig,
    dataset,
    models: Mapping[str, nn.Module],
    *,
    shots: Sequence[int] | None = None,
    repeats: int | None = None,
    seed: int | None = None,
    users: Sequence[str] | None = None,
    progress: bool = False,
    on_split: Callable[[SplitPrediction], None] | None = None,
) -> EvaluationResult:
    """Run the meta-testing protocol (in this process).

    :func:`evaluate_users` then :func:`merge_outcomes`;
    :mod:`piaa_dist.orchestration.ray_evaluate` spreads the first over Ray workers with the
    same numbers.

    Args:
        cfg: job config (``eval`` budget, ``data.image_size``, ``meta.inner_params`` /
            ``meta.inner_head_lr_scale``: see :func:`piaa_dist.protocol.finetune_budget`).
        dataset: a :class:`piaa_dist.data.stream.Dataset`.
        models: method name → the model it starts from, e.g. ``{"blg-piaa": meta,
            "meta-no-adapt": meta, "giaa-finetune": giaa}`` (see :func:`standard_models`).
            Names in :data:`METHODS` set whether the method is fine-tuned; any other name is
            fine-tuned unless it ends in ``no-adapt``.
        shots: shot counts k; default ``cfg.eval.shots``.
        repeats: random splits per user and k; default ``cfg.eval.repeats``.
        seed: split seed; default ``cfg.run.seed``.
        users: users to evaluate; default ``dataset.users("test")``.
        progress: show a tqdm bar over users × repeats.
        on_split: called with every method's :class:`SplitPrediction` (to keep or inspect the
            per-image predictions behind the numbers).

    Returns:
        The typed result (its ``model``/``data``/``giaa`` sources unset: the caller knows them,
        see :meth:`~piaa_dist.results.EvaluationResult.with_sources`).

    Raises:
        ValueError: no models, or no user has enough ratings for any k.
        ConfigError: an invalid fine-tuning budget in `cfg`.
    """
    if not models:
        raise ValueError("evaluate: no models to evaluate")
    shots, repeats, seed = protocol_of(cfg, shots, repeats, seed)
    users = list(users if users is not None else dataset.users("test"))
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(users) * repeats, desc="evaluate", unit="split")
    try:
        outcomes = evaluate_users(cfg, dataset, models, users, shots=shots, repeats=repeats, seed=seed,
                                  on_split=on_split, on_repeat=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    return merge_outcomes(cfg, outcomes, methods=list(models), users=users, shots=shots, repeats=repeats,
                          seed=seed, seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Choosing each method's fine-tuning on validation users


def finetune_grid(cfg: JobConfig) -> list[dict[str, object]]:
    """The candidates of the fine-tuning search, in a fixed order (ties go to the first):
    ``eval.search_params`` × (SGD at ``eval.search_sgd_lrs``, Adam at ``eval.search_adam_lrs``),
    each at every count of ``eval.search_steps`` (one run of the longest scores them all)."""
    ev = cfg.eval
    return [{"optimizer": opt, "lr": float(lr), "params": params}
            for params in ev.search_params
            for opt, lrs in (("sgd", ev.search_sgd_lrs), ("adam", ev.search_adam_lrs))
            for lr in lrs]


def setting_text(method: str, k: int, values: Mapping[str, object]) -> str:
    """One ``eval.finetune`` entry (``METHOD@K: ...``) for a setting."""
    if "penalty" in values:
        return f"{method}@{int(k)}: penalty={float(values['penalty'])!r}"
    return (f"{method}@{int(k)}: {values.get('optimizer', 'sgd')} lr={float(values['lr'])!r} "  # type: ignore[arg-type]
            f"steps={int(values['steps'])} params={values['params']}")  # type: ignore[call-overload]


def _explicit(cfg: JobConfig) -> dict[tuple[str, int | None], str]:
    from piaa_dist.config import parse_finetune_setting

    return {parse_finetune_setting(t)[:2]: t for t in cfg.eval.finetune}


def search_plan(cfg: JobConfig, methods: Iterable[str], shots: Sequence[int]) -> dict[str, list[int]]:
    """method → the shot counts whose setting the search chooses: every fine-tuned method under
    ``eval.protocol: per-method`` (``giaa-ridge``'s penalty under either protocol), except
    where ``eval.finetune`` already gives a setting (for ``METHOD@K`` or ``METHOD``)."""
    given = _explicit(cfg)
    plan: dict[str, list[int]] = {}
    for name in methods:
        if not _adapts(name) or (name not in RIDGE_METHODS and cfg.eval.protocol != "per-method"):
            continue
        ks = [int(k) for k in shots if (name, int(k)) not in given and (name, None) not in given]
        if ks:
            plan[name] = ks
    return plan


def search_user(cfg: JobConfig, ratings, models: Mapping[str, nn.Module], plan: Mapping[str, Sequence[int]],
                *, repeats: int, seed: int, images: torch.Tensor | None = None
                ) -> dict[str, dict[int, dict[str, list[float]]]]:
    """Every candidate of the search on one (validation) user: method → k → setting → SROCC of
    each repeat. The splits and fine-tuning streams are :func:`evaluate_user`'s (functions of
    ``(seed, user, k, repeat)``), scored through the same :class:`~piaa_dist.protocol.Scorer`.

    Each (method, k) cell depends on nothing but the user, the prior, the grid and the seed, so
    the cells of one user can be computed apart (:func:`search_cells`) with the same numbers.
    ``images``: the user's decoded images when the caller has them already."""
    ev = cfg.eval
    n = len(ratings.scores)
    scores = np.asarray(ratings.scores, dtype=np.float64)
    images = decode_user(ratings, cfg.data.image_size) if images is None else images
    targets = score_targets(scores)
    grid = finetune_grid(cfg)
    steps = sorted({int(x) for x in ev.search_steps})
    out: dict[str, dict[int, dict[str, list[float]]]] = {m: {} for m in plan}
    scorers = {m: Scorer(models[m], finetune_budget(cfg, models[m]), images) for m in plan}
    for r in range(repeats):
        for m, ks in plan.items():
            for k in ks:
                if n - k < _MIN_TEST:
                    continue
                tr, te = split_indices(n, k, seed=seed, user=ratings.user, repeat=r)
                support = (images[tr], targets[tr])
                ft_seed = finetune_seed(seed, ratings.user, k, r)
                cell = out[m].setdefault(k, {})
                if m in RIDGE_METHODS:
                    for penalty in ev.search_ridge:
                        budget = FinetuneBudget(steps=0, lr=0.0, batch_size=int(ev.batch_size), bn=ev.finetune_bn,
                                                ridge=float(penalty))
                        pred = scorers[m].with_budget(budget).score(support, seed=ft_seed)[te]
                        cell.setdefault(setting_text(m, k, {"penalty": penalty}), []).append(
                            _rank_metrics(pred, scores[te])[0])
                    continue
                for cand in grid:
                    budget = budget_of_setting(cfg, models[m], {**cand, "steps": steps[-1]})
                    preds = scorers[m].with_budget(budget).score_steps(support, steps, seed=ft_seed)
                    for st in steps:
                        text = setting_text(m, k, {**cand, "steps": st})
                        cell.setdefault(text, []).append(_rank_metrics(preds[st][te], scores[te])[0])
    return out


def search_finetuning(
    cfg: JobConfig,
    dataset,
    models: Mapping[str, nn.Module],
    users: Sequence[str],
    *,
    shots: Sequence[int] | None = None,
    seed: int | None = None,
    progress: bool = False,
    run_items: Callable[[list[SearchItem], int, int, Callable[[int], object] | None],
                        list[dict[str, list[float]]]] | None = None,
) -> FinetuneChoice:
    """Choose each method's fine-tuning setting per shot count on `users` (validation users).

    Every method of :func:`search_plan` is scored on the same grid (:func:`finetune_grid` ×
    ``eval.search_steps``; ``eval.search_ridge`` for ``giaa-ridge``) with the same splits and
    ``eval.search_repeats`` repeats; a setting's score is the mean over users of each user's
    mean SROCC over repeats, and the highest wins (ties: the first in grid order). Only
    `users`' ratings are read: the caller passes validation users (training users held out of
    meta-training), never test users, so no test rating can sway a choice.

    The work is :func:`search_items` (user × method × k, every grid setting in each), run by
    :func:`search_cells` in this process or by ``run_items(items, repeats, seed, advance)``
    (the orchestration layer's Ray workers: it returns the cells of the items in order and
    calls ``advance(n)`` as n items finish); :func:`choose_finetuning` then picks, with the
    same numbers either way.

    Returns:
        The :class:`~piaa_dist.results.FinetuneChoice` (``source`` ``"search"``), with the
        ``eval.finetune`` settings given in `cfg` as well (validation score None).

    Raises:
        ValueError: no users, or no user has enough ratings for a searched shot count.
    """
    shots, _, seed = protocol_of(cfg, shots, None, seed)
    users = list(users)
    plan = search_plan(cfg, models, shots)
    repeats = int(cfg.eval.search_repeats)
    if plan and not users:
        raise ValueError("search_finetuning: no validation users to choose the fine-tuning settings on")
    items = search_items(plan, users)
    bar = None
    if progress and items:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="fine-tuning search (validation users)", unit="cell")
    try:
        if run_items is not None and items:
            cells = run_items(items, repeats, seed, bar.update if bar is not None else None)
        else:
            cells = search_cells(cfg, dataset, models, items, repeats=repeats, seed=seed,
                                 on_item=(lambda: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    return choose_finetuning(cfg, models, users, shots, dict(zip(items, cells)), repeats=repeats)


#: One unit of the fine-tuning search: ``(validation user, method, k)``, every candidate of the
#: grid on that user's splits at k (:func:`search_cells`).
SearchItem = tuple[str, str, int]


def search_items(plan: Mapping[str, Sequence[int]], users: Sequence[str]) -> list[SearchItem]:
    """The search's units of work, method by method (the plan's order), then k, then user: a
    list to share out over workers in any way (each unit's numbers depend on it alone)."""
    return [(u, m, int(k)) for m, ks in plan.items() for k in ks for u in users]


def search_cells(cfg: JobConfig, dataset, models: Mapping[str, nn.Module], items: Sequence[SearchItem], *,
                 repeats: int, seed: int, on_item: Callable[[], None] | None = None
                 ) -> list[dict[str, list[float]]]:
    """Every candidate's SROCC of each repeat on each item (:func:`search_user` of the item's user,
    method and k): ``setting text → [srocc per repeat]``, empty when the user has too few
    ratings for k. A user's ratings are loaded and decoded once for consecutive items."""
    out: list[dict[str, list[float]]] = []
    loaded: tuple[str, object, torch.Tensor] | None = None
    for user, m, k in items:
        if loaded is None or loaded[0] != user:
            ratings = dataset.load_user(user)
            loaded = (user, ratings, decode_user(ratings, cfg.data.image_size))
        got = search_user(cfg, loaded[1], models, {m: [int(k)]}, repeats=repeats, seed=seed, images=loaded[2])
        out.append(got[m].get(int(k), {}))
        if on_item is not None:
            on_item()
    return out


def choose_finetuning(cfg: JobConfig, models: Mapping[str, nn.Module], users: Sequence[str], shots: Sequence[int],
                      cells: Mapping[SearchItem, Mapping[str, Sequence[float]]], *, repeats: int) -> FinetuneChoice:
    """The choice of :func:`search_finetuning` from every item's cell (:func:`search_cells`),
    whatever process computed each: a pure function of the cells (the users' order sets only
    the order of a float sum, the same as one process's).

    Raises:
        ValueError: a (method, k) of the plan has no user with enough ratings.
    """
    import hashlib

    shots = [int(k) for k in shots]
    users = list(users)
    plan = search_plan(cfg, models, shots)
    table: dict[str, dict[int, dict[str, list[float]]]] = {m: {} for m in plan}
    for user in users:
        for m, ks in plan.items():
            for k in ks:
                for text, vals in cells[(user, m, int(k))].items():
                    table[m].setdefault(k, {}).setdefault(text, []).append(float(np.mean(vals)))
    chosen: dict[str, dict[int, str]] = {}
    val: dict[str, dict[int, float | None]] = {}
    grid: dict[str, dict[int, dict[str, float]]] = {}
    for m, ks in plan.items():
        for k in ks:
            cands = table[m].get(k)
            if not cands:
                raise ValueError(f"search_finetuning: none of the {len(users)} validation users has enough "
                                 f"ratings for {k} shots (needs {k + _MIN_TEST})")
            means = {text: float(np.mean(v)) for text, v in cands.items()}
            best = max(means, key=lambda t: means[t])  # max keeps the first of equal scores
            chosen.setdefault(m, {})[k] = best
            val.setdefault(m, {})[k] = means[best]
            grid.setdefault(m, {})[k] = means
            log.info("fine-tuning of %s at %d shots: %s (validation SROCC %.4f on %d users)",
                     m, k, best, means[best], len(users))
    for (m, k), text in _explicit(cfg).items():
        if m in models:
            for kk in ([k] if k is not None else shots):
                if int(kk) in shots:
                    chosen.setdefault(m, {})[int(kk)] = text
                    val.setdefault(m, {})[int(kk)] = None
    return FinetuneChoice(
        protocol=cfg.eval.protocol, source="search" if plan else "config", chosen=chosen,
        validation_srocc=val, grid=grid, validation_users=len(users),
        validation_sha256=hashlib.sha256("\n".join(sorted(users)).encode("utf-8")).hexdigest(),
        repeats=repeats if plan else 0,
    )


def with_choice(cfg: JobConfig, choice: FinetuneChoice) -> JobConfig:
    """`cfg` with the searched settings of `choice` added to ``eval.finetune`` (what
    :func:`evaluate` then uses; the result's config records them)."""
    from piaa_dist.config import with_overrides

    given = set(cfg.eval.finetune)
    extra = [t for t in choice.settings() if t not in given]
    return with_overrides(cfg, {"eval.finetune": [*cfg.eval.finetune, *extra]}) if extra else cfg


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, dtypes, shapes, values): the model's identity in the
    search cache key."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def search_key(cfg: JobConfig, models: Mapping[str, nn.Module], users: Sequence[str], data: str,
               shots: Sequence[int], seed: int) -> str:
    """The identity of a fine-tuning search: the priors (by :func:`model_digest`), the data,
    the validation users, the grid and protocol (``eval``'s search fields, explicit settings,
    BatchNorm mode, minibatch size), the shot counts and the seed. Equal keys, equal choice."""
    import hashlib
    import json

    ev = cfg.eval
    ident = {
        "models": {m: model_digest(mod) for m, mod in sorted(models.items())},
        "data": data, "users": hashlib.sha256("\n".join(sorted(users)).encode("utf-8")).hexdigest(),
        "grid": {"protocol": ev.protocol, "finetune": list(ev.finetune), "sgd": list(ev.search_sgd_lrs),
                 "adam": list(ev.search_adam_lrs), "steps": list(ev.search_steps),
                 "params": list(ev.search_params), "ridge": list(ev.search_ridge),
                 "repeats": ev.search_repeats, "bn": ev.finetune_bn, "batch_size": ev.batch_size,
                 "image_size": cfg.data.image_size},
        "shots": [int(k) for k in shots], "seed": int(seed), "version": 1,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def protocol_of(cfg: JobConfig, shots: Sequence[int] | None = None, repeats: int | None = None,
                seed: int | None = None) -> tuple[list[int], int, int]:
    """``(shots, repeats, seed)``: the arguments given, else ``cfg.eval.shots``,
    ``cfg.eval.repeats`` and ``cfg.run.seed`` (the defaults of :func:`evaluate`)."""
    return ([int(k) for k in (shots if shots is not None else cfg.eval.shots)],
            int(repeats if repeats is not None else cfg.eval.repeats),
            int(seed if seed is not None else cfg.run.seed))


def _paired(ref: Mapping[str, float], other: Mapping[str, float]) -> PairedDiff:
    """Mean and 95% CI of per-user differences ref − other over their common users."""
    common = sorted(set(ref) & set(other))
    diffs = np.array([ref[u] - other[u] for u in common], dtype=np.float64)
    mean, lo, hi = mean_ci95(diffs)
    return PairedDiff(
        diff_mean=float(mean),
        ci95=None if math.isnan(lo) or math.isnan(hi) else (float(lo), float(hi)),
        n_users=len(common),
        users_better=int((diffs > 0).sum()),
    )


def validation_srocc(cfg: JobConfig, dataset, model: nn.Module, users: Sequence[str], *,
                     shots: int, repeats: int) -> float:
    """Tune's metric: mean ``blg-piaa`` SROCC of `model` fine-tuned on `shots` shots of `users`.

    It *is* :func:`evaluate` (same budget, same scorer, seeded by ``cfg.run.seed``), on
    validation users (training users held out of meta-training, never test users).
    """
    res = evaluate(cfg, dataset, {REFERENCE_METHOD: model}, shots=[shots], repeats=repeats,
                   users=users)
    cell = res.stats(REFERENCE_METHOD, shots)
    if cell is None:
        raise ValueError(f"validation: none of the {len(users)} users has enough ratings for {shots} shots")
    return cell.srocc_mean


__all__ = [
    "METHODS",
    "REFERENCE_METHOD",
    "MethodSpec",
    "SearchItem",
    "SplitPrediction",
    "UserOutcome",
    "ceilings",
    "ceilings_ci95",
    "choose_finetuning",
    "decode_user",
    "evaluate",
    "evaluate_user",
    "evaluate_users",
    "finetune_grid",
    "finetune_seed",
    "merge_outcomes",
    "method_budgets",
    "model_digest",
    "protocol_of",
    "search_cells",
    "search_finetuning",
    "search_items",
    "search_key",
    "search_plan",
    "search_user",
    "setting_text",
    "standard_models",
    "validation_srocc",
    "with_choice",
]
