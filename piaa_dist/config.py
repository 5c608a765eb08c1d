"""Typed job configuration: frozen dataclasses loaded from YAML with ``key=value`` overrides.

A config file is a YAML mapping whose top-level keys are the sections of :class:`JobConfig`
(``data``, ``model``, ``meta``, ``eval``, ``giaa``, ``run``, ``tune``). Every key is checked
against the dataclass that owns it: an unknown key is an error naming the file and the key,
never a silently ignored typo. Parsing has no side effects (no directories are created, no
clients are opened, no file named by a value is opened), so a config can be loaded anywhere,
including in tests.

Overrides use dotted paths, ``meta.inner_lr=0.01 eval.shots=[10,100]``; values are parsed as
YAML scalars/lists and then coerced to the field's declared type. When the same key is given
twice on the command line, the later one wins (as with any command-line flag).

Validation happens at load
--------------------------
Every section validates itself when it is built (``__post_init__``), however it is built:
:func:`load_config`, :func:`config_from_dict`, :func:`with_overrides`, ``dataclasses.replace``
or a direct ``MetaConfig(...)``. So a misspelt enum, a negative step count or a learning rate
of 0 is a :class:`ConfigError` before any expensive work starts, never a traceback inside a
Ray worker. The checks, in order:

1. *Type*: the value is coerced to the field's annotation (``int``, ``float``, ``str``,
   ``bool``, ``tuple[...]``). YAML 1.1 reads ``no``/``off``/``yes`` as booleans and ``1e-3``
   as a string; here booleans are read as typed (a string field such as ``run.use_gpu`` gets
   ``no``; a boolean field accepts ``yes/no/on/off/true/false``), and a float field accepts
   ``1e-3``. Non-finite numbers are rejected.
2. *Rules* of the field (enums, ranges, positivity; see the rule functions below).
3. *Cross-field rules* of :class:`JobConfig` (``JobConfig._CROSS_RULES``), cheap checks that
   involve two sections.

Error messages are one line: ``FILE:LINE: section.key: what is wrong`` (or
``override 'section.key=value': ...``), naming the allowed values.

Adding a validated field is one line
------------------------------------
Declare it in its section with :func:`setting`: the default, then its rules::

    patience: int = setting(0, at_least(0))  #: validation rounds without improvement (0 = off)
    schedule: str = setting("cosine", one_of("cosine", "step"))  #: meta-lr schedule
    lrs: tuple[float, ...] = setting((0.01,), non_empty, each(positive))

The type comes from the annotation (``int | None`` for an optional value: the rules skip
``None``); rules available: :func:`at_least`, :data:`positive`,
:func:`in_range`, :func:`one_of`, :func:`each`, :data:`non_empty`, :data:`distinct`,
:data:`increasing`, :data:`storage_url`, :data:`http_url`, :data:`weights_source`,
:data:`model_name`, :data:`model_alias`, :data:`not_blank`. A rule is any function
``value -> value`` that raises :class:`RuleError` with the problem (it may also normalise the
value). A new enum whose names are defined by a registry in a torch-heavy module (as
``eval.methods`` is by :data:`piaa_dist.evaluate.METHODS`) keeps a light copy of the names
here (:data:`METHOD_NAMES`); ``tests/test_configs.py`` checks that the copy and the registry
agree. A rule that involves two fields goes into ``JobConfig._CROSS_RULES``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import posixpath
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, ClassVar
from urllib.parse import urlparse

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed: unknown key, wrong type, or bad value.

    The message is always one line (the CLI prints it as is). ``key`` is the dotted key the
    error is about (``"meta.flavour"``), when there is one.
    """

    def __init__(self, message: str, key: str | None = None, *, also: tuple[str, ...] = ()):
        super().__init__(" ".join(str(message).splitlines()))
        self.key = key
        #: every key involved (a cross-field rule names several), ``key`` first
        self.keys: tuple[str, ...] = tuple(k for k in (key, *also) if k)


class RuleError(ValueError):
    """Raised by a field rule with the problem (``"must be >= 1, got 0"``); the caller adds
    the key and the source."""


Rule = Callable[[Any], Any]

#: How YAML 1.1 spells booleans; a boolean field accepts these (any case).
TRUE_WORDS = ("true", "yes", "on")
FALSE_WORDS = ("false", "no", "off")

#: Names the enum fields accept. The math modules keep their own copies (``meta.FLAVOURS``,
#: ``evaluate.METHODS``...) and ``tests/test_configs.py`` checks they agree: config.py must not
#: import torch just to validate a name.
FLAVOURS = ("second_order", "first_order", "reptile")
OPTIMIZERS = ("sgd", "adam")
INNER_PARAMS = ("all", "head")
BN_MODES = ("batch", "running")
BACKBONES = ("convnet", "resnet18")
METHOD_NAMES = ("blg-piaa", "meta-no-adapt", "giaa-finetune", "giaa-no-adapt", "giaa-ridge")
#: How fine-tuning methods get their budget at evaluation: each its own, chosen on validation
#: users ("per-method"), or the one ``eval.finetune_*`` budget for all (the paper's, "shared").
EVAL_PROTOCOLS = ("per-method", "shared")
#: Which parameters a fine-tuning setting adapts.
FINETUNE_PARAMS = ("head", "all")
GPU_CHOICES = ("auto", "yes", "no")
ALLREDUCE_DTYPES = ("float64", "float32")
LR_SCHEDULES = ("step", "cosine")
TRIAL_RUNNERS = ("auto", "in-trial", "ray-train")


# ---------------------------------------------------------------------------------------------
# Rules: small functions value -> value that raise RuleError with the problem


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else _show(v)


def at_least(minimum: float) -> Rule:
    """``value >= minimum`` (for tuples, use ``each(at_least(n))``)."""

    def rule(v: Any) -> Any:
        if v < minimum:
            raise RuleError(f"must be >= {_num(minimum)}, got {_num(v)}")
        return v

    return rule


def positive(v: Any) -> Any:
    """``value > 0`` (learning rates, scales)."""
    if not v > 0:
        raise RuleError(f"must be > 0, got {_num(v)}")
    return v


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """``lo <= value <= hi``; ``lo_open``/``hi_open`` exclude the ends (``[0, 1)``)."""
    text = f"{'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"

    def rule(v: Any) -> Any:
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        if not (above and below):
            raise RuleError(f"must be in {text}, got {_num(v)}")
        return v

    return rule


def one_of(*choices: str) -> Rule:
    """An enum: the value must be one of ``choices`` (exactly; case matters)."""
    listed = ", ".join(repr(c) for c in choices)

    def rule(v: Any) -> Any:
        if v not in choices:
            hint = next((c for c in choices if c.lower() == str(v).strip().lower()), None)
            extra = f" (did you mean {hint!r}?)" if hint else ""
            raise RuleError(f"must be one of {listed}; got {v!r}{extra}")
        return v

    return rule


def each(rule: Rule) -> Rule:
    """Apply ``rule`` to every element of a tuple (the message names the index)."""

    def each_rule(v: tuple) -> tuple:
        out = []
        for i, x in enumerate(v):
            try:
                out.append(rule(x))
            except RuleError as err:
                raise RuleError(f"[{i}] {err}") from None
        return tuple(out)

    return each_rule


def non_empty(v: Any) -> Any:
    """At least one element."""
    if len(v) == 0:
        raise RuleError("must not be empty")
    return v


def distinct(v: tuple) -> tuple:
    """No element twice (a repeated method or shot count would be evaluated twice)."""
    seen: list = []
    for x in v:
        if x in seen:
            raise RuleError(f"lists {_show(x)} twice")
        seen.append(x)
    return v


def increasing(v: tuple) -> tuple:
    """A ``(lo, hi)`` range with ``lo < hi``."""
    if not v[0] < v[1]:
        raise RuleError(f"must be a range [lo, hi] with lo < hi, got [{_num(v[0])}, {_num(v[1])}]")
    return v


def not_blank(v: str) -> str:
    """A non-empty string (not only spaces)."""
    if not v.strip():
        raise RuleError("must not be empty")
    return v


def storage_url(v: str) -> str:
    """Empty, a local folder (plain path or ``file://``) or ``s3://bucket[/prefix]``.

    The same schemes :func:`piaa_dist.storage.open_store` accepts (it is not imported here:
    it is the data plane).
    """
    if not v:
        return v
    parsed = urlparse(v)
    if parsed.scheme == "s3":
        if not 3 <= len(parsed.netloc) <= 63:
            raise RuleError(f"expected s3://bucket/prefix with a bucket name of 3-63 characters, got {v!r}")
    elif parsed.scheme not in ("", "file") and len(parsed.scheme) > 1:  # one letter: a drive
        raise RuleError(f"unsupported URL scheme {parsed.scheme!r} in {v!r}: use a local folder or s3://bucket/prefix")
    return v


def http_url(v: str) -> str:
    """Empty or an ``http(s)://host[:port]`` endpoint (what boto3's ``endpoint_url`` takes)."""
    if not v:
        return v
    parsed = urlparse(v)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise RuleError(f"expected an endpoint URL like http://host:port, got {v!r}")
    return v


#: What ``model.pretrained`` may say besides a file path: ``required`` is ``auto`` that refuses to
#: train from scratch (the GPU configs use it).
WEIGHTS_CHOICES = ("auto", "none", "required")


def weights_source(v: str) -> str:
    """``"auto"``, ``"none"``, ``"required"`` or the path of a weights file (existence is checked
    when the model is built, where the file has to be: a config may be loaded on another machine)."""
    if v in WEIGHTS_CHOICES:
        return v
    if v.strip().lower() in WEIGHTS_CHOICES:
        raise RuleError(f"must be 'auto', 'none' or a weights file path, or 'required'; got {v!r} "
                        f"(did you mean {v.strip().lower()!r}?)")
    path = PurePath(v.strip())
    if not v.strip() or ("/" not in v and "\\" not in v and not path.suffix):
        raise RuleError(
            f"must be 'auto', 'none' or a weights file path (with a folder or a file extension, "
            f"e.g. ~/weights/resnet18.pth), or 'required' (the cached ImageNet weights must exist); got {v!r}"
        )
    return v


def model_name(v: str) -> str:
    """Empty (do not register) or a name the MLflow registry accepts (no ``/`` or ``:``)."""
    if not v:
        return v
    # MLflow's own checks (mlflow.utils.validation._validate_model_name), without importing it.
    if not v.strip() or "/" in v or ":" in v or posixpath.normpath(v) != v or v == "." or v.startswith(".."):
        raise RuleError(f"must be a registered-model name without '/' or ':' (or empty: do not register); got {v!r}")
    return v


_ALIAS = re.compile(r"[\w\-]{1,255}", re.ASCII)


def model_alias(v: str) -> str:
    """Empty (no alias) or an MLflow alias: letters, digits, ``_``, ``-``; not ``latest`` or
    ``v<N>`` (MLflow reserves those)."""
    if not v:
        return v
    if not _ALIAS.fullmatch(v) or v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
        raise RuleError(
            f"must be an alias of letters, digits, '_' and '-' other than 'latest' and 'v<N>' "
            f"(or empty); got {v!r}"
        )
    return v


#: What a fine-tuning setting may name (``eval.finetune``), and its value types.
_SETTING_KEYS = {"lr": float, "steps": int, "params": str, "penalty": float}


def parse_finetune_setting(text: str) -> tuple[str, int | None, dict[str, Any]]:
    """Parse one ``eval.finetune`` entry: ``METHOD[@K]: [sgd|adam] key=value ...``.

    Keys: ``lr`` (> 0), ``steps`` (>= 0), ``params`` (``head`` or ``all``) for a fine-tuned
    method; ``penalty`` (> 0, relative: see ``piaa_dist.protocol.ridge_fit``) for ``giaa-ridge``.
    The optimizer is a bare word (default ``sgd``).

    Returns:
        ``(method, k or None, {"optimizer", "lr", "steps", "params"} or {"penalty"})``.

    Raises:
        RuleError: anything else, saying what.
    """
    head, sep, rest = str(text).partition(":")
    if not sep:
        raise RuleError(f"expected 'METHOD[@K]: key=value ...', got {_show(text)}")
    method, at, k_text = head.strip().partition("@")
    if method not in METHOD_NAMES:
        raise RuleError(f"unknown method {method!r} in {_show(text)}; known: {', '.join(METHOD_NAMES)}")
    k = None
    if at:
        try:
            k = int(k_text)
        except ValueError:
            raise RuleError(f"expected a shot count after '@', got {_show(k_text)} in {_show(text)}") from None
        if k < 1:
            raise RuleError(f"shot count must be >= 1, got {k} in {_show(text)}")
    values: dict[str, Any] = {}
    for word in rest.split():
        if "=" not in word:
            if word not in OPTIMIZERS:
                raise RuleError(f"unknown optimizer {word!r} in {_show(text)}; use one of {OPTIMIZERS}")
            values["optimizer"] = word
            continue
        key, _, raw = word.partition("=")
        if key not in _SETTING_KEYS:
            raise RuleError(f"unknown key {key!r} in {_show(text)}; known: {', '.join(_SETTING_KEYS)}")
        try:
            value = _SETTING_KEYS[key](raw)
        except ValueError:
            raise RuleError(f"{key}: expected a {_SETTING_KEYS[key].__name__}, got {raw!r} in {_show(text)}") from None
        if key in ("lr", "penalty") and not (math.isfinite(value) and value > 0):
            raise RuleError(f"{key} must be > 0, got {raw} in {_show(text)}")
        if key == "steps" and value < 0:
            raise RuleError(f"steps must be >= 0, got {raw} in {_show(text)}")
        if key == "params" and value not in FINETUNE_PARAMS:
            raise RuleError(f"params must be one of {FINETUNE_PARAMS}, got {raw!r} in {_show(text)}")
        values[key] = value
    if method == "giaa-ridge":
        if set(values) != {"penalty"}:
            raise RuleError(f"giaa-ridge takes exactly 'penalty=...', got {_show(text)}")
    elif method.endswith("no-adapt"):
        raise RuleError(f"{method} is not fine-tuned: it takes no setting ({_show(text)})")
    else:
        missing = sorted({"lr", "steps", "params"} - set(values))
        if missing or "penalty" in values:
            raise RuleError(f"a fine-tuning setting needs lr, steps and params (and no penalty); "
                            f"missing {missing} in {_show(text)}")
        values.setdefault("optimizer", "sgd")
    return method, k, values


def finetune_setting(v: str) -> str:
    """An ``eval.finetune`` entry that :func:`parse_finetune_setting` reads."""
    parse_finetune_setting(v)
    return v


def distinct_setting_keys(v: tuple) -> tuple:
    """No ``METHOD[@K]`` given twice in ``eval.finetune``."""
    seen: set = set()
    for text in v:
        method, k, _ = parse_finetune_setting(text)
        if (method, k) in seen:
            raise RuleError(f"sets {method}{'' if k is None else f'@{k}'} twice")
        seen.add((method, k))
    return v


def setting(default: Any, *rules: Rule, booleans: tuple[str, str] | None = None) -> Any:
    """A config field: its default and the rules its value must pass.

    Args:
        default: the default value (immutable: tuples, not lists).
        *rules: checks applied after type coercion, in order.
        booleans: for a string field, the values that YAML/Python booleans map to, as
            ``(true_value, false_value)``: ``run.use_gpu: no`` means ``"no"``, not ``False``.
    """
    return field(default=default, metadata={"rules": rules, "booleans": booleans})


# ---------------------------------------------------------------------------------------------
# Type coercion


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _word(v: Any) -> bool | None:
    """A YAML 1.1 boolean word (or a Python bool) as a bool; None otherwise."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        low = v.strip().lower()
        if low in TRUE_WORDS:
            return True
        if low in FALSE_WORDS:
            return False
    return None


def _coerce(value: Any, typ: Any, booleans: tuple[str, str] | None = None) -> Any:
    """Coerce a (YAML- or Python-typed) value to a field type, or raise RuleError."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return _coerce(value, args[0], booleans)
    if origin is tuple:
        args = typing.get_args(typ)
        if isinstance(value, (Mapping, set, frozenset, bytes)):
            raise RuleError(f"expected a list, got {_show(value)}")
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            raise RuleError(f"expected a list of {len(args)} values, got {_show(value)}")
        out = []
        for i, (v, a) in enumerate(zip(value, args)):
            try:
                out.append(_coerce(v, a))
            except RuleError as err:
                raise RuleError(f"[{i}] {err}") from None
        return tuple(out)
    if typ is bool:
        word = _word(value)
        if word is None:
            raise RuleError(f"expected true/false (or yes/no, on/off), got {_show(value)}")
        return word
    if typ is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise RuleError(f"expected an integer, got {_show(value)}")
    if typ is float:
        number: float | None = None
        try:
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
                number = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except OverflowError:
            number = None
        if number is None or not math.isfinite(number):
            raise RuleError(f"expected a finite number, got {_show(value)}")
        return number
    if typ is str:
        if booleans is not None and _word(value) is not None:
            return booleans[0] if _word(value) else booleans[1]
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                return str(value)
            except ValueError:  # an int past Python's digit limit for str()
                pass
        raise RuleError(f"expected a string, got {_show(value)}")
    if dataclasses.is_dataclass(typ):
        if isinstance(value, typ):
            return value
        return _build(typ, value)
    raise RuleError(f"unsupported field type {typ!r}")


def _show(v: Any) -> str:
    """A short one-line rendering of a bad value for a message."""
    try:
        text = repr(v)
    except ValueError:  # an int past Python's digit limit for str() (4300 digits)
        text = f"<an integer of {v.bit_length()} bits>" if isinstance(v, int) else f"<a {type(v).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: Any) -> Any:
    """Build section ``cls`` from a mapping; unknown keys are errors (ConfigError with key)."""
    section = getattr(cls, "SECTION", "")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        if section:
            raise ConfigError(f"{section}: the section must be a mapping of keys, got {_show(data)}", section)
        raise ConfigError(f"the config must be a mapping of sections (data, model, meta, ...), got {_show(data)}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted((k for k in data if k not in names), key=str)
    if unknown:
        where = f"{section}." if section else ""
        shown = ", ".join(f"{where}{k}" if isinstance(k, str) else repr(k) for k in unknown)
        kind = "key(s)" if section else "section(s)"
        raise ConfigError(
            f"unknown {kind} {shown}; known: {', '.join(names)}",
            f"{where}{unknown[0]}" if isinstance(unknown[0], str) else section or None,
        )
    return cls(**data)


class _Section:
    """Mixin of the section dataclasses: coerce and validate every field at construction."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = f"{self.SECTION}.{f.name}" if self.SECTION else f.name
            value = getattr(self, f.name)
            try:
                value = _coerce(value, hints[f.name], f.metadata.get("booleans"))
                # None is only ever a value of an Optional field: "not set", nothing to check.
                for rule in f.metadata.get("rules", ()) if value is not None else ():
                    value = rule(value)
            except RuleError as err:
                raise ConfigError(f"{key}: {err}", key) from None
            except ConfigError as err:  # a nested section: its key is already complete
                raise ConfigError(str(err), err.key or key, also=err.keys[1:]) from None
            object.__setattr__(self, f.name, value)


# ---------------------------------------------------------------------------------------------
# The sections


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the shards are and how tasks are cut from them."""

    SECTION: ClassVar[str] = "data"

    url: str = setting("", storage_url)  #: dataset root holding manifest.parquet: a local folder or s3://bucket/prefix
    s3_endpoint: str = setting("", http_url)  #: S3 endpoint URL; empty means $AWS_ENDPOINT_URL, then AWS default
    image_size: int = setting(64, at_least(1))  #: side of the square image fed to the model
    shots: int = setting(10, at_least(1))  #: support-set size of a meta-training task
    query_size: int = setting(20, at_least(1))  #: query-set size of a meta-training task
    augment: bool = True  #: random flip + crop on support images (as the reference code)
    #: training users held out for validation (Tune's metric); never test users
    validation_users: int = setting(8, at_least(0))
    cache_users: int = setting(4096, at_least(0))  #: decoded users a rank keeps in memory (LRU; 0 = none)


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Backbone and aesthetic head."""

    SECTION: ClassVar[str] = "model"

    # Defaults are the cheap CPU configuration. The paper's (GPU, data.image_size=224):
    # backbone=resnet18, feature_dim=1000, head_hidden=[1024, 512], dropout=0.5
    # (piaa_dist.model.PAPER_MODEL).
    backbone: str = setting("convnet", one_of(*BACKBONES))  #: "convnet" (small, CPU) or "resnet18" (the paper's)
    #: "auto" (torch hub cache if present), "required" (the cache file must exist), "none", or a weights file
    #: path
    pretrained: str = setting("auto", weights_source)
    width: int = setting(32, at_least(1))  #: channels of the convnet backbone
    conv_blocks: int = setting(4, at_least(1))  #: conv3x3-BN-ReLU-maxpool blocks of the convnet backbone
    feature_dim: int = setting(128, at_least(1))  #: backbone output size fed to the head (the paper: 1000)
    #: hidden sizes of the head MLP (the paper: 1024, 512)
    head_hidden: tuple[int, ...] = setting((64, 32), each(at_least(1)))
    dropout: float = setting(0.2, in_range(0.0, 1.0, hi_open=True))  #: head dropout (the paper: 0.5)


@dataclass(frozen=True)
class MetaConfig(_Section):
    """Bilevel optimization: the inner (support) loop and the outer (query) update."""

    SECTION: ClassVar[str] = "meta"

    flavour: str = setting("second_order", one_of(*FLAVOURS))  #: "second_order", "first_order" or "reptile"
    inner_steps: int = setting(5, at_least(1))  #: adaptation steps on the support set
    inner_lr: float = setting(0.01, positive)  #: step size of the inner loop
    inner_optimizer: str = setting("sgd", one_of(*OPTIMIZERS))  #: "sgd" or "adam" (differentiable, functional)
    #: "all" or "head": which parameters the inner loop adapts
    inner_params: str = setting("all", one_of(*INNER_PARAMS))
    inner_head_lr_scale: float = setting(1.0, positive)  #: head inner lr = inner_lr × this (reference code: 10)
    meta_batch: int = setting(4, at_least(1))  #: user tasks per meta-step (the paper's 4)
    meta_lr: float = setting(1e-3, positive)  #: outer (meta) learning rate
    meta_steps: int = setting(300, at_least(1))  #: number of meta-updates
    #: multiplicative meta-lr decay per `decay_every` steps
    lr_decay: float = setting(1.0, in_range(0.0, 1.0, lo_open=True))
    decay_every: int = setting(100, at_least(1))
    #: "step" (× lr_decay every decay_every steps) or "cosine" (meta_lr → lr_floor × meta_lr over meta_steps)
    lr_schedule: str = setting("step", one_of(*LR_SCHEDULES))
    #: linear meta-lr warm-up from meta_lr / warmup_steps over the first steps (0 = none)
    warmup_steps: int = setting(0, at_least(0))
    lr_floor: float = setting(0.0, in_range(0.0, 1.0))  #: cosine schedule: the final meta-lr as a fraction of meta_lr
    grad_clip: float = setting(10.0, at_least(0.0))  #: clip the meta-gradient norm (0 = off)


@dataclass(frozen=True)
class EvalConfig(_Section):
    """The meta-testing protocol (fine-tune on k shots of an unseen user, rank the rest)."""

    SECTION: ClassVar[str] = "eval"

    shots: tuple[int, ...] = setting((10, 100), non_empty, each(at_least(1)), distinct)
    repeats: int = setting(10, at_least(1))  #: random splits per user and k
    finetune_steps: int = setting(20, at_least(0))  #: fine-tuning budget, the same for every method (0 = none)
    finetune_lr: float = setting(0.01, positive)
    finetune_optimizer: str = setting("sgd", one_of(*OPTIMIZERS))
    #: BatchNorm while fine-tuning: "batch" (as the inner loop) or "running"
    finetune_bn: str = setting("batch", one_of(*BN_MODES))
    batch_size: int = setting(100, at_least(1))
    methods: tuple[str, ...] = setting(
        ("blg-piaa", "meta-no-adapt", "giaa-finetune", "giaa-no-adapt", "giaa-ridge"),
        non_empty, each(one_of(*METHOD_NAMES)), distinct,
    )
    #: "per-method": each fine-tuning method gets the setting chosen for it on validation users
    #: (from the search grid below, the same grid and budget for every method) or given in
    #: ``eval.finetune``; "shared": the paper's protocol, the ``finetune_*`` budget for every method
    protocol: str = setting("per-method", one_of(*EVAL_PROTOCOLS))
    #: explicit per-method settings, e.g. ``["giaa-finetune@10: adam lr=0.001 steps=20 params=all",
    #: "giaa-ridge: penalty=10"]`` (``METHOD[@K]: ...``; see :func:`parse_finetune_setting`); a
    #: method (and shot count) given here is not searched
    finetune: tuple[str, ...] = setting((), each(finetune_setting), distinct_setting_keys)
    search_sgd_lrs: tuple[float, ...] = setting((0.05, 0.2, 0.5, 2.0), each(positive))  #: SGD rates of the search grid
    search_adam_lrs: tuple[float, ...] = setting((0.001, 0.01), each(positive))  #: Adam rates of the search grid
    #: step counts of the search grid
    search_steps: tuple[int, ...] = setting((5, 20, 50), non_empty, each(at_least(1)), distinct)
    #: parameters adapted, searched
    search_params: tuple[str, ...] = setting(("head", "all"), non_empty, each(one_of(*FINETUNE_PARAMS)), distinct)
    #: relative ridge penalties of giaa-ridge, searched
    search_ridge: tuple[float, ...] = setting((0.01, 0.1, 1.0, 10.0, 100.0), non_empty, each(positive))
    search_repeats: int = setting(2, at_least(1))  #: random splits per validation user and k in the search


@dataclass(frozen=True)
class GiaaConfig(_Section):
    """The conventional prior: one generic model trained on all training users' ratings pooled."""

    SECTION: ClassVar[str] = "giaa"

    steps: int = setting(600, at_least(1))
    batch_size: int = setting(64, at_least(1))
    lr: float = setting(1e-3, positive)


@dataclass(frozen=True)
class RunConfig(_Section):
    """Where a run writes and how it is distributed and tracked."""

    SECTION: ClassVar[str] = "run"

    seed: int = setting(0, at_least(0))  #: numpy seeds must be non-negative
    workers: int = setting(0, at_least(0))  #: Ray Train workers; 0 runs the same loop in-process
    cpus_per_worker: float = setting(1.0, positive)
    use_gpu: str = setting("auto", one_of(*GPU_CHOICES), booleans=("yes", "no"))  #: "auto", "yes" or "no"
    threads_per_worker: int = setting(1, at_least(1))  #: torch intra-op threads per worker (fair CPU comparisons)
    #: bf16 autocast of the backbone on CUDA; off by default: bf16 second-order meta-gradients miss cosine
    #: 0.99 vs float64 (tests/test_precision.py)
    amp: bool = False
    #: allow TF32 tensor cores for float32 convolutions/matmuls on CUDA (faster; off keeps float32 exact)
    tf32: bool = False
    #: per-step all-reduce: "float64" (exact sums) or "float32" (half the bytes)
    allreduce_dtype: str = setting("float64", one_of(*ALLREDUCE_DTYPES))
    checkpoint_every: int = setting(50, at_least(0))  #: meta-steps between checkpoints (0 = only at the end)
    #: checkpoints kept in storage: the newest N (>= 2 keeps one behind a torn newest); 0 keeps all
    #: (a learning curve scored afterwards). The best validation checkpoint is kept apart, always
    keep_checkpoints: int = setting(2, at_least(0))
    #: checkpoint storage (local folder or s3://); empty = <out>/checkpoints
    storage_path: str = setting("", storage_url)
    #: Ray Train restarts from the last checkpoint (-1 = unlimited, Ray's convention)
    max_failures: int = setting(2, at_least(-1))
    #: meta-steps between loss reports (0 = only at checkpoints/validation/end)
    log_every: int = setting(10, at_least(0))
    validate_every: int = setting(100, at_least(0))  #: meta-steps between validation SROCC measurements (0 = off)
    #: early stopping: validations in a row without an improvement of more than run.min_delta
    #: before meta-training stops (0 = run all meta.meta_steps)
    patience: int = setting(0, at_least(0))
    #: early stopping: the rise of validation SROCC over the best so far that counts as an improvement
    min_delta: float = setting(0.0, at_least(0.0))
    mlflow_uri: str = ""  #: empty = $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db in the cwd
    experiment: str = setting("piaa-dist", not_blank)
    register_name: str = setting("blg-piaa", model_name)  #: registered model name ("" = do not register)
    alias: str = setting("", model_alias)  #: alias to move to the registered version, e.g. "champion"


@dataclass(frozen=True)
class TuneConfig(_Section):
    """Ray Tune search space and scheduler."""

    SECTION: ClassVar[str] = "tune"

    samples: int = setting(4, at_least(1))
    max_concurrent: int = setting(1, at_least(1))  #: trials at once; sized for 2 CPUs by default
    inner_lr: tuple[float, float] = setting((1e-3, 1e-1), each(positive), increasing)  #: log-uniform range
    inner_steps: tuple[int, ...] = setting((1, 3, 5), non_empty, each(at_least(1)), distinct)
    shots: tuple[int, ...] = setting((5, 10, 20), non_empty, each(at_least(1)), distinct)
    meta_lr: tuple[float, float] = setting((1e-4, 3e-3), each(positive), increasing)  #: log-uniform range
    grace_period: int = setting(1, at_least(1))  #: ASHA: validation rounds before a trial may be stopped
    reduction_factor: int = setting(2, at_least(2))  #: ASHA keeps 1/reduction_factor of the trials per rung
    #: meta-steps of each trial (0 = meta.meta_steps); the winner is refit to meta.meta_steps
    trial_steps: int = setting(0, at_least(0))
    #: the first trial runs the config's own values of the searched hyperparameters
    start_from_config: bool = setting(True)
    #: "in-trial" runs a 1-worker trial's loop inside the trial (no Train worker group to start),
    #: "ray-train" a TorchTrainer per trial; "auto": in-trial for 1-worker CPU trials
    trial_runner: str = setting("auto", one_of(*TRIAL_RUNNERS))


# Cross-field rules: (keys the message names, check returning a problem or None). Cheap and
# only where a combination is certainly wrong.


def _convnet_weights(cfg: JobConfig) -> str | None:
    if cfg.model.backbone == "convnet" and cfg.model.pretrained not in ("auto", "none"):
        return (f"the convnet backbone has no pretrained weights: use 'auto' or 'none' "
                f"(or model.backbone=resnet18), got {cfg.model.pretrained!r}")
    return None


def _convnet_input(cfg: JobConfig) -> str | None:
    # Each convnet block halves the image (maxpool 2, floored); below one pixel PyTorch fails.
    need = 2 ** cfg.model.conv_blocks
    if cfg.model.backbone == "convnet" and cfg.data.image_size < need:
        return (f"{cfg.data.image_size} px is too small for {cfg.model.conv_blocks} convnet blocks "
                f"(each halves the image): needs data.image_size >= {need} or fewer model.conv_blocks")
    return None


def _patience_needs_validation(cfg: JobConfig) -> str | None:
    # Early stopping watches the validation SROCC: without validation it could never fire,
    # which would silently train every meta-step while the config says otherwise.
    if cfg.run.patience > 0 and cfg.run.validate_every <= 0:
        return "early stopping watches validation SROCC: set run.validate_every > 0 (or run.patience=0)"
    if cfg.run.patience > 0 and cfg.data.validation_users <= 0:
        return "early stopping watches validation SROCC: set data.validation_users > 0 (or run.patience=0)"
    return None


@dataclass(frozen=True)
class JobConfig(_Section):
    """Everything a train / tune / evaluate job needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    giaa: GiaaConfig = field(default_factory=GiaaConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    #: (keys involved, the first one named in the message; check returning a problem or None)
    _CROSS_RULES: ClassVar[tuple[tuple[tuple[str, ...], Callable[[JobConfig], str | None]], ...]] = (
        (("model.pretrained", "model.backbone"), _convnet_weights),
        (("data.image_size", "model.conv_blocks", "model.backbone"), _convnet_input),
        (("run.patience", "run.validate_every", "data.validation_users"), _patience_needs_validation),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for keys, check in self._CROSS_RULES:
            problem = check(self)
            if problem:
                raise ConfigError(f"{keys[0]}: {problem}", keys[0], also=keys[1:])


# ---------------------------------------------------------------------------------------------
# YAML: booleans as typed, duplicate keys as errors, one-line messages


class _Loader(yaml.SafeLoader):
    """Safe YAML without the YAML 1.1 implicit booleans and timestamps: ``no`` stays the
    string ``"no"`` (the field's type decides what it means) and ``2024-01-01`` a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: ``line L, column C: problem``."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "reason", None) or str(err)
    context = getattr(err, "context", None)
    text = f"{context}: {problem}" if context else str(problem)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    position = getattr(err, "position", None)
    return f"position {position}: {text}" if position is not None else text


def _check_duplicates(root: yaml.Node, source: str) -> dict[str, int]:
    """Raise ConfigError for a key given twice in any mapping; return each key path's line."""
    lines: dict[str, int] = {}
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    seen_nodes: set[int] = set()
    while stack:  # iterative: aliases may make the node graph deep or cyclic
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                child = path
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    ident = (key_node.tag, key_node.value)
                    line = key_node.start_mark.line + 1
                    name = f"{path}.{key_node.value}" if path else key_node.value
                    if ident in first:
                        raise ConfigError(
                            f"{source}:{line}: duplicate key {name!r} (first given on line "
                            f"{first[ident]}); each key may appear once", name,
                        )
                    first[ident] = line
                    lines.setdefault(name, line)
                    child = name
                stack.append((value_node, child))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, path) for v in node.value)
    return lines


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse one YAML document; return the data and the line of every key path."""
    loader = None
    try:
        loader = _Loader(text)  # the reader already rejects control characters here
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines = _check_duplicates(node, source)
        try:
            return loader.construct_document(node), lines
        except (yaml.YAMLError, RecursionError):
            raise
        # PyYAML's constructors of explicit tags (!!timestamp, !!float...) raise assorted errors
        # on malformed values.
        except Exception as err:  # noqa: BLE001
            raise ConfigError(
                f"{source}: invalid YAML: cannot construct a value ({type(err).__name__}: {err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML at {_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


# ---------------------------------------------------------------------------------------------
# Loading, overriding, dumping


def config_from_dict(data: Mapping[str, Any] | None, source: str = "<dict>") -> JobConfig:
    """Build and validate a JobConfig from a nested mapping, rejecting unknown keys.

    Args:
        data: nested mapping ``{"meta": {"inner_lr": 0.01}, ...}``.
        source: name used in error messages (usually the file path).

    Raises:
        ConfigError: unknown key, wrong type or invalid value, naming ``source`` and the key.
    """
    try:
        return _build(JobConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}", err.key, also=err.keys[1:]) from None


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["meta.inner_lr=0.01", ...]`` into a nested dict (types are checked later).

    Values are YAML (``[10,100]`` is a list); ``no``/``yes`` stay strings until the field's
    type decides what they mean. A key given twice keeps its last value.
    """
    return {section: dict(values) for section, values in _parse_overrides(overrides)[0].items()}


def _parse_overrides(overrides: Iterable[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    nested: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}  # dotted key -> the override text that set it
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {item!r}: expected a 'section.key=value' string")
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. meta.inner_lr=0.01")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ConfigError(f"override {item!r}: key must be section.name, e.g. meta.inner_lr")
        parts = [p.strip() for p in parts]
        value, _ = _parse_yaml(raw, f"override {item!r}") if raw.strip() else ("", {})
        nested.setdefault(parts[0], {})[parts[1]] = value
        origin[".".join(parts)] = item
    return nested, origin


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read and parse a config file without validating its values.

    Returns:
        ``(data, lines)``: the top-level mapping and the line of every dotted key path.

    Raises:
        ConfigError: unreadable, not UTF-8 text, invalid YAML, a duplicate key, or a top
            level that is not a mapping; naming the file (and the line where there is one).
    """
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not a UTF-8 text file (byte {err.start}: {err.reason})") from None
    loaded, lines = _parse_yaml(text, source)
    if loaded is not None and not isinstance(loaded, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (data, model, meta, ...), "
                          f"got {_show(loaded)}")
    return dict(loaded or {}), lines


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> JobConfig:
    """Load a job config from YAML (or defaults when `path` is None) and apply overrides.

    Every value is validated here (types, enums, ranges, cross-field rules; see the module
    docstring), so a bad config fails before any work starts.

    Args:
        path: YAML file; its top-level keys are JobConfig sections.
        overrides: ``section.key=value`` strings applied after the file.

    Raises:
        ConfigError: one line naming the file and line (or the override) and the key: unknown
            keys, duplicate keys, wrong types, invalid values, a missing or unreadable file.
    """
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "<defaults>" if path is None else str(path)
    if path is not None:
        data, lines = read_config_file(path)
    overrides = list(overrides)
    over, origin = _parse_overrides(overrides)
    try:
        return _build(JobConfig, _merge(data, over))
    except ConfigError as err:
        where = _where(err.keys, source, lines, origin, overrides)
        raise ConfigError(f"{where}: {err}", err.key, also=err.keys[1:]) from None


def _where(keys: tuple[str, ...], source: str, lines: Mapping[str, int], origin: Mapping[str, str],
           overrides: list[str]) -> str:
    """Where bad keys came from: the override that set one, else ``FILE:LINE``, else the file."""
    for key in keys:  # overrides are applied last: if one set an involved key, it is the cause
        item = origin.get(key) or next((v for k, v in origin.items() if k.split(".")[0] == key), None)
        if item is not None:
            return f"override {item!r}"
    for key in keys:
        for k in (key, key.split(".")[0]):
            if k in lines:
                return f"{source}:{lines[k]}"
    return f"{source} with overrides {overrides}" if overrides else source


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
    """YAML text of a config (what a run saves beside its model).

    Passwords in URIs (``run.mlflow_uri: http://user:pass@host``) are written as
    ``http://user:***@host`` (:func:`piaa_dist.redact.redact_value`): a saved config is stored
    and shared, a secret never is. Loading it back gives a URI whose password comes from the
    environment (``MLFLOW_TRACKING_PASSWORD``).
    """
    from piaa_dist.redact import redact_value

    return yaml.safe_dump(redact_value(config_to_dict(cfg)), sort_keys=False)


def flat_params(cfg: JobConfig) -> dict[str, Any]:
    """``{"meta.inner_lr": 0.01, ...}``: the form MLflow params and Tune configs use."""
    flat: dict[str, Any] = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def with_overrides(cfg: JobConfig, updates: Mapping[str, Any]) -> JobConfig:
    """Return a copy of `cfg` with flat ``{"section.key": value}`` updates applied and validated.

    Raises:
        ConfigError: a key that is not ``section.name``, or an invalid resulting config.
    """
    nested: dict[str, Any] = {}
    for key, value in updates.items():
        section, _, name = str(key).partition(".")
        if not name:
            raise ConfigError(f"update {key!r}: key must be section.name", str(key))
        nested.setdefault(section, {})[name] = value
    return config_from_dict(_merge(config_to_dict(cfg), nested), "<updates>")
