"""The optional float32 all-reduce: half the bytes, within float32 rounding of the exact one.

Two ranks' contributions to one meta-step are computed for real (the tiny world, rank r of 2
takes ``batch[r::2]``); the trainer's ``reduce`` is the documented contract, a SUM over ranks of
the tensor it is given, here rank 0's tensor plus rank 1's in the same dtype, which is what
``torch.distributed.all_reduce`` returns on both ranks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from piaa_dist.config import load_config, with_overrides
from piaa_dist.data.stream import Dataset, TaskStream
from piaa_dist.model import build_model
from piaa_dist.train import MetaTrainer, meta_training_users

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def contributions(tiny_dataset_url):
    cfg = load_config("jobs/configs/tiny.yaml")
    dataset = Dataset.open(tiny_dataset_url)
    users = meta_training_users(cfg, dataset)
    torch.manual_seed(cfg.run.seed)
    trainer = MetaTrainer(cfg, build_model(cfg.model))
    flats = []
    for rank in (0, 1):
        stream = TaskStream(dataset, users, rank=rank, world_size=2, meta_batch=cfg.meta.meta_batch,
                            shots=cfg.data.shots, query_size=cfg.data.query_size,
                            image_size=cfg.data.image_size, augment=cfg.data.augment, seed=cfg.run.seed)
        flats.append(trainer.local_flat(stream.tasks(0)))
    return cfg, trainer, flats


def _step(cfg, trainer, flats, dtype: str):
    """Rank 0's meta-step under run.allreduce_dtype=dtype; returns (trainer, dtypes reduced)."""
    t = copy.deepcopy(trainer)
    t.cfg = with_overrides(cfg, {"run.allreduce_dtype": dtype})
    seen = []

    def reduce(x: torch.Tensor) -> torch.Tensor:  # SUM over the two ranks, in x's dtype
        seen.append((x.dtype, x.element_size() * x.numel()))
        return x + flats[1].to(x.dtype)

    t.apply_flat(t.reduce_flat(flats[0], reduce))
    return t, seen


def test_float64_is_the_exact_default(contributions):
    cfg, trainer, flats = contributions
    assert cfg.run.allreduce_dtype == "float64"
    t, seen = _step(cfg, trainer, flats, "float64")
    assert [d for d, _ in seen] == [torch.float64]
    exact = copy.deepcopy(trainer)
    exact.apply_flat(flats[0] + flats[1])
    for (name, a), b in zip(t.model.state_dict().items(), exact.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_float32_halves_the_bytes_and_stays_within_float32_rounding(contributions):
    cfg, trainer, flats = contributions
    t64, seen64 = _step(cfg, trainer, flats, "float64")
    t32, seen32 = _step(cfg, trainer, flats, "float32")
    assert seen32[0][0] == torch.float32 and seen32[0][1] * 2 == seen64[0][1]
    # The summed tensor: each element within float32 rounding of its two terms (rounding each
    # rank's sum, then the float32 add), relative to their magnitudes (terms may cancel).
    total64 = flats[0] + flats[1]
    total32 = (flats[0].float() + flats[1].float()).double()
    err = (total32 - total64).abs()
    bound = 2 * torch.finfo(torch.float32).eps * (flats[0].abs() + flats[1].abs())
    assert bool((err <= bound).all())
    assert float(err.norm() / total64.norm()) < 1e-6
    # The update it leads to (Adam normalises by the gradient's RMS, so compare the parameters).
    for (name, a), b in zip(t32.model.state_dict().items(), t64.model.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_float32_wire_comes_back_as_float64(contributions):
    """What apply_flat receives is float64 whatever went over the wire (its float64 division
    of the BatchNorm sums is then the same code path for both settings)."""
    cfg, trainer, flats = contributions
    t = copy.deepcopy(trainer)
    t.cfg = with_overrides(cfg, {"run.allreduce_dtype": "float32"})
    summed = t.reduce_flat(flats[0], lambda x: x + flats[1].to(x.dtype))
    assert summed.dtype == torch.float64
    assert torch.equal(summed, (flats[0].float() + flats[1].float()).double())
