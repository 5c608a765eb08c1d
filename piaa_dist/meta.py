"""Bilevel meta-learning as small pure functions over parameter dicts.

Everything here works on ``params`` / ``buffers`` dicts (``dict(model.named_parameters())``,
``dict(model.named_buffers())``) through :func:`torch.func.functional_call`, so the module's
own tensors are never reassigned and nothing here knows about processes or ranks.

Inner level (:func:`adapt`): a few functional SGD or Adam steps on a task's **support** set.
Outer level (:func:`meta_gradient`): the adapted model's loss on the task's **query** set,
differentiated w.r.t. the meta parameters in one of three flavours:

``second_order``
    Exact MAML: backpropagate the query loss through the unrolled inner loop
    (``create_graph=True``), so d L_q(θ'(θ)) / dθ including the Hessian terms.
``first_order``
    FOMAML: ∇L_q evaluated at the adapted θ' and used as the gradient w.r.t. θ (the inner
    loop's Jacobian is treated as the identity).
``reptile``
    The public BLG-PIAA code's Reptile-like update: adapt ``steps`` steps on the support
    set, then ``steps`` more steps on the query set (the same optimizer state carries over,
    as the reference keeps one optimizer), and return the "gradient" ``θ − θ_adapted``.
    Composition with the meta optimizer: the trainer divides the all-reduced sum by the
    global task count, giving ``mean_i(θ − θ_i)``; a plain SGD meta step with ``meta_lr=1.0``
    then moves ``θ ← θ + mean_i(θ_i − θ) = θ + Σ_i (θ_i − θ) / meta_batch``: the reference's
    ``(adapted − meta) / 4`` per task for a meta-batch of 4. (Equivalently, SGD with lr
    ``1 / meta_batch`` on the un-averaged sum.) Two deliberate differences from the
    reference: (a) every task's move is measured from the meta weights at the start of the
    step, whereas the reference applies the moves sequentially, each measured from the
    already-moved weights, which weights task i by ``(1/4)(3/4)^(3-i)`` (order-dependent and
    not distributable; its total step length is ``1 − (3/4)^4 ≈ 0.68``, which ``meta_lr=0.68``
    reproduces on average); (b) the inner Adam state starts fresh for every task (the
    reference carries one Adam state across all tasks and epochs). With an Adam meta
    optimizer, or gradient clipping, the difference is used as a direction, not a step.

BatchNorm, deliberately
-----------------------
* Every forward pass inside :func:`adapt` and :func:`meta_gradient` runs the model in
  **train mode**: BatchNorm normalises with the batch's statistics (the support batch in the
  inner loop, the query batch in the outer loss), as in MAML. The statistics are therefore a
  differentiable function of the (adapted) parameters, and the second-order gradient
  includes that path.
* The buffers passed in are **never mutated**: each forward gets a fresh copy of the meta
  buffers (train-mode BN updates running statistics in place, and ``functional_call``
  reflects in-place updates into the dict it was given).
* The meta-learner's running statistics are updated **explicitly**: for each task, the query
  forward at the adapted parameters updates a fresh copy of the meta buffers, i.e.
  ``r_task = (1 − m)·r + m·stats(query | θ')`` (m = the BN module's momentum). Because that is
  linear in the batch statistics, the mean of ``r_task`` over the step's tasks equals one EMA
  update with the task-averaged statistics. :class:`MetaGradient` returns the **sum** of the
  ``r_task`` (floating buffers only); the trainer all-reduces it with the gradients and
  calls :func:`apply_buffer_update` with the global task count. The result depends only on
  the set of tasks, so 1 and 2 workers agree (up to float summation order). Eval-mode
  prediction (:func:`predict`) after adaptation then uses running statistics of *adapted*
  models on users' images, not of the un-adapted meta model or of a single user.

Dropout follows the module's configured probability and the global torch RNG. Pass
``seeds`` to :func:`meta_gradient` to run each task under its own seeded RNG (a pure
function of the task, so independent of rank and world size); tests use dropout 0.

Losses in :class:`MetaGradient` are **sums** over this call's tasks of per-task means, like
the gradients, so the trainer reduces them the same way.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# FLAVOURS / OPTIMIZERS live in config.py (validated at load); re-exported here, never retyped.
from piaa_dist.config import FLAVOURS, OPTIMIZERS, MetaConfig

Tensor = torch.Tensor
Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]


#: Functional Adam hyper-parameters (torch.optim.Adam's defaults).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Added under the square root of Adam's second moment: d sqrt(v)/dv is infinite at v = 0 (a
# parameter whose gradient is exactly zero), which would turn the second-order gradient into
# NaN (inf · 0). 1e-30 changes sqrt(v) by at most 1e-15, far below ADAM_EPS.
_ADAM_SQRT_FLOOR = 1e-30


@dataclass
class MetaGradient:
    """One call's contribution to a meta-update.

    Attributes:
        grads: name → gradient w.r.t. the meta parameters, **summed** over this call's tasks
            (detached). For ``reptile`` this is ``Σ_i (θ − θ_i)``.
        n_tasks: number of tasks summed.
        query_loss: sum over tasks of the mean query MSE at the support-adapted parameters.
        support_loss: sum over tasks of the mean support MSE at the meta parameters (before
            adaptation).
        buffers: name → sum over tasks of the per-task updated floating buffers (BatchNorm
            running mean/var); integer buffers (``num_batches_tracked``) are not included.
            See :func:`apply_buffer_update`.
    """

    grads: dict[str, Tensor]
    n_tasks: int
    query_loss: float
    support_loss: float
    buffers: dict[str, Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Small helpers


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Temporarily put `model` in train/eval mode (public API only), restoring every submodule."""
    before = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, was in before:
            m.training = was


def _fresh(buffers: Mapping[str, Tensor]) -> Params:
    """Copies of the buffers, so train-mode BatchNorm updates land on scratch tensors."""
    return {k: v.clone() for k, v in buffers.items()}


def _to_device(batch: Batch, device: torch.device, dtype: torch.dtype) -> Batch:
    images, targets = batch
    return (
        images.to(device=device, dtype=dtype, non_blocking=True),
        targets.to(device=device, dtype=dtype, non_blocking=True),
    )


def _lr_of(inner_lr: float | Mapping[str, float], name: str) -> float:
    if isinstance(inner_lr, Mapping):
        return float(inner_lr[name])
    return float(inner_lr)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run under a private RNG seeded with `seed` (None: the caller's RNG, untouched)."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------
# Losses and prediction


def loss_fn(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
            batch: Batch) -> Tensor:
    """Mean squared error between the model's prediction and the targets (``score / 5``).

    Runs ``model`` functionally with ``params`` and ``buffers`` in the module's current
    mode. In train mode BatchNorm updates the running statistics **in place in ``buffers``**;
    pass copies when that matters (:func:`adapt` and :func:`meta_gradient` do).

    Args:
        model: the module whose forward is used (its own tensors are not used or changed).
        params: name → parameter tensor (all of the model's parameters).
        buffers: name → buffer tensor.
        batch: ``(images [N,3,S,S], targets [N])``.

    Returns:
        Scalar loss tensor, at least float32: under reduced-precision autocast the prediction
        is compared with float32 targets in float32 (never targets rounded to bf16, whose
        resolution near 0.6 is ~0.004, a large part of a typical residual); a float64 model
        keeps float64.
    """
    images, targets = batch
    pred = functional_call(model, (dict(params), dict(buffers)), (images,))
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return F.mse_loss(pred.to(dtype), targets.to(dtype))


@torch.no_grad()
def predict(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
            images: Tensor, *, batch_size: int | None = None) -> Tensor:
    """Eval-mode prediction (running BatchNorm statistics, no dropout) with given parameters.

    Args:
        model: the module.
        params: e.g. the output of :func:`adapt`.
        buffers: running statistics to use, normally the meta-learner's.
        images: ``[N,3,S,S]``.
        batch_size: split the forward into chunks of this size (None: one pass).

    Returns:
        ``[N]`` predictions in ``(0, 1)``, detached.
    """
    with _mode(model, False):
        chunks = [images] if not batch_size else list(torch.split(images, batch_size))
        preds = [functional_call(model, (dict(params), dict(buffers)), (c,)) for c in chunks]
    return torch.cat(preds).detach()


# ---------------------------------------------------------------------------------------------
# Inner loop


@dataclass
class _AdamState:
    step: int = 0
    exp_avg: dict[str, Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, Tensor] = field(default_factory=dict)


def _inner_loop(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batch: Batch,
    *,
    steps: int,
    inner_lr: float | Mapping[str, float],
    optimizer: str,
    names: Sequence[str],
    create_graph: bool,
    adam: _AdamState | None,
) -> tuple[Params, Tensor | None]:
    """``steps`` functional optimizer steps on `batch`; returns (params, loss at the start)."""
    # Tensors to differentiate must be in the graph: a detached one becomes a new leaf.
    current: Params = {
        n: (p.detach().requires_grad_(True) if n in names and not p.requires_grad else p)
        for n, p in params.items()
    }
    first_loss: Tensor | None = None
    for _ in range(steps):
        loss = loss_fn(model, current, _fresh(buffers), batch)
        if first_loss is None:
            first_loss = loss.detach()
        inputs = [current[n] for n in names]
        grads = torch.autograd.grad(
            loss, inputs, create_graph=create_graph, allow_unused=True, materialize_grads=True
        )
        if optimizer == "sgd":
            for n, p, g in zip(names, inputs, grads):
                current[n] = p - _lr_of(inner_lr, n) * g
        else:
            assert adam is not None
            adam.step += 1
            b1, b2 = ADAM_BETAS
            bc1 = 1.0 - b1**adam.step
            bc2 = 1.0 - b2**adam.step
            for n, p, g in zip(names, inputs, grads):
                m = adam.exp_avg.get(n)
                v = adam.exp_avg_sq.get(n)
                m = (1.0 - b1) * g if m is None else b1 * m + (1.0 - b1) * g
                v = (1.0 - b2) * g * g if v is None else b2 * v + (1.0 - b2) * g * g
                adam.exp_avg[n], adam.exp_avg_sq[n] = m, v
                denom = torch.sqrt(v / bc2 + _ADAM_SQRT_FLOOR) + ADAM_EPS
                current[n] = p - _lr_of(inner_lr, n) * (m / bc1) / denom
    return current, first_loss


def _check_names(params: Mapping[str, Tensor], adapt_names: Any) -> list[str]:
    if adapt_names is None:
        return list(params)
    names = [n for n in params if n in set(adapt_names)]
    unknown = set(adapt_names) - set(params)
    if unknown:
        raise ValueError(f"adapt_names not among the parameters: {sorted(unknown)[:5]}")
    return names


def _check_optimizer(optimizer: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"inner optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    support: Batch,
    *,
    steps: int,
    inner_lr: float | Mapping[str, float],
    optimizer: str = "sgd",
    adapt_names: Sequence[str] | set[str] | None = None,
    create_graph: bool = False,
) -> Params:
    """Adapt parameters to a support set with a differentiable functional optimizer.

    Forward passes run in train mode (batch statistics, dropout as configured) on fresh
    copies of ``buffers``, which are never modified.

    Args:
        model: the module.
        params: meta parameters, name → tensor. An adapted tensor that does not require
            grad starts as a new leaf; pass detached copies (e.g. at meta-test time) to get
            a result that is not connected to the model's parameters.
        buffers: BatchNorm buffers (not modified).
        support: ``(images, targets)``.
        steps: number of optimizer steps (0 returns ``params`` unchanged).
        inner_lr: step size, or name → step size (e.g. a larger one for the head).
        optimizer: ``"sgd"`` or ``"adam"`` (functional Adam with torch's default betas/eps;
            its state starts fresh on every call).
        adapt_names: parameter names to adapt (e.g. :func:`piaa_dist.model.head_names`);
            None adapts all. The others are returned as the very same tensors.
        create_graph: keep the graph of the inner gradients so the result can be
            differentiated through (second-order); without it the result is ``θ − Σ lr·g``
            with the g's constant, whose Jacobian w.r.t. θ is the identity (first-order).

    Returns:
        New dict name → adapted tensor (same keys as ``params``).
    """
    _check_optimizer(optimizer)
    names = _check_names(params, adapt_names)
    with _mode(model, True):
        adapted, _ = _inner_loop(
            model, params, buffers, support, steps=steps, inner_lr=inner_lr,
            optimizer=optimizer, names=names, create_graph=create_graph,
            adam=_AdamState() if optimizer == "adam" else None,
        )
    return adapted


# ---------------------------------------------------------------------------------------------
# Outer level


def meta_gradient(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    tasks: Sequence[Any],
    *,
    flavour: str,
    steps: int,
    inner_lr: float | Mapping[str, float],
    optimizer: str = "sgd",
    adapt_names: Sequence[str] | set[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> MetaGradient:
    """Meta-gradient of this call's tasks, summed (see the module docstring for flavours).

    Args:
        model: the module (its tensors are neither used nor changed).
        params: meta parameters, ``dict(model.named_parameters())``.
        buffers: meta buffers, ``dict(model.named_buffers())`` (not modified).
        tasks: objects with ``.support`` and ``.query`` ``(images, targets)`` pairs, e.g.
            :class:`piaa_dist.data.stream.Task`. Tensors are moved to the params' device.
        flavour: ``"second_order"``, ``"first_order"`` or ``"reptile"``.
        steps: inner steps (reptile: on the support, then as many on the query).
        inner_lr: inner step size (float or name → float).
        optimizer: inner optimizer, ``"sgd"`` or ``"adam"``.
        adapt_names: parameters adapted in the inner loop (None: all). For ``reptile`` the
            others get a zero "gradient".
        seeds: one RNG seed per task for dropout (None: use the global RNG as is).

    Returns:
        :class:`MetaGradient` with summed grads, losses and BatchNorm buffers.

    Raises:
        ValueError: unknown flavour/optimizer, or ``seeds`` of the wrong length.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"meta flavour must be one of {FLAVOURS}, got {flavour!r}")
    _check_optimizer(optimizer)
    if seeds is not None and len(seeds) != len(tasks):
        raise ValueError(f"got {len(seeds)} seeds for {len(tasks)} tasks")
    names = _check_names(params, adapt_names)
    ref = next(iter(params.values()))
    device, dtype = ref.device, ref.dtype

    # Leaves owned by this call: the caller's tensors are neither differentiated into (no
    # .grad side effects) nor kept alive by our graphs.
    meta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    grad_sum = {n: torch.zeros_like(p) for n, p in meta.items()}
    float_buffers = [n for n, b in buffers.items() if b.is_floating_point()]
    buffer_sum = {n: torch.zeros_like(buffers[n]) for n in float_buffers}
    query_sum = torch.zeros((), device=device, dtype=torch.float64)
    support_sum = torch.zeros((), device=device, dtype=torch.float64)

    with _mode(model, True):
        for i, task in enumerate(tasks):
            support = _to_device(task.support, device, dtype)
            query = _to_device(task.query, device, dtype)
            with _seeded(None if seeds is None else int(seeds[i])):
                adam = _AdamState() if optimizer == "adam" else None
                adapted, first = _inner_loop(
                    model, meta, buffers, support, steps=steps, inner_lr=inner_lr,
                    optimizer=optimizer, names=names,
                    create_graph=(flavour == "second_order"), adam=adam,
                )
                if first is None:  # steps == 0: still report the support loss
                    with torch.no_grad():
                        first = loss_fn(model, meta, _fresh(buffers), support)
                task_buffers = _fresh(buffers)  # receives r_task = (1-m) r + m stats(query|θ')
                if flavour == "reptile":
                    with torch.no_grad():
                        q_loss = loss_fn(model, adapted, task_buffers, query)
                    final, _ = _inner_loop(
                        model, {n: t.detach() for n, t in adapted.items()}, buffers, query,
                        steps=steps, inner_lr=inner_lr, optimizer=optimizer,
                        names=names, create_graph=False, adam=adam,
                    )
                    for n in names:
                        grad_sum[n] += meta[n].detach() - final[n].detach()
                else:
                    q_loss = loss_fn(model, adapted, task_buffers, query)
                    # first_order: `adapted` = θ − Σ lr·g with constant g, so d/dθ is
                    # ∇L_q(θ'); second_order: the full unrolled derivative.
                    grads = torch.autograd.grad(q_loss, list(meta.values()), allow_unused=True,
                                                materialize_grads=True)
                    for n, g in zip(meta, grads):
                        grad_sum[n] += g.detach()
            query_sum += q_loss.detach().to(torch.float64)
            support_sum += first.detach().to(torch.float64)
            for n in float_buffers:
                buffer_sum[n] += task_buffers[n]

    return MetaGradient(
        grads=grad_sum,
        n_tasks=len(tasks),
        query_loss=float(query_sum),
        support_loss=float(support_sum),
        buffers=buffer_sum,
    )


@torch.no_grad()
def apply_buffer_update(model: nn.Module, buffer_sums: Mapping[str, Tensor],
                        n_tasks: int) -> None:
    """Set the meta-learner's BatchNorm running statistics from a step's tasks.

    Call once per meta-step with the (all-reduced) :attr:`MetaGradient.buffers` sum and the
    global task count: each floating buffer becomes ``sum / n_tasks`` (one EMA update with
    the task-averaged query statistics of the adapted models) and ``num_batches_tracked``
    advances by one.

    Args:
        model: the meta-learner (modified in place through ``Tensor.copy_``).
        buffer_sums: name → summed buffer (floating buffers).
        n_tasks: total number of tasks in the sum (all ranks).

    Raises:
        ValueError: ``n_tasks < 1`` or an unknown buffer name.
    """
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    own = dict(model.named_buffers())
    unknown = set(buffer_sums) - set(own)
    if unknown:
        raise ValueError(f"unknown buffers: {sorted(unknown)[:5]}")
    for name, buf in own.items():
        if name in buffer_sums:
            buf.copy_(buffer_sums[name] / n_tasks)
        elif name.endswith("num_batches_tracked") and buffer_sums:
            buf.add_(1)


#: What ``meta.inner_params`` may say: adapt every parameter, or the head only.
INNER_PARAMS = ("all", "head")


def adaptation_lrs(
    model: nn.Module, cfg: MetaConfig, lr: float
) -> tuple[float | dict[str, float], frozenset[str] | None]:
    """Which parameters an adaptation moves, and at what rate: the one rule shared by the inner
    loop (:func:`meta_kwargs`) and meta-test fine-tuning (``piaa_dist.protocol.finetune_budget``).

    ``meta.inner_params`` picks the parameters (``"head"``: the head's, ``"all"``: every one)
    and ``meta.inner_head_lr_scale`` multiplies the head's rate, so a learner is fine-tuned at
    meta-test time the way it was taught to adapt.

    Args:
        model: a model with a ``head`` (``piaa_dist.model.AestheticModel``).
        cfg: the meta config (``inner_params``, ``inner_head_lr_scale``).
        lr: the base rate (``meta.inner_lr`` or ``eval.finetune_lr``).

    Returns:
        ``(lr, adapt_names)``: a float when every parameter shares it, else a name → rate
        mapping over all parameters; the names to adapt, or None for all.

    Raises:
        ValueError: ``inner_params`` is not ``"all"`` or ``"head"``.
    """
    from piaa_dist.model import head_names

    if cfg.inner_params not in INNER_PARAMS:
        raise ValueError(f"meta.inner_params must be 'all' or 'head', got {cfg.inner_params!r}")
    heads = frozenset(head_names(model))  # type: ignore[arg-type]
    rates: float | dict[str, float] = float(lr)
    if cfg.inner_head_lr_scale != 1.0:
        rates = {
            n: float(lr) * (cfg.inner_head_lr_scale if n in heads else 1.0)
            for n, _ in model.named_parameters()
        }
    return rates, (heads if cfg.inner_params == "head" else None)


def meta_kwargs(model: nn.Module, cfg: MetaConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`meta_gradient` / :func:`adapt` from a MetaConfig.

    ``steps``, ``optimizer``, and the ``inner_lr`` / ``adapt_names`` of
    :func:`adaptation_lrs` at the base rate ``inner_lr``.
    """
    inner_lr, adapt_names = adaptation_lrs(model, cfg, cfg.inner_lr)
    return {
        "steps": cfg.inner_steps,
        "inner_lr": inner_lr,
        "optimizer": cfg.inner_optimizer,
        "adapt_names": adapt_names,
    }


def grad_norm(grads: Mapping[str, Tensor]) -> float:
    """Global L2 norm of a gradient dict (for logging and clipping decisions)."""
    total = sum(float(g.detach().double().pow(2).sum()) for g in grads.values())
    return math.sqrt(total)
