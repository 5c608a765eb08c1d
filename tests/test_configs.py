"""Every job config loads, and its first line is the exact command that runs it; every value is
validated at load, with one-line errors naming the file, line or override, and the key."""

from __future__ import annotations

import dataclasses
import logging
import shlex
from pathlib import Path

import pytest

from piaa_dist import config as config_mod
from piaa_dist.config import (
    ConfigError,
    JobConfig,
    MetaConfig,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    with_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"cpu.yaml", "gpu.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.meta.meta_steps > 0
    assert cfg.meta.meta_batch > 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_first_line_is_the_command_that_runs_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: first line must be a comment with the command"
    argv = shlex.split(first[2:])
    # The command names this very file as its config...
    assert "--config" in argv, first
    assert argv[argv.index("--config") + 1] == f"jobs/configs/{path.name}", first
    # ...and a script that exists in the repository (run from the repository root).
    scripts = [a for a in argv if a.endswith(".py")]
    assert scripts, f"{path.name}: the command runs no python script: {first}"
    assert (ROOT / scripts[0]).is_file(), f"{path.name}: {scripts[0]} does not exist"
    if argv[:3] == ["ray", "job", "submit"]:
        # `ray job submit ... -- python SCRIPT`: the entry point follows the separator.
        sep = argv.index("--")
        assert argv[sep + 1] == "python" and argv[sep + 2] == scripts[0], first


def test_gpu_config_is_the_papers_model():
    cfg = load_config(ROOT / "jobs" / "configs" / "gpu.yaml")
    assert cfg.model.backbone == "resnet18" and cfg.data.image_size == 224
    assert cfg.run.use_gpu == "yes"
    cpu = load_config(ROOT / "jobs" / "configs" / "cpu.yaml")
    assert cpu.run.use_gpu == "no" and cpu.run.workers * cpu.run.cpus_per_worker <= 2


# ---------------------------------------------------------------------------------------------
# Validation at load (issue 11 item 4, issue 10 item 4)

CPU = ROOT / "jobs" / "configs" / "cpu.yaml"


def _error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg  # the CLI prints it as one line
    return msg


@pytest.mark.parametrize("typed, expected", [
    ("no", "no"), ("yes", "yes"), ("auto", "auto"), ('"no"', "no"), ("off", "no"), ("on", "yes"),
    ("false", "no"), ("true", "yes"), ("No", "no"), ("YES", "yes"),
])
def test_use_gpu_works_as_typed_in_overrides_files_and_code(tmp_path, typed, expected):
    assert load_config(None, [f"run.use_gpu={typed}"]).run.use_gpu == expected
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  use_gpu: {typed}\n")
    assert load_config(path).run.use_gpu == expected
    # Python booleans (a Tune search space, a caller's dict) mean the same.
    if expected != "auto":
        assert with_overrides(JobConfig(), {"run.use_gpu": expected == "yes"}).run.use_gpu == expected


def test_booleans_and_numbers_read_as_typed():
    cfg = load_config(None, ["run.amp=no", "data.augment=on", "meta.meta_lr=1e-4", "run.experiment=yes",
                             "run.register_name=off"])
    assert cfg.run.amp is False and cfg.data.augment is True
    assert cfg.meta.meta_lr == 1e-4  # YAML 1.1 reads "1e-4" as a string
    # A free-text field keeps the text that was typed, not str(False).
    assert cfg.run.experiment == "yes" and cfg.run.register_name == "off"


@pytest.mark.parametrize("override, key, fragment", [
    ("meta.flavour=second_ordre", "meta.flavour", "'second_order', 'first_order', 'reptile'"),
    ("meta.flavour=Reptile", "meta.flavour", "did you mean 'reptile'"),
    ("meta.inner_optimizer=adamw", "meta.inner_optimizer", "'sgd', 'adam'"),
    ("meta.inner_params=backbone", "meta.inner_params", "'all', 'head'"),
    ("eval.finetune_optimizer=rmsprop", "eval.finetune_optimizer", "'sgd', 'adam'"),
    ("eval.finetune_bn=frozen", "eval.finetune_bn", "'batch', 'running'"),
    ("run.use_gpu=maybe", "run.use_gpu", "'auto', 'yes', 'no'"),
    ("model.backbone=vgg16", "model.backbone", "'convnet', 'resnet18'"),
    ("model.pretrained=imagenet", "model.pretrained", "'auto', 'none' or a weights file path"),
    ("eval.methods=[blg-piaa, maml]", "eval.methods", "[1] must be one of 'blg-piaa'"),
    ("eval.methods=[blg-piaa, blg-piaa]", "eval.methods", "twice"),
    ("eval.methods=[]", "eval.methods", "must not be empty"),
    ("meta.inner_steps=-3", "meta.inner_steps", "must be >= 1, got -3"),
    ("meta.meta_steps=0", "meta.meta_steps", "must be >= 1"),
    ("meta.meta_batch=0", "meta.meta_batch", "must be >= 1"),
    ("meta.inner_lr=0", "meta.inner_lr", "must be > 0"),
    ("meta.meta_lr=-1e-3", "meta.meta_lr", "must be > 0"),
    ("meta.lr_decay=1.5", "meta.lr_decay", "(0, 1]"),
    ("meta.grad_clip=-1", "meta.grad_clip", ">= 0"),
    ("meta.inner_lr=.nan", "meta.inner_lr", "finite number"),
    ("model.dropout=1.0", "model.dropout", "[0, 1)"),
    ("model.head_hidden=[32, 0]", "model.head_hidden", "[1] must be >= 1"),
    ("data.shots=0", "data.shots", ">= 1"),
    ("data.query_size=-1", "data.query_size", ">= 1"),
    ("data.url=https://example.com/x", "data.url", "s3://bucket/prefix"),
    ("data.s3_endpoint=localhost:9000", "data.s3_endpoint", "http://host:port"),
    ("eval.shots=[10, 0]", "eval.shots", "[1] must be >= 1"),
    ("eval.repeats=0", "eval.repeats", ">= 1"),
    ("eval.finetune_steps=-1", "eval.finetune_steps", ">= 0"),
    ("giaa.lr=0", "giaa.lr", "> 0"),
    ("run.seed=-1", "run.seed", ">= 0"),
    ("run.cpus_per_worker=0", "run.cpus_per_worker", "> 0"),
    ("run.max_failures=-2", "run.max_failures", ">= -1"),
    ("run.register_name=a/b", "run.register_name", "without '/'"),
    ("run.alias=v3", "run.alias", "other than 'latest'"),
    ("tune.inner_lr=[0.1, 0.01]", "tune.inner_lr", "lo < hi"),
    ("tune.meta_lr=[0, 0.01]", "tune.meta_lr", "[0] must be > 0"),
    ("tune.inner_lr=[0.1]", "tune.inner_lr", "expected a list of 2 values"),
    ("tune.reduction_factor=1", "tune.reduction_factor", ">= 2"),
    ("tune.shots=[5, -5]", "tune.shots", ">= 1"),
    ("meta.inner_steps=three", "meta.inner_steps", "expected an integer"),
    ("meta.inner_steps=2.5", "meta.inner_steps", "expected an integer"),
    ("data.augment=maybe", "data.augment", "expected true/false"),
    ("run.experiment=[a, b]", "run.experiment", "expected a string"),
    ("meta.flavor=reptile", "meta.flavor", "unknown key"),
    ("mtea.flavour=reptile", "mtea", "unknown section"),
])
def test_bad_values_are_one_line_errors_naming_the_override_and_key(override, key, fragment):
    msg = _error(CPU, [override])
    assert msg.startswith(f"override {override!r}: "), msg
    assert key in msg and fragment in msg, msg


def test_bad_values_in_a_file_name_the_file_line_and_key(tmp_path):
    text = CPU.read_text()
    path = tmp_path / "cpu-typo.yaml"
    path.write_text(text.replace("flavour: second_order", "flavour: second-order"))
    line = next(i for i, s in enumerate(path.read_text().splitlines(), 1) if "second-order" in s)
    msg = _error(path)
    assert msg.startswith(f"{path}:{line}: meta.flavour: must be one of"), msg
    path.write_text(text.replace("meta_steps: 1500", "meta_steps: -1500"))
    assert "meta.meta_steps: must be >= 1, got -1500" in _error(path)
    path.write_text(text.replace("  inner_lr: 0.5", "  inner_lr: 0.5\n  inner_lr_typo: 1"))
    assert f"{path}:" in (msg := _error(path)) and "meta.inner_lr_typo" in msg


def test_cross_field_rules(tmp_path):
    # A convnet has no pretrained weights; a 16 px image cannot pass 5 halvings.
    msg = _error(None, ["model.pretrained=~/w/resnet18.pth"])
    assert "model.pretrained" in msg and "convnet" in msg
    assert load_config(None, ["model.backbone=resnet18", "model.pretrained=~/w/resnet18.pth"])
    msg = _error(CPU, ["model.conv_blocks=6"])  # cpu.yaml: 32 px
    assert msg.startswith("override 'model.conv_blocks=6': data.image_size:"), msg
    assert load_config(CPU, ["model.conv_blocks=5"]).model.conv_blocks == 5  # 32 px / 2^5 = 1 px


@pytest.mark.parametrize("text, key, lines", [
    ("meta:\n  inner_lr: 0.1\nrun:\n  seed: 1\nmeta:\n  inner_steps: 2\n", "'meta'", (5, 1)),
    ("meta:\n  inner_lr: 0.1\n  meta_lr: 0.2\n  inner_lr: 0.2\n", "'meta.inner_lr'", (4, 2)),
    ("eval: {repeats: 2, repeats: 3}\n", "'eval.repeats'", (1, 1)),
    ("run:\n  use_gpu: no\n  'use_gpu': yes\n", "'run.use_gpu'", (3, 2)),
])
def test_duplicate_keys_are_errors_naming_file_key_and_lines(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    msg = _error(path)
    assert msg.startswith(f"{path}:{lines[0]}: duplicate key {key} (first given on line {lines[1]})"), msg


def test_binary_and_non_utf8_files_are_config_errors(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  experiment: caf\xe9\n".encode("latin-1"))
    assert _error(path).startswith(f"{path}: not a UTF-8 text file (byte 22")
    path.write_bytes(b"\x00\x01\x02binary\xff")
    assert _error(path).startswith(f"{path}: ")
    path.write_bytes(b"meta:\n  \x07flavour: reptile\n")  # control character: not YAML
    assert _error(path).startswith(f"{path}: invalid YAML")
    assert _error(tmp_path).startswith(f"{tmp_path}: cannot read config")
    assert _error(tmp_path / "missing.yaml").startswith(f"{tmp_path / 'missing.yaml'}: cannot read config")


def test_every_construction_validates():
    with pytest.raises(ConfigError, match="meta.inner_steps: must be >= 1"):
        MetaConfig(inner_steps=0)
    with pytest.raises(ConfigError, match="meta.flavour"):
        dataclasses.replace(JobConfig().meta, flavour="maml")
    with pytest.raises(ConfigError, match="<updates>: meta.meta_steps"):
        with_overrides(JobConfig(), {"meta.meta_steps": -1})
    with pytest.raises(ConfigError, match=r"src\.yaml: model\.dropout"):
        config_from_dict({"model": {"dropout": 2}}, "src.yaml")
    with pytest.raises(ConfigError, match="model.pretrained"):
        JobConfig(model=ModelConfig(pretrained="/w.pth"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_round_trip_through_dump_and_dict(tmp_path, path):
    cfg = load_config(path)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    (tmp_path / "dumped.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "dumped.yaml") == cfg


def test_enum_names_match_the_registries_they_stand_for():
    """config.py keeps light copies of names whose registries live in torch-heavy modules."""
    from piaa_dist import evaluate, meta, model, protocol, train

    assert set(config_mod.METHOD_NAMES) == set(evaluate.METHODS)
    assert tuple(config_mod.FLAVOURS) == tuple(meta.FLAVOURS) == tuple(train.FLAVOURS)
    assert tuple(config_mod.OPTIMIZERS) == tuple(meta.OPTIMIZERS)
    assert tuple(config_mod.BN_MODES) == tuple(protocol.BN_MODES)
    assert tuple(config_mod.BACKBONES) == tuple(model.BACKBONES) == tuple(model.BACKBONE_BUILDERS)
    # ...and every name the config accepts loads.
    for name in config_mod.METHOD_NAMES:
        assert load_config(None, [f"eval.methods=[{name}]"]).eval.methods == (name,)
    for flavour in config_mod.FLAVOURS:
        assert load_config(None, [f"meta.flavour={flavour}"]).meta.flavour == flavour


def test_cli_prints_one_line_and_exits_2_before_any_work(tmp_path, caplog):
    from piaa_dist import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text(CPU.read_text().replace("flavour: second_order", "flavour: second_ordr"))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="piaa_dist"):
        rc = cli.main(["train", "--config", str(bad), "--data", str(tmp_path / "data"), "--out", str(out)])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert f"{bad}:" in errors[0] and "meta.flavour" in errors[0] and "'second_order'" in errors[0]
    assert not out.exists()  # nothing was started or written
