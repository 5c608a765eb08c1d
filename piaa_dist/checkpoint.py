"""Model and trainer checkpoints as plain files: safetensors for tensors, YAML/JSON for the rest.

Nothing here ever unpickles: ``torch.load`` is not used, so loading a checkpoint (including one
pulled from a model registry or a shared bucket) cannot execute code. Two formats:

**Model folder** (what a run registers and what ``evaluate`` / ``personalize`` load)::

    model.safetensors   the model's state dict: parameters *and* buffers (BatchNorm statistics)
    config.yaml         the JobConfig that built the model (``piaa_dist.config.dump_config``)
    info.json           caller's metadata + ``"_checkpoint": {"format", "files_sha256",
                        "info_sha256", ...}``

``load_model`` rebuilds the architecture from ``config.yaml`` (``piaa_dist.model.build_model``)
and loads the weights strictly. Every file of the folder is covered by a hash recorded at save
time: ``files_sha256`` holds the SHA-256 of ``model.safetensors`` and ``config.yaml`` (a
weights file swapped for one that still parses, or fine-tuning settings edited in
``config.yaml``, are refused, naming the file), and ``info_sha256`` is the SHA-256 of
``info.json``'s own content in canonical JSON form (:func:`info_digest`). These hashes catch
accidental or careless changes; against deliberate tampering with a folder in a shared store,
the registry keeps its own copy of every file's hash (``orchestration/tracking.py``), outside
the folder. Folders written before these hashes existed load with whatever they record.

**Training state folder** (trainer resume: meta-learner + optimizer + sampler step)::

    training_state.safetensors   every tensor of the state, named by its path ("optimizer/state/0/exp_avg")
    training_state.json          the structure with tensors replaced by references, plus scalars

Optimizer state dicts have integer keys (parameter indices) and tuples (Adam's betas); the JSON
encoding keeps those types exactly, because ``Optimizer.load_state_dict`` matches state to
parameters by integer key and silently drops state whose keys do not match.

Files are written to a temporary name and renamed, with the JSON written last, so a crash
mid-save never leaves a folder that looks complete but is not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from piaa_dist.config import JobConfig, ModelConfig, dump_config, load_config
from piaa_dist.errors import DataError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
INFO_FILE = "info.json"
STATE_TENSORS_FILE = "training_state.safetensors"
STATE_JSON_FILE = "training_state.json"
#: Files that make up a model folder (what registration uploads; nothing else is shipped).
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, INFO_FILE)

MODEL_FORMAT = "piaa-dist/model/1"
STATE_FORMAT = "piaa-dist/training-state/1"
_CHECKPOINT_KEY = "_checkpoint"  # reserved key in info.json for format bookkeeping

Builder = Callable[[ModelConfig], nn.Module]


class CheckpointError(DataError):
    """A checkpoint folder is missing, incomplete, corrupted or does not match its model."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename (never a half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    """Make numpy scalars and paths JSON-serializable; anything else is a TypeError."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _tensor_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Serialize tensors with safetensors (detached, on CPU, contiguous, no shared storage)."""
    from safetensors.torch import save

    # clone(): safetensors refuses tensors that share storage (tied weights, views); a copy per
    # name is simplest and the cost is one transient copy of the state.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(plain, metadata=dict(metadata))


def _read_tensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning every failure into a CheckpointError naming the file."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected a safetensors weights file)")
    device = torch.device(map_location)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({type(err).__name__}: {err}); "
            "the file is corrupted or was not written by piaa-dist"
        ) from None
    if device.type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read JSON: {err}") from None


# ---------------------------------------------------------------------------------------------
# Model folders


def info_digest(info: Mapping[str, Any]) -> str:
    """SHA-256 of an ``info.json`` document's content, excluding its own recorded digest.

    Canonical JSON (sorted keys, no whitespace), so the digest survives a re-indented file
    but not a changed value.
    """
    doc = json.loads(json.dumps(info, default=_json_default))
    meta = doc.get(_CHECKPOINT_KEY)
    if isinstance(meta, dict):
        meta.pop("info_sha256", None)
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def model_file_hashes(directory: str | Path) -> dict[str, str]:
    """SHA-256 of each model file (:data:`MODEL_FILES`) present in ``directory``, by file name."""
    folder = Path(directory)
    return {name: sha256_file(folder / name) for name in MODEL_FILES if (folder / name).is_file()}


def verify_model_folder(directory: str | Path) -> dict[str, Any]:
    """Check every file of a model folder against the hashes recorded when it was saved.

    Args:
        directory: a folder written by :func:`save_model`.

    Returns:
        The full ``info.json`` document (with its ``"_checkpoint"`` record).

    Raises:
        CheckpointError: ``info.json`` is missing or unreadable, or a file is missing or does
            not match its recorded hash (names the file).
    """
    folder = Path(directory)
    info_path = folder / INFO_FILE
    raw_info = _read_json(info_path)
    if not isinstance(raw_info, dict):
        raise CheckpointError(f"{info_path}: expected a JSON object")
    meta = raw_info.get(_CHECKPOINT_KEY) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{info_path}: {_CHECKPOINT_KEY!r} must be a JSON object")
    recorded_info = meta.get("info_sha256")
    if recorded_info and info_digest(raw_info) != recorded_info:
        raise CheckpointError(
            f"{info_path}: content does not match the SHA-256 recorded in it when it was saved; "
            "the file was modified after saving"
        )
    expected = meta.get("files_sha256")
    if not isinstance(expected, dict):  # written before per-file hashes: the weights only
        expected = {WEIGHTS_FILE: meta["weights_sha256"]} if meta.get("weights_sha256") else {}
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (its SHA-256 is recorded in {INFO_FILE})")
        actual = sha256_file(path)
        if actual != digest:
            raise CheckpointError(
                f"{path}: SHA-256 {actual[:12]}… does not match {str(digest)[:12]}… recorded in "
                f"{INFO_FILE}; the file was modified or replaced after saving"
            )
    return raw_info


def save_model(
    directory: str | Path, model: nn.Module, cfg: JobConfig, info: Mapping[str, Any] | None = None
) -> Path:
    """Write a model folder: ``model.safetensors``, ``config.yaml``, ``info.json``.

    Args:
        directory: folder to write (created if needed; existing model files are replaced).
        model: the model; its full ``state_dict()`` (parameters and buffers) is saved.
        cfg: the job config that built the model (``cfg.model`` must rebuild the architecture).
        info: JSON-serializable metadata (step, metrics, source run...). The key
            ``"_checkpoint"`` is reserved.

    Returns:
        The folder path.

    Raises:
        TypeError: ``info`` holds something JSON cannot represent.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(info or {})
    if _CHECKPOINT_KEY in info:
        raise ValueError(f"info key {_CHECKPOINT_KEY!r} is reserved for the checkpoint format")
    state = model.state_dict()
    # Serialize info first so a non-serializable value fails before any file is touched.
    json.dumps(info, default=_json_default)

    weights = out / WEIGHTS_FILE
    _atomic_write(weights, _tensor_bytes(state, {"format": MODEL_FORMAT}))
    _atomic_write(out / CONFIG_FILE, dump_config(cfg).encode())
    files = {WEIGHTS_FILE: sha256_file(weights), CONFIG_FILE: sha256_file(out / CONFIG_FILE)}
    info[_CHECKPOINT_KEY] = {
        "format": MODEL_FORMAT,
        "weights_sha256": files[WEIGHTS_FILE],  # what readers before files_sha256 check
        "files_sha256": files,
        "tensors": len(state),
        "torch": torch.__version__,
    }
    doc = json.loads(json.dumps(info, default=_json_default))  # exactly what a reader will see
    doc[_CHECKPOINT_KEY]["info_sha256"] = info_digest(doc)
    # info.json last: its presence with matching hashes marks a complete folder.
    _atomic_write(out / INFO_FILE, json.dumps(doc, indent=2).encode())
    log.debug("saved model (%d tensors) to %s", len(state), out)
    return out


def read_model_info(directory: str | Path) -> dict[str, Any]:
    """The caller's ``info`` dict of a model folder (without the format bookkeeping)."""
    info = _read_json(Path(directory) / INFO_FILE)
    if not isinstance(info, dict):
        raise CheckpointError(f"{Path(directory) / INFO_FILE}: expected a JSON object")
    info.pop(_CHECKPOINT_KEY, None)
    return info


def load_model(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    build: Builder | None = None,
) -> tuple[nn.Module, JobConfig, dict[str, Any]]:
    """Rebuild a model from a folder written by :func:`save_model` (weights only, no pickles).

    Only ``model.safetensors``, ``config.yaml`` and ``info.json`` are read; any other file in
    the folder (say a ``model.pt``) is ignored.

    Args:
        directory: the model folder.
        map_location: device the weights (and the returned model) are put on.
        build: ``ModelConfig -> nn.Module``; defaults to ``piaa_dist.model.build_model``.

    Returns:
        ``(model, cfg, info)``: the model in eval mode on ``map_location``, the JobConfig it was
        saved with, and the caller's info dict.

    Raises:
        CheckpointError: a file is missing or corrupted, a file does not match the hash
            recorded at save time (names the file), or the weights do not fit the architecture
            (names the file and the mismatching keys).
        ConfigError: ``config.yaml`` is invalid (names the file).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder (does not exist or is not a directory)")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        others = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(
            f"{weights}: missing; a piaa-dist model folder holds {', '.join(MODEL_FILES)} "
            f"(found: {', '.join(others) or 'nothing'}). Pickled checkpoints (.pt/.pth/.pkl) "
            "are never loaded."
        )
    cfg = load_config(folder / CONFIG_FILE)  # ConfigError names the file
    raw_info = verify_model_folder(folder)
    raw_info.pop(_CHECKPOINT_KEY, None)
    # Read on CPU: the model is built on CPU and moved once, whatever map_location is.
    tensors = _read_tensors(weights, "cpu")

    if build is None:
        from piaa_dist.model import build_model as build
    model = build(cfg.model)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        # torch's message lists missing/unexpected keys and size mismatches; keep it on one line
        # (the CLI prints user errors as one line) and add the files involved.
        detail = " ".join(str(err).split())
        raise CheckpointError(
            f"{weights}: weights do not match the model built from {folder / CONFIG_FILE}: {detail}"
        ) from None
    model.to(torch.device(map_location))
    model.eval()
    log.debug("loaded model from %s", folder)
    return model, cfg, raw_info


# ---------------------------------------------------------------------------------------------
# Training state (tensors + structure, no pickles)

# JSON encoding of the structure. Plain JSON objects are used for dicts whose keys are strings
# not starting with "__"; everything else is tagged so the round trip is exact.
_T_TENSOR = "__tensor__"
_T_NDARRAY = "__ndarray__"
_T_TUPLE = "__tuple__"
_T_DICT = "__dict__"  # [[key, value], ...] for dicts with non-string or "__"-prefixed keys
_T_FLOAT = "__float__"  # "nan" / "inf" / "-inf": keeps the file strict JSON


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    def name_for(p: str) -> str:
        name, n = p or "root", 1
        while name in tensors:  # keys containing "/" could collide with nesting
            n += 1
            name = f"{p}#{n}"
        return name

    if isinstance(obj, torch.Tensor):
        name = name_for(path)
        tensors[name] = obj
        return {_T_TENSOR: name}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"training state at {path or '<root>'}: object arrays are not supported")
        name = name_for(path)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(obj))
        return {_T_NDARRAY: name}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_T_FLOAT: repr(obj)}
    if isinstance(obj, tuple):
        return {_T_TUPLE: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in obj)
        if plain:
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, str))):
                raise TypeError(f"training state at {path or '<root>'}: unsupported key {k!r}")
            items.append([k, _encode(v, f"{path}/{k}", tensors)])
        return {_T_DICT: items}
    raise TypeError(
        f"training state at {path or '<root>'}: {type(obj).__name__} is not supported "
        "(use tensors, numpy arrays, numbers, strings, None, lists, tuples, dicts)"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], used: set[str], where: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, used, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag in (_T_TENSOR, _T_NDARRAY):
            if value not in tensors:
                raise CheckpointError(f"{where}: references tensor {value!r} missing from {STATE_TENSORS_FILE}")
            used.add(value)
            t = tensors[value]
            return t.cpu().numpy() if tag == _T_NDARRAY else t
        if tag == _T_TUPLE:
            return tuple(_decode(v, tensors, used, where) for v in value)
        if tag == _T_DICT:
            return {k: _decode(v, tensors, used, where) for k, v in value}
        if tag == _T_FLOAT:
            return float(value)
    return {k: _decode(v, tensors, used, where) for k, v in obj.items()}


def save_training_state(directory: str | Path, state: Mapping[str, Any]) -> Path:
    """Write a trainer state (model, optimizer, step, RNG...) without pickles.

    Args:
        directory: folder to write (created if needed).
        state: nested dicts/lists/tuples of tensors, numpy arrays, numbers, strings and None,
            e.g. ``{"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 120}``.
            Dict keys may be strings, ints, bools or None (optimizer state uses ints).

    Returns:
        The folder path.

    Raises:
        TypeError: the state holds an unsupported type (names its path in the state).
    """
    out = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, "", tensors)
    doc = {"format": STATE_FORMAT, "state": skeleton}
    json.dumps(doc, allow_nan=False)  # fail before writing anything if the structure is not JSON
    out.mkdir(parents=True, exist_ok=True)
    weights = out / STATE_TENSORS_FILE
    _atomic_write(weights, _tensor_bytes(tensors, {"format": STATE_FORMAT}))
    doc["tensors_sha256"] = sha256_file(weights)
    text = json.dumps(doc, allow_nan=False)
    _atomic_write(out / STATE_JSON_FILE, text.encode())  # last: marks the folder complete
    log.debug("saved training state (%d tensors) to %s", len(tensors), out)
    return out


def load_training_state(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a folder written by :func:`save_training_state` (same structure, key types kept).

    Args:
        directory: the training-state folder.
        map_location: device for the tensors.

    Raises:
        CheckpointError: missing/corrupted files, a hash mismatch, or dangling references.
    """
    folder = Path(directory)
    doc = _read_json(folder / STATE_JSON_FILE)
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or "state" not in doc:
        raise CheckpointError(
            f"{folder / STATE_JSON_FILE}: not a piaa-dist training state (format {STATE_FORMAT})"
        )
    weights = folder / STATE_TENSORS_FILE
    expected = doc.get("tensors_sha256")
    if expected and weights.is_file() and sha256_file(weights) != expected:
        raise CheckpointError(
            f"{weights}: SHA-256 does not match {STATE_JSON_FILE}; the file was modified or replaced"
        )
    tensors = _read_tensors(weights, map_location)
    used: set[str] = set()
    state = _decode(doc["state"], tensors, used, folder / STATE_JSON_FILE)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{weights}: tensors not referenced by {STATE_JSON_FILE}: {unused[:5]}")
    return state


def is_model_dir(directory: str | Path) -> bool:
    """True when ``directory`` holds a model's weights and config (cheap check, no loading)."""
    folder = Path(directory)
    return (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file()


__all__ = [
    "CONFIG_FILE",
    "INFO_FILE",
    "MODEL_FILES",
    "MODEL_FORMAT",
    "STATE_JSON_FILE",
    "STATE_TENSORS_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "info_digest",
    "is_model_dir",
    "load_model",
    "load_training_state",
    "model_file_hashes",
    "read_model_info",
    "save_model",
    "save_training_state",
    "sha256_file",
    "verify_model_folder",
]
