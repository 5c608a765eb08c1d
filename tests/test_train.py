"""The meta-trainer (no Ray): learning, exact resume, and the rank-splitting invariant."""

from __future__ import annotations

import pytest
import torch

from piaa_dist.checkpoint import load_training_state, save_training_state
from piaa_dist.config import load_config, with_overrides
from piaa_dist.data.stream import Dataset, TaskStream
from piaa_dist.meta import meta_gradient, meta_kwargs
from piaa_dist.model import build_model
from piaa_dist.train import (
    MetaTrainer,
    meta_train,
    meta_training_users,
    task_seed,
    validation_users,
)

TINY = "jobs/configs/tiny.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY)


@pytest.fixture(scope="module")
def dataset(tiny_dataset_url):
    return Dataset.open(tiny_dataset_url)


def _tasks(cfg, dataset, step: int, *, rank: int = 0, world_size: int = 1):
    stream = TaskStream(
        dataset, meta_training_users(cfg, dataset), rank=rank, world_size=world_size,
        meta_batch=cfg.meta.meta_batch, shots=cfg.data.shots, query_size=cfg.data.query_size,
        image_size=cfg.data.image_size, augment=cfg.data.augment, seed=cfg.run.seed,
        start_step=step,
    )
    got_step, tasks = next(iter(stream))
    assert got_step == step
    return tasks


def _trainer(cfg) -> MetaTrainer:
    torch.manual_seed(cfg.run.seed)
    return MetaTrainer(cfg, build_model(cfg.model), torch.device("cpu"))


def _assert_same_state(a: dict, b: dict) -> None:
    """Bit-identical nested states (tensors compared with torch.equal)."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def test_validation_users_are_held_out(cfg, dataset):
    train = set(dataset.users("train"))
    val = set(validation_users(cfg, dataset))
    meta = set(meta_training_users(cfg, dataset))
    assert len(val) == cfg.data.validation_users
    assert val <= train and not (val & meta)
    assert meta | val == train
    assert not (meta & set(dataset.users("test")))


def test_meta_training_lowers_the_query_loss(cfg, dataset):
    """After some meta-steps the post-adaptation query loss on fixed tasks is lower."""
    cfg = with_overrides(cfg, {"meta.meta_steps": 6, "meta.meta_lr": 0.01})
    probe = [t for step in (100, 101) for t in _tasks(cfg, dataset, step)]  # unseen steps

    def query_loss(trainer: MetaTrainer) -> float:
        flat = trainer.local_flat(probe)  # does not change the trainer
        return float(flat[-2] / flat[-3])

    before = query_loss(_trainer(cfg))
    seen = []
    trainer = meta_train(cfg, dataset, on_step=lambda s, m, t: seen.append((s, m)))
    assert [s for s, _ in seen] == list(range(1, 7))
    assert trainer.step_count == 6
    assert all(m["tasks"] == cfg.meta.meta_batch for _, m in seen)
    after = query_loss(trainer)
    assert after < before, (before, after)


def test_two_ranks_equal_one_rank(cfg, dataset):
    """Rank slices of the same meta-batch, summed, give the 1-rank update bit for bit."""
    one, r0, r1 = _trainer(cfg), _trainer(cfg), _trainer(cfg)
    for step in range(3):
        full = _tasks(cfg, dataset, step)
        half0 = _tasks(cfg, dataset, step, rank=0, world_size=2)
        half1 = _tasks(cfg, dataset, step, rank=1, world_size=2)
        assert sorted(t.user for t in half0 + half1) == sorted(t.user for t in full)
        m_one = one.step(full)
        # Emulated all-reduce: each rank adds the other's contribution to its own.
        flat0, flat1 = r0.local_flat(half0), r1.local_flat(half1)
        m0 = r0.step(half0, reduce=lambda f, other=flat1: f + other)
        m1 = r1.step(half1, reduce=lambda f, other=flat0: other + f)
        assert m0 == m1
        assert m0["tasks"] == m_one["tasks"] == cfg.meta.meta_batch
        assert m0["query_loss"] == pytest.approx(m_one["query_loss"], rel=1e-12)
        torch.testing.assert_close(r0.last_grad, one.last_grad, rtol=0, atol=0)
    _assert_same_state(r0.state_dict(), r1.state_dict())
    _assert_same_state(r0.state_dict(), one.state_dict())


def test_a_rank_without_tasks_contributes_nothing(cfg, dataset):
    """meta_batch < world size: the idle rank sends zeros and still applies the update."""
    tasks = _tasks(cfg, dataset, 0)[:1]
    one, busy, idle = _trainer(cfg), _trainer(cfg), _trainer(cfg)
    one.step(tasks)
    flat = busy.local_flat(tasks)
    assert not idle.local_flat([]).any()
    idle.step([], reduce=lambda f: f + flat)
    _assert_same_state(idle.state_dict(), one.state_dict())
    with pytest.raises(ValueError, match="no tasks"):
        _trainer(cfg).step([])


def test_resume_is_bit_identical(cfg, dataset, tmp_path):
    """Stop after a checkpoint, resume from the saved folder: same weights and optimizer."""
    cfg = with_overrides(cfg, {"meta.meta_steps": 5, "meta.lr_decay": 0.5, "meta.decay_every": 2})
    reference = meta_train(cfg, dataset)

    class Stop(Exception):
        pass

    def crash_after_checkpoint(step, metrics, trainer):
        if step == 3:
            save_training_state(tmp_path / "ckpt", trainer.state_dict())
        if step == 4:  # work after the checkpoint is lost
            raise Stop

    with pytest.raises(Stop):
        meta_train(cfg, dataset, on_step=crash_after_checkpoint)
    state = load_training_state(tmp_path / "ckpt")
    assert state["step"] == 3
    resumed = meta_train(cfg, dataset, resume=state)
    assert resumed.step_count == 5
    _assert_same_state(resumed.state_dict(), reference.state_dict())
    # The same through a path.
    again = meta_train(cfg, dataset, resume=tmp_path / "ckpt")
    _assert_same_state(again.state_dict(), reference.state_dict())


def test_state_dict_round_trip(cfg, dataset):
    a = _trainer(cfg)
    a.step(_tasks(cfg, dataset, 0))
    state = a.state_dict()
    # the early-stopping state (best validation score/step) is part of the training state
    assert set(state) == {"model", "optimizer", "step", "early_stopping"} and state["step"] == 1
    b = _trainer(cfg)
    b.load_state_dict(state)
    assert b.step_count == 1 and b.current_lr() == a.current_lr()
    _assert_same_state(b.state_dict(), state)
    tasks = _tasks(cfg, dataset, 1)
    a.step(tasks)
    b.step(tasks)
    _assert_same_state(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("flavour", ["first_order", "reptile"])
def test_other_flavours_run(cfg, dataset, flavour):
    overrides = {"meta.flavour": flavour, "meta.meta_steps": 2}
    if flavour == "reptile":
        overrides["meta.meta_lr"] = 1.0
    cfg = with_overrides(cfg, overrides)
    trainer = meta_train(cfg, dataset)
    assert trainer.step_count == 2
    expected = torch.optim.SGD if flavour == "reptile" else torch.optim.Adam
    assert isinstance(trainer.optimizer, expected)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_meta_lr_decays_with_the_step(cfg):
    cfg = with_overrides(cfg, {"meta.meta_lr": 0.1, "meta.lr_decay": 0.5, "meta.decay_every": 2})
    trainer = _trainer(cfg)
    lrs = []
    for step in range(5):
        trainer.step_count = step
        lrs.append(trainer.current_lr())
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_grad_clipping_bounds_the_update(cfg, dataset):
    """Clipping at half the raw meta-gradient norm halves the (plain SGD) meta-step."""
    cfg = with_overrides(cfg, {"meta.flavour": "reptile", "meta.meta_lr": 1.0, "meta.grad_clip": 0.0})
    tasks = _tasks(cfg, dataset, 0)

    def step_length(trainer: MetaTrainer) -> tuple[float, float]:
        before = [p.detach().clone() for p in trainer.model.parameters()]
        metrics = trainer.step(tasks)
        moved = sum(((p.detach() - q) ** 2).sum() for p, q in zip(trainer.model.parameters(), before))
        return float(moved) ** 0.5, metrics["grad_norm"]

    free, raw = step_length(_trainer(cfg))
    assert free == pytest.approx(raw, rel=1e-3)
    clipped, raw_again = step_length(_trainer(with_overrides(cfg, {"meta.grad_clip": raw / 2})))
    assert raw_again == raw  # grad_norm reports the norm before clipping
    assert clipped == pytest.approx(raw / 2, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# One meta-step, computed by hand


def _hand_steps(cfg, batches: list[list], clip: float) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The meta-updates of ``batches`` (one global meta-batch per step) written out: per task
    the meta-gradient of piaa_dist.meta (seeded by (seed, step, user)), their MEAN over the
    global meta-batch, its norm clipped to ``clip`` (0: off), one step of the flavour's optimizer at the
    step's learning rate, BatchNorm statistics := mean of the tasks' updated statistics.

    Returns the model after the steps and each step's (unclipped) mean gradient.
    """
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model)  # the trainer's initial weights (same seed)
    model.train()
    params = [p for p in model.parameters()]
    meta = cfg.meta
    opt_cls = torch.optim.SGD if meta.flavour == "reptile" else torch.optim.Adam
    opt = opt_cls(params, lr=meta.meta_lr)
    kw = meta_kwargs(model, meta)
    means = []
    for step, tasks in enumerate(batches):
        names = [n for n, _ in model.named_parameters()]
        grad_sum = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
        buf_sum = {n: torch.zeros_like(b, dtype=torch.float64)
                   for n, b in model.named_buffers() if b.is_floating_point()}
        for task in tasks:
            mg = meta_gradient(model, dict(model.named_parameters()), dict(model.named_buffers()),
                               [task], flavour=meta.flavour,
                               seeds=[task_seed(cfg.run.seed, step, task.user)], **kw)
            for n in names:
                grad_sum[n] += mg.grads[n].double()
            for n in buf_sum:
                buf_sum[n] += mg.buffers[n].double()
        n_tasks = len(tasks)
        mean = {n: (grad_sum[n] / n_tasks).float() for n in names}
        means.append(torch.cat([mean[n].reshape(-1) for n in names]))
        for n, p in model.named_parameters():
            p.grad = mean[n].clone()
        if clip > 0:  # torch's own clipping: Adam turns any rounding difference into a full step
            torch.nn.utils.clip_grad_norm_(params, clip)
        for group in opt.param_groups:
            group["lr"] = meta.meta_lr * meta.lr_decay ** (step // max(1, meta.decay_every))
        opt.step()
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buf_sum:
                    b.copy_(buf_sum[n] / n_tasks)
                elif n.endswith("num_batches_tracked"):
                    b.add_(1)
    return model, means


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(("flavour", "clip", "world_size"), [
    ("reptile", "off", 1),           # plain SGD: the step is the mean itself
    ("reptile", "between", 2),       # clip between |mean| and |sum|: only a mean stays unclipped
    ("second_order", "between", 2),  # Adam: scale-invariant, but not once clipping bites a sum
    ("second_order", "active", 1),   # Adam with clipping active on every step
])
def test_a_step_applies_the_mean_meta_gradient_of_the_global_meta_batch(cfg, dataset, flavour, clip,
                                                                       world_size):
    """Two trainer steps equal the hand-written update from the MEAN meta-gradient over the
    global meta-batch (divided by the global task count, whatever the ranks hold), for SGD
    (reptile) and Adam, with gradient clipping on."""
    cfg = with_overrides(cfg, {"meta.flavour": flavour, "meta.meta_lr": 0.5 if flavour == "reptile" else 0.01,
                               "meta.lr_decay": 0.5, "meta.decay_every": 1, "meta.grad_clip": 0.0})
    batches = [_tasks(cfg, dataset, step) for step in range(2)]
    n_tasks = cfg.meta.meta_batch
    assert all(len(b) == n_tasks for b in batches)
    _, (first_mean,) = _hand_steps(cfg, batches[:1], 0.0)
    size = float(torch.linalg.vector_norm(first_mean))
    assert size > 0
    limit = {"off": 0.0, "between": size * n_tasks / 2, "active": size / 4}[clip]
    cfg = with_overrides(cfg, {"meta.grad_clip": limit})
    expected, means = _hand_steps(cfg, batches, limit)

    trainers = [_trainer(cfg) for _ in range(world_size)]
    for step, batch in enumerate(batches):
        # rank r holds batch[r::world_size]; the reduce is an emulated all-reduce (SUM)
        slices = [batch[r::world_size] for r in range(world_size)]
        flats = [t.local_flat(s) for t, s in zip(trainers, slices)]
        total = sum(flats[1:], flats[0])
        for trainer, own_slice in zip(trainers, slices):
            metrics = trainer.step(own_slice, reduce=(lambda f, t=total: t.clone()) if world_size > 1 else None)
            assert metrics["tasks"] == n_tasks
            # (step 2 starts from weights that agree to float32 rounding, hence a small atol)
            torch.testing.assert_close(trainer.last_grad, means[step], rtol=1e-5,
                                       atol=1e-5 * float(means[step].abs().max()))
            assert metrics["grad_norm"] == pytest.approx(float(torch.linalg.vector_norm(means[step])), rel=1e-5)
    for trainer in trainers:
        got = trainer.model.state_dict()
        for name, value in expected.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, n=name: f"{n}: {m}")
            else:
                assert torch.equal(got[name], value), name


def test_sync_from_rank0_gives_every_rank_rank0s_weights_and_statistics(cfg):
    """Ranks that start different (other seeds, other BatchNorm statistics) all hold rank 0's
    parameters and running statistics bit for bit after one SUM reduce; rank 0 keeps its own."""
    import threading

    world = 3
    trainers = []
    for rank in range(world):
        torch.manual_seed(100 + rank)
        t = MetaTrainer(cfg, build_model(cfg.model), torch.device("cpu"))
        with torch.no_grad():
            for v in t.model.state_dict().values():  # every weight and running statistic
                if v.is_floating_point():
                    v.add_(torch.rand_like(v) + 0.5)
        trainers.append(t)
    rank0 = {k: v.clone() for k, v in trainers[0].model.state_dict().items()}
    floats = [k for k, v in rank0.items() if v.is_floating_point()]
    assert any("running" in k for k in floats)
    for t in trainers[1:]:
        assert all(not torch.equal(t.model.state_dict()[k], rank0[k]) for k in floats)

    sent: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(world)

    def reduce_for(rank: int):
        def reduce(flat: torch.Tensor) -> torch.Tensor:  # an emulated all-reduce (SUM)
            sent[rank] = flat.clone()
            barrier.wait()
            return sum((sent[r] for r in range(1, world)), sent[0].clone())
        return reduce

    threads = [threading.Thread(target=t.sync_from_rank0, args=(reduce_for(r), r))
               for r, t in enumerate(trainers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert len(sent) == world
    for rank, t in enumerate(trainers):
        got = t.model.state_dict()
        assert got.keys() == rank0.keys()
        for name, value in rank0.items():
            if value.is_floating_point():
                assert torch.equal(got[name], value), (rank, name)


def test_a_steps_losses_are_the_mean_over_the_global_meta_batch(cfg, dataset):
    """``query_loss`` / ``support_loss`` of a step are the means over its tasks of each task's
    loss (what meta_gradient reports for it under its task seed), on 1 rank and on 2."""
    tasks = _tasks(cfg, dataset, 0)
    reference = _trainer(cfg)
    params, buffers = dict(reference.model.named_parameters()), dict(reference.model.named_buffers())
    per_task = [meta_gradient(reference.model, params, buffers, [t], flavour=cfg.meta.flavour,
                              seeds=[task_seed(cfg.run.seed, 0, t.user)],
                              **meta_kwargs(reference.model, cfg.meta)) for t in tasks]
    query = sum(mg.query_loss for mg in per_task) / len(tasks)
    support = sum(mg.support_loss for mg in per_task) / len(tasks)
    one = _trainer(cfg).step(tasks)
    r0, r1 = _trainer(cfg), _trainer(cfg)
    flat1 = r1.local_flat(tasks[1::2])
    two = r0.step(tasks[0::2], reduce=lambda f: f + flat1)
    for metrics in (one, two):
        assert metrics["tasks"] == len(tasks)
        assert metrics["query_loss"] == pytest.approx(query, rel=1e-6)
        assert metrics["support_loss"] == pytest.approx(support, rel=1e-6)


class _WithoutRows:
    """The dataset as one that offers no row indices (``user_indices``): users by name only."""

    def __init__(self, dataset):
        self._dataset = dataset

    def __getattr__(self, name):
        if name == "user_indices":
            raise AttributeError(name)
        return getattr(self._dataset, name)


def test_meta_training_on_user_names_equals_meta_training_on_dataset_rows(cfg, dataset):
    """A dataset that only names its users meta-trains on the same users in the same order as
    one that hands out row indices: the same model, bit for bit."""
    cfg = with_overrides(cfg, {"meta.meta_steps": 2})
    assert not hasattr(_WithoutRows(dataset), "user_indices") and hasattr(dataset, "user_indices")
    rows = meta_train(cfg, dataset)
    names = meta_train(cfg, _WithoutRows(dataset))
    _assert_same_state(rows.model.state_dict(), names.model.state_dict())
    assert names.step_count == rows.step_count == 2


def test_the_trainer_and_its_tasks_go_to_the_device_it_is_given(cfg):
    """A trainer given a device holds its model there, and moves every task tensor there.

    PyTorch's ``meta`` device stands in for a GPU (no GPU in CI): any non-CPU device takes the
    path a CUDA run takes, and a tensor left behind (or moved to the default device) shows.
    """
    from piaa_dist.data.stream import Task
    from piaa_dist.train import _task_to  # noqa: PLC2701 (the move the trainer applies to each task)

    device = torch.device("meta")
    trainer = MetaTrainer(cfg, build_model(cfg.model), device)
    assert trainer.device == device
    assert {p.device for p in trainer.model.parameters()} == {device}

    k, q, s = cfg.data.shots, cfg.data.query_size, cfg.data.image_size
    task = Task(user="u1", support=(torch.rand(k, 3, s, s), torch.rand(k)),
                query=(torch.rand(q, 3, s, s), torch.rand(q)))
    moved = _task_to(task, device)
    assert moved.user == task.user
    for before, after in zip(task.support + task.query, moved.support + moved.query):
        assert after.device == device
        assert after.shape == before.shape and after.dtype == before.dtype
    # On CPU the task is used as it is (no copy).
    assert _task_to(task, torch.device("cpu")) is task
