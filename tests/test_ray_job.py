"""``ray job submit`` of a jobs/ entry point against a real ``ray start --head`` cluster.

This is how users run piaa-dist on a cluster; here the cluster is local (started and stopped
by the test, on free ports, with its own temp dir) and the job meta-trains with one Ray Train
worker on the tiny synthetic dataset, logging to a SQLite MLflow store.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    ray = str(BIN / "ray")
    gcs_port, dash_port, agent_port, agent_grpc, metrics, runtime_env = (_free_port() for _ in range(6))
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = Path(f"/tmp/piaa-ray-{os.getpid()}")
    # As a user with the venv activated: the job's `python` is the venv's (CI runs pytest
    # through .venv/bin/python without activating it).
    env = dict(os.environ, RAY_TRAIN_V2_ENABLED="1", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    # Ray >= 2.59 secures local clusters with a token (`ray start` writes ~/.ray/auth_token);
    # the job client reads it only in token mode, as the README tells users to do.
    env["RAY_AUTH_MODE"] = "token"
    start = subprocess.run(
        [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # Ray's fixed default agent ports collide with any other Ray on the machine; a busy
         # port leaves the job agent down ("No available agent to submit job").
         f"--dashboard-agent-listen-port={agent_port}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"http://127.0.0.1:{dash_port}", env
    finally:
        _stop_cluster(temp_dir)


def _stop_cluster(temp_dir: Path) -> None:
    """Stop only this test's cluster (`ray stop` would kill every Ray on the machine)."""
    import signal

    def ours() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmd = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if str(temp_dir).encode() in cmd:
                    pids.append(int(entry.name))
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while ours() and time.monotonic() < deadline:
            time.sleep(0.5)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_train_entry_point(ray_head, tiny_dataset_url, tmp_path):
    address, env = ray_head
    out = tmp_path / "job-out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--", "python", "jobs/train.py", "--config", "jobs/configs/tiny.yaml",
        "--data", tiny_dataset_url, "--mlflow-uri", uri, "--out", str(out), "--workers", "1",
        "run.register_name=blg-piaa-job", "run.alias=champion",
    ]
    for _ in range(12):  # bounded: the head's job agent may still be starting (slow machines)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
        log = proc.stdout + proc.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(10)
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]
    assert "meta-learner at step 4" in log
    assert (out / "model" / "model.safetensors").is_file()
    # the job logged to MLflow and registered the model under its alias
    from piaa_dist.orchestration.tracking import load_model_uri

    model, cfg, info = load_model_uri("models:/blg-piaa-job@champion", uri=uri)
    assert info["step"] == 4 and info["workers"] == 1
