"""The meta-testing protocol: fine-tune on k rated images of an unseen user, rank the rest.

For every test user, every shot count k and every repeat r,
:func:`piaa_dist.data.stream.split_indices` draws a random split of the user's ratings into k
training images ("shots") and the rest as test images. The split is a pure function of ``(seed, user, k, r)``: never of the method, the order
users are visited in, or anything else, so every method is scored on exactly the same images.

Methods (all in one run, on the same splits):

* ``blg-piaa``: the meta-learner fine-tuned on the k shots;
* ``meta-no-adapt``: the meta-learner as is (what the prior alone knows about a new user);
* ``giaa-finetune``: the generic model (:mod:`piaa_dist.giaa`) fine-tuned on the same k shots;
* ``giaa-no-adapt`` (optional): the generic model as is.

Every fine-tuned method gets the same budget: ``eval.finetune_steps`` steps of
``eval.finetune_optimizer`` at ``eval.finetune_lr`` on minibatches of ``eval.batch_size``,
adapting the parameters ``meta.inner_params`` names (the head's rate scaled by
``meta.inner_head_lr_scale``, as in the inner loop), with BatchNorm as ``eval.finetune_bn``
says and the same random stream (minibatch order, dropout masks) per split. The only
difference between ``blg-piaa`` and ``giaa-finetune`` is therefore the prior they start from.

Metrics per (user, k, r): SROCC and PLCC between the predictions and the observed scores of
the test images. Aggregates (see :func:`evaluate`): ``srocc_mean`` averages the users' mean
SROCC over repeats; ``srocc_std`` is the spread over repeats (sample std across repeats of
the per-repeat, user-averaged SROCC); ``paired`` gives, per k, the mean over users of the
per-user (mean over repeats) difference between ``blg-piaa`` and each other method with a
95% t-interval. When the data carries the synthetic world's truth sidecar, ``ceilings``
gives what a perfect model of the user (``oracle``: the user's noise-free latent scores)
and of the average user (``average_user``) would score against the observed ratings.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from piaa_dist.config import JobConfig, config_to_dict
from piaa_dist.data.decode import decode_batch
from piaa_dist.data.stream import split_indices
from piaa_dist.metrics import mean_ci95, plcc, srocc
from piaa_dist.model import head_names

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
}

#: The method every other method is compared against in ``paired``.
REFERENCE_METHOD = "blg-piaa"

# Fewest test images a split must leave for a rank correlation to mean anything.
_MIN_TEST = 3

# Shortcut for head-only adaptation: run the (unchanged) backbone once instead of every step,
# and predict from cached backbone features. Exact; a switch so tests can compare with the
# plain path.
_FIXED_FEATURES = True


# ---------------------------------------------------------------------------------------------
# Building blocks


def _split_seed(seed: int, user: str, k: int, repeat: int) -> int:
    """Seed of the fine-tuning random stream for one split (shared by every method)."""
    entropy = [int(seed) & 0xFFFFFFFF, zlib.crc32(user.encode("utf-8")), int(k), int(repeat), 1]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


#: How BatchNorm normalizes during fine-tuning (see :func:`finetune`).
BN_MODES = ("batch", "running")


def _freeze_bn_stats(model: nn.Module, running: bool = False) -> None:
    """Stop BatchNorm layers from updating their running statistics; with `running`, also make
    them normalize with those statistics (eval mode) instead of the batch's."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
            if running:
                m.eval()


def finetune(
    model: nn.Module,
    support: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    lr: float | Mapping[str, float],
    optimizer: str = "sgd",
    batch_size: int = 100,
    seed: int = 0,
    adapt_names: Iterable[str] | None = None,
    bn: str = "batch",
) -> nn.Module:
    """Fine-tune a copy of `model` on one user's shots (MSE on ``score / 5``).

    BatchNorm running statistics are never updated: predictions (:func:`predict`, eval mode)
    use the prior's population statistics, not ones estimated from k images (noisy at k = 10).
    How BatchNorm normalizes *during* fine-tuning is `bn`:

    * ``"batch"``: like the meta-learner's inner loop (:mod:`piaa_dist.meta`), each step
      normalizes with the statistics of the current batch. Exactly what ``blg-piaa`` was
      meta-trained to adapt with; but what is optimized (train-mode outputs) is not what is
      predicted with (eval mode), and large moves of the layers before a BatchNorm (many steps,
      Adam, all parameters) can make the two drift apart.
    * ``"running"``: BatchNorm uses the running statistics throughout (a fixed affine map), so
      fine-tuning minimizes the loss of the very predictor that is then evaluated.

    Dropout stays active during fine-tuning in both modes.

    Args:
        model: the prior; left untouched.
        support: ``(images [k,3,S,S], targets [k])`` with targets = score / 5.
        steps: optimizer steps (0 returns an untouched copy).
        lr: learning rate, or parameter name → learning rate (e.g. a larger one for the head,
            as :func:`piaa_dist.meta.meta_kwargs` builds from ``meta.inner_head_lr_scale``).
        optimizer: ``"sgd"`` or ``"adam"``.
        batch_size: minibatch size; ``>= k`` means full-batch steps.
        seed: seeds the minibatch order and dropout masks, so the same call gives the same model.
        adapt_names: parameter names to adapt (e.g. the head only); None adapts all.
        bn: ``"batch"`` or ``"running"`` (see above).

    Returns:
        The fine-tuned copy, in eval mode.

    Raises:
        ValueError: unknown optimizer or BatchNorm mode.
    """
    tuned = copy.deepcopy(model)
    device = next(tuned.parameters()).device
    images, targets = (t.to(device) for t in support)
    names = None if adapt_names is None else set(adapt_names)
    named = [(n, p) for n, p in tuned.named_parameters() if names is None or n in names]
    for n, p in tuned.named_parameters():
        p.requires_grad_(names is None or n in names)
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"eval.finetune_optimizer: unknown {optimizer!r}; use 'sgd' or 'adam'")
    if bn not in BN_MODES:
        raise ValueError(f"eval.finetune_bn: unknown {bn!r}; use one of {BN_MODES}")
    if steps <= 0 or not named:
        tuned.eval()
        return tuned
    # One parameter group per distinct learning rate.
    groups: dict[float, list[torch.Tensor]] = {}
    for n, p in named:
        groups.setdefault(float(lr[n]) if isinstance(lr, Mapping) else float(lr), []).append(p)
    param_groups = [{"params": ps, "lr": g_lr} for g_lr, ps in groups.items()]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(param_groups)
    elif optimizer == "adam":
        opt = torch.optim.Adam(param_groups)
    else:  # pragma: no cover - checked above
        raise ValueError(f"eval.finetune_optimizer: unknown {optimizer!r}; use 'sgd' or 'adam'")
    k = int(images.shape[0])
    batch = max(1, min(int(batch_size), k))
    gen = torch.Generator().manual_seed(int(seed))
    tuned.train()
    _freeze_bn_stats(tuned, running=(bn == "running"))
    # Head-only, full-batch fine-tuning of a backbone+head model: the backbone is fixed and
    # sees the same batch every step, so its train-mode output (batch statistics) is the same
    # every step. Computing it once gives bit-identical results to the plain loop at a fraction
    # of the cost (the backbone holds almost all the compute).
    fixed_features = _FIXED_FEATURES and batch >= k and _head_only(tuned, names)
    # fork_rng: dropout draws from the global RNG; seeding a fork keeps calls reproducible without
    # disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        order = torch.randperm(k, generator=gen)
        if batch >= k:
            # Full batch: the same (permuted once) batch every step.
            images, targets = images[order], targets[order]
        if fixed_features:
            with torch.no_grad():
                feats = tuned.backbone(images)
            forward, inputs = tuned.head, feats
        else:
            forward, inputs = tuned, images
        pos = 0
        for _ in range(int(steps)):
            if batch >= k:
                idx = slice(None)
            else:
                if pos + batch > k:
                    order = torch.randperm(k, generator=gen)
                    pos = 0
                idx = order[pos : pos + batch]
                pos += batch
            loss = F.mse_loss(forward(inputs[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in tuned.parameters():
        p.requires_grad_(True)
    tuned.eval()
    return tuned


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Predict ``score / 5`` for each image with the model in eval mode.

    Args:
        model: an aesthetic model; its train/eval mode is restored afterwards.
        images: ``[N,3,S,S]`` normalized images.
        batch_size: images per forward pass.

    Returns:
        float64 array ``[N]``.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = [
            model(images[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, images.shape[0], max(1, batch_size))
        ]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


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


def ceilings(dataset, users: Sequence[str]) -> dict[str, float] | None:
    """What perfect knowledge scores against the observed ratings (synthetic data only).

    Args:
        dataset: anything with ``load_user`` returning ratings with ``scores``, ``latent`` and
            ``average_latent``.
        users: users to average over (the test users).

    Returns:
        ``{"oracle": mean_u SROCC(latent_u, scores_u), "average_user": mean_u
        SROCC(average_latent_u, scores_u)}`` over all of each user's ratings, or None when any
        user lacks the truth sidecar.
    """
    oracle, average = [], []
    for user in users:
        r = dataset.load_user(user)
        if r.latent is None or r.average_latent is None:
            return None
        scores = np.asarray(r.scores, dtype=np.float64)
        oracle.append(_rank_metrics(np.asarray(r.latent, dtype=np.float64), scores)[0])
        average.append(_rank_metrics(np.asarray(r.average_latent, dtype=np.float64), scores)[0])
    if not oracle:
        return None
    return {"oracle": float(np.mean(oracle)), "average_user": float(np.mean(average))}


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


def finetune_budget(cfg: JobConfig, model: nn.Module) -> dict:
    """The fine-tuning budget every adapted method gets: ``{"lr", "adapt_names"}``.

    The parameters adapted are those the meta-learner's inner loop adapts
    (``meta.inner_params``), and the head gets ``meta.inner_head_lr_scale`` × the learning rate as
    in the inner loop; both apply to every method alike, so the priors differ and nothing else.
    """
    heads = head_names(model) if hasattr(model, "head") else set()
    adapt_names = heads if cfg.meta.inner_params == "head" else None
    lr: float | dict[str, float] = float(cfg.eval.finetune_lr)
    scale = float(getattr(cfg.meta, "inner_head_lr_scale", 1.0))
    if scale != 1.0:
        lr = {n: cfg.eval.finetune_lr * (scale if n in heads else 1.0) for n, _ in model.named_parameters()}
    return {"lr": lr, "adapt_names": adapt_names}


def _head_only(model: nn.Module, adapt_names) -> bool:
    return (
        adapt_names is not None
        and hasattr(model, "backbone")
        and hasattr(model, "head")
        and all(n.startswith("head.") for n in adapt_names)
    )


@torch.no_grad()
def _backbone_features(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Eval-mode backbone output (what the head sees at prediction time)."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = [model.backbone(images[i : i + batch_size].to(device)).cpu()
               for i in range(0, images.shape[0], max(1, batch_size))]
    finally:
        model.train(was)
    return torch.cat(out)


@torch.no_grad()
def _predict_head(model: nn.Module, feats: torch.Tensor) -> np.ndarray:
    """Eval-mode head on precomputed backbone features: equals :func:`predict` on the images
    when only the head was adapted."""
    model.eval()
    device = next(model.parameters()).device
    return model.head(feats.to(device)).float().cpu().numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# The protocol


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
) -> dict:
    """Run the meta-testing protocol and return the issue-3 result dict (JSON-ready).

    Args:
        cfg: job config (``eval`` budget, ``data.image_size``, ``meta.inner_params``).
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

    Returns:
        ``{"methods": {name: {str(k): {"srocc_mean", "srocc_std", "plcc_mean", "plcc_std",
        "per_user": {user: mean SROCC}, "per_user_plcc", "n_users", "degenerate"}}},
        "paired": {"blg-piaa vs NAME": {str(k): {"diff_mean", "ci95": [lo, hi], "n_users",
        "users_better"}}}, "ceilings": {"oracle", "average_user"} or None, "users",
        "skipped": {str(k): [users with too few ratings]}, "shots", "repeats", "seed",
        "config", "seconds"}``.

    Raises:
        ValueError: no models, or no user has enough ratings for any k.
    """
    if not models:
        raise ValueError("evaluate: no models to evaluate")
    shots = [int(k) for k in (shots if shots is not None else cfg.eval.shots)]
    repeats = int(repeats if repeats is not None else cfg.eval.repeats)
    seed = int(seed if seed is not None else cfg.run.seed)
    users = list(users if users is not None else dataset.users("test"))
    ev = cfg.eval
    t0 = time.perf_counter()

    def adapts(name: str) -> bool:
        return METHODS[name].adapt if name in METHODS else not name.endswith("no-adapt")

    names = list(models)
    # scores[name][k][user] = list of (srocc, plcc) over repeats
    per: dict[str, dict[int, dict[str, list[tuple[float, float]]]]] = {
        n: {k: {} for k in shots} for n in names
    }
    degenerate = {n: {k: 0 for k in shots} for n in names}
    skipped: dict[int, list[str]] = {k: [] for k in shots}
    budgets = {n: finetune_budget(cfg, m) for n, m in models.items()}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(users) * repeats, desc="evaluate", unit="split")
    for user in users:
        ratings = dataset.load_user(user)
        n = len(ratings.scores)
        scores = np.asarray(ratings.scores, dtype=np.float64)
        images = decode_user(ratings, cfg.data.image_size)
        targets = torch.as_tensor(scores / 5.0, dtype=torch.float32)
        # A method that does not adapt predicts the same for every split: predict once.
        static = {n_: predict(m, images, ev.batch_size) for n_, m in models.items() if not adapts(n_)}
        # Head-only adaptation leaves the backbone as it is: its eval-mode features of this
        # user's images are the same for every split, so compute them once per prior.
        head_feats = {
            n_: _backbone_features(m, images, ev.batch_size)
            for n_, m in models.items()
            if _FIXED_FEATURES and adapts(n_) and _head_only(m, budgets[n_]["adapt_names"])
        }
        for r in range(repeats):
            for k in shots:
                if n - k < _MIN_TEST:
                    if r == 0:
                        skipped[k].append(user)
                        log.warning("user %s has %d ratings: too few for %d shots; skipped", user, n, k)
                    continue
                tr, te = split_indices(n, k, seed=seed, user=user, repeat=r)
                support = (images[tr], targets[tr])
                ft_seed = _split_seed(seed, user, k, r)
                for name, model in models.items():
                    if adapts(name):
                        tuned = finetune(
                            model, support, steps=ev.finetune_steps, lr=budgets[name]["lr"],
                            optimizer=ev.finetune_optimizer, batch_size=ev.batch_size,
                            seed=ft_seed, adapt_names=budgets[name]["adapt_names"],
                            bn=ev.finetune_bn,
                        )
                        if name in head_feats:
                            pred = _predict_head(tuned, head_feats[name][te])
                        else:
                            pred = predict(tuned, images[te], ev.batch_size)
                    else:
                        pred = static[name][te]
                    s, p, bad = _rank_metrics(pred, scores[te])
                    degenerate[name][k] += int(bad)
                    per[name][k].setdefault(user, []).append((s, p))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    if all(not per[names[0]][k] for k in shots):
        raise ValueError(f"evaluate: none of the {len(users)} users has enough ratings for shots {shots}")

    methods_out: dict[str, dict[str, dict]] = {}
    for name in names:
        methods_out[name] = {}
        for k in shots:
            table = per[name][k]
            if not table:
                continue
            kept = sorted(table)
            arr = np.array([[sp[0] for sp in table[u]] for u in kept])  # [users, repeats]
            parr = np.array([[sp[1] for sp in table[u]] for u in kept])
            by_repeat = arr.mean(axis=0)  # user-averaged SROCC of each repeat
            pby_repeat = parr.mean(axis=0)
            ddof = 1 if repeats > 1 else 0
            methods_out[name][str(k)] = {
                "srocc_mean": float(arr.mean(axis=1).mean()),
                "srocc_std": float(by_repeat.std(ddof=ddof)),
                "plcc_mean": float(parr.mean(axis=1).mean()),
                "plcc_std": float(pby_repeat.std(ddof=ddof)),
                "per_user": {u: float(arr[i].mean()) for i, u in enumerate(kept)},
                "per_user_plcc": {u: float(parr[i].mean()) for i, u in enumerate(kept)},
                "n_users": len(kept),
                "degenerate": degenerate[name][k],
            }

    paired: dict[str, dict[str, dict]] = {}
    if REFERENCE_METHOD in methods_out:
        ref = methods_out[REFERENCE_METHOD]
        for other in names:
            if other == REFERENCE_METHOD:
                continue
            paired[f"{REFERENCE_METHOD} vs {other}"] = {
                ks: _paired(ref[ks]["per_user"], methods_out[other][ks]["per_user"])
                for ks in ref
                if ks in methods_out[other]
            }

    result = {
        "methods": methods_out,
        "paired": paired,
        "ceilings": ceilings(dataset, users),
        "users": len(users),
        "skipped": {str(k): v for k, v in skipped.items()},
        "shots": shots,
        "repeats": repeats,
        "seed": seed,
        "config": config_to_dict(cfg),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return result


def _paired(ref: Mapping[str, float], other: Mapping[str, float]) -> dict:
    """Mean and 95% CI of per-user differences ref − other over their common users."""
    common = sorted(set(ref) & set(other))
    diffs = np.array([ref[u] - other[u] for u in common], dtype=np.float64)
    mean, lo, hi = mean_ci95(diffs)
    return {
        "diff_mean": float(mean),
        "ci95": [float(lo), float(hi)],
        "n_users": len(common),
        "users_better": int((diffs > 0).sum()),
    }


def validation_srocc(cfg: JobConfig, dataset, model: nn.Module, users: Sequence[str], *,
                     shots: int, repeats: int) -> float:
    """Tune's metric: mean ``blg-piaa`` SROCC of `model` fine-tuned on `shots` shots of `users`.

    Uses the same protocol and budget as :func:`evaluate` (seeded by ``cfg.run.seed``), on
    validation users (training users held out of meta-training, never test users).
    """
    res = evaluate(cfg, dataset, {REFERENCE_METHOD: model}, shots=[shots], repeats=repeats,
                   users=users)
    return float(res["methods"][REFERENCE_METHOD][str(shots)]["srocc_mean"])


def format_table(result: Mapping) -> str:
    """The result as a plain-text table: methods × shots (SROCC mean ± std over repeats, PLCC),
    then ceilings and the paired differences."""
    shots = [str(k) for k in result.get("shots", [])] or sorted(
        {k for m in result["methods"].values() for k in m}, key=int
    )
    width = max([len("method")] + [len(n) for n in result["methods"]])
    head = f"{'method':<{width}}" + "".join(f" | {k + '-shot SROCC':>17} {'PLCC':>6}" for k in shots)
    lines = [head, "-" * len(head)]
    for name, by_k in result["methods"].items():
        row = f"{name:<{width}}"
        for k in shots:
            cell = by_k.get(k)
            if cell is None:
                row += f" | {'n/a':>17} {'':>6}"
            else:
                row += f" | {cell['srocc_mean']:>8.3f} ± {cell['srocc_std']:.3f}  {cell['plcc_mean']:>6.3f}"
        lines.append(row)
    ceil = result.get("ceilings")
    if ceil:
        lines.append(
            f"ceilings: oracle (user's noise-free score) {ceil['oracle']:.3f}, "
            f"average user {ceil['average_user']:.3f}"
        )
    for pair, by_k in result.get("paired", {}).items():
        parts = [
            f"{k}-shot {d['diff_mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
            f"({d['users_better']}/{d['n_users']} users better)"
            for k, d in by_k.items()
        ]
        lines.append(f"paired {pair}: " + "; ".join(parts))
    n_users = result.get("users")
    if n_users is not None:
        lines.append(
            f"{n_users} test users, {result.get('repeats')} repeats, seed {result.get('seed')}, "
            f"{result.get('seconds', 0):.0f}s"
        )
    return "\n".join(lines)
