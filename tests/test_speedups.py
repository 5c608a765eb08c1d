"""The meta-step's speed-ups keep the numbers: each optimised path against the plain one.

* ``piaa_dist.meta.Speedups`` (head-only inner loop on backbone features computed once,
  channels-last images, lean inner steps) against ``PLAIN``, on the tiny world's real tasks,
  for every flavour and inner optimizer, in float64 (so "float tolerance" is tight).
* The task stream's decoded-pixel cache against decoding at every visit (bit for bit).
* Validation spread over two ranks against validation on one rank.
* The trainer's per-phase timers reach ``on_step``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from piaa_dist.config import load_config, with_overrides
from piaa_dist.data.decode import decode_batch, decode_pixels, normalize
from piaa_dist.data.stream import Dataset, TaskStream
from piaa_dist.meta import FAST, PLAIN, adapts_head_only, meta_gradient, meta_kwargs
from piaa_dist.model import build_model
from piaa_dist.train import meta_train, meta_training_users, task_seed

TINY = "jobs/configs/tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tiny_dataset_url):
    return Dataset.open(tiny_dataset_url)


def _stream(cfg, dataset, **kw) -> TaskStream:
    return TaskStream(
        dataset, meta_training_users(cfg, dataset), rank=0, world_size=1,
        meta_batch=cfg.meta.meta_batch, shots=cfg.data.shots, query_size=cfg.data.query_size,
        image_size=cfg.data.image_size, augment=cfg.data.augment, seed=cfg.run.seed, **kw,
    )


@pytest.fixture(scope="module")
def tasks(dataset):
    cfg = with_overrides(load_config(TINY), {"data.shots": 6, "data.query_size": 8})
    return _stream(cfg, dataset).tasks(0)


class _BackboneCalls:
    """Counts forward passes through a model's backbone (hooks fire under functional_call)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.backbone.register_forward_hook(self._hit)

    def _hit(self, *_):
        self.n += 1


@pytest.mark.parametrize("inner_params", ["head", "all"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("flavour", ["second_order", "first_order", "reptile"])
def test_the_fast_meta_gradient_equals_the_plain_one(tasks, flavour, optimizer, inner_params):
    """Every shortcut on (FAST) gives the plain path's meta-gradient, losses and BatchNorm
    statistics to float64 rounding (which Adam magnifies to ~1e-8 relative): with head dropout
    on (seeded per task, so the random stream must be drawn in the same order), 2 inner steps,
    a larger head learning rate."""
    cfg = with_overrides(load_config(TINY), {
        "model.dropout": 0.3, "meta.inner_params": inner_params, "meta.inner_steps": 2,
        "meta.inner_optimizer": optimizer, "meta.inner_head_lr_scale": 3.0,
        "meta.inner_lr": 0.01 if optimizer == "adam" else 0.1,
    })
    torch.manual_seed(0)
    model = build_model(cfg.model).double()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    kw = dict(flavour=flavour, seeds=[task_seed(0, 0, t.user) for t in tasks],
              **meta_kwargs(model, cfg.meta))
    calls = _BackboneCalls(model)
    plain = meta_gradient(model, params, buffers, tasks, speedups=PLAIN, **kw)
    plain_calls, calls.n = calls.n, 0
    fast = meta_gradient(model, params, buffers, tasks, speedups=FAST, **kw)
    assert set(fast.grads) == set(plain.grads) == set(params)
    # Biases right before a BatchNorm have a true gradient of ~0, which Adam (reptile's moves)
    # scales up: rounding noise there is measured against the largest entry, not their own.
    scale = max(float(g.abs().max()) for g in plain.grads.values())
    for name in params:
        torch.testing.assert_close(fast.grads[name], plain.grads[name], rtol=1e-7,
                                   atol=1e-7 * scale, msg=lambda m, n=name: f"{n}: {m}")
    assert fast.query_loss == pytest.approx(plain.query_loss, rel=1e-9)
    assert fast.support_loss == pytest.approx(plain.support_loss, rel=1e-9)
    assert set(fast.buffers) == set(plain.buffers)
    for name in plain.buffers:
        torch.testing.assert_close(fast.buffers[name], plain.buffers[name], rtol=1e-7, atol=1e-10)
    # The backbone of a head-only inner loop runs once on each set (support, query), where the
    # plain path runs it at every step (and, for reptile, at every query step too).
    steps = cfg.meta.inner_steps
    per_task = {"second_order": steps + 1, "first_order": steps + 1, "reptile": 2 * steps + 1}
    assert plain_calls == len(tasks) * per_task[flavour]
    assert calls.n == len(tasks) * (2 if inner_params == "head" else per_task[flavour])



@pytest.mark.parametrize("flavour", ["second_order", "first_order"])
def test_with_no_inner_step_the_head_shortcut_still_equals_the_plain_path(tasks, flavour):
    """``steps=0`` (no adaptation: the meta-gradient is the query loss' gradient at the meta
    parameters): the head-only shortcut reports the same support loss (measured at the meta
    parameters, as no step measured one) and the same meta-gradient as the plain path."""
    cfg = with_overrides(load_config(TINY), {"model.dropout": 0.0, "meta.inner_params": "head"})
    torch.manual_seed(0)
    model = build_model(cfg.model).double()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    kw = dict(flavour=flavour, seeds=[task_seed(0, 0, t.user) for t in tasks[:2]],
              **{**meta_kwargs(model, cfg.meta), "steps": 0})
    plain = meta_gradient(model, params, buffers, tasks[:2], speedups=PLAIN, **kw)
    fast = meta_gradient(model, params, buffers, tasks[:2], speedups=FAST, **kw)
    assert plain.support_loss > 0 and fast.support_loss == pytest.approx(plain.support_loss, rel=1e-9)
    assert fast.query_loss == pytest.approx(plain.query_loss, rel=1e-9)
    for name in params:
        torch.testing.assert_close(fast.grads[name], plain.grads[name], rtol=1e-7, atol=1e-12)

def test_the_head_shortcut_is_refused_where_it_would_not_be_exact():
    cfg = load_config(TINY)
    model = build_model(cfg.model)
    heads = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert adapts_head_only(model, heads)
    assert not adapts_head_only(model, None)  # everything adapts
    assert not adapts_head_only(model, heads | {"backbone.fc.weight"})
    noisy = copy.deepcopy(model)
    noisy.backbone.features.append(torch.nn.Dropout(0.1))  # the backbone would draw randoms
    assert not adapts_head_only(noisy, heads)


@pytest.mark.parametrize("flavour", ["second_order", "reptile"])
def test_the_head_shortcut_runs_the_head_in_float32_under_bf16_autocast(tasks, flavour):
    """Under the GPU's bf16 autocast (emulated on CPU) the model runs its head on float32
    features with autocast off; the head-features shortcut must do the same, on the support
    and on the query features, and so agree with the plain path (to bf16 rounding of the
    backbone, whose kernels may differ)."""
    from piaa_dist.model import autocast

    cfg = with_overrides(load_config(TINY), {"model.dropout": 0.0, "meta.inner_params": "head"})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    kw = dict(flavour=flavour, **meta_kwargs(model, cfg.meta))
    with autocast("cpu", True, emulate_on_cpu=True):
        plain = meta_gradient(model, params, buffers, tasks[:2], speedups=PLAIN, **kw)
        fast = meta_gradient(model, params, buffers, tasks[:2], speedups=FAST, **kw)
    assert all(g.dtype == torch.float32 for g in fast.grads.values())
    assert fast.query_loss == pytest.approx(plain.query_loss, rel=2e-2)
    assert fast.support_loss == pytest.approx(plain.support_loss, rel=2e-2)
    scale = max(float(g.abs().max()) for g in plain.grads.values())
    for name in params:
        torch.testing.assert_close(fast.grads[name], plain.grads[name], rtol=5e-2, atol=5e-2 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("flavour", ["second_order", "first_order"])
def test_plain_hands_the_model_channels_first_batches_and_fast_channels_last_where_it_may(tasks, flavour):
    """PLAIN is the reference with every shortcut off: the backbone sees contiguous
    (channels-first) image batches. FAST hands it channels-last ones, except where the inner
    loop adapts backbone parameters to second order (channels_last_twice off)."""
    cfg = with_overrides(load_config(TINY), {"model.dropout": 0.0, "meta.inner_params": "all"})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    formats: list[str] = []

    def hook(module, args):
        x = args[0]
        formats.append("first" if x.is_contiguous() else
                       "last" if x.is_contiguous(memory_format=torch.channels_last) else "other")

    model.backbone.register_forward_pre_hook(hook)
    kw = dict(flavour=flavour, **meta_kwargs(model, cfg.meta))
    meta_gradient(model, params, buffers, tasks[:1], speedups=PLAIN, **kw)
    assert formats and set(formats) == {"first"}
    formats.clear()
    meta_gradient(model, params, buffers, tasks[:1], speedups=FAST, **kw)
    assert set(formats) == ({"first"} if flavour == "second_order" else {"last"})


# ---------------------------------------------------------------------------------------------
# Decoded-pixel cache


def _same_tasks(a, b) -> None:
    assert [t.user for t in a] == [t.user for t in b]
    for x, y in zip(a, b):
        for part in ("support", "query"):
            for u, v in zip(getattr(x, part), getattr(y, part)):
                assert u.dtype == v.dtype and torch.equal(u, v)


def test_pixels_then_normalize_is_decoding(dataset):
    ratings = dataset.load_user(dataset.users("train")[0])
    assert torch.equal(normalize(decode_pixels(ratings.jpegs, 32)), decode_batch(ratings.jpegs, 32))


@pytest.mark.parametrize("augment", [False, True])
def test_the_pixel_cache_gives_the_same_tasks_and_decodes_an_image_once(tiny_dataset_url, augment):
    cfg = with_overrides(load_config(TINY), {"data.augment": augment})
    plain = _stream(cfg, Dataset.open(tiny_dataset_url), cache_pixels=False)
    cached_ds = Dataset.open(tiny_dataset_url)
    cached = _stream(cfg, cached_ds)
    steps = range(6)  # 6 x 4 of 6 meta-training users: every user is met several times
    for step in steps:
        _same_tasks(cached.tasks(step), plain.tasks(step))
    stats = dict(cached_ds.pixel_stats)
    assert stats["misses"] > 0 and stats["hits"] > 0
    # The same steps again: nothing left to decode, the same tensors.
    for step in steps:
        _same_tasks(cached.tasks(step), plain.tasks(step))
    assert cached_ds.pixel_stats["misses"] == stats["misses"]
    # Augmented support images are cut at random every visit: only query images are cached.
    per_step = cfg.meta.meta_batch * (cfg.data.query_size + (0 if augment else cfg.data.shots))
    assert stats["hits"] + stats["misses"] == len(steps) * per_step


def test_the_pixel_cache_stays_within_its_bound(tiny_dataset_url):
    cfg = load_config(TINY)
    probe = Dataset.open(tiny_dataset_url)
    one_user = len(probe.load_user(probe.users("train")[0])) * 3 * cfg.data.image_size ** 2
    bound_mb = 1.5 * one_user / 2**20  # room for one user, not two
    small = Dataset.open(tiny_dataset_url, cache_pixels_mb=bound_mb)
    cached, plain = _stream(cfg, small), _stream(cfg, Dataset.open(tiny_dataset_url), cache_pixels=False)
    for step in range(4):
        _same_tasks(cached.tasks(step), plain.tasks(step))
        held = sum(e.data.numel() for e in small._pixels.values())
        assert held <= bound_mb * 2**20
    assert small.pixel_stats["evicted"] > 0


# ---------------------------------------------------------------------------------------------
# Validation on two ranks


class _Watched:
    """A dataset that records whose ratings are read."""

    def __init__(self, inner):
        self.inner, self.loaded = inner, set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load_user(self, user):
        self.loaded.add(user)
        return self.inner.load_user(user)


def _two_ranks(fn):
    """Run ``fn(rank, reduce)`` for ranks 0 and 1, ``reduce`` being a SUM all-reduce between them.

    The ranks run one after the other (one process: torch's global RNG, which fine-tuning seeds,
    cannot be shared by concurrent ranks), twice: the first pass records what each rank sends,
    the second hands every rank the sum of both. ``fn`` is deterministic, so this is what a
    concurrent all-reduce would give.
    """
    # Every reduce call of a rank, in order (a step hook reduces more than once, and what it
    # sends second depends on what the first call returned: the validation shares, then rank
    # 0's combined score for the early-stopping decision). Passes repeat, each answering every
    # call with the sum of what both ranks sent in the previous pass, until the ranks send what
    # they sent before: then every call got what a concurrent all-reduce would have given.
    sums: list = []
    for _ in range(5):
        sent: list[list] = [[], []]

        def reduce_of(rank, sent=sent, sums=sums):
            def reduce(t):
                i = len(sent[rank])
                sent[rank].append(t.clone())
                return sums[i].clone() if i < len(sums) else t
            return reduce

        results = [fn(rank, reduce_of(rank)) for rank in (0, 1)]
        assert len(sent[0]) == len(sent[1]), "the ranks made different numbers of collective calls"
        new_sums = [a + b for a, b in zip(sent[0], sent[1], strict=True)]
        if len(new_sums) == len(sums) and all(torch.equal(x, y) for x, y in zip(new_sums, sums, strict=True)):
            return results
        sums = new_sums
    raise AssertionError("the emulated all-reduce did not settle")


def test_validation_spread_over_two_ranks_equals_one_rank(dataset):
    """Each rank scores half of the validation users (and reads no one else's ratings); the
    combined score is the one-rank score, on both ranks, and both step hooks report it."""
    from piaa_dist.orchestration.step_hook import StepHook, validation_score
    from piaa_dist.train import validation_users

    cfg = load_config(TINY, ["data.validation_users=4", "run.validate_every=1", "eval.repeats=2"])
    users = validation_users(cfg, dataset)
    assert len(users) == 4
    torch.manual_seed(0)
    model = build_model(cfg.model)
    one = validation_score(cfg, dataset, model)
    watched = [_Watched(dataset), _Watched(dataset)]
    scores = _two_ranks(lambda r, reduce: validation_score(cfg, watched[r], model, rank=r,
                                                           world_size=2, reduce=reduce))
    assert scores[0] == scores[1] == pytest.approx(one, rel=1e-12, abs=1e-12)
    assert watched[0].loaded and watched[1].loaded
    assert not watched[0].loaded & watched[1].loaded
    assert watched[0].loaded | watched[1].loaded == set(users)

    # The step hook of each rank validates its share and reports the common score.
    reports: list = [[], []]

    def hook_on(rank, reduce):
        trainer = type("T", (), {"model": model, "reduce": staticmethod(reduce), "world_size": 2})()
        hook = StepHook(cfg, rank=rank, dataset=dataset,
                        report=lambda step, metrics, tr, ckpt: reports[rank].append(metrics))
        hook(1, {"data_s": 0.0, "step_s": 1.0, "query_loss": 0.1}, trainer)

    _two_ranks(hook_on)
    assert reports[0][-1]["val_srocc"] == reports[1][-1]["val_srocc"] == scores[0]
    assert all(r[-1]["val_total_s"] > 0 for r in reports)


# ---------------------------------------------------------------------------------------------
# Phase timers


def test_every_step_reports_its_phases(dataset):
    cfg = with_overrides(load_config(TINY), {"meta.meta_steps": 3})
    seen = []
    meta_train(cfg, dataset, on_step=lambda s, m, t: seen.append(dict(m)))
    assert len(seen) == 3
    for m in seen:
        phases = [m[k] for k in ("data_s", "inner_s", "outer_s", "allreduce_s", "update_s")]
        assert all(np.isfinite(p) and p >= 0 for p in phases), m
        assert m["inner_s"] > 0 and m["outer_s"] > 0
        assert sum(phases) <= m["step_s"] * 1.01 + 1e-3


def test_the_trainer_takes_the_shortcuts_it_is_set_to(tasks):
    """``MetaTrainer.speedups`` decides the trainer's path: PLAIN runs the backbone at every
    inner step, the default (FAST) once per set when only the head adapts; same sums."""
    from piaa_dist.train import MetaTrainer

    cfg = with_overrides(load_config(TINY), {"meta.inner_params": "head", "meta.flavour": "second_order",
                                             "meta.inner_steps": 2, "model.dropout": 0.0})
    torch.manual_seed(0)
    trainer = MetaTrainer(cfg, build_model(cfg.model), torch.device("cpu"))
    calls = _BackboneCalls(trainer.model)
    fast = trainer.local_flat(tasks[:2])
    fast_calls, calls.n = calls.n, 0
    trainer.speedups = PLAIN
    plain = trainer.local_flat(tasks[:2])
    assert fast_calls == 2 * 2 and calls.n == 2 * (2 + 1)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6)
