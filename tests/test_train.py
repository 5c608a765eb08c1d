"""The meta-trainer (no Ray): learning, exact resume, and the rank-splitting invariant."""

from __future__ import annotations

import pytest
import torch

from piaa_dist.checkpoint import load_training_state, save_training_state
from piaa_dist.config import load_config, with_overrides
from piaa_dist.data.stream import Dataset, TaskStream
from piaa_dist.model import build_model
from piaa_dist.train import MetaTrainer, meta_train, meta_training_users, validation_users

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
        m0 = r0.step(half0, reduce=lambda f: f + flat1)
        m1 = r1.step(half1, reduce=lambda f: flat0 + f)
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
    assert set(state) == {"model", "optimizer", "step"} and state["step"] == 1
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
