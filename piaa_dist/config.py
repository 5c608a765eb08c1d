"""Typed job configuration: frozen dataclasses loaded from YAML with ``key=value`` overrides.

A config file is a YAML mapping whose top-level keys are the sections of :class:`JobConfig`
(``data``, ``model``, ``meta``, ``eval``, ``giaa``, ``run``, ``tune``). Every key is checked
against the dataclass that owns it: an unknown key is an error naming the file and the key,
never a silently ignored typo. Parsing has no side effects (no directories are created, no
clients are opened), so a config can be loaded anywhere, including in tests.

Overrides use dotted paths, ``meta.inner_lr=0.01 eval.shots=[10,100]``; values are parsed as
YAML scalars/lists and then coerced to the field's declared type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed: unknown key, wrong type, or bad value."""


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how tasks are cut from them."""

    url: str = ""  #: dataset root holding manifest.parquet: a local folder or s3://bucket/prefix
    s3_endpoint: str = ""  #: S3 endpoint URL; empty means $AWS_ENDPOINT_URL, then AWS default
    image_size: int = 64  #: side of the square image fed to the model
    shots: int = 10  #: support-set size of a meta-training task
    query_size: int = 20  #: query-set size of a meta-training task
    augment: bool = True  #: random flip + crop on support images (as the reference code)
    validation_users: int = 8  #: training users held out for validation (Tune's metric); never test users
    cache_users: int = 4096  #: decoded users a rank keeps in memory (LRU)


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and aesthetic head."""

    # Defaults are the cheap CPU configuration. The paper's (GPU, data.image_size=224):
    # backbone=resnet18, feature_dim=1000, head_hidden=[1024, 512], dropout=0.5
    # (piaa_dist.model.PAPER_MODEL).
    backbone: str = "convnet"  #: "convnet" (small, CPU) or "resnet18" (the paper's)
    pretrained: str = "auto"  #: "auto" (torch hub cache if present), "none", or a weights file path
    width: int = 32  #: channels of the convnet backbone
    conv_blocks: int = 4  #: conv3x3-BN-ReLU-maxpool blocks of the convnet backbone
    feature_dim: int = 128  #: backbone output size fed to the head (the paper: 1000)
    head_hidden: tuple[int, ...] = (64, 32)  #: hidden sizes of the head MLP (the paper: 1024, 512)
    dropout: float = 0.2  #: head dropout (the paper: 0.5)


@dataclass(frozen=True)
class MetaConfig:
    """Bilevel optimization: the inner (support) loop and the outer (query) update."""

    flavour: str = "second_order"  #: "second_order", "first_order" or "reptile"
    inner_steps: int = 5  #: adaptation steps on the support set
    inner_lr: float = 0.01  #: step size of the inner loop
    inner_optimizer: str = "sgd"  #: "sgd" or "adam" (differentiable, functional)
    inner_params: str = "all"  #: "all" or "head": which parameters the inner loop adapts
    inner_head_lr_scale: float = 1.0  #: head inner lr = inner_lr × this (reference code: 10)
    meta_batch: int = 4  #: user tasks per meta-step (the paper's 4)
    meta_lr: float = 1e-3  #: outer (meta) learning rate
    meta_steps: int = 300  #: number of meta-updates
    lr_decay: float = 1.0  #: multiplicative meta-lr decay per `decay_every` steps
    decay_every: int = 100
    grad_clip: float = 10.0  #: clip the meta-gradient norm (0 = off)


@dataclass(frozen=True)
class EvalConfig:
    """The meta-testing protocol (fine-tune on k shots of an unseen user, rank the rest)."""

    shots: tuple[int, ...] = (10, 100)
    repeats: int = 10  #: random splits per user and k
    finetune_steps: int = 20  #: fine-tuning budget, the same for every method
    finetune_lr: float = 0.01
    finetune_optimizer: str = "sgd"
    finetune_bn: str = "batch"  #: BatchNorm while fine-tuning: "batch" (as the inner loop) or "running"
    batch_size: int = 100
    methods: tuple[str, ...] = ("blg-piaa", "meta-no-adapt", "giaa-finetune")


@dataclass(frozen=True)
class GiaaConfig:
    """The conventional prior: one generic model trained on all training users' ratings pooled."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it is distributed and tracked."""

    seed: int = 0
    workers: int = 0  #: Ray Train workers; 0 runs the same loop in-process
    cpus_per_worker: float = 1.0
    use_gpu: str = "auto"  #: "auto", "yes" or "no"
    threads_per_worker: int = 1  #: torch intra-op threads per worker (fair CPU comparisons)
    amp: bool = True  #: bf16 autocast of forward passes on CUDA (CPU always runs float32)
    checkpoint_every: int = 50  #: meta-steps between checkpoints
    storage_path: str = ""  #: checkpoint storage (local folder or s3://); empty = <out>/checkpoints
    max_failures: int = 2  #: Ray Train restarts from the last checkpoint
    log_every: int = 10
    validate_every: int = 100  #: meta-steps between validation SROCC measurements
    mlflow_uri: str = ""  #: empty = $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db in the cwd
    experiment: str = "piaa-dist"
    register_name: str = "blg-piaa"  #: registered model name ("" = do not register)
    alias: str = ""  #: alias to move to the registered version, e.g. "champion"


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune search space and scheduler."""

    samples: int = 4
    max_concurrent: int = 1  #: trials at once; sized for 2 CPUs by default
    inner_lr: tuple[float, float] = (1e-3, 1e-1)  #: log-uniform range
    inner_steps: tuple[int, ...] = (1, 3, 5)
    shots: tuple[int, ...] = (5, 10, 20)
    meta_lr: tuple[float, float] = (1e-4, 3e-3)  #: log-uniform range
    grace_period: int = 1  #: ASHA: validation rounds before a trial may be stopped
    reduction_factor: int = 2


@dataclass(frozen=True)
class JobConfig:
    """Everything a train / tune / evaluate job needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    giaa: GiaaConfig = field(default_factory=GiaaConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


# ---------------------------------------------------------------------------------------------
# Loading, overriding, dumping


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Coerce a YAML value to a dataclass field type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(typ):
        return _build(typ, value, where)
    raise ConfigError(f"{where}: unsupported field type {typ!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; "
            f"known keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any] | None, source: str = "<dict>") -> JobConfig:
    """Build a JobConfig from a nested mapping, rejecting unknown keys.

    Args:
        data: nested mapping ``{"meta": {"inner_lr": 0.01}, ...}``.
        source: name used in error messages (usually the file path).
    """
    try:
        return _build(JobConfig, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["meta.inner_lr=0.01", ...]`` into a nested dict (no validation yet)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. meta.inner_lr=0.01")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r}: key must be section.name, e.g. meta.inner_lr")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse value: {err}") from None
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> JobConfig:
    """Load a job config from YAML (or defaults when `path` is None) and apply overrides.

    Args:
        path: YAML file; its top-level keys are JobConfig sections.
        overrides: ``section.key=value`` strings applied after the file.

    Raises:
        ConfigError: unknown keys, wrong types, or a missing file, naming the file and key.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config: {err.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: invalid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
        data = dict(loaded or {})
    over = parse_overrides(overrides)
    if over:
        source = f"{source} with overrides {list(overrides)}"
    return config_from_dict(_merge(data, over), source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that round-trips through :func:`config_from_dict`."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def dump_config(cfg: JobConfig) -> str:
    """YAML text of a config (what a run saves beside its model)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def flat_params(cfg: JobConfig) -> dict[str, Any]:
    """``{"meta.inner_lr": 0.01, ...}``: the form MLflow params and Tune configs use."""
    flat: dict[str, Any] = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def with_overrides(cfg: JobConfig, updates: Mapping[str, Any]) -> JobConfig:
    """Return a copy of `cfg` with flat ``{"section.key": value}`` updates applied and validated."""
    nested: dict[str, Any] = {}
    for key, value in updates.items():
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"update {key!r}: key must be section.name")
        nested.setdefault(section, {})[name] = value
    return config_from_dict(_merge(config_to_dict(cfg), nested), "<updates>")
