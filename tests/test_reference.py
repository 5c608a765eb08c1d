"""The reference loop (piaa_dist.reference): the released BLG-PIAA training loop, sequential.

What makes it the public code's algorithm (BACKGROUND.md) rather than piaa-dist's: the tasks of
a meta-batch move the weights one after the other by ``(adapted − meta) / n``; one Adam that is
never reset (1e-4 backbone, 1e-3 head) takes 5 support then 5 query steps per task; the
learning rates fall ×0.9 per epoch. The expected weights below are written out independently
with a second model and optimizer.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from piaa_dist.config import load_config
from piaa_dist.model import build_model, head_names
from piaa_dist.reference import ReferenceSettings, ReferenceTrainer, reference_train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(*over: str):
    return load_config(TINY, ["model.dropout=0", *over])


def _task(seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)

    def batch(n):
        return torch.rand(n, 3, 32, 32, generator=g), torch.rand(n, generator=g)

    return SimpleNamespace(support=batch(4), query=batch(4))


def _adam(model, settings: ReferenceSettings, scale: float = 1.0) -> torch.optim.Adam:
    heads = head_names(model)
    named = list(model.named_parameters())
    return torch.optim.Adam([
        {"params": [p for n, p in named if n not in heads], "lr": settings.backbone_lr * scale},
        {"params": [p for n, p in named if n in heads], "lr": settings.head_lr * scale},
    ])


def _steps(model, opt, batch, n):
    for _ in range(n):
        loss = F.mse_loss(model(batch[0]), batch[1])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _trainer_and_twin(steps_per_epoch: int):
    """A seeded reference trainer, its settings, and an untouched copy of its starting model."""
    torch.manual_seed(0)
    cfg, settings = _cfg(), ReferenceSettings()
    model = build_model(cfg.model)
    twin = copy.deepcopy(model)
    trainer = ReferenceTrainer(cfg, model, steps_per_epoch=steps_per_epoch, settings=settings)
    return trainer, model, twin, settings


def test_tasks_move_the_weights_one_after_the_other_with_one_persistent_adam():
    trainer, model, twin, settings = _trainer_and_twin(steps_per_epoch=100)
    tasks = [_task(1), _task(2), _task(3)]
    trainer.step(tasks)

    # Written out: each task adapts the current weights (5 support + 5 query steps of the same
    # Adam), then the weights become meta + (adapted - meta) / 3, and the next task starts there.
    twin.train()
    opt = _adam(twin, settings)
    for task in tasks:
        meta = {k: v.clone() for k, v in twin.state_dict().items() if v.is_floating_point()}
        _steps(twin, opt, task.support, 5)
        _steps(twin, opt, task.query, 5)
        with torch.no_grad():
            for k, v in twin.state_dict().items():
                if k in meta:
                    v.copy_(meta[k] + (v - meta[k]) / len(tasks))
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # the one Adam was never reset: 10 steps per task so far, and its moments carry on
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {30}
    trainer.step(tasks[:1])
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {40}


def test_one_task_moves_the_whole_way_and_learning_rates_fall_per_epoch():
    trainer, model, twin, settings = _trainer_and_twin(steps_per_epoch=2)
    task = _task(5)
    trainer.step([task])
    twin.train()
    opt = _adam(twin, settings)
    _steps(twin, opt, task.support, 5)
    _steps(twin, opt, task.query, 5)
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    trainer.step([task])
    assert trainer.current_scale() == pytest.approx(0.9)  # an epoch (2 meta-batches) is done
    trainer.step([task])
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.9e-4, 0.9e-3])
    trainer.step([task])
    trainer.step([task])
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.81e-4, 0.81e-3])


def test_reference_train_runs_on_the_data_path_and_stops_when_asked(tiny_dataset_url):
    from piaa_dist.data.stream import Dataset

    cfg = _cfg("data.augment=false", "data.validation_users=2")
    seen = []

    def on_step(step, metrics, trainer):
        seen.append((step, metrics["query_loss"]))
        return step == 3

    trainer = reference_train(cfg, Dataset.open(tiny_dataset_url), max_steps=10, on_step=on_step)
    assert trainer.step_count == 3 and [s for s, _ in seen] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(q)) for _, q in seen)
    again = reference_train(cfg, Dataset.open(tiny_dataset_url), max_steps=3)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k  # a run is reproducible
