"""Secrets never reach the bucket, the output folders, the MLflow store or a log line.

Planted secrets: a unique AWS secret key and session token (in the environment, where the S3
clients read them) and a unique password in the MLflow tracking URI
(``http://piaa:<password>@127.0.0.1:<port>``, a real ``mlflow server`` on this machine). The
end-to-end test runs ``piaa-dist train`` with 2 Ray Train workers and a 2-trial ``piaa-dist
tune`` against the local S3 endpoint with MLflow on and checkpoints/Tune state in the bucket,
then scans every object in the buckets, every file under the output folders, the MLflow
server's store (database and artifacts), Ray's session folder and everything the commands
printed: zero hits. The fast tests cover the paths one at a time: the pickled storage
filesystem, Tune's stored state (``tuner.pkl``), the tracking URI, MLflow params/tags and a
saved ``config.yaml``.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"


def _secret(kind: str) -> str:
    return f"{kind}{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"


def _hits(data: bytes, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value.encode() in data]


def _scan_folder(root: Path, secrets: dict[str, str]) -> tuple[list[str], int]:
    """``(["file: secret name", ...], files scanned)`` for every regular file under ``root``."""
    found, n = [], 0
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:  # a socket or a file removed meanwhile
            continue
        n += 1
        found += [f"{path}: {name}" for name in _hits(data, secrets)]
    return found, n


def _scan_buckets(endpoint: str, buckets: list[str], secrets: dict[str, str]) -> tuple[list[str], list[str]]:
    """``(hits, keys scanned)`` over every object (every version) of ``buckets``."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    found, keys = [], []
    for bucket in buckets:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                data = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                keys.append(f"s3://{bucket}/{obj['Key']}")
                found += [f"s3://{bucket}/{obj['Key']}: {name}" for name in _hits(data, secrets)]
    return found, keys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A real MLflow tracking server on 127.0.0.1: ``(url, store folder, its log file)``."""
    store = tmp_path / "mlflow-server"
    store.mkdir()
    port = _free_port()
    log_file = tmp_path / "mlflow-server.log"
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--artifacts-destination", str(store / "artifacts")],
            cwd=store, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {log_file.read_text()[-2000:]}")
            time.sleep(1)
        yield url, store, log_file
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cli(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "piaa_dist.cli", *args], env=env, cwd=cwd,
                          capture_output=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The redaction rule


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://user:pass@host:5000/path?x=1", "http://user:***@host:5000/path?x=1"),
    ("https://a:b@c@host/", "https://a:***@host/"),  # an unencoded "@" in the password
    ("postgresql://u:p%40ss@db:5432/mlflow", "postgresql://u:***@db:5432/mlflow"),
    ("http://user@host", "http://user@host"),  # a user name alone is no secret
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("not a uri", "not a uri"),
])
def test_redact_uri_hides_the_password_and_keeps_the_rest(uri, shown):
    from piaa_dist.redact import redact_text, redact_uri

    assert redact_uri(uri) == shown
    assert redact_text(f"cannot reach {uri}: refused") == f"cannot reach {shown}: refused"


def test_split_credentials_and_redact_text_in_messages():
    from piaa_dist.redact import redact_text, redact_value, split_credentials

    assert split_credentials("http://me:pw@h:1/x") == ("http://h:1/x", "me", "pw")
    assert split_credentials("http://h:1/x") == ("http://h:1/x", None, None)
    msg = "tried 'http://a:one@x/api' and http://b:two@y:2, then gave up"
    assert redact_text(msg) == "tried 'http://a:***@x/api' and http://b:***@y:2, then gave up"
    assert redact_text("key sk-0123456789 leaked", ["sk-0123456789"]) == "key *** leaked"
    nested = {"run": {"mlflow_uri": "http://u:pw@h"}, "shots": [10, "http://v:pw2@h"], "n": 3}
    assert redact_value(nested) == {"run": {"mlflow_uri": "http://u:***@h"},
                                    "shots": [10, "http://v:***@h"], "n": 3}


# ---------------------------------------------------------------------------------------------
# One path at a time (fast)


@pytest.fixture
def planted(monkeypatch) -> dict[str, str]:
    """A unique AWS secret key and session token in this process's environment."""
    secrets = {"AWS secret key": _secret("sk"), "AWS session token": _secret("tok")}
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets["AWS secret key"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", secrets["AWS session token"])
    return secrets


def test_storage_filesystem_pickles_without_credentials(planted, s3_endpoint, s3_bucket):
    """Ray pickles the checkpoint storage's filesystem (into worker arguments and Tune's
    tuner.pkl): the pickle holds no key, and an unpickled copy still reaches the bucket with
    the credentials of the environment it lands in."""
    from piaa_dist.orchestration.checkpoint_store import RunStorage, read_pointer, write_pointer

    storage = RunStorage.from_url(f"s3://{s3_bucket}/runs", "r", s3_endpoint)
    data = pickle.dumps(storage)
    assert _hits(data, planted) == []
    clone = pickle.loads(data)
    write_pointer(clone, clone.run_path("POINTER"), "written by the unpickled copy")
    assert read_pointer(storage, storage.run_path("POINTER")) == "written by the unpickled copy"


def test_tune_state_in_the_bucket_holds_no_secret(planted, s3_endpoint, s3_bucket, tiny_s3_dataset_url):
    """Constructing the sweep's Tuner writes tuner.pkl (run config, callbacks, storage
    filesystem) to the storage path: with checkpoints in the bucket, nothing secret in it."""
    from piaa_dist.config import load_config
    from piaa_dist.orchestration.tune import build_tuner

    password = _secret("pw")
    secrets = {**planted, "MLflow URI password": password}
    uri = f"http://piaa:{password}@127.0.0.1:9"  # never contacted: the Tuner is not fitted
    cfg = load_config(TINY, ["run.validate_every=2", f"run.mlflow_uri={uri}"])
    build_tuner(cfg, tiny_s3_dataset_url, samples=2, workers_per_trial=1,
                storage=f"s3://{s3_bucket}/tune", s3_endpoint=s3_endpoint, mlflow_uri=uri)
    found, keys = _scan_buckets(s3_endpoint, [s3_bucket], secrets)
    assert any(k.endswith("/tuner.pkl") for k in keys), keys
    assert found == []


def test_tracking_uri_moves_an_http_password_to_the_environment(monkeypatch):
    from piaa_dist.orchestration.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri("http://me:p%40ss@mlflow.example:5000") == "http://mlflow.example:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "me"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    # a redacted URI (a saved config.yaml) takes the password from the environment
    assert tracking_uri("http://me:***@mlflow.example:5000") == "http://mlflow.example:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    # the same through $MLFLOW_TRACKING_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://you:other@mlflow.example")
    assert tracking_uri("") == "https://mlflow.example"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "other"
    # a database URI needs its credentials: kept (and redacted wherever shown or stored)
    assert tracking_uri("postgresql://u:pw@db/mlflow") == "postgresql://u:pw@db/mlflow"


def test_mlflow_params_tags_errors_and_logs_are_redacted(tmp_path, caplog):
    """A URI password in the config (a database tracking URI, an S3 endpoint) or in an error
    never reaches the MLflow store or the log."""
    import logging

    from mlflow import MlflowClient

    from piaa_dist.config import load_config
    from piaa_dist.orchestration.tracking import RunLogger

    pw1, pw2, pw3 = _secret("pw"), _secret("pw"), _secret("pw")
    secrets = {"config URI": pw1, "endpoint": pw2, "error": pw3}
    cfg = load_config(TINY, [f"run.mlflow_uri=postgresql://u:{pw1}@db/mlflow",
                             f"data.s3_endpoint=http://k:{pw2}@127.0.0.1:9"])
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(RuntimeError), RunLogger("secrets", uri=uri, run_name="r", rank=0,
                                                    tags={"endpoint": cfg.data.s3_endpoint}) as run:
            run.log_params(cfg)
            run.set_tags({"where": f"postgresql://u:{pw1}@db/mlflow"})
            run.log_dict({"uri": cfg.run.mlflow_uri}, "connection.json")
            raise RuntimeError(f"cannot reach http://u:{pw3}@127.0.0.1:9")
    stored = MlflowClient(uri).get_run(run.run_id)
    assert stored.data.params["run.mlflow_uri"] == "postgresql://u:***@db/mlflow"
    assert stored.data.params["data.s3_endpoint"] == "http://k:***@127.0.0.1:9"
    assert stored.data.tags["error"] == "RuntimeError: cannot reach http://u:***@127.0.0.1:9"
    found, n = _scan_folder(tmp_path, secrets)
    assert n >= 2 and found == []  # the database and the artifact
    assert _hits(caplog.text.encode(), secrets) == []


def test_saved_config_yaml_holds_no_uri_password(tmp_path):
    from piaa_dist.checkpoint import load_model, save_model
    from piaa_dist.config import load_config
    from piaa_dist.model import build_model

    password = _secret("pw")
    cfg = load_config(TINY, [f"run.mlflow_uri=http://piaa:{password}@mlflow.example:5000"])
    folder = save_model(tmp_path / "model", build_model(cfg.model), cfg, {"kind": "test"})
    text = (folder / "config.yaml").read_text()
    assert password not in text and "http://piaa:***@mlflow.example:5000" in text
    _, loaded, _ = load_model(folder)  # still a valid config (the hashes cover the redacted text)
    assert loaded.run.mlflow_uri == "http://piaa:***@mlflow.example:5000"


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_no_secret_reaches_the_bucket_outputs_mlflow_or_logs(
    mlflow_server, tiny_s3_dataset_url, s3_endpoint, s3_bucket, tmp_path
):
    url, store, server_log = mlflow_server
    secrets = {
        "AWS secret key": _secret("sk"),
        "AWS session token": _secret("tok"),
        "MLflow URI password": _secret("pw"),
    }
    uri_with_password = url.replace("http://", f"http://piaa:{secrets['MLflow URI password']}@")
    # A short Ray temp folder (Unix socket paths are limited to ~107 characters) we can scan.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    env.update(
        AWS_SECRET_ACCESS_KEY=secrets["AWS secret key"],
        AWS_SESSION_TOKEN=secrets["AWS session token"],
        RAY_TMPDIR=str(ray_tmp),
        PYTHONPATH=str(REPO),
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    common = ["--config", str(TINY), "--data", tiny_s3_dataset_url, "--s3-endpoint", s3_endpoint]
    try:
        # train: the password reaches the config through run.mlflow_uri (config.yaml's route)
        train = _cli(["train", *common, "--out", str(work / "train"), "--workers", "2",
                      "meta.meta_steps=4", "run.checkpoint_every=2",
                      f"run.storage_path=s3://{s3_bucket}/train",
                      f"run.mlflow_uri={uri_with_password}", "run.register_name=secret-scan"],
                     env, work)
        assert train.returncode == 0, train.stderr.decode()[-3000:]
        # tune: the password comes as --mlflow-uri; Tune's state goes to the bucket
        tune = _cli(["tune", *common, "--out", str(work / "tune"), "--samples", "2",
                     "--workers-per-trial", "1", "--mlflow-uri", uri_with_password,
                     "--alias", "champion", "meta.meta_steps=4", "run.validate_every=2",
                     "run.checkpoint_every=2", "data.validation_users=2",
                     "run.register_name=secret-scan", "tune.max_concurrent=1",
                     f"run.storage_path=s3://{s3_bucket}/tune"],
                    env, work)
        assert tune.returncode == 0, tune.stderr.decode()[-3000:]

        found: list[str] = []
        for name, proc in (("train", train), ("tune", tune)):
            for stream in ("stdout", "stderr"):
                found += [f"{name} {stream}: {s}" for s in _hits(getattr(proc, stream), secrets)]
        bucket = tiny_s3_dataset_url.removeprefix("s3://").split("/")[0]
        in_buckets, keys = _scan_buckets(s3_endpoint, [s3_bucket, bucket], secrets)
        found += in_buckets
        scanned = {}
        for root in (work, store, ray_tmp):
            hits, scanned[root] = _scan_folder(root, secrets)
            found += hits
        found += [f"{server_log}: {s}" for s in _hits(server_log.read_bytes(), secrets)]
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)

    # The scan covered what the runs wrote: checkpoints and Tune's pickled state in the bucket,
    # registered model files in MLflow's artifact store, model folders in the outputs.
    assert any(k.endswith("/tuner.pkl") for k in keys), keys[:20]
    assert any("/train/" in k and k.endswith("/config.yaml") for k in keys)
    assert any(p.name == "config.yaml" for p in (store / "artifacts").rglob("*"))
    assert (work / "train" / "model" / "config.yaml").is_file()
    assert scanned[work] > 5 and scanned[ray_tmp] > 5
    assert found == [], "\n".join(found)
