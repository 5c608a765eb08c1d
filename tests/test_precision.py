"""Meta-gradients under the GPU configuration's precision, against float64.

No GPU here: CPU autocast (``piaa_dist.model.autocast(..., emulate_on_cpu=True)``, the same
policy the trainer applies on CUDA) stands in for it. The model is the GPU config's (ResNet-18
with the paper's head) at 64 px on a few random support/query images, one task, the GPU
config's inner optimizer and rate, two unrolled second-order inner steps.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from piaa_dist.config import load_config, with_overrides
from piaa_dist.meta import loss_fn, meta_gradient, meta_kwargs
from piaa_dist.model import autocast, build_model

GPU_CONFIG = "jobs/configs/gpu.yaml"
SIZE, SUPPORT, QUERY = 64, 8, 6

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setting():
    # The GPU config as is, except: no ImageNet file here (random weights), no dropout (the
    # float64 and float32 runs must see the same network), two inner steps (CPU time).
    cfg = with_overrides(load_config(GPU_CONFIG), {
        "model.pretrained": "none", "model.dropout": 0.0, "meta.inner_steps": 2,
    })
    torch.manual_seed(0)
    model = build_model(cfg.model)
    gen = torch.Generator().manual_seed(1)
    task = SimpleNamespace(
        user="u",
        support=(torch.randn(SUPPORT, 3, SIZE, SIZE, generator=gen), torch.rand(SUPPORT, generator=gen)),
        query=(torch.randn(QUERY, 3, SIZE, SIZE, generator=gen), torch.rand(QUERY, generator=gen)),
    )
    reference = _flat_meta_gradient(cfg, model, task, torch.float64, amp=False)
    return cfg, model, task, reference


def _flat_meta_gradient(cfg, model, task, dtype, *, amp: bool) -> torch.Tensor:
    m = copy.deepcopy(model).to(dtype)
    params, buffers = dict(m.named_parameters()), dict(m.named_buffers())
    with autocast("cpu", amp, emulate_on_cpu=True):
        mg = meta_gradient(m, params, buffers, [task], flavour=cfg.meta.flavour,
                           **meta_kwargs(m, cfg.meta))
    return torch.cat([mg.grads[n].double().reshape(-1) for n in params])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def test_the_gpu_configs_precision_keeps_the_meta_gradient(setting):
    """With run.amp / run.tf32 as gpu.yaml sets them, the second-order meta-gradient agrees with
    float64 to cosine >= 0.99 (the training run's own precision, emulated on CPU)."""
    cfg, model, task, reference = setting
    assert cfg.meta.flavour == "second_order" and cfg.meta.inner_params == "all"
    got = _flat_meta_gradient(cfg, model, task, torch.float32, amp=cfg.run.amp)
    assert _cosine(got, reference) >= 0.99
    assert float((got - reference).norm() / reference.norm()) < 0.1
    # TF32 (10-bit products) is not what this test measures: the GPU config must not allow it.
    assert cfg.run.tf32 is False


def test_bf16_autocast_would_not_keep_it(setting):
    """Why the GPU config runs float32: bf16 autocast of the backbone (head, losses and targets
    float32) stays well below 0.99 here; the issue measured 0.85-0.89 at these sizes. This also
    shows the stand-in is sensitive enough to catch a precision regression."""
    cfg, model, task, reference = setting
    got = _flat_meta_gradient(cfg, model, task, torch.float32, amp=True)
    assert _cosine(got, reference) < 0.99


def test_losses_and_targets_stay_float32_under_autocast(setting):
    """Under autocast the head and the loss run in float32, against float32 targets: the loss
    equals the float32 MSE of the head applied to the (bf16) backbone features in float32."""
    cfg, model, task, _ = setting
    m = copy.deepcopy(model).train()
    params, buffers = dict(m.named_parameters()), dict(m.named_buffers())
    images = task.support[0]
    targets = torch.full((SUPPORT,), 0.6 + 2**-10)  # not representable in bf16 (8 bits)
    with autocast("cpu", True, emulate_on_cpu=True):
        loss = loss_fn(m, params, copy.deepcopy(buffers), (images, targets))
        feats = m.backbone(images)
    assert loss.dtype == torch.float32
    assert feats.dtype == torch.bfloat16  # the backbone did run in bf16
    m.load_state_dict(model.state_dict())  # undo the BN statistics update of the forward above
    pred = m.head.train()(feats.float())
    expected = torch.nn.functional.mse_loss(pred, targets)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
