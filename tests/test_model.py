"""The aesthetic model: shapes, head structure, ImageNet-weights policy, device helpers."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from piaa_dist.config import ModelConfig
from piaa_dist.model import (
    BACKBONE_BUILDERS,
    PAPER_MODEL,
    RESNET18_WEIGHTS_FILE,
    autocast,
    build_model,
    head_names,
    select_device,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_convnet_forward_shape_range_and_head_structure():
    torch.manual_seed(0)
    model = build_model(ModelConfig())  # the CPU defaults
    x = torch.randn(5, 3, 64, 64)
    out = model(x)
    assert out.shape == (5,)
    assert torch.all((out > 0) & (out < 1))
    model.eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1,)  # 32 px works too, even N=1 in eval
    kinds = [type(m) for m in model.head.modules()]
    for kind in (nn.Linear, nn.BatchNorm1d, nn.PReLU, nn.Dropout):
        assert kind in kinds
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 64), (64, 32), (32, 1)]
    names = {n for n, _ in model.named_parameters()}
    heads = head_names(model)
    assert heads < names and all(n.startswith("head.") for n in heads)
    assert all(n.startswith("backbone.") for n in names - heads)


@pytest.mark.parametrize("backbone", sorted(BACKBONE_BUILDERS))
def test_every_registered_backbone_makes_a_model_the_meta_learner_can_adapt(backbone):
    """The contract a new backbone must meet: ``feature_dim`` features per image, a score in
    (0, 1) per image, its parameters under ``backbone.`` apart from the head's, and a
    meta-gradient that reaches every parameter through ``functional_call``."""
    from piaa_dist.meta import meta_gradient

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, pretrained="none", feature_dim=16, head_hidden=(8,), width=8)
    model = build_model(cfg)
    x = torch.randn(6, 3, 32, 32)
    assert model.backbone(x).shape == (6, 16)
    out = model(x)
    assert out.shape == (6,) and torch.all((out > 0) & (out < 1))
    names = {n for n, _ in model.named_parameters()}
    assert all(n.startswith("backbone.") for n in names - head_names(model))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    task = SimpleNamespace(support=(x[:3], torch.rand(3)), query=(x[3:], torch.rand(3)))
    mg = meta_gradient(model, params, buffers, [task], flavour="second_order", steps=1, inner_lr=0.1)
    assert set(mg.grads) == set(params)
    assert all(torch.isfinite(g).all() for g in mg.grads.values())
    assert any(g.abs().sum() > 0 for n, g in mg.grads.items() if n.startswith("backbone."))


def test_dropout_is_configurable():
    model = build_model(ModelConfig(dropout=0.0))
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    with pytest.raises(ValueError, match="dropout"):
        build_model(ModelConfig(dropout=1.0))
    with pytest.raises(ValueError, match="backbone"):
        build_model(ModelConfig(backbone="vgg"))


def test_resnet18_from_scratch_logs_and_runs_at_64px(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = ModelConfig(backbone="resnet18", pretrained="auto", feature_dim=1000,
                      head_hidden=(16,))
    with caplog.at_level(logging.WARNING, logger="piaa_dist.model"):
        model = build_model(cfg)
    expected = tmp_path / "hub" / "checkpoints" / RESNET18_WEIGHTS_FILE
    assert f"no ImageNet weights found at {expected}; training from scratch" in caplog.text
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2,)


def test_resnet18_loads_weights_from_cache_or_path(tmp_path, monkeypatch, caplog):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    reference = resnet18(weights=None).state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference, cache / RESNET18_WEIGHTS_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    with caplog.at_level(logging.INFO, logger="piaa_dist.model"):
        model = build_model(ModelConfig(backbone="resnet18", pretrained="auto",
                                        feature_dim=1000, head_hidden=(8,)))
    assert "loaded ImageNet weights" in caplog.text
    torch.testing.assert_close(model.backbone.conv1.weight, reference["conv1.weight"])
    torch.testing.assert_close(model.backbone.fc.weight, reference["fc.weight"])

    # Explicit path, and a feature_dim other than 1000 (new projection, trunk still loaded).
    model = build_model(ModelConfig(backbone="resnet18", pretrained=str(cache / RESNET18_WEIGHTS_FILE),
                                    feature_dim=32, head_hidden=(8,)))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight,
                               reference["layer4.1.conv2.weight"])
    assert model.backbone.fc.out_features == 32
    # "none" ignores the cache; a missing explicit path is an error, not a silent scratch run.
    model = build_model(ModelConfig(backbone="resnet18", pretrained="none", feature_dim=1000,
                                    head_hidden=(8,)))
    assert not torch.equal(model.backbone.conv1.weight, reference["conv1.weight"])
    with pytest.raises(FileNotFoundError, match="no weights file"):
        build_model(ModelConfig(backbone="resnet18", pretrained=str(tmp_path / "missing.pth")))


def test_paper_config_is_the_papers():
    assert PAPER_MODEL.backbone == "resnet18"
    assert PAPER_MODEL.feature_dim == 1000
    assert PAPER_MODEL.head_hidden == (1024, 512)
    assert PAPER_MODEL.dropout == 0.5


def test_device_helpers():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("no") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            select_device("cuda")
    x = torch.randn(2, 3)
    with autocast("cpu"):  # a no-op on CPU: float32 stays float32
        assert (x @ x.T).dtype == torch.float32
