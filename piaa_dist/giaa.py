"""The conventional prior: a generic (GIAA) model trained on all training users' ratings pooled.

This is the baseline BLG-PIAA is compared against (`giaa-finetune` in :mod:`piaa_dist.evaluate`):
the *same* architecture as the meta-learner, trained by plain supervised learning on every
(image, score) pair of the training users, so it learns the population-average user. At
meta-test time it is fine-tuned on a test user's k shots with exactly the budget the
meta-learner gets, so the only difference between the two methods is the prior.

Training is MSE on ``score / 5`` (the model's sigmoid output lives in (0, 1), as in the
reference code) with Adam and a cosine learning-rate decay; every random choice (initial
weights, minibatches, augmentation, dropout) derives from ``cfg.run.seed`` so the same config
gives the same model.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from piaa_dist.config import JobConfig
from piaa_dist.data.decode import decode_batch
from piaa_dist.errors import DataError
from piaa_dist.model import build_model

log = logging.getLogger(__name__)

# Offset so the GIAA model's streams of random numbers never coincide with the meta-learner's
# (which also start from cfg.run.seed): the two priors must not share an initialization by accident.
_SEED_OFFSET = 7919

# Decode every pooled image once (instead of once per visit) when they fit in this many bytes
# as float32 and there is no augmentation: at CPU sizes that removes most of the cost of a step.
_PREDECODE_BYTES = 512 * 2**20


class HeldOutUserError(DataError):
    """The GIAA training pool names a user it must never see (a test or validation user)."""


def check_training_users(cfg: JobConfig, dataset, users: Sequence[str]) -> None:
    """Refuse a GIAA training pool that holds a test user or a validation user.

    The baseline is compared with the meta-learner on the test users and the validation users
    make choices (Tune's metric, the best checkpoint): a prior that saw their ratings would be
    scored on its own training data. :func:`piaa_dist.train.meta_training_users` is the pool
    that passes: the very users the meta-learner is trained on.

    Raises:
        HeldOutUserError: naming the held-out users found in `users` (up to 5 of each kind).
    """
    # imported here, as train imports its own helpers: giaa stays importable on its own
    from piaa_dist.train import validation_users

    pool = set(users)
    problems = []
    for kind, held in (("test", dataset.users("test")), ("validation", validation_users(cfg, dataset))):
        found = sorted(pool.intersection(held))
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            problems.append(f"{len(found)} {kind} user(s) ({shown})")
    if problems:
        where = getattr(dataset, "url", None)
        raise HeldOutUserError(
            f"GIAA training users{f' of {where}' if where else ''} include {' and '.join(problems)}; "
            "the baseline must never train on held-out users (use train.meta_training_users)"
        )


def train_giaa(
    cfg: JobConfig,
    dataset,
    users: Sequence[str],
    *,
    progress: bool = False,
    device: torch.device | None = None,
) -> nn.Module:
    """Train the generic model on the pooled ratings of `users`.

    Args:
        cfg: job config; uses ``model`` (architecture), ``data.image_size`` / ``data.augment``
            (the same input pipeline as meta-training support sets), ``giaa.steps``,
            ``giaa.batch_size``, ``giaa.lr`` and ``run.seed``.
        dataset: a :class:`piaa_dist.data.stream.Dataset` (anything with ``load_user``).
        users: the training users whose ratings are pooled: never a test or validation user
            (:func:`check_training_users` refuses them); callers pass
            :func:`piaa_dist.train.meta_training_users`, so both priors see the same data.
        progress: show a tqdm bar over optimization steps.
        device: where to train; CPU by default.

    Returns:
        The trained model on CPU, in eval mode.

    Raises:
        ValueError: when `users` is empty or they have no ratings at all.
        HeldOutUserError: `users` holds a test or validation user (names them).
    """
    users = list(users)
    if not users:
        raise ValueError("train_giaa needs at least one training user")
    check_training_users(cfg, dataset, users)
    device = device or torch.device("cpu")
    seed = int(cfg.run.seed) + _SEED_OFFSET

    # Pool every rating: the jpeg bytes stay compressed in memory and are decoded per batch,
    # which keeps memory flat for big pools and gives fresh augmentation each time.
    jpegs: list[bytes] = []
    targets: list[float] = []
    for user in users:
        ratings = dataset.load_user(user)
        jpegs.extend(ratings.jpegs)
        targets.extend((np.asarray(ratings.scores, dtype=np.float32) / 5.0).tolist())
    if not jpegs:
        raise ValueError(f"train_giaa: the {len(users)} training users have no ratings")
    target_t = torch.tensor(targets, dtype=torch.float32)
    n = len(jpegs)
    log.info("GIAA: training on %d pooled ratings of %d users for %d steps",
             n, len(users), cfg.giaa.steps)

    torch.manual_seed(seed)
    model = build_model(cfg.model).to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.giaa.lr)
    # Cosine decay to zero: pooled ratings are very noisy targets (every user's own taste and
    # scale use is noise to the average user), so a constant learning rate leaves the model
    # jittering around the optimum and its quality depends on the exact stopping step.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(cfg.giaa.steps)))
    gen = torch.Generator().manual_seed(seed)
    batch = min(int(cfg.giaa.batch_size), n)
    size = int(cfg.data.image_size)
    decoded = None
    if not cfg.data.augment and n * 3 * size * size * 4 <= _PREDECODE_BYTES:
        decoded = decode_batch(jpegs, size, False)

    steps = range(int(cfg.giaa.steps))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="giaa", unit="step")
    # Epoch-style sampling without replacement: every rating is seen equally often.
    order = torch.randperm(n, generator=gen)
    pos = 0
    running = None
    for step in steps:
        if pos + batch > n:
            order = torch.randperm(n, generator=gen)
            pos = 0
        idx = order[pos : pos + batch]
        pos += batch
        if decoded is not None:
            images = decoded[idx].to(device)
        else:
            images = decode_batch([jpegs[i] for i in idx.tolist()], size, cfg.data.augment, gen).to(device)
        loss = F.mse_loss(model(images), target_t[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if progress:
            steps.set_postfix(loss=f"{running:.4f}")
        elif cfg.run.log_every and (step + 1) % max(1, cfg.run.log_every * 10) == 0:
            log.debug("GIAA step %d: loss %.4f", step + 1, running)
    log.info("GIAA: final smoothed training loss %.4f", running if running is not None else float("nan"))
    model.eval()
    return model.cpu()
