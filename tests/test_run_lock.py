"""One run per output: a second run on a held output or checkpoint storage is refused, naming the
holder; a lock left by a dead process is taken over with a warning. Holders are real processes."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from piaa_dist.config import load_config, with_overrides
from piaa_dist.orchestration.checkpoint_store import RunStorage
from piaa_dist.orchestration.ray_train import run_distributed
from piaa_dist.orchestration.run_lock import LOCK_FILE, LockHolder, RunLocked, hold_run

REPO = Path(__file__).resolve().parents[1]
TINY = "jobs/configs/tiny.yaml"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)


def _takeovers(caplog, pid: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "taking over the lock" in r.getMessage() and f"pid {pid}," in r.getMessage()]


def test_train_refuses_a_held_output_and_takes_over_a_dead_holders_lock(tiny_dataset_url, tmp_path, caplog):
    """A live ``piaa-dist train`` holds its --out: a second run (in-process, Ray, or the CLI) is
    refused with host, pid and start time; once the holder is killed (-9, no clean-up), the
    next run takes the lock over with a warning and resumes from the holder's checkpoints."""
    out = tmp_path / "out"
    log_file = tmp_path / "holder.log"
    with open(log_file, "w") as log_fh:
        holder = subprocess.Popen(
            [sys.executable, "-m", "piaa_dist.cli", "train", "--data", tiny_dataset_url,
             "--config", TINY, "--out", str(out), "--workers", "0", "--no-mlflow",
             "meta.meta_steps=1000000", "run.checkpoint_every=1", "run.log_every=1000"],
            cwd=REPO, env=_env(), stdout=log_fh, stderr=subprocess.STDOUT,
        )
    try:
        latest = out / "checkpoints" / "meta-train" / "local" / "LATEST"
        deadline = time.time() + 300
        while not latest.exists():
            assert holder.poll() is None, log_file.read_text()[-3000:]
            assert time.time() < deadline, "the holder never saved a checkpoint"
            time.sleep(0.5)

        cfg = load_config(REPO / TINY)
        with pytest.raises(RunLocked) as err:
            run_distributed(cfg, tiny_dataset_url, out, workers=0)
        msg = str(err.value)
        assert str(out) in msg and f"host {socket.gethostname()}, pid {holder.pid}, since 20" in msg, msg
        # A Ray run is refused the same way, before it starts anything.
        with pytest.raises(RunLocked, match=f"pid {holder.pid},"):
            run_distributed(cfg, tiny_dataset_url, out, workers=1)
        # The CLI prints it as one line and exits 2.
        proc = subprocess.run(
            [sys.executable, "-m", "piaa_dist.cli", "train", "--data", tiny_dataset_url,
             "--config", TINY, "--out", str(out), "--workers", "0", "--no-mlflow"],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, check=False,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"pid {holder.pid}," in proc.stderr and "in use by another run" in proc.stderr
        assert holder.poll() is None  # the holder was never disturbed
    finally:
        _kill(holder)

    lock = out / LOCK_FILE
    assert json.loads(lock.read_text())["pid"] == holder.pid  # left behind by the killed holder
    with caplog.at_level(logging.WARNING):
        result = run_distributed(with_overrides(cfg, {"meta.meta_steps": 1}), tiny_dataset_url, out, workers=0)
    assert _takeovers(caplog, holder.pid), [r.getMessage() for r in caplog.records]
    assert result.step >= 1  # the holder's newest checkpoint that loads (already past 1 step)
    assert not lock.exists()  # released at the end


def _hold_in_subprocess(out: Path, storage_args: tuple) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys
        from piaa_dist.orchestration.checkpoint_store import RunStorage
        from piaa_dist.orchestration.run_lock import hold_run
        with hold_run({str(out)!r}, RunStorage.from_url(*{storage_args!r})):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "held":
        _kill(proc)
        pytest.fail(f"the holder did not take the lock: {line!r}")
    return proc


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_checkpoint_storage_is_held_too(kind, tmp_path, request, caplog):
    """Two runs with different --out but the same checkpoint storage and run name would prune
    each other's checkpoints: the storage is locked as well (a lock file in a local folder, a
    conditionally created object on S3), and a dead holder's lock is taken over."""
    if kind == "local":
        args = (str(tmp_path / "shared-ckpt"), "meta-train")
        where = f"{tmp_path}/shared-ckpt/meta-train"
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        args = (f"s3://{bucket}/runs", "meta-train", endpoint)
        where = f"s3://{bucket}/runs/meta-train"
    holder = _hold_in_subprocess(tmp_path / "a", args)
    try:
        storage = RunStorage.from_url(*args)
        with pytest.raises(RunLocked) as err, hold_run(tmp_path / "b", storage):
            pass
        assert where in str(err.value) and f"pid {holder.pid}," in str(err.value), str(err.value)
        assert not (tmp_path / "b" / LOCK_FILE).exists()  # the refused run let go of its --out
        # another run name under the same root is a different run: free
        with hold_run(tmp_path / "b", RunStorage.from_url(args[0], "other", *args[2:])):
            pass
    finally:
        _kill(holder)
    with caplog.at_level(logging.WARNING), hold_run(tmp_path / "b", storage):
        assert _takeovers(caplog, holder.pid)
    # released: a third run gets it without a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING), hold_run(tmp_path / "c", storage):
        assert not [r for r in caplog.records if "taking over" in r.getMessage()]


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(LockHolder("elsewhere", 4242, "2024-01-01T00:00:00+00:00").to_json())
    with pytest.raises(RunLocked, match=r"host elsewhere, pid 4242, since 2024-01-01.*delete .*\.piaa-dist\.lock"), \
            hold_run(out):
        pass
    assert (out / LOCK_FILE).exists()  # left for its owner (or a person) to remove


def test_the_lock_is_reentrant_for_its_holder_and_released_after(tmp_path):
    out = tmp_path / "out"
    with hold_run(out):
        with hold_run(out):
            record = json.loads((out / LOCK_FILE).read_text())
            assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert (out / LOCK_FILE).exists()  # the outer holder still has it
    assert not (out / LOCK_FILE).exists()
