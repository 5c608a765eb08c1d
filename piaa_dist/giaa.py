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
        device: where to train; CPU by default. A CUDA device must be usable (else
            :class:`piaa_dist.gpu.GpuUnavailable`, naming the driver found and needed).

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
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        from piaa_dist.gpu import require_cuda

        require_cuda("GIAA training")
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

    total = int(cfg.giaa.steps)
    log_every = max(1, cfg.run.log_every * 10) if cfg.run.log_every else 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="giaa", unit="step")
    pin = device.type == "cuda"
    # Sampling and decoding run in a background thread, one batch ahead of the model, in the
    # same order as a single-threaded loop (so the same seed gives the same model); the loss is
    # read back from the device only when it is logged, so a GPU is never waited on per step.
    batches = _Prefetch(_batches(jpegs, target_t, gen, batch, size, cfg.data.augment, decoded,
                                 total, pin), depth=2)
    running = None
    try:
        for step, (images, targets) in enumerate(batches):
            images = images.to(device, non_blocking=pin)
            targets = targets.to(device, non_blocking=pin)
            loss = F.mse_loss(model(images), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            # An exponential average kept on the device (no .item() per step).
            running = loss.detach().clone() if running is None else running.mul_(0.9).add_(loss.detach(), alpha=0.1)
            if bar is not None:
                bar.update(1)
            if log_every and (step + 1) % log_every == 0:
                value = float(running)  # the one sync, every log_every * 10 steps
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.4f}")
                else:
                    log.debug("GIAA step %d: loss %.4f", step + 1, value)
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    running = float(running) if running is not None else None
    log.info("GIAA: final smoothed training loss %.4f", running if running is not None else float("nan"))
    model.eval()
    return model.cpu()


def _batches(jpegs: Sequence[bytes], targets: torch.Tensor, gen: torch.Generator, batch: int,
             size: int, augment: bool, decoded: torch.Tensor | None, steps: int, pin: bool):
    """The training batches ``(images, targets)``: epochs of a seeded permutation of the pool.

    Every draw from ``gen`` (permutations, augmentation) happens here, in step order, so the
    batches do not depend on which thread produces them.
    """
    n = len(jpegs)
    # Epoch-style sampling without replacement: every rating is seen equally often.
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch > n:
            order = torch.randperm(n, generator=gen)
            pos = 0
        idx = order[pos : pos + batch]
        pos += batch
        if decoded is not None:
            images = decoded[idx]
        else:
            images = decode_batch([jpegs[i] for i in idx.tolist()], size, augment, gen)
        ys = targets[idx]
        if pin:  # page-locked, so the copy to the GPU can overlap the previous step
            images, ys = images.pin_memory(), ys.pin_memory()
        yield images, ys


class _Prefetch:
    """Iterate ``source`` in a background thread, at most ``depth`` items ahead.

    An exception in the producer is re-raised by the consumer; :meth:`close` stops the producer
    (it is a daemon thread either way).
    """

    _DONE = object()

    def __init__(self, source, depth: int = 2):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True,
                                        name="giaa-prefetch")
        self._thread.start()

    def _run(self, source) -> None:
        import queue

        try:
            for item in source:
                while not self._stop.is_set():
                    try:
                        self._queue.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put((True, self._DONE))
        except BaseException as err:  # handed to the consumer, which raises it
            self._queue.put((False, err))

    def __iter__(self):
        while True:
            ok, item = self._queue.get()
            if not ok:
                raise item
            if item is self._DONE:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
