"""The checkpoint store (no Ray): run storage, loading, the newest-loadable rule, pointer files.

Local folders and the local S3 server (moto over HTTP) both; nothing here starts Ray.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from piaa_dist.checkpoint import CheckpointError, save_training_state
from piaa_dist.config import JobConfig
from piaa_dist.orchestration.checkpoint_store import (
    LATEST,
    InProcessCheckpoints,
    RunStorage,
    load_checkpoint,
    newest_loadable,
    read_pointer,
    stored_checkpoints,
    write_pointer,
)

REPO = Path(__file__).resolve().parents[1]


def _state(step: int) -> dict:
    return {"step": step, "w": torch.full((3,), float(step))}


def _tear(storage: RunStorage, folder: str) -> None:
    """Corrupt a stored checkpoint's tensors file (as a torn upload or bit rot would)."""
    path = f"{folder}/training_state.safetensors"
    with storage.filesystem.open_input_stream(path) as f:
        data = bytearray(f.read())
    data[-1] ^= 0xFF
    with storage.filesystem.open_output_stream(path) as f:
        f.write(bytes(data))


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> RunStorage:
    """An empty run storage on a local folder or on the local S3 server."""
    if request.param == "local":
        return RunStorage.from_url(str(tmp_path / "ckpt"), "meta-train")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return RunStorage.from_url(f"s3://{bucket}/runs", "meta-train", endpoint)


def test_a_torn_checkpoint_is_skipped_on_resume(tmp_path):
    """Resume picks the newest checkpoint folder that loads; a torn one is passed over.

    (Moved from tests/test_ray_train.py with the code it tests.)
    """
    root = tmp_path / "meta-train"
    for step in (2, 4, 6):
        save_training_state(root / f"checkpoint_{step:06d}", {"step": step, "w": torch.full((3,), step)})
    (root / "checkpoint_000006" / "training_state.safetensors").write_bytes(b"torn")
    (root / "not_a_checkpoint").mkdir()
    storage = RunStorage.from_url(str(tmp_path), "meta-train")
    assert [s for s, _ in stored_checkpoints(storage)] == [6, 4, 2]
    point = newest_loadable(storage)
    assert point.folder.endswith("checkpoint_000004") and point.state["step"] == 4
    assert torch.equal(point.state["w"], torch.full((3,), 4))
    # Nothing newer than a given step: no state.
    assert newest_loadable(storage, after=4).state is None
    assert newest_loadable(RunStorage.from_url(str(tmp_path), "missing")).state is None


def test_skipped_checkpoints_are_named_by_their_real_location(storage, caplog, tmp_path):
    """A torn newest checkpoint is skipped with a warning naming where it really is (an
    s3:// URL or the folder), never a temporary copy; the intact older one is resumed from."""
    for step in (2, 4):
        with_dir = tmp_path / f"src{step}"
        save_training_state(with_dir, _state(step))
        dest = storage.run_path(f"checkpoint_{step:06d}")
        storage.filesystem.create_dir(dest, recursive=True)
        for p in with_dir.iterdir():
            with storage.filesystem.open_output_stream(f"{dest}/{p.name}") as f:
                f.write(p.read_bytes())
    torn = storage.run_path("checkpoint_000004")
    _tear(storage, torn)
    real = storage.url_of(torn)
    assert real.startswith(("s3://", "/"))

    with caplog.at_level(logging.WARNING, logger="piaa_dist.orchestration.checkpoint_store"):
        point = newest_loadable(storage)
    assert point.step == 2 and point.folder.endswith("checkpoint_000002")
    assert point.skipped == (real,)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(real in w for w in warnings), warnings
    assert not any("piaa-checkpoint-" in w or "/tmp/tmp" in w for w in warnings), warnings

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(storage, torn)
    assert str(err.value).startswith(real) and "SHA-256" in str(err.value)
    assert "piaa-checkpoint-" not in str(err.value)


def test_in_process_checkpoints_keep_newest_and_previous(storage):
    cfg = JobConfig()
    store = InProcessCheckpoints(storage)
    assert store.resume_point().state is None
    for step in (2, 4, 6):
        url = store.save(step, _state(step), cfg)
        assert url == storage.url_of(storage.run_path("local", f"checkpoint_{step:06d}"))
    assert [s for s, _ in stored_checkpoints(storage, "local")] == [6, 4]
    assert read_pointer(storage, storage.run_path("local", LATEST)) == "checkpoint_000006"

    # A torn newest folder: a new attempt resumes from 4, and its next save replaces the torn
    # folder and prunes down to the new one and the one it resumed from.
    _tear(storage, storage.run_path("local", "checkpoint_000006"))
    again = InProcessCheckpoints(storage)
    point = again.resume_point()
    assert point.step == 4 and len(point.skipped) == 1
    again.save(6, _state(6), cfg)
    assert [s for s, _ in stored_checkpoints(storage, "local")] == [6, 4]
    assert torch.equal(again.resume_point().state["w"], torch.full((3,), 6.0))



def test_the_best_checkpoint_is_kept_apart_read_back_and_replaced(storage):
    """A best save is copied to ``local/best/`` and named by ``local/BEST``; a later best
    replaces it (one copy kept); it reads back with its step, score and state, and a copy of
    another step than the run's recorded best is ignored. Pruning never touches it."""
    import pyarrow.fs

    from piaa_dist.orchestration.checkpoint_store import read_best

    cfg = JobConfig()
    store = InProcessCheckpoints(storage, keep=1)
    assert read_best(storage, "local") is None
    for step, best in ((2, True), (4, False), (6, True), (8, False), (10, False)):
        state = {**_state(step), "early_stopping": {"best_step": 6 if step >= 6 else 2,
                                                    "best_score": 0.7 if step >= 6 else 0.5}}
        store.save(step, state, cfg, best=best)
    best = read_best(storage, "local", best_step=6)
    assert (best.step, best.score) == (6, 0.7)
    assert torch.equal(best.state["w"], torch.full((3,), 6.0))
    assert best.url == storage.url_of(storage.run_path("local", "best", "checkpoint_000006"))
    copies = storage.filesystem.get_file_info(pyarrow.fs.FileSelector(storage.run_path("local", "best")))
    assert [i.base_name for i in copies if i.type == pyarrow.fs.FileType.Directory] == ["checkpoint_000006"]
    assert read_best(storage, "local").step == 6
    assert read_best(storage, "local", best_step=2) is None  # BEST names another step: ignored


def test_a_model_is_rebuilt_from_a_training_state():
    from piaa_dist.model import build_model
    from piaa_dist.orchestration.checkpoint_store import model_from_state

    cfg = JobConfig()
    torch.manual_seed(3)
    model = build_model(cfg.model)
    rebuilt = model_from_state(cfg, {"model": model.state_dict(), "step": 1})
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name

def test_an_empty_or_stale_pointer_never_decides_the_resume_point(storage):
    store = InProcessCheckpoints(storage)
    for step in (2, 4):
        store.save(step, _state(step), JobConfig())
    latest = storage.run_path("local", LATEST)
    for text in ("", "checkpoint_000002", "garbage"):
        with storage.filesystem.open_output_stream(latest) as f:
            f.write(text.encode())
        assert InProcessCheckpoints(storage).resume_point().step == 4


def test_pointer_writes_are_atomic(tmp_path):
    """A reader in another process never sees a pointer file empty or half-written while it is
    rewritten over and over (a truncate-then-write would show it empty now and then)."""
    storage = RunStorage.from_url(str(tmp_path), "run")
    path = storage.run_path(LATEST)
    storage.filesystem.create_dir(storage.run_path(), recursive=True)
    names = ["checkpoint_000002" * 40, "checkpoint_000004" * 40]  # a few hundred bytes each
    write_pointer(storage, path, names[0])
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os
            ok, reads, bad = {set(names)!r}, 0, 0
            while reads % 100 or not os.path.exists({str(stop)!r}):
                try:
                    text = open({path!r}).read()
                except FileNotFoundError:
                    text = ""
                reads += 1
                bad += text not in ok
            print(reads, bad)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(0.5)  # let the reader start reading
        deadline = time.time() + 4
        i = 0
        while time.time() < deadline:
            write_pointer(storage, path, names[i % 2])
            i += 1
        stop.touch()
        out, _ = reader.communicate(timeout=120)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    reads, bad = (int(x) for x in out.split())
    assert i > 100 and reads > 100, (i, reads)
    assert bad == 0, f"{bad} of {reads} reads saw a partial pointer during {i} writes"
    # no temporary files left beside it
    assert sorted(p.name for p in Path(path).parent.iterdir()) == [LATEST]


def test_storage_from_urls(tmp_path, s3_endpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = RunStorage.from_url("rel/ckpt", "a")
    assert local.url == str(tmp_path / "rel" / "ckpt") and local.is_local
    assert local.run_path("local", "LATEST") == f"{tmp_path}/rel/ckpt/a/local/LATEST"
    assert local.ray_storage() == (str(tmp_path / "rel" / "ckpt"), None)
    s3 = RunStorage.from_url("s3://bucket-x/runs/", "b", s3_endpoint)
    assert not s3.is_local and s3.root == "bucket-x/runs"
    assert s3.url_of(s3.run_path("checkpoint_000002")) == "s3://bucket-x/runs/b/checkpoint_000002"
    path, fs = s3.ray_storage()
    assert path == "bucket-x/runs" and fs is s3.filesystem
    import pickle

    assert pickle.loads(pickle.dumps(s3)).url == s3.url  # travels to Ray workers


def test_store_step_hook_and_sinks_import_no_ray():
    """The checkpoint store, step hook, metric sinks, in-process runner and lock do not need Ray."""
    modules = [
        "piaa_dist.orchestration.checkpoint_store",
        "piaa_dist.orchestration.step_hook",
        "piaa_dist.orchestration.run_records",
        "piaa_dist.orchestration.in_process",
        "piaa_dist.orchestration.run_lock",
    ]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps([m for m in ('ray', 'mlflow') if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
