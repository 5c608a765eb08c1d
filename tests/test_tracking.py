"""MLflow runs, registry and model resolution against a real SQLite-backed MLflow (no mocks)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_results import sample_result

from piaa_dist import checkpoint
from piaa_dist.config import JobConfig, flat_params, with_overrides
from piaa_dist.orchestration import tracking
from piaa_dist.orchestration.tracking import (
    RunLogger,
    TrackingError,
    register_model,
    resolve_model,
    tracking_uri,
)
from piaa_dist.presentation import plot_srocc_vs_shots
from piaa_dist.results import EvaluationResult

REPO = Path(__file__).resolve().parents[1]

#: A typed evaluate result (blg-piaa 0.41 / giaa-finetune 0.33 at 10 shots, oracle 0.83).
EVAL = sample_result()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store per module: creating its schema costs seconds, so tests share it."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.client(uri)  # the store exists (resolving a reference never creates one)
    return uri


@pytest.fixture()
def cfg() -> JobConfig:
    # A small real model (piaa_dist.model.build_model): the fresh process rebuilds it from config.
    return with_overrides(JobConfig(), {"model.width": 8, "model.feature_dim": 16, "model.head_hidden": [8]})


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _model(cfg: JobConfig, seed: int) -> torch.nn.Module:
    from piaa_dist.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():  # non-default BN statistics, so buffers are checked too
        model.train()
        model(torch.randn(4, 3, 32, 32))
    return model


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_uri() == "http://mlflow:5000"
    assert tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"
    assert tracking_uri("runs.db") == f"sqlite:///{tmp_path / 'runs.db'}"
    assert tracking_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path / 'sub' / 'm.db'}"
    assert tracking_uri("sqlite:///:memory:") == "sqlite:///:memory:"
    assert os.environ["MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK"] == "1"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_run_logs_params_metrics_and_artifacts(store, cfg, tmp_path):
    with RunLogger("exp-a", uri=store, run_name="train", tags={"kind": "train"}) as run:
        run.log_params(cfg)
        for step in range(3):
            run.log_metrics({"query_loss": 1.0 / (step + 1), "note": "skipped"}, step=step)
        run.log_dict({"a": 1}, "meta/info.json")
        run.log_text("hello", "notes.txt")
        run.log_evaluation(EVAL)
        run_id = run.run_id
    client = _client(store)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    params = got.data.params
    flat = flat_params(cfg)
    assert len(params) == len(flat)
    assert params["meta.inner_lr"] == str(cfg.meta.inner_lr)
    assert json.loads(params["model.head_hidden"]) == [8]
    history = client.get_metric_history(run_id, "query_loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.333333)]
    assert "note" not in got.data.metrics
    assert got.data.metrics["eval.blg-piaa.k10.srocc_mean"] == pytest.approx(0.41)
    assert got.data.metrics["eval.giaa-finetune.k100.plcc_mean"] == pytest.approx(0.49)
    assert got.data.metrics["eval.paired.giaa-finetune.k10.diff_mean"] == pytest.approx(0.08)
    assert got.data.metrics["eval.ceiling.oracle"] == pytest.approx(0.83)
    assert got.data.metrics["eval.ceiling.average_user"] == pytest.approx(0.37)
    assert got.data.tags["kind"] == "train"

    files = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for d in ("meta", "eval") for a in client.list_artifacts(run_id, d)
    }
    assert {"notes.txt", "meta/info.json", "eval/evaluate.json", "eval/srocc_vs_shots.png"} <= files
    local = Path(client.download_artifacts(run_id, "eval", str(tmp_path)))
    assert (local / "srocc_vs_shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert EvaluationResult.load(local / "evaluate.json") == EVAL
    # artifacts live beside the SQLite DB, not in whatever the cwd was
    db_dir = Path(store[len("sqlite:///"):]).parent
    assert got.info.artifact_uri.startswith((db_dir / "mlruns").as_uri())


def test_failed_block_marks_run_failed_and_reraises(store):
    with pytest.raises(ZeroDivisionError):
        with RunLogger("exp-a", uri=store) as run:
            run.log_metric("x", 1.0, step=0)
            1 / 0  # noqa: B018 -- raises inside the block on purpose
    got = _client(store).get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert "ZeroDivisionError" in got.data.tags["error"]


def test_nonzero_rank_is_a_noop(store, monkeypatch):
    client = _client(store)
    exp = tracking.get_or_create_experiment("exp-a", store)
    before = len(client.search_runs([exp]))
    with RunLogger("exp-a", uri=store, rank=1) as run:
        run.log_params({"a": 1})
        run.log_metrics({"x": 1.0}, step=1)
        run.log_figure(plot_srocc_vs_shots(EVAL), "f.png")
        assert run.run_id is None and not run.active
        assert run.register_model("/nonexistent", "m") is None
    monkeypatch.setenv("RANK", "3")  # what Ray Train sets in its workers
    with RunLogger("exp-a", uri=store) as run:
        assert run.run_id is None
    assert len(client.search_runs([exp])) == before


def test_reopen_run_by_id(store):
    with RunLogger("exp-a", uri=store) as run:
        run.log_metric("loss", 2.0, step=0)
    with RunLogger("exp-a", uri=store, run_id=run.run_id) as again:
        again.log_metric("loss", 1.0, step=1)
    hist = _client(store).get_metric_history(run.run_id, "loss")
    assert [m.step for m in hist] == [0, 1]
    assert _client(store).get_run(run.run_id).info.status == "FINISHED"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _fresh_process_state(ref: str, store: str, out: Path) -> dict[str, torch.Tensor]:
    """Resolve + load ``ref`` in a new interpreter; return the state dict it saw."""
    code = textwrap.dedent(
        f"""
        import sys
        from safetensors.torch import save_file
        from piaa_dist.orchestration.tracking import load_model_uri
        model, cfg, info = load_model_uri({ref!r}, uri={store!r})
        assert "mlflow.pytorch" not in sys.modules  # no flavor loader involved
        save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, {str(out)!r})
        print(info["tag"])
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    return {"__tag__": proc.stdout.strip().splitlines()[-1], **load_file(str(out))}


def test_register_alias_resolve_and_load_in_fresh_process(store, cfg, tmp_path):
    marker = tmp_path / "PWNED"
    models = {}
    versions = {}
    for i in (1, 2):
        model = _model(cfg, seed=i)
        folder = checkpoint.save_model(tmp_path / f"m{i}", model, cfg, {"tag": f"model-{i}"})
        (folder / "model.pt").write_bytes(pickle.dumps(_Payload(marker)))  # must never ship
        with RunLogger("exp-reg", uri=store) as run:
            versions[i] = run.register_model(folder, "blg-test", alias="champion")
        models[i] = model
    assert versions[2] == versions[1] + 1

    client = _client(store)
    # the alias moved to the new version
    assert int(client.get_model_version_by_alias("blg-test", "champion").version) == versions[2]
    mv = client.get_model_version("blg-test", str(versions[2]))
    assert mv.tags[tracking.TAG_SHA256] == checkpoint.sha256_file(tmp_path / "m2" / "model.safetensors")
    # only the plain model files were uploaded: no pickle, no MLmodel flavor
    uploaded = sorted(Path(a.path).name for a in client.list_artifacts(mv.run_id, "model"))
    assert uploaded == sorted(checkpoint.MODEL_FILES)

    # a fresh interpreter resolves models:/NAME@champion and gets identical weights and buffers
    state = _fresh_process_state("models:/blg-test@champion", store, tmp_path / "seen.safetensors")
    assert state.pop("__tag__") == "model-2"
    expected = models[2].state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    # an explicit version still gives the old weights
    folder = resolve_model(f"models:/blg-test/{versions[1]}", uri=store, dst=tmp_path / "v1")
    assert sorted(p.name for p in folder.iterdir()) == sorted(checkpoint.MODEL_FILES)
    loaded, _, info = checkpoint.load_model(folder)
    assert info["tag"] == "model-1"
    for k, v in models[1].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not marker.exists()


def test_planted_pickle_and_tampering_in_artifact_store(store, cfg, tmp_path):
    marker = tmp_path / "PWNED"
    folder = checkpoint.save_model(tmp_path / "m", _model(cfg, 3), cfg, {"tag": "x"})
    with RunLogger("exp-reg", uri=store) as run:
        version = run.register_model(folder, "blg-tamper", alias="champion")
    client = _client(store)
    source = client.get_model_version_download_uri("blg-tamper", str(version))
    store_dir = Path(source.replace("file://", ""))
    assert (store_dir / "model.safetensors").is_file()

    # a pickle planted next to the registered files is neither downloaded nor executed
    (store_dir / "model.pt").write_bytes(pickle.dumps(_Payload(marker)))
    got = resolve_model("models:/blg-tamper@champion", uri=store, dst=tmp_path / "dl")
    assert sorted(p.name for p in got.iterdir()) == sorted(checkpoint.MODEL_FILES)
    tracking.load_model_uri(got)
    assert not marker.exists()

    # weights altered in the store after registration: refused, naming the reason
    data = bytearray((store_dir / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (store_dir / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(TrackingError, match="SHA-256.*modified after registration"):
        resolve_model("models:/blg-tamper@champion", uri=store, dst=tmp_path / "dl2")
    # replaced with garbage *and* every recorded hash faked: the safetensors parser still refuses
    (store_dir / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    fake = checkpoint.sha256_file(store_dir / "model.safetensors")
    info = json.loads((store_dir / "info.json").read_text())
    info["_checkpoint"]["weights_sha256"] = fake
    info["_checkpoint"]["files_sha256"]["model.safetensors"] = fake
    info["_checkpoint"]["info_sha256"] = checkpoint.info_digest(info)
    (store_dir / "info.json").write_text(json.dumps(info))
    client.set_model_version_tag("blg-tamper", str(version), tracking.TAG_SHA256, fake)
    client.set_model_version_tag(
        "blg-tamper", str(version), tracking.TAG_FILES_SHA256,
        json.dumps(checkpoint.model_file_hashes(store_dir)),
    )
    with pytest.raises(checkpoint.CheckpointError, match="not a valid safetensors file"):
        tracking.load_model_uri("models:/blg-tamper@champion", uri=store)
    assert not marker.exists()


@pytest.mark.parametrize("fname", ["config.yaml", "info.json"])
def test_registry_hashes_cover_config_and_info(store, cfg, tmp_path, fname):
    """Fine-tuning settings (config.yaml) or metadata (info.json) changed in the artifact store
    after registration are refused at download, naming the file, even when the edit keeps the
    folder's own recorded hashes consistent."""
    folder = checkpoint.save_model(tmp_path / "m", _model(cfg, 5), cfg, {"tag": "x"})
    with RunLogger("exp-reg", uri=store) as run:
        version = run.register_model(folder, f"blg-cover-{fname[:4]}", alias="champion")
    ref = f"models:/blg-cover-{fname[:4]}@champion"
    mv = _client(store).get_model_version(f"blg-cover-{fname[:4]}", str(version))
    assert json.loads(mv.tags[tracking.TAG_FILES_SHA256]) == checkpoint.model_file_hashes(folder)
    store_dir = Path(_client(store).get_model_version_download_uri(
        f"blg-cover-{fname[:4]}", str(version)).replace("file://", ""))

    info = json.loads((store_dir / "info.json").read_text())
    if fname == "config.yaml":
        text = (store_dir / "config.yaml").read_text()
        assert "finetune_steps: 20" in text
        (store_dir / "config.yaml").write_text(text.replace("finetune_steps: 20", "finetune_steps: 500"))
        # re-seal the folder as someone editing the store would: its own hashes now agree
        info["_checkpoint"]["files_sha256"]["config.yaml"] = checkpoint.sha256_file(store_dir / "config.yaml")
    else:
        info["tag"] = "y"
    info["_checkpoint"]["info_sha256"] = checkpoint.info_digest(info)
    (store_dir / "info.json").write_text(json.dumps(info, indent=2))
    checkpoint.load_model(store_dir)  # the folder alone cannot tell: only the registry can

    with pytest.raises(TrackingError, match=rf"{fname}.*SHA-256.*modified after registration"):
        resolve_model(ref, uri=store, dst=tmp_path / "dl")
    with pytest.raises(TrackingError, match=rf"downloaded {fname}"):
        tracking.load_model_uri(ref, uri=store)


def test_resolve_errors_are_clear(store, tmp_path):
    with pytest.raises(TrackingError, match="models:/nope@champion: not found"):
        resolve_model("models:/nope@champion", uri=store)
    with pytest.raises(TrackingError, match="expected models:/NAME@ALIAS"):
        resolve_model("models:/a/b/c", uri=store)
    with pytest.raises(TrackingError, match="unsupported model reference"):
        resolve_model("s3://bucket/model", uri=store)
    with pytest.raises(checkpoint.CheckpointError, match="not a model folder"):
        resolve_model(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="not a model folder"):
        register_model("0" * 32, tmp_path, "x", uri=store)


def test_resolve_local_folder_and_file_uri(cfg, tmp_path):
    folder = checkpoint.save_model(tmp_path / "m", _model(cfg, 4), cfg, {})
    assert resolve_model(folder) == folder
    assert resolve_model(folder.as_uri()) == folder


def test_concurrent_first_use_of_a_new_sqlite_store(tmp_path):
    """Tune trials / Train restarts opening a brand-new store at once must not race its schema."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = textwrap.dedent(
        f"""
        import sys
        from piaa_dist.orchestration.tracking import RunLogger
        with RunLogger("race", uri={uri!r}, rank=0) as run:
            run.log_metric("x", 1.0, step=int(sys.argv[1]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    exp = _client(uri).get_experiment_by_name("race")
    assert len(_client(uri).search_runs([exp.experiment_id])) == 3


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_mlflow_server_is_named_in_seconds_not_reported_as_a_missing_model(
        tmp_path, monkeypatch, caplog):
    """A server that is down was reported as "models:/x@champion: not found in the registry" after
    minutes of MLflow's retries; now every entry that talks to a server says it is unreachable."""
    from piaa_dist.cli import main as cli_main

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # if the probe were missing: fail fast
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # tracking_uri sets them
        monkeypatch.delenv(var, raising=False)
    down = f"http://alice:s3cr3t-pass-word@127.0.0.1:{_closed_port()}"
    with pytest.raises(TrackingError, match=r"MLflow server at http://127\.0\.0\.1:\d+ is unreachable"):
        resolve_model("models:/piaa@champion", uri=down)
    with pytest.raises(TrackingError, match="is unreachable") as err:
        RunLogger("exp", uri=tracking_uri(down), rank=0).start()
    assert "not found" not in str(err.value) and "s3cr3t" not in str(err.value)
    # Through the CLI: one line, exit code 2.
    caplog.clear()
    code = cli_main(["evaluate", "--model", "models:/piaa@champion", "--mlflow-uri", down,
                     "--data", str(tmp_path / "none")])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("is unreachable" in e for e in errors), errors
    assert not any("s3cr3t" in e for e in errors)


def test_any_http_answer_counts_as_a_reachable_server(tmp_path):
    """The probe only asks whether something answers: a server that wants credentials or has no
    /health route is there, and the API call that follows says what it thinks."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.check_server(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    with pytest.raises(TrackingError, match="unreachable"):
        tracking.check_server(f"http://127.0.0.1:{_closed_port()}", timeout=2)
    tracking.check_server("sqlite:///nowhere.db")  # not a server: not probed
