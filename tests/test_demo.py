"""The main job end to end at a tiny size: every stage leaves its artifact, nothing keeps running.

Real components throughout: a moto S3 server over HTTP, local Ray (2 Train workers, then a
Tune sweep), SQLite MLflow with a registry alias, and the report with its plots.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


def _ray_processes() -> set[int]:
    """PIDs of the Ray daemons this test process started, and their worker processes.

    A local Ray's session folder ends in the driver's PID (``session_<time>_<pid>``), which
    tells our raylet/GCS apart from any other Ray on a shared machine; ``ray::`` workers are
    the raylet's children.
    """
    marker = f"_{os.getpid()}"
    procs: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if "State:\tZ" in status:
            continue  # already dead, waiting for its parent to reap it
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        procs[int(entry.name)] = (ppid, cmd)
    ours = {pid for pid, (_, cmd) in procs.items()
            if "session_" in cmd and marker in cmd and ("raylet" in cmd or "gcs_server" in cmd
                                                        or "ray/" in cmd)}
    ours |= {pid for pid, (ppid, cmd) in procs.items() if ppid in ours and cmd.startswith("ray::")}
    return ours


def test_demo_produces_every_artifact_and_stops_everything(tmp_path, monkeypatch):
    from piaa_dist.data.synth import WorldSpec
    from piaa_dist.orchestration.demo import DemoSettings, run_demo

    before = _ray_processes()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-results:start -->\nold\n<!-- demo-results:end -->\nrest\n")
    for var in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "demo"
    summary = run_demo(DemoSettings(
        out=out, config=REPO / "jobs" / "configs" / "tiny.yaml",
        overrides=("meta.meta_steps=4", "run.validate_every=2", "run.checkpoint_every=2",
                   "data.validation_users=2", "eval.finetune_steps=2", "giaa.steps=20"),
        world=WorldSpec(users=10, images=120, seed=0, test_fraction=0.2,
                        ratings_per_user=(24, 32), image_size=40),
        tune_overrides=("meta.meta_steps=4", "run.validate_every=2", "run.checkpoint_every=2"),
        workers=2, tune_samples=2, shots=(5, 10), repeats=2, readme=readme,
    ))

    # data: the manifest and ingest report in the (stopped) local S3 were used; the world exists
    assert summary["data"].startswith("s3://")
    assert summary["ingest"]["ratings"]["read"] == summary["world"]["ratings"]
    # meta-training on Ray with 2 workers left checkpoints and metrics
    assert summary["train"]["step"] == 4
    assert list((out / "train" / "checkpoints").rglob("training_state.safetensors"))
    assert (out / "train" / "metrics.jsonl").read_text().strip()
    # the sweep ran and the champion alias is in the registry
    assert len(summary["tune"]["best_params"]) == 4
    reg = summary["registry"]
    assert reg["alias"].endswith("@champion") and reg["version"] >= 1
    from piaa_dist.orchestration.tracking import resolve_model

    assert (resolve_model(reg["alias"], uri=summary["mlflow_uri"]) / "model.safetensors").is_file()
    # meta-testing of the three methods at both shot counts, with ceilings
    result = json.loads((out / "evaluate.json").read_text())
    assert set(result["methods"]) >= {"blg-piaa", "meta-no-adapt", "giaa-finetune"}
    assert set(result["methods"]["blg-piaa"]) == {"5", "10"}
    assert result["ceilings"]["oracle"] > result["ceilings"]["average_user"]
    # personalization output: every other rated image of the user, ranked
    rankings = list((out / "personalize").glob("*-ranking.csv"))
    assert len(rankings) == 1 and len(rankings[0].read_text().splitlines()) > 10
    # the report and its plots
    report = (out / "report.md").read_text()
    for png in ("srocc_vs_shots.png", "training_curves.png", "personalized_user.png"):
        assert (out / "plots" / png).stat().st_size > 1000
        assert f"plots/{png}" in report
    assert "models:/" in report and "mlflow ui" in report and "oracle ceiling" in report
    # the README's results table is the demo's, not typed
    text = readme.read_text()
    assert "old" not in text and "| `blg-piaa` |" in text and text.endswith("rest\n")
    # it comes from the run's own block file, which the report points to (the demo itself
    # never needs to touch a README: `make demo` passes none)
    block = out / "readme-results.md"
    assert summary["readme_block"] == str(block)
    assert "| `blg-piaa` |" in block.read_text() and block.read_text().strip() in text
    assert "readme-results.md" in report and "make readme-results" in report
    # nothing left running: no new Ray processes (ray.shutdown reaps its workers
    # asynchronously, so allow them a bounded moment to exit), the S3 endpoint is gone
    import time

    deadline = time.monotonic() + 60
    while (left := _ray_processes() - before) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, {pid: _cmdline(pid) for pid in left}
    import urllib.request

    endpoint = summary["s3_endpoint"]
    assert endpoint.startswith("http://127.0.0.1:")
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint, timeout=5)
    assert "AWS_ENDPOINT_URL" not in os.environ
