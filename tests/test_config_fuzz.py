"""Fuzzing the config loader: whatever the bytes, the only outcomes are a valid config or the
project's own one-line user error (issue 11 item 4).

Inputs: random bytes as a config file; the real configs under ``jobs/configs/`` mutated
structurally (keys deleted, duplicated, renamed; values replaced by other values or other
types) and textually (lines deleted, duplicated, spliced); random override strings; random
Python values through ``with_overrides``. A success must be a config that validates again
after a round trip (so nothing invalid slipped through); a failure must be a ``ConfigError`` /
``UserError`` whose message is one line and names where it came from.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piaa_dist.config import (
    JobConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    with_overrides,
)
from piaa_dist.errors import USER_ERRORS

ROOT = Path(__file__).resolve().parents[1]
CONFIG_TEXTS = {p.name: p.read_text() for p in sorted((ROOT / "jobs" / "configs").glob("*.yaml"))}
SECTIONS = {f.name: [g.name for g in dataclasses.fields(getattr(JobConfig(), f.name))]
            for f in dataclasses.fields(JobConfig)}
KEYS = [f"{s}.{k}" for s, names in SECTIONS.items() for k in names]

# A few seconds in all; database=None: no .hypothesis folder in the worktree.
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Values of every YAML/Python type a config value could be replaced by.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["no", "yes", "off", "auto", "head", "reptile", "sgd", "1e-3",
                                           "s3://b", "s3://bucket/p", "~/w.pth", "", " ", "Reptile"]),
)
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.text(max_size=6), kids, max_size=3), max_leaves=6)


def _outcome(load) -> JobConfig | None:
    """Run a load; return the config, or None after checking the error is a clean user error."""
    try:
        cfg = load()
    except USER_ERRORS as err:
        msg = str(err)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return None
    assert isinstance(cfg, JobConfig)
    # Whatever loaded is valid as a whole: it rebuilds, unchanged, through the validating path...
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # ...and holds invariants written out here independently of config.py's rules.
    _sane(cfg)
    return cfg


def _sane(cfg: JobConfig) -> None:
    m, e, r, t = cfg.meta, cfg.eval, cfg.run, cfg.tune
    assert m.flavour in ("second_order", "first_order", "reptile")
    assert m.inner_optimizer in ("sgd", "adam") and e.finetune_optimizer in ("sgd", "adam")
    assert m.inner_params in ("all", "head") and e.finetune_bn in ("batch", "running")
    assert r.use_gpu in ("auto", "yes", "no") and cfg.model.backbone in ("convnet", "resnet18")
    assert set(e.methods) <= {"blg-piaa", "meta-no-adapt", "giaa-finetune", "giaa-no-adapt", "giaa-ridge"}
    assert e.methods and e.protocol in ("per-method", "shared")
    assert r.patience >= 0 and r.min_delta >= 0 and m.lr_schedule in ("step", "cosine")
    for n in (m.inner_steps, m.meta_batch, m.meta_steps, m.decay_every, e.repeats, e.batch_size,
              cfg.giaa.steps, cfg.giaa.batch_size, cfg.data.shots, cfg.data.query_size,
              cfg.data.image_size, r.threads_per_worker, t.samples, *e.shots, *t.shots, *t.inner_steps):
        assert type(n) is int and n >= 1, n
    for x in (m.inner_lr, m.meta_lr, e.finetune_lr, cfg.giaa.lr, r.cpus_per_worker, *t.inner_lr, *t.meta_lr):
        assert type(x) is float and math.isfinite(x) and x > 0, x
    assert 0 <= cfg.model.dropout < 1 and 0 < m.lr_decay <= 1 and m.grad_clip >= 0
    assert t.inner_lr[0] < t.inner_lr[1] and t.meta_lr[0] < t.meta_lr[1]
    assert r.seed >= 0 and r.workers >= 0 and e.finetune_steps >= 0
    assert all(type(v) is bool for v in (cfg.data.augment, r.amp))


def _load_file(tmp_path: Path, data: bytes, overrides=()) -> JobConfig | None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    try:
        return _outcome(lambda: load_config(path, overrides))
    finally:
        path.unlink()


def _file_error_names_the_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except USER_ERRORS as err:
        assert str(err).startswith(str(path)), str(err)
    finally:
        path.unlink()


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes(tmp_path, data):
    _load_file(tmp_path, data)
    _file_error_names_the_file(tmp_path, data)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("meta:run_gpu flavour -[]{},'\"\n\t#&*!|>0123.e")), max_size=200))
def test_random_yaml_like_text(tmp_path, text):
    _load_file(tmp_path, text.encode("utf-8"))


def _mutate(data: dict, draw) -> dict:
    """One structural mutation of a parsed config (sections may be None or odd after earlier ones)."""
    kind = draw(st.sampled_from(["delete", "replace", "rename", "add", "section", "retype"]))
    sections = [s for s in data if isinstance(data.get(s), dict) and data[s]]
    if kind == "section" or not sections:
        target = draw(st.sampled_from([*SECTIONS, "extra", *data.keys()]))
        data[target] = draw(values)
        return data
    section = draw(st.sampled_from(sections))
    key = draw(st.sampled_from(sorted(data[section], key=str)))
    if kind == "delete":
        del data[section][key]
    elif kind == "replace":
        data[section][key] = draw(values)
    elif kind == "rename":
        data[section][f"{key}{draw(st.sampled_from(['_', 's', 'x']))}"] = data[section].pop(key)
    elif kind == "add":
        data[section][draw(st.sampled_from(SECTIONS.get(section, ["x"]) + ["typo"]))] = draw(values)
    else:  # the same value as another type
        v = data[section][key]
        data[section][key] = draw(st.sampled_from([str(v), [v], {"v": v}, None, -1, 0, True]))
    return data


@FUZZ
@given(name=st.sampled_from(sorted(CONFIG_TEXTS)), data=st.data())
def test_mutated_real_configs(tmp_path, name, data):
    parsed = yaml.safe_load(CONFIG_TEXTS[name])
    for _ in range(data.draw(st.integers(1, 4))):
        parsed = _mutate(parsed, data.draw)
    text = yaml.safe_dump(parsed, sort_keys=False, allow_unicode=True)
    _load_file(tmp_path, text.encode("utf-8"))


@FUZZ
@given(name=st.sampled_from(sorted(CONFIG_TEXTS)), data=st.data())
def test_textually_mutated_real_configs(tmp_path, name, data):
    """Duplicated, deleted and spliced lines: duplicates must be errors, never a silent win."""
    lines = CONFIG_TEXTS[name].splitlines(keepends=True)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        kind = data.draw(st.sampled_from(["dup", "del", "splice", "indent"]))
        if kind == "dup":
            lines.insert(i, lines[i])
        elif kind == "del":
            del lines[i]
        elif kind == "splice":
            j = data.draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:j] + data.draw(st.text(max_size=8)) + lines[i][j:]
        else:
            lines[i] = " " * data.draw(st.integers(1, 4)) + lines[i]
        if not lines:
            break
    _load_file(tmp_path, "".join(lines).encode("utf-8", "surrogatepass"))


def test_a_duplicated_line_is_never_silently_accepted(tmp_path):
    """Deterministic companion of the fuzz: every key line of every config, duplicated."""
    for name, text in CONFIG_TEXTS.items():
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if ":" not in line or line.lstrip().startswith("#"):
                continue
            cfg = _load_file(tmp_path, "".join(lines[: i + 1] + [line] + lines[i + 1 :]).encode())
            assert cfg is None, f"{name}: duplicating line {i + 1} ({line.strip()!r}) was accepted"


override_keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=15))
override_values = st.one_of(
    st.text(max_size=15),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
)


@FUZZ
@given(name=st.sampled_from(sorted(CONFIG_TEXTS)),
       overrides=st.lists(st.one_of(st.text(max_size=25),
                                    st.tuples(override_keys, override_values).map("=".join)), max_size=4))
def test_random_overrides(tmp_path, name, overrides):
    _load_file(tmp_path, CONFIG_TEXTS[name].encode(), overrides)
    _outcome(lambda: load_config(None, overrides))


@FUZZ
@given(updates=st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), values, max_size=4))
def test_random_python_updates(updates):
    _outcome(lambda: with_overrides(JobConfig(), updates))


def test_huge_numbers_are_user_errors(tmp_path):
    """Found by the fuzz: ints past Python's str() digit limit must not escape as ValueError."""
    huge = 10**5000
    for key in ("run.experiment", "run.seed", "meta.meta_lr", "eval.shots"):
        for value in (huge, [huge, huge]):
            _outcome(lambda k=key, v=value: with_overrides(JobConfig(), {k: v}))
    assert _load_file(tmp_path, b"run:\n  seed: " + b"9" * 5000 + b"\n") is None
