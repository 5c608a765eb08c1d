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
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

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
        inner_s: wall seconds spent in the tasks' inner loops (support features included).
        outer_s: wall seconds spent on the query loss and the outer gradient. (On CUDA both
            count kernel launches, not kernel time, unless the caller synchronizes.)
    """

    grads: dict[str, Tensor]
    n_tasks: int
    query_loss: float
    support_loss: float
    buffers: dict[str, Tensor] = field(default_factory=dict)
    inner_s: float = 0.0
    outer_s: float = 0.0


@dataclass(frozen=True)
class Speedups:
    """Shortcuts :func:`meta_gradient` takes, each exact (the same numbers as without it, to float
    rounding) and each switchable, so a benchmark can measure it alone and a test can compare it
    with :data:`PLAIN` (``tests/test_meta.py``).

    Attributes:
        head_features: when only the head adapts (:func:`adapts_head_only`), run the backbone
            once per task on the support set and once on the query set, and the inner loop on
            the head alone. Exact because the backbone's parameters and its input batch are
            fixed within the inner loop, so its train-mode output (BatchNorm on the batch's own
            statistics) is the same at every step. The support features are computed *with*
            grad (second order): the outer gradient still reaches the backbone through them and
            through the query features.
        channels_last: hand 4-D image batches to the model in channels-last memory format,
            in which oneDNN's convolutions, pooling and BatchNorm run several times faster on
            CPU; convolutions then pick other kernels, so results change at float rounding only.
            Not where the inner loop adapts backbone parameters to second order (unless
            ``channels_last_twice``): on CPU the double backward of BatchNorm and of
            convolutions makes contiguous (channels-first) tensors, and the mix measured slower
            than channels-first throughout.
        channels_last_twice: channels-last there too (for GPUs, where tensor cores want it;
            ``benchmarks/gpu_step.py``'s ``bf16-cl`` variant measures it).
        lean_steps: fewer autograd nodes per inner step (see :func:`_inner_loop`).

    ``benchmarks/meta_step.py`` measures each against the one before, in one run.
    """

    head_features: bool = True
    channels_last: bool = True
    lean_steps: bool = True
    channels_last_twice: bool = False


#: Every shortcut on: what the trainer uses.
FAST = Speedups()
#: Every shortcut off: the reference computation the shortcuts are measured and tested against.
PLAIN = Speedups(head_features=False, channels_last=False, lean_steps=False)

# Prefixes of piaa_dist.model.AestheticModel's two halves in named_parameters().
_BACKBONE, _HEAD = "backbone.", "head."
# Modules that draw random numbers in train mode: a backbone holding one cannot be run once for
# several inner steps without changing the random stream the head's dropout sees.
_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                   nn.FeatureAlphaDropout)


def adapts_head_only(model: nn.Module, adapt_names: Sequence[str] | set[str] | None) -> bool:
    """Whether an inner loop over `adapt_names` can run on backbone features computed once.

    True when `model` computes ``head(backbone(x))`` (a :class:`piaa_dist.model.AestheticModel`
    whose forward is not overridden), only head parameters adapt, and the backbone draws no
    random numbers (no dropout), so running it once per batch changes nothing but the cost.
    """
    from piaa_dist.model import AestheticModel

    if adapt_names is None or not isinstance(model, AestheticModel):
        return False
    if type(model).forward is not AestheticModel.forward:
        return False
    if not all(n.startswith(_HEAD) for n in adapt_names):
        return False
    return not any(isinstance(m, _RANDOM_MODULES) and m.p > 0 for m in model.backbone.modules())


def _part(tensors: Mapping[str, Tensor], prefix: str) -> Params:
    """The entries of one submodule, renamed relative to it (the very same tensor objects, so a
    BatchNorm update through the part lands in ``tensors`` too)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def backbone_features(model: nn.Module, params: Mapping[str, Tensor],
                      buffers: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """The backbone half of an :class:`piaa_dist.model.AestheticModel`, run functionally.

    Args:
        model: the model (its own tensors are not used).
        params, buffers: name → tensor over the whole model (``backbone.*`` ones are used);
            train-mode BatchNorm updates land in ``buffers``.
        images: ``[N,3,S,S]``.

    Returns:
        ``[N, feature_dim]``: what the model's forward feeds its head.
    """
    return functional_call(model.backbone, (_part(params, _BACKBONE), _part(buffers, _BACKBONE)),
                           (images,))


def _head_precision(device_type: str) -> tuple[bool, contextlib.AbstractContextManager]:
    """How :class:`piaa_dist.model.AestheticModel`'s forward runs its head: under autocast, on
    float32 features with autocast off. Returns (convert the features to float32, context)."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return True, torch.autocast(device_type=device_type, enabled=False)
    return False, contextlib.nullcontext()


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


def _to_device(batch: Batch, device: torch.device, dtype: torch.dtype,
               channels_last: bool = False) -> Batch:
    images, targets = batch
    images = images.to(device=device, dtype=dtype, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device=device, dtype=dtype, non_blocking=True)


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
    lean: bool = False,
) -> tuple[Params, Tensor | None]:
    """``steps`` functional optimizer steps on `batch`; returns (params, loss at the start).

    ``lean`` (:attr:`Speedups.lean_steps`): every step's forward writes its (discarded)
    BatchNorm statistics into one scratch copy of ``buffers`` instead of a fresh copy each (a
    train-mode forward reads none of them), and an SGD step is one fused ``p + (-lr)·g`` node
    instead of a multiply and a subtract (fewer nodes to build and to differentiate through).
    """
    # Tensors to differentiate must be in the graph: a detached one becomes a new leaf.
    current: Params = {
        n: (p.detach().requires_grad_(True) if n in names and not p.requires_grad else p)
        for n, p in params.items()
    }
    first_loss: Tensor | None = None
    scratch = _fresh(buffers) if lean else None
    for _ in range(steps):
        loss = loss_fn(model, current, scratch if lean else _fresh(buffers), batch)
        if first_loss is None:
            first_loss = loss.detach()
        inputs = [current[n] for n in names]
        grads = torch.autograd.grad(
            loss, inputs, create_graph=create_graph, allow_unused=True, materialize_grads=True
        )
        if optimizer == "sgd" and lean:
            for n, p, g in zip(names, inputs, grads):
                current[n] = torch.add(p, g, alpha=-_lr_of(inner_lr, n))
        elif optimizer == "sgd":
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
    speedups: Speedups = FAST,
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
        speedups: exact shortcuts to take (:class:`Speedups`; :data:`PLAIN` for none).

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
    task_fn = (_head_only_task if speedups.head_features and adapts_head_only(model, adapt_names)
               else _plain_task)
    backbone_twice = flavour == "second_order" and not all(n.startswith(_HEAD) for n in names)
    channels_last = speedups.channels_last and (speedups.channels_last_twice or not backbone_twice)

    # Leaves owned by this call: the caller's tensors are neither differentiated into (no
    # .grad side effects) nor kept alive by our graphs.
    meta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    grad_sum = {n: torch.zeros_like(p) for n, p in meta.items()}
    float_buffers = [n for n, b in buffers.items() if b.is_floating_point()]
    buffer_sum = {n: torch.zeros_like(buffers[n]) for n in float_buffers}
    query_sum = torch.zeros((), device=device, dtype=torch.float64)
    support_sum = torch.zeros((), device=device, dtype=torch.float64)

    inner_s = outer_s = 0.0
    with _mode(model, True):
        for i, task in enumerate(tasks):
            t0 = time.perf_counter()
            support = _to_device(task.support, device, dtype, channels_last)
            query = _to_device(task.query, device, dtype, channels_last)
            with _seeded(None if seeds is None else int(seeds[i])):
                res = task_fn(
                    model, meta, buffers, support, query, flavour=flavour, steps=steps,
                    inner_lr=inner_lr, optimizer=optimizer, names=names, lean=speedups.lean_steps,
                )
            for n, g in res.grads.items():
                grad_sum[n] += g
            query_sum += res.query_loss.to(torch.float64)
            support_sum += res.support_loss.to(torch.float64)
            for n in float_buffers:
                buffer_sum[n] += res.buffers[n]
            inner_s += res.inner_end - t0
            outer_s += time.perf_counter() - res.inner_end

    return MetaGradient(
        grads=grad_sum,
        n_tasks=len(tasks),
        query_loss=float(query_sum),
        support_loss=float(support_sum),
        buffers=buffer_sum,
        inner_s=inner_s,
        outer_s=outer_s,
    )


class _TaskResult(NamedTuple):
    """One task's part of :func:`meta_gradient`, all detached."""

    grads: dict[str, Tensor]  # contributions by name
    query_loss: Tensor  # at the adapted parameters
    support_loss: Tensor  # at the meta parameters
    buffers: Params  # the task's updated buffers
    inner_end: float  # time.perf_counter() when the inner loop was done


def _plain_task(model: nn.Module, meta: Params, buffers: Mapping[str, Tensor], support: Batch,
                query: Batch, *, flavour: str, steps: int, inner_lr: float | Mapping[str, float],
                optimizer: str, names: Sequence[str], lean: bool) -> _TaskResult:
    """One task through the whole model at every inner step."""
    adam = _AdamState() if optimizer == "adam" else None
    adapted, first = _inner_loop(
        model, meta, buffers, support, steps=steps, inner_lr=inner_lr, optimizer=optimizer,
        names=names, create_graph=(flavour == "second_order"), adam=adam, lean=lean,
    )
    if first is None:  # steps == 0: still report the support loss
        with torch.no_grad():
            first = loss_fn(model, meta, _fresh(buffers), support)
    inner_end = time.perf_counter()
    task_buffers = _fresh(buffers)  # receives r_task = (1-m) r + m stats(query|θ')
    if flavour == "reptile":
        with torch.no_grad():
            q_loss = loss_fn(model, adapted, task_buffers, query)
        final, _ = _inner_loop(
            model, {n: t.detach() for n, t in adapted.items()}, buffers, query,
            steps=steps, inner_lr=inner_lr, optimizer=optimizer,
            names=names, create_graph=False, adam=adam, lean=lean,
        )
        grads = {n: meta[n].detach() - final[n].detach() for n in names}
    else:
        q_loss = loss_fn(model, adapted, task_buffers, query)
        # first_order: `adapted` = θ − Σ lr·g with constant g, so d/dθ is ∇L_q(θ');
        # second_order: the full unrolled derivative.
        raw = torch.autograd.grad(q_loss, list(meta.values()), allow_unused=True,
                                  materialize_grads=True)
        grads = {n: g.detach() for n, g in zip(meta, raw)}
    return _TaskResult(grads, q_loss.detach(), first.detach(), task_buffers, inner_end)


def _head_only_task(model: nn.Module, meta: Params, buffers: Mapping[str, Tensor],
                    support: Batch, query: Batch, *, flavour: str, steps: int,
                    inner_lr: float | Mapping[str, float], optimizer: str,
                    names: Sequence[str], lean: bool) -> _TaskResult:
    """:func:`_plain_task` when only the head adapts (:attr:`Speedups.head_features`).

    The backbone runs once on the support set and once on the query set; the inner loop, the
    query loss and (reptile) the query steps run on the head over those features. Random
    numbers are drawn in the plain path's order (the backbone draws none), BatchNorm statistics
    of the query forward land in the task's buffers as in the plain path.
    """
    second = flavour == "second_order"
    (xs, ys), (xq, yq) = support, query
    head_meta, head_buffers = _part(meta, _HEAD), _part(buffers, _HEAD)
    local = [n[len(_HEAD):] for n in names]
    lr = _part(inner_lr, _HEAD) if isinstance(inner_lr, Mapping) else inner_lr
    adam = _AdamState() if optimizer == "adam" else None
    # Support features with grad only where the outer gradient goes through the inner loop.
    with torch.set_grad_enabled(second):
        fs = backbone_features(model, meta, _fresh(buffers), xs)
    to_float, head_ctx = _head_precision(fs.device.type)
    fs = fs.float() if to_float else fs
    with head_ctx:
        adapted, first = _inner_loop(
            model.head, head_meta, head_buffers, (fs, ys), steps=steps, inner_lr=lr,
            optimizer=optimizer, names=local, create_graph=second, adam=adam, lean=lean,
        )
        if first is None:
            with torch.no_grad():
                first = loss_fn(model.head, head_meta, _fresh(head_buffers), (fs, ys))
    inner_end = time.perf_counter()
    task_buffers = _fresh(buffers)
    # The query features at the meta backbone (it does not adapt); this forward updates the
    # backbone's running statistics in the task's buffers, the head's query forward the head's.
    with torch.set_grad_enabled(flavour != "reptile"):
        fq = backbone_features(model, meta, task_buffers, xq)
    fq = fq.float() if to_float else fq
    with head_ctx:
        if flavour == "reptile":
            with torch.no_grad():
                q_loss = loss_fn(model.head, adapted, _part(task_buffers, _HEAD), (fq, yq))
            final, _ = _inner_loop(
                model.head, {n: t.detach() for n, t in adapted.items()}, head_buffers, (fq, yq),
                steps=steps, inner_lr=lr, optimizer=optimizer, names=local,
                create_graph=False, adam=adam, lean=lean,
            )
            moves = {n: meta[n].detach() - final[m].detach() for n, m in zip(names, local)}
            return _TaskResult(moves, q_loss.detach(), first.detach(), task_buffers, inner_end)
        q_loss = loss_fn(model.head, adapted, _part(task_buffers, _HEAD), (fq, yq))
    raw = torch.autograd.grad(q_loss, list(meta.values()), allow_unused=True,
                              materialize_grads=True)
    grads = {n: g.detach() for n, g in zip(meta, raw)}
    return _TaskResult(grads, q_loss.detach(), first.detach(), task_buffers, inner_end)


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
