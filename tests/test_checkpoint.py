"""Model folders and trainer states round-trip exactly, fail loudly, and never unpickle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from piaa_dist import checkpoint
from piaa_dist.checkpoint import (
    CheckpointError,
    load_model,
    load_training_state,
    save_model,
    save_training_state,
)
from piaa_dist.config import (
    ConfigError,
    JobConfig,
    ModelConfig,
    load_config,
    with_overrides,
)
from piaa_dist.errors import UserError


class StandIn(nn.Module):
    """Small model with BatchNorm buffers, sized by cfg.width (so a config change changes shapes)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, cfg.width, 3, padding=1)
        self.bn = nn.BatchNorm2d(cfg.width)
        self.head = nn.Linear(cfg.width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return torch.sigmoid(self.head(h)).squeeze(-1)


def _trained_standin(cfg: JobConfig) -> StandIn:
    torch.manual_seed(0)
    model = StandIn(cfg.model)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # move the BN running statistics away from their defaults
            model(torch.randn(4, 3, 8, 8) * 3 + 1)
    return model


@pytest.fixture()
def cfg() -> JobConfig:
    return with_overrides(JobConfig(), {"model.width": 6, "model.pretrained": "none"})


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _forget_hashes(folder: Path) -> None:
    """Drop the hashes recorded in info.json (as a folder saved before they existed, or edited
    by hand), so a test can reach the checks behind them."""
    info = json.loads((folder / "info.json").read_text())
    del info["_checkpoint"]
    (folder / "info.json").write_text(json.dumps(info))


def test_model_round_trip_keeps_weights_buffers_config_and_info(tmp_path, cfg):
    model = _trained_standin(cfg)
    out = save_model(tmp_path / "m", model, cfg, {"step": 7, "srocc": np.float32(0.5)})
    assert sorted(p.name for p in out.iterdir()) == sorted(checkpoint.MODEL_FILES)

    loaded, cfg2, info = load_model(out, build=StandIn)
    _assert_same_state(model, loaded)
    assert loaded.bn.num_batches_tracked.item() == 3
    assert not torch.equal(loaded.bn.running_mean, torch.zeros(6))  # buffers carried, not reset
    assert cfg2 == cfg
    assert info == {"step": 7, "srocc": 0.5}
    assert not loaded.training
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    assert torch.equal(model(x), loaded(x))



def test_model_info_reads_back_alone(tmp_path, cfg):
    """``read_model_info`` gives the caller's info dict without loading the weights (and
    without the format's own bookkeeping)."""
    out = save_model(tmp_path / "m", _trained_standin(cfg), cfg, {"step": 7, "srocc": 0.25, "note": "x"})
    assert checkpoint.read_model_info(out) == {"step": 7, "srocc": 0.25, "note": "x"}
    assert checkpoint.read_model_info(str(out)) == {"step": 7, "srocc": 0.25, "note": "x"}

def test_real_model_round_trip(tmp_path, cfg):
    """The default builder is piaa_dist.model.build_model."""
    from piaa_dist.model import build_model

    torch.manual_seed(1)
    model = build_model(cfg.model)
    save_model(tmp_path, model, cfg, {})
    loaded, _, _ = load_model(tmp_path)
    _assert_same_state(model, loaded)


def test_mismatched_architecture_names_file_and_keys(tmp_path, cfg):
    save_model(tmp_path, _trained_standin(cfg), cfg, {})

    class Other(StandIn):
        def __init__(self, c: ModelConfig) -> None:
            super().__init__(c)
            self.extra = nn.Linear(2, 2)

    with pytest.raises(CheckpointError, match=r"model\.safetensors.*extra\.weight"):
        load_model(tmp_path, build=Other)
    # a config whose shapes differ from the weights: size mismatch, again naming the file
    # (past the config's recorded hash, which would refuse the edit first)
    _forget_hashes(tmp_path)
    (tmp_path / "config.yaml").write_text(
        (tmp_path / "config.yaml").read_text().replace("width: 6", "width: 5")
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*size mismatch"):
        load_model(tmp_path, build=StandIn)


def test_garbage_weights_file_gives_clear_error(tmp_path, cfg):
    save_model(tmp_path, _trained_standin(cfg), cfg, {})
    _forget_hashes(tmp_path)  # get past the hashes: the parser must still refuse
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        load_model(tmp_path, build=StandIn)
    assert issubclass(CheckpointError, UserError)  # the CLI prints it as one line


def test_tampered_weights_fail_the_hash_check(tmp_path, cfg):
    save_model(tmp_path, _trained_standin(cfg), cfg, {})
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the tensor data: still parses, different weights
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 .* does not match"):
        load_model(tmp_path, build=StandIn)


def test_every_file_of_a_model_folder_is_covered_by_its_hashes(tmp_path, cfg):
    """Fine-tuning settings edited in config.yaml, or metadata edited in info.json, are refused
    at load, naming the file; a harmless re-indentation of info.json is not a change."""
    out = save_model(tmp_path / "m", _trained_standin(cfg), cfg, {"step": 7})
    pristine = {name: (out / name).read_bytes() for name in checkpoint.MODEL_FILES}

    config = pristine["config.yaml"].decode()
    assert "finetune_steps: 20" in config
    (out / "config.yaml").write_text(config.replace("finetune_steps: 20", "finetune_steps: 200"))
    assert load_config(out / "config.yaml").eval.finetune_steps == 200  # still a valid config
    with pytest.raises(CheckpointError, match=r"config\.yaml: SHA-256 .* does not match"):
        load_model(out, build=StandIn)
    (out / "config.yaml").write_bytes(pristine["config.yaml"])

    info = json.loads(pristine["info.json"])
    info["step"] = 8
    (out / "info.json").write_text(json.dumps(info, indent=2))
    with pytest.raises(CheckpointError, match=r"info\.json: content does not match"):
        load_model(out, build=StandIn)
    # the hashes recorded inside info.json cannot be edited unnoticed either
    info = json.loads(pristine["info.json"])
    info["_checkpoint"]["files_sha256"]["config.yaml"] = "0" * 64
    (out / "info.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"info\.json: content does not match"):
        load_model(out, build=StandIn)

    (out / "info.json").write_text(json.dumps(json.loads(pristine["info.json"])))  # no indent
    _, _, got = load_model(out, build=StandIn)
    assert got == {"step": 7}
    assert checkpoint.model_file_hashes(out)["config.yaml"] == checkpoint.sha256_file(out / "config.yaml")


class _Payload:
    """Unpickling this creates a marker directory: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickles_are_never_unpickled(tmp_path, cfg):
    marker = tmp_path / "PWNED"
    evil = pickle.dumps({"conv.weight": _Payload(marker)})

    # 1. a malicious .pt beside a valid checkpoint is ignored
    good = tmp_path / "good"
    model = _trained_standin(cfg)
    save_model(good, model, cfg, {})
    (good / "model.pt").write_bytes(evil)
    loaded, _, _ = load_model(good, build=StandIn)
    _assert_same_state(model, loaded)

    # 2. a folder with only a pickle is rejected with a message saying why
    only_pt = tmp_path / "only_pt"
    only_pt.mkdir()
    (only_pt / "model.pt").write_bytes(evil)
    with pytest.raises(CheckpointError, match=r"missing.*model\.pt.*never loaded"):
        load_model(only_pt, build=StandIn)

    # 3. a pickle renamed to model.safetensors is refused by the parser
    disguised = tmp_path / "disguised"
    save_model(disguised, model, cfg, {})
    (disguised / "info.json").write_text("{}")  # no recorded hash: only the parser stands guard
    (disguised / "model.safetensors").write_bytes(evil)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(disguised, build=StandIn)

    # 4. a pickle posing as a training state is refused too
    (disguised / "training_state.json").write_text(json.dumps({"format": checkpoint.STATE_FORMAT, "state": {}}))
    (disguised / "training_state.safetensors").write_bytes(evil)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_training_state(disguised)

    assert not marker.exists()


def test_missing_folder_and_bad_config_name_the_path(tmp_path, cfg):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_model(tmp_path / "nowhere", build=StandIn)
    save_model(tmp_path, _trained_standin(cfg), cfg, {})
    (tmp_path / "config.yaml").write_text("model:\n  widht: 6\n")
    with pytest.raises(ConfigError, match=r"config\.yaml.*widht"):
        load_model(tmp_path, build=StandIn)


def test_info_must_be_json(tmp_path, cfg):
    with pytest.raises(TypeError):
        save_model(tmp_path, _trained_standin(cfg), cfg, {"bad": object()})
    assert not (tmp_path / "model.safetensors").exists()  # nothing half-written


def test_training_state_round_trip_with_adam(tmp_path, cfg):
    model = _trained_standin(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 3, 8, 8)).sum().backward()
        opt.step()
    rng = np.random.default_rng(5)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 2,
        "rng": torch.get_rng_state(),
        "np_rng": rng.bit_generator.state,  # 128-bit ints
        "legacy_rng": np.random.RandomState(3).get_state(legacy=False),  # uint32 array
        "history": [0.5, float("nan"), float("inf")],
        "tags": ("a", 1, None, True),
        "__weird": {"__tensor__": "not a tensor ref"},
    }
    save_training_state(tmp_path, state)
    back = load_training_state(tmp_path)

    assert back["step"] == 2 and back["tags"] == ("a", 1, None, True)
    assert back["history"][0] == 0.5 and np.isnan(back["history"][1]) and back["history"][2] == float("inf")
    assert back["__weird"] == {"__tensor__": "not a tensor ref"}
    assert torch.equal(back["rng"], state["rng"])
    assert back["np_rng"] == state["np_rng"]
    np.testing.assert_array_equal(back["legacy_rng"]["state"]["key"], state["legacy_rng"]["state"]["key"])
    assert back["legacy_rng"]["state"]["key"].dtype == state["legacy_rng"]["state"]["key"].dtype
    # optimizer state keeps its int keys and tuple betas: load into a fresh optimizer and compare
    assert set(back["optimizer"]["state"]) == set(opt.state_dict()["state"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.99)
    model2 = StandIn(cfg.model)
    model2.load_state_dict(back["model"])
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name]), (k, name)
    # and the next step is identical
    x = torch.randn(3, 3, 8, 8)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    _assert_same_state(model, model2)


def test_training_state_rejects_unsupported_and_detects_tampering(tmp_path):
    with pytest.raises(TypeError, match="optimizer/fn"):
        save_training_state(tmp_path / "x", {"optimizer": {"fn": lambda: 0}})
    save_training_state(tmp_path, {"w": torch.arange(4.0), "step": 1})
    path = tmp_path / "training_state.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="training_state.safetensors: SHA-256"):
        load_training_state(tmp_path)
    with pytest.raises(CheckpointError, match="training_state.json: missing"):
        load_training_state(tmp_path / "nothing")
