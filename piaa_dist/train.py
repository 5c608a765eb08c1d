"""Meta-training: the outer loop of BLG-PIAA, written once for 1 rank and for N ranks.

The trainer never imports Ray or MLflow. Distribution enters through one function, ``reduce``:
a SUM over ranks of a flat tensor (``torch.distributed.all_reduce`` under Ray Train, ``None``
for a single process). Every meta-step packs this rank's

* summed meta-gradients (one slot per parameter),
* summed BatchNorm running statistics of the tasks' adapted models (``MetaGradient.buffers``),
* task count, summed query loss, summed support loss

into ONE flat float64 tensor, reduces it once, and divides by the *global* task count. Every
rank then holds the same averaged gradient and applies the same update, so the meta-learner
stays identical on all ranks without a DDP wrapper (DDP cannot double-backward; see
BACKGROUND.md).

Nothing depends on the rank: the task stream is a pure function of ``(seed, step, user)``;
each task's meta-gradient runs under a torch RNG seeded from the same triple (dropout masks);
and per-task results are summed in float64, where a sum of a few float32 values is exact, so
the order of the sum (which tasks met on which rank) does not change the result. On CPU, 1
and 2 workers therefore apply bit-identical updates (tests/test_train.py checks this).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from piaa_dist.config import JobConfig
from piaa_dist.meta import FAST, FLAVOURS

log = logging.getLogger(__name__)

#: SUM over ranks of a flat tensor (returns the summed tensor); ``None`` means a single rank.
Reduce = Callable[[torch.Tensor], torch.Tensor]
#: ``on_step(step_count, metrics, trainer)``, called after each meta-update on every rank.
OnStep = Callable[[int, dict, "MetaTrainer"], None]


def task_seed(seed: int, step: int, user: str) -> int:
    """A 63-bit RNG seed that depends only on ``(seed, step, user)``, never on rank or world size."""
    digest = hashlib.blake2b(f"{seed}:{step}:{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _to_cpu(obj: Any) -> Any:
    """Deep copy of a (nested) state with every tensor detached on CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class MetaTrainer:
    """Holds the meta-learner and its meta-optimizer and applies one meta-update per :meth:`step`.

    Args:
        cfg: the job config (``meta`` and ``run`` sections are used).
        model: the meta-learner (from ``piaa_dist.model.build_model``); moved to ``device``.
        device: compute device; default from ``cfg.run.use_gpu`` (CUDA when present on "auto").

    Attributes:
        step_count: meta-updates applied so far. It is also the sampler position: the task
            stream is a pure function of ``(seed, step)``, so a trainer restored at step ``s``
            continues with the same meta-batches an uninterrupted run would have seen.
    """

    def __init__(self, cfg: JobConfig, model: nn.Module, device: torch.device | None = None):
        from piaa_dist.gpu import require_cuda
        from piaa_dist.meta import meta_kwargs
        from piaa_dist.model import select_device, set_float32_precision

        if cfg.meta.flavour not in FLAVOURS:
            raise ValueError(f"meta.flavour: unknown {cfg.meta.flavour!r}; choose from {FLAVOURS}")
        self.cfg = cfg
        self.device = (torch.device(device) if device is not None
                       else select_device(cfg.run.use_gpu, "meta-training"))
        if self.device.type == "cuda":
            # A GPU handed in (e.g. by Ray) must be usable: fail here, naming the driver,
            # rather than in model.to() with CUDA's own message.
            require_cuda("meta-training")
            # float32 means float32 unless run.tf32 says otherwise (cuDNN convolutions use
            # TF32 by default on Ampere+, which the precision test does not cover).
            set_float32_precision(tf32=cfg.run.tf32)
        self.model = model.to(self.device)
        self.model.train()
        self.step_count = 0
        self._names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._sizes = [p.numel() for p in self._params]
        # Floating-point buffers are BatchNorm running statistics; integer ones
        # (num_batches_tracked) are counters that a mean would not make sense for.
        self._buffer_names = [
            n for n, b in self.model.named_buffers() if torch.is_floating_point(b)
        ]
        self._meta_kwargs = meta_kwargs(self.model, cfg.meta)
        # bf16 autocast of the backbone's forward passes only on CUDA (CPU runs stay float32 so
        # that the 1-vs-N-rank and resume checks hold); losses and targets are float32 (see
        # piaa_dist.meta.loss_fn), the reduce float64 unless run.allreduce_dtype says float32,
        # clipping and Adam float32.
        self.amp = bool(cfg.run.amp) and self.device.type == "cuda"
        if self.amp:
            log.warning(
                "run.amp: bf16 autocast on %s. Measured on ResNet-18 (CPU autocast as a stand-in), "
                "bf16 meta-gradients agree with float64 only to cosine ~0.8; the GPU configs run "
                "float32 (run.amp=false, see README: GPU clusters)", self.device,
            )
        self.optimizer = self._make_optimizer()
        self.last_grad: torch.Tensor | None = None  #: averaged flat meta-gradient of the last step
        #: Shortcuts of piaa_dist.meta.meta_gradient (all exact; meta.PLAIN to compare without).
        self.speedups = FAST
        #: Wall seconds of the last step's phases: ``inner_s`` (inner loops), ``outer_s``
        #: (query losses and outer gradients), ``allreduce_s``, ``update_s`` (meta-optimizer
        #: step). Kept out of :meth:`step`'s metrics, which are identical on every rank.
        self.last_phases: dict[str, float] = {}
        #: How this trainer's ranks talk (set by :func:`meta_train`): the SUM ``reduce`` (None
        #: for one rank), this rank and the world size. The step hook spreads validation with it.
        self.reduce: Reduce | None = None
        self.rank, self.world_size = 0, 1
        from piaa_dist.schedule import EarlyStopping

        #: validation-plateau rule and state (best score/step); part of :meth:`state_dict`
        self.early_stopping = EarlyStopping.from_config(cfg.run)

    # -----------------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        meta = self.cfg.meta
        if meta.flavour == "reptile":
            # piaa_dist.meta: the Reptile "gradient" averages to mean_i(meta - adapted_i); plain
            # SGD moves the meta weights meta_lr of the way towards the mean adapted weights
            # (meta_lr=1.0 is the public code's (adapted - meta)/4 per task for 4 tasks).
            return torch.optim.SGD(self._params, lr=meta.meta_lr)
        return torch.optim.Adam(self._params, lr=meta.meta_lr)

    def current_lr(self) -> float:
        """Meta learning rate at the current step (:func:`piaa_dist.schedule.meta_lr_at`:
        ``meta.lr_schedule`` with its warm-up).

        A pure function of ``step_count`` (no scheduler state), so a resumed trainer uses the
        same learning rate an uninterrupted one would.
        """
        from piaa_dist.schedule import meta_lr_at

        return meta_lr_at(self.cfg.meta, self.step_count)

    @property
    def flat_size(self) -> int:
        """Length of the flat tensor :meth:`local_flat` builds (what ``reduce`` receives)."""
        n_buf = sum(self.model.get_buffer(n).numel() for n in self._buffer_names)
        return sum(self._sizes) + n_buf + 3

    # -----------------------------------------------------------------------------------------
    def local_flat(self, tasks: Sequence[Any]) -> torch.Tensor:
        """This rank's contribution to one meta-step, packed as one flat float64 tensor.

        Layout: ``[grad sums (params) | BN running-stat sums (float buffers) | n_tasks,
        query-loss sum, support-loss sum]``. A rank with no tasks contributes zeros.

        Each task's meta-gradient is computed on its own and accumulated in float64: a sum of
        a few float32 numbers is then (nearly always) exact, so it does not depend on how the
        meta-batch was split over ranks or on the reduce order. That matters because Adam
        divides by the gradient's RMS: parameters whose true meta-gradient is ~0 (a bias
        followed by BatchNorm) would otherwise turn float32 summation noise into full-size,
        rank-count-dependent steps.

        Args:
            tasks: this rank's slice of the meta-batch (``piaa_dist.data.stream.Task``).
        """
        from piaa_dist.meta import meta_gradient
        from piaa_dist.model import autocast

        total = torch.zeros(self.flat_size, dtype=torch.float64, device=self.device)
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        inner_s = outer_s = 0.0
        for task in tasks:
            # A task seed from (seed, step, user): dropout masks do not depend on which rank
            # the task landed on, so 1 and N ranks compute the same meta-gradient.
            seed = task_seed(self.cfg.run.seed, self.step_count, task.user)
            with autocast(self.device, enabled=self.amp):
                mg = meta_gradient(
                    self.model, params, buffers, [_task_to(task, self.device)],
                    flavour=self.cfg.meta.flavour, seeds=[seed], speedups=self.speedups,
                    **self._meta_kwargs,
                )
            inner_s += mg.inner_s
            outer_s += mg.outer_s
            parts = []
            for name, p in zip(self._names, self._params):
                g = mg.grads.get(name)
                parts.append(torch.zeros(p.numel(), device=self.device) if g is None
                             else g.detach().reshape(-1))
            for name in self._buffer_names:
                b = mg.buffers.get(name)
                parts.append(torch.zeros(self.model.get_buffer(name).numel(), device=self.device)
                             if b is None else b.detach().reshape(-1))
            total[:-3] += torch.cat([t.to(torch.float64) for t in parts])
            total[-3:] += torch.tensor(
                [float(mg.n_tasks), float(mg.query_loss), float(mg.support_loss)],
                dtype=torch.float64, device=self.device,
            )
        self.last_phases = {"inner_s": inner_s, "outer_s": outer_s}
        return total

    def apply_flat(self, total: torch.Tensor) -> dict[str, float]:
        """Apply the meta-update from the SUM over all ranks of :meth:`local_flat` tensors.

        Divides by the global task count, sets ``.grad``, clips the gradient norm, steps the
        meta-optimizer and installs the averaged BatchNorm statistics. Deterministic given
        ``total``, so every rank that receives the same ``total`` ends with the same weights.

        Returns:
            metrics: ``query_loss``, ``support_loss`` (global means), ``grad_norm`` (before
            clipping), ``lr``, ``tasks`` (global count).

        Raises:
            ValueError: the meta-batch had no tasks on any rank.
        """
        from piaa_dist.meta import apply_buffer_update

        n_grad = sum(self._sizes)
        n_tasks, q_sum, s_sum = (float(x) for x in total[-3:].tolist())
        if n_tasks <= 0:
            raise ValueError("meta-step with no tasks on any rank (meta.meta_batch too small?)")
        grad = (total[:n_grad] / n_tasks).to(torch.float32)
        offset = 0
        for p, size in zip(self._params, self._sizes):
            p.grad = grad[offset : offset + size].view_as(p).to(p.dtype).clone()
            offset += size
        clip = self.cfg.meta.grad_clip
        norm = torch.linalg.vector_norm(grad).item()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, clip)
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._buffer_names:
            # Running statistics are not learned by gradients: they become one EMA update with
            # the meta-batch's task-averaged query statistics (see piaa_dist.meta).
            sums, offset = {}, n_grad
            for name in self._buffer_names:
                buf = self.model.get_buffer(name)
                # float64 sums: apply_buffer_update divides before copy_ casts to float32.
                sums[name] = total[offset : offset + buf.numel()].view_as(buf)
                offset += buf.numel()
            apply_buffer_update(self.model, sums, int(round(n_tasks)))
        self.last_grad = grad.detach()
        self.step_count += 1
        return {
            "query_loss": q_sum / n_tasks,
            "support_loss": s_sum / n_tasks,
            "grad_norm": norm,
            "lr": lr,
            "tasks": n_tasks,
        }

    def step(self, tasks: Sequence[Any], reduce: Reduce | None = None) -> dict[str, float]:
        """One meta-update: local meta-gradients → ``reduce`` (SUM) → global mean → update.

        Args:
            tasks: this rank's slice of the meta-batch.
            reduce: SUM over ranks of a flat tensor; ``None`` for a single rank.

        Returns:
            metrics of the step (see :meth:`apply_flat`); identical on every rank.
        """
        flat = self.local_flat(tasks)
        phases = self.last_phases
        t0 = time.perf_counter()
        if reduce is not None:
            flat = self.reduce_flat(flat, reduce)
        t1 = time.perf_counter()
        metrics = self.apply_flat(flat)
        self.last_phases = {**phases, "allreduce_s": t1 - t0, "update_s": time.perf_counter() - t1}
        return metrics

    def reduce_flat(self, flat: torch.Tensor, reduce: Reduce) -> torch.Tensor:
        """SUM over ranks of this rank's float64 :meth:`local_flat`, in ``run.allreduce_dtype``.

        ``"float64"`` (the default) sends the float64 sums as they are: exact, so 1 and N ranks
        apply bit-identical updates. ``"float32"`` halves the bytes on the wire: each rank's sum
        is rounded to float32 and the ranks' sums are added in float32 (a relative error of
        about 1e-7 per element, order-dependent across ranks); the result comes back as float64
        so :meth:`apply_flat` is unchanged. ``benchmarks/allreduce.py`` measures both.
        """
        if self.cfg.run.allreduce_dtype == "float32":
            return reduce(flat.to(torch.float32)).to(torch.float64)
        return reduce(flat)

    def sync_from_rank0(self, reduce: Reduce, rank: int) -> None:
        """Make every rank's weights equal rank 0's using only the SUM reduce.

        Rank 0 contributes its parameters and float buffers, the others zeros; ``x + 0 == x``
        exactly, so afterwards all ranks hold rank 0's values bit for bit (protects against
        non-deterministic initialisation, e.g. different pretrained files per node).
        """
        tensors = [p.data for p in self._params] + [
            self.model.get_buffer(n) for n in self._buffer_names
        ]
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        if rank != 0:
            flat.zero_()
        flat = reduce(flat)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    # -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: ``{"model", "optimizer", "step", "early_stopping"}``,
        tensors on CPU (the early-stopping state: best validation score and step, validations
        since, whether it stopped)."""
        return {
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "step": int(self.step_count),
            "early_stopping": self.early_stopping.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (model weights, optimizer moments, sampler position,
        early-stopping state; a state saved before early stopping existed starts it fresh)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        if state.get("early_stopping") is not None:
            self.early_stopping.load_state_dict(state["early_stopping"])


def _task_to(task: Any, device: torch.device) -> Any:
    """The task with its tensors on ``device`` (a no-op on CPU)."""
    if device.type == "cpu":
        return task
    import dataclasses

    return dataclasses.replace(
        task,
        support=tuple(t.to(device, non_blocking=True) for t in task.support),
        query=tuple(t.to(device, non_blocking=True) for t in task.query),
    )


# ---------------------------------------------------------------------------------------------


def meta_training_users(cfg: JobConfig, dataset: Any) -> list[str]:
    """Training users minus the validation users (which meta-training never sees)."""
    train = dataset.users("train")
    val = set(validation_users(cfg, dataset))
    users = [u for u in train if u not in val]
    if not users:
        raise ValueError(
            f"no meta-training users: {len(train)} training users, "
            f"{len(val)} held out for validation (data.validation_users)"
        )
    return users


def _meta_training_rows(cfg: JobConfig, dataset: Any) -> Any:
    """:func:`meta_training_users` as dataset rows where the dataset offers them: the same
    users in the same order, without a Python string per user (a million-user dataset)."""
    if not hasattr(dataset, "user_indices"):
        return meta_training_users(cfg, dataset)
    from piaa_dist.data.stream import split_validation_indices

    rows, _ = split_validation_indices(dataset.user_indices("train"), cfg.data.validation_users, cfg.run.seed)
    if not len(rows):
        return meta_training_users(cfg, dataset)  # raises the usual error
    return rows


def validation_users(cfg: JobConfig, dataset: Any) -> list[str]:
    """The held-out validation users (the data plane's seeded split of the training users)."""
    from piaa_dist.data.stream import validation_users as split

    return split(dataset.users("train"), cfg.data.validation_users, cfg.run.seed)


def meta_train(
    cfg: JobConfig,
    dataset: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    reduce: Reduce | None = None,
    resume: Mapping[str, Any] | str | Path | None = None,
    on_step: OnStep | None = None,
    device: torch.device | None = None,
) -> MetaTrainer:
    """Meta-train until ``cfg.meta.meta_steps`` updates have been applied, or until early
    stopping fires (``run.patience``: ``on_step`` feeds it validation scores).

    Args:
        cfg: job config.
        dataset: an opened ``piaa_dist.data.stream.Dataset``.
        rank: this process's rank; it streams ``batch[rank::world_size]`` of every meta-batch.
        world_size: number of ranks.
        reduce: SUM over ranks (``None`` for one rank).
        resume: a :meth:`MetaTrainer.state_dict` (or a folder written by
            ``piaa_dist.checkpoint.save_training_state``) to continue from.
        on_step: called as ``on_step(step_count, metrics, trainer)`` after every update, on
            every rank (checkpointing, reporting). ``metrics`` adds ``data_s`` (time waiting
            for this rank's tasks), ``step_s`` (wall time of the whole step), ``cpu_s`` (this
            process's CPU time in the step, all threads) and the step's phases
            (:attr:`MetaTrainer.last_phases`: ``inner_s``, ``outer_s``, ``allreduce_s``,
            ``update_s``) to :meth:`MetaTrainer.apply_flat`'s.
        device: compute device (default from ``cfg.run.use_gpu``).

    Returns:
        The trainer after the last update (``trainer.model`` is the meta-learner).
    """
    from piaa_dist.data.stream import TaskStream
    from piaa_dist.model import build_model

    # Same seed on every rank -> same initial weights; sync_from_rank0 below makes it exact.
    torch.manual_seed(cfg.run.seed)
    trainer = MetaTrainer(cfg, build_model(cfg.model), device)
    trainer.reduce, trainer.rank, trainer.world_size = reduce, rank, world_size
    if resume is not None:
        if isinstance(resume, (str, Path)):
            from piaa_dist.checkpoint import load_training_state

            resume = load_training_state(resume)
        trainer.load_state_dict(resume)
        if rank == 0:
            log.info("resuming meta-training at step %d", trainer.step_count)
    elif reduce is not None and world_size > 1:
        trainer.sync_from_rank0(reduce, rank)

    users = _meta_training_rows(cfg, dataset)
    if rank == 0:
        log.info(
            "meta-training on %d users, %d steps x %d tasks, %s, %d rank(s) on %s",
            len(users), cfg.meta.meta_steps, cfg.meta.meta_batch, cfg.meta.flavour,
            world_size, trainer.device,
        )
    if trainer.step_count >= cfg.meta.meta_steps or trainer.early_stopping.stopped:
        return trainer
    stream = TaskStream(
        dataset,
        users,
        rank=rank,
        world_size=world_size,
        meta_batch=cfg.meta.meta_batch,
        shots=cfg.data.shots,
        query_size=cfg.data.query_size,
        image_size=cfg.data.image_size,
        augment=cfg.data.augment,
        seed=cfg.run.seed,
        start_step=trainer.step_count,
        num_steps=cfg.meta.meta_steps - trainer.step_count,
    )
    batches = iter(stream)
    # on_step (the step hook) feeds validation scores to trainer.early_stopping on every rank
    # alike, so every rank leaves this loop after the same step.
    while trainer.step_count < cfg.meta.meta_steps and not trainer.early_stopping.stopped:
        c0 = time.process_time()
        t0 = time.perf_counter()
        step, tasks = next(batches)
        t1 = time.perf_counter()
        if step != trainer.step_count:
            raise RuntimeError(f"task stream at step {step}, trainer at {trainer.step_count}")
        metrics = trainer.step(tasks, reduce)
        metrics.update(trainer.last_phases)
        metrics["data_s"] = t1 - t0
        metrics["step_s"] = time.perf_counter() - t0
        metrics["cpu_s"] = time.process_time() - c0
        if rank == 0 and (
            trainer.step_count % max(1, cfg.run.log_every) == 0
            or trainer.step_count == cfg.meta.meta_steps
        ):
            log.info(
                "step %d/%d query_loss %.4f support_loss %.4f grad_norm %.3g lr %.3g (%.2fs/step)",
                trainer.step_count, cfg.meta.meta_steps, metrics["query_loss"],
                metrics["support_loss"], metrics["grad_norm"], metrics["lr"], metrics["step_s"],
            )
        if on_step is not None:
            on_step(trainer.step_count, metrics, trainer)
    if trainer.early_stopping.stopped:
        batches.close()  # the stream's prefetch thread: nothing more is needed
        if rank == 0:
            log.info("early stopping at step %d/%d: %s", trainer.step_count, cfg.meta.meta_steps,
                     trainer.early_stopping.describe())
    return trainer
