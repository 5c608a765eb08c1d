"""ImageNet weights by design: ``model.pretrained: required`` fails fast where the weights are
missing, loads them where they are, and the GPU configs use it."""

from __future__ import annotations

import pytest
import torch

from piaa_dist.config import ConfigError, ModelConfig, load_config
from piaa_dist.errors import UserError
from piaa_dist.model import (
    RESNET18_WEIGHTS_FILE,
    WeightsMissing,
    build_model,
    resolve_pretrained,
    weights_cache_path,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REQUIRED = ModelConfig(backbone="resnet18", pretrained="required", feature_dim=1000, head_hidden=(8,))


def test_required_is_a_valid_setting_and_convnets_refuse_it():
    assert load_config(None, ["model.backbone=resnet18", "model.pretrained=required"]).model.pretrained == "required"
    with pytest.raises(ConfigError, match="model.pretrained.*convnet"):
        load_config(None, ["model.pretrained=required"])  # the default backbone is the convnet
    with pytest.raises(ConfigError, match="did you mean 'required'"):
        load_config(None, ["model.backbone=resnet18", "model.pretrained=Required"])


def test_required_weights_missing_stop_the_model_build_naming_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / RESNET18_WEIGHTS_FILE
    assert weights_cache_path() == expected
    with pytest.raises(WeightsMissing) as info:
        build_model(REQUIRED)
    err = info.value
    assert isinstance(err, UserError) and isinstance(err, FileNotFoundError)
    text = str(err)
    assert str(expected) in text and "\n" not in text
    assert "docker/Dockerfile" in text and "model.pretrained=auto" in text  # how to fix it
    # "auto" in the same place trains from scratch (with a warning), as before
    assert resolve_pretrained("auto") is None


def test_required_weights_load_from_the_cache(tmp_path, monkeypatch):
    from torchvision.models import resnet18

    torch.manual_seed(5)
    reference = resnet18(weights=None).state_dict()
    path = tmp_path / "hub" / "checkpoints" / RESNET18_WEIGHTS_FILE
    path.parent.mkdir(parents=True)
    torch.save(reference, path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert resolve_pretrained("required") == path
    model = build_model(REQUIRED)
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, reference["layer3.0.conv1.weight"])
    torch.testing.assert_close(model.backbone.fc.bias, reference["fc.bias"])


def test_an_explicit_path_that_is_missing_is_the_same_clear_error(tmp_path):
    missing = tmp_path / "w" / "resnet18.pth"
    with pytest.raises(WeightsMissing, match=f"no weights file at {missing}"):
        build_model(ModelConfig(backbone="resnet18", pretrained=str(missing), feature_dim=1000, head_hidden=(8,)))


def test_the_gpu_configs_require_imagenet_weights():
    from pathlib import Path

    gpu_configs = [p for p in Path("jobs/configs").glob("*.yaml")
                   if load_config(p).run.use_gpu == "yes"]
    assert gpu_configs, "there is a GPU config"
    for path in gpu_configs:
        cfg = load_config(path)
        assert cfg.model.backbone == "resnet18" and cfg.model.pretrained == "required", path
