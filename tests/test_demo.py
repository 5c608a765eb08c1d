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


def _ray_processes() -> set[int]:
    """PIDs of Ray daemons and workers on this machine (raylet, gcs_server, ray:: actors)."""
    pids = set()
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
        if "raylet" in cmd or "gcs_server" in cmd or cmd.startswith("ray::"):
            pids.add(int(entry.name))
    return pids


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
    # nothing left running: no new Ray processes, the S3 endpoint is gone
    assert _ray_processes() - before == set()
    import urllib.request

    endpoint = summary["s3_endpoint"]
    assert endpoint.startswith("http://127.0.0.1:")
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint, timeout=5)
    assert "AWS_ENDPOINT_URL" not in os.environ
