"""The GIAA training loop never waits on the device per step: the loss is read back only when
it is logged (``run.log_every * 10`` steps) and once at the end.

Observed on PyTorch's meta device, whose tensors have no values: the first read of one raises,
so the number of forward passes before that error is the number of steps that ran without a
read. (On a GPU each such read is a host-device synchronisation.)
"""

from __future__ import annotations

import pytest
import torch

from piaa_dist.config import load_config, with_overrides
from piaa_dist.data.stream import Dataset
from piaa_dist.giaa import train_giaa
from piaa_dist.model import AestheticModel
from piaa_dist.train import meta_training_users

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def forwards():
    calls: list[int] = []

    def hook(module, inputs, output):
        if isinstance(module, AestheticModel):
            calls.append(1)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield calls
    handle.remove()


@pytest.mark.parametrize(("log_every", "steps_before_first_read"), [(0, 25), (1, 10)])
def test_giaa_reads_the_loss_only_when_it_logs(tiny_dataset_url, forwards, log_every, steps_before_first_read):
    cfg = with_overrides(load_config("jobs/configs/tiny.yaml"),
                         {"giaa.steps": 25, "giaa.batch_size": 8, "run.log_every": log_every})
    dataset = Dataset.open(tiny_dataset_url)
    with pytest.raises(RuntimeError, match="meta tensors"):
        train_giaa(cfg, dataset, meta_training_users(cfg, dataset), device=torch.device("meta"))
    # log_every=0: all 25 steps, then the final log line; log_every=1: the first log at step 10.
    assert len(forwards) == steps_before_first_read
