"""The main job end to end at a tiny size: every stage leaves its artifact, nothing keeps running.

Real components throughout: a moto S3 server over HTTP, local Ray (2 Train workers, then a
Tune sweep), SQLite MLflow with a registry alias, and the report with its plots.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
from pngcheck import assert_plot

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


def _plot_sizes() -> dict[str, tuple[int, int]]:
    """The demo's plots and their pixel sizes (the figures' sizes at 100 dpi; the training curve,
    with the best checkpoint marked, is 8 x 3.5 in: presentation.plot_training_curves)."""
    return {"srocc_vs_shots.png": (600, 400), "training_curves.png": (800, 350),
            "personalized_user.png": (450, 400)}


PLOT_SIZES = _plot_sizes()


def check_metrics(path: Path, *, steps: int, validate_every: int) -> None:
    """One ``metrics.jsonl`` line per report (log_every=1: every meta-step once, none lost, in
    order), each with finite, non-negative losses; validation SROCC at its steps, in [-1, 1]."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), [r.get("step") for r in rows]
    for r in rows:
        losses = {k: v for k, v in r.items() if k.endswith("_loss")}
        assert {"query_loss", "support_loss"} <= set(losses), r
        assert all(math.isfinite(v) and v >= 0 for v in losses.values()), r
    val = {r["step"]: r["val_srocc"] for r in rows if r.get("val_srocc") is not None}
    assert set(val) == set(range(validate_every, steps + 1, validate_every)), val
    assert all(-1.0 <= v <= 1.0 for v in val.values()), val


def check_champion_alias(summary: dict) -> None:
    """The registry's ``champion`` alias points at the version the run reports, and that is the
    version its stage registered (train's, or the sweep's refit when it won)."""
    from mlflow import MlflowClient

    reg = summary["registry"]
    champion = MlflowClient(tracking_uri=summary["mlflow_uri"]).get_model_version_by_alias(reg["name"], "champion")
    assert int(champion.version) == reg["version"], (champion.version, reg)
    assert reg["source"] in ("train", "tune")
    assert summary[reg["source"]]["registered"] == f"models:/{reg['name']}/{reg['version']}"
    if reg["source"] == "train":
        assert champion.run_id == summary["train"]["mlflow_run_id"]


def check_evaluation(result: dict, test_users: list[str], *, shots: tuple[int, ...], repeats: int) -> None:
    """Every test user is scored (none has too few ratings) or skipped at each shot count, for
    every method; SROCC/PLCC are correlations; a method's mean is the mean of its users'."""
    assert sorted(result["users"]) == sorted(test_users)
    assert sorted(result["shots"]) == sorted(shots) and result["repeats"] == repeats
    for method, by_k in result["methods"].items():
        assert set(by_k) == {str(k) for k in shots}, method
        for k, s in by_k.items():
            skipped = set(result["skipped"].get(k, []))
            assert set(s["per_user"]).isdisjoint(skipped) and set(s["per_user"]) | skipped == set(test_users)
            # every test user of the demo's world rated >= 24 images: enough for every k
            assert s["n_users"] == len(s["per_user"]) == len(test_users), (method, k, s["n_users"])
            assert set(s["per_user_plcc"]) == set(s["per_user"])
            for v in (*s["per_user"].values(), *s["per_user_plcc"].values(), s["srocc_mean"], s["plcc_mean"]):
                assert -1.0 <= v <= 1.0, (method, k, v)
            assert s["srocc_mean"] == pytest.approx(sum(s["per_user"].values()) / s["n_users"])
            assert s["srocc_std"] >= 0 and 0 <= s["degenerate"] <= s["n_users"] * repeats
    ceil = result["ceilings"]
    assert 1.0 >= ceil["oracle"] > ceil["average_user"] >= -1.0


def check_ranking(ranking_csv: Path, world: Path, *, user: str) -> None:
    """One row per image the user rated but did not give personalize (all of them, none of the
    10 given), ranks 1..n with scores best first, on the user's 1-5 scale."""
    assert ranking_csv.name == f"{user}-ranking.csv"
    with (world / "FLICKR-AES_image_labeled_by_each_worker.csv").open(newline="") as f:
        rated = {row[1].strip() for row in csv.reader(f) if row[0].strip() == user}
    with (ranking_csv.parent / f"{user}-ratings.csv").open(newline="") as f:
        given = {row["image"] for row in csv.DictReader(f)}
    assert len(given) == 10 and given <= rated
    with ranking_csv.open(newline="") as f:
        ranking = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in ranking] == list(range(1, len(ranking) + 1))
    assert sorted(Path(r["image"]).name for r in ranking) == sorted(rated - given)
    scores = [float(r["predicted_score"]) for r in ranking]
    assert scores == sorted(scores, reverse=True)
    assert all(1.0 <= s <= 5.0 for s in scores), scores


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
    check_metrics(out / "train" / "metrics.jsonl", steps=4, validate_every=2)
    # the sweep ran and the champion alias is in the registry
    assert len(summary["tune"]["best_params"]) == 4
    reg = summary["registry"]
    assert reg["alias"].endswith("@champion") and reg["version"] >= 1
    from piaa_dist.orchestration.tracking import resolve_model

    assert (resolve_model(reg["alias"], uri=summary["mlflow_uri"]) / "model.safetensors").is_file()
    check_champion_alias(summary)
    # meta-testing of the three methods at both shot counts, with ceilings
    world = out / "world"
    test_users = (world / "test_workers.csv").read_text().split()[1:]
    assert len(test_users) == 2
    result = json.loads((out / "evaluate.json").read_text())
    assert set(result["methods"]) >= {"blg-piaa", "meta-no-adapt", "giaa-finetune"}
    check_evaluation(result, test_users, shots=(5, 10), repeats=2)
    # personalization output: every other rated image of the user, ranked
    rankings = list((out / "personalize").glob("*-ranking.csv"))
    assert len(rankings) == 1
    check_ranking(rankings[0], world, user=test_users[0])
    # the report and its plots: PNGs of the figures' sizes (100 dpi) that decode to drawings
    report = (out / "report.md").read_text()
    for png, size in PLOT_SIZES.items():
        assert_plot(out / "plots" / png, size)
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
