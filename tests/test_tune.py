"""A real Ray Tune sweep of Ray Train trials on this machine's 2 CPUs, tracked in SQLite MLflow.

Checks the issue's contract end to end: the sweep finishes on 2 CPUs, every trial is a nested
MLflow run under the sweep's run, the winning configuration is refit to the config's full length
and that model is registered with an alias, and ``models:/NAME@champion`` resolves and loads in
a fresh process (weights only) and can be used to personalize there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_dataset_url):
    from piaa_dist.orchestration.usecases import tune

    out = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    summary = tune(
        data=tiny_dataset_url, out=out / "sweep", config=TINY,
        overrides=["meta.meta_steps=4", "run.validate_every=2", "run.checkpoint_every=2",
                   "data.validation_users=2", "run.register_name=blg-piaa-test",
                   "tune.max_concurrent=1", "tune.trial_steps=2"],
        samples=2, workers_per_trial=1, mlflow_uri=uri, alias="champion",
    )
    return summary, out, uri


def test_sweep_finishes_on_two_cpus_and_reports_every_trial(sweep):
    summary, out, _ = sweep
    trials = summary.trials
    assert len(trials) == 2
    assert all(t["status"] == "TERMINATED" for t in trials), trials
    scores = [t["val_srocc"] for t in trials if t["val_srocc"] is not None]
    assert scores and summary.best_score == max(scores)
    # the searched hyperparameters are in the trial rows and within the configured ranges
    for t in trials:
        assert 0.001 <= t["meta.inner_lr"] <= 0.1
        assert t["meta.inner_steps"] in (1, 3, 5)
        assert t["data.shots"] in (5, 10, 20)
    best = json.loads((out / "sweep" / "sweep.json").read_text())
    assert best["best_params"] == summary.best_params
    assert (out / "sweep" / "best-model" / "model.safetensors").is_file()
    from piaa_dist.config import load_config

    best_cfg = load_config(out / "sweep" / "best.yaml")
    assert best_cfg.meta.inner_lr == pytest.approx(summary.best_params["meta.inner_lr"])


def test_mlflow_holds_the_sweep_and_its_trials(sweep):
    from mlflow import MlflowClient

    summary, _, uri = sweep
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("piaa-dist")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == summary.mlflow_run_id]
    assert parent and parent[0].info.status == "FINISHED"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary.mlflow_run_id]
    children = [r for r in nested if r.data.tags.get("piaa_dist.kind") == "tune-trial"]
    assert len(children) == 2
    # the refit of the winner is the sweep's other nested run, with its per-step metrics
    refits = [r for r in nested if r.data.tags.get("piaa_dist.kind") == "tune-refit"]
    assert len(refits) == 1 and refits[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(refits[0].info.run_id, "val_srocc")] == [2, 4]
    # trials that ran to the end finish; one ASHA stopped is closed as KILLED, never left RUNNING
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    assert any(c.info.status == "FINISHED" for c in children)
    for child in children:
        if child.info.status == "KILLED":
            assert child.data.tags["piaa_dist.ended_by"] == "stopped early by the scheduler"
        assert "meta.inner_lr" in child.data.params
        history = client.get_metric_history(child.info.run_id, "query_loss")
        assert len(history) >= 2  # metrics per step, not just a final value
    assert "best.val_srocc" in parent[0].data.metrics


def test_registered_alias_resolves_and_personalizes_in_a_fresh_process(sweep, tiny_world, tmp_path):
    summary, out, uri = sweep
    assert summary.alias == "models:/blg-piaa-test@champion"
    # a test user's ratings from the synthetic world, as a person would bring them
    import csv

    from piaa_dist.data.synth import RATINGS_FILE

    test_user = (tiny_world / "test_workers.csv").read_text().split()[1]
    rows = [r for r in csv.reader((tiny_world / RATINGS_FILE).open()) if r and r[0].strip() == test_user]
    ratings = tmp_path / "me.csv"
    ratings.write_text("image,score\n" + "".join(f"{r[1].strip()},{r[2].strip()}\n" for r in rows[:10]))
    to_score = [str(tiny_world / "images" / r[1].strip()) for r in rows[10:15]]
    code = (
        "import sys, json\n"
        "from piaa_dist.orchestration.tracking import load_model_uri\n"
        "model, cfg, info = load_model_uri(sys.argv[1], uri=sys.argv[2])\n"
        "print(json.dumps({'params': sum(p.numel() for p in model.parameters()),"
        " 'source': info.get('source')}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, summary.alias, uri],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["source"] == "tune" and loaded["params"] > 0
    ranking = tmp_path / "ranking.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "piaa_dist.cli", "personalize", "--model", summary.alias,
         "--mlflow-uri", uri, "--ratings", str(ratings), "--images", str(tiny_world / "images"),
         "--score", *to_score, "--out", str(ranking)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = ranking.read_text().splitlines()
    assert lines[0] == "rank,image,predicted_score" and len(lines) == 6
    ranked = [(line.split(",")[1], float(line.split(",")[2])) for line in lines[1:]]
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True)
    assert sorted(p for p, _ in ranked) == sorted(to_score)
    # the values: what the registered model, adapted here to the same ratings, predicts on the
    # 1-5 scale (the CSV keeps 4 decimals)
    from piaa_dist.orchestration.tracking import load_model_uri
    from piaa_dist.personalize import personalize, read_ratings

    model, cfg, _ = load_model_uri(summary.alias, uri=uri)
    here = personalize(model, cfg, read_ratings(ratings, tiny_world / "images"),
                       [Path(p) for p in to_score], seed=0)
    expected = {str(p): s for p, s in here}
    for path, score in ranked:
        assert score == pytest.approx(expected[path], abs=1e-4), path


def test_the_validation_metric_is_computed_on_held_out_training_users_only(tiny_dataset_url):
    """Tune's metric (``val_srocc``, reported by the step hook on rank 0) reads the ratings of the
    validation users and nobody else: training users that meta-training never sees, never a
    test user. (Fast: no sweep; the ``sweep`` fixture is not used here.)"""
    import torch

    from piaa_dist.config import load_config
    from piaa_dist.data.stream import Dataset
    from piaa_dist.evaluate import evaluate
    from piaa_dist.model import build_model
    from piaa_dist.orchestration.step_hook import StepHook, validation_score
    from piaa_dist.train import meta_training_users, validation_users

    cfg = load_config(TINY, ["data.validation_users=2", "run.validate_every=1", "eval.repeats=2"])
    data = Dataset.open(tiny_dataset_url)

    class Watched:
        """The real dataset, with a record of whose ratings are read."""

        def __init__(self, inner):
            self.inner, self.loaded = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def load_user(self, user):
            self.loaded.append(user)
            return self.inner.load_user(user)

    val = validation_users(cfg, data)
    assert len(val) == 2 and set(val) <= set(data.users("train"))
    assert not set(val) & set(meta_training_users(cfg, data))
    assert not set(val) & set(data.users("test"))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    watched = Watched(data)
    score = validation_score(cfg, watched, model)
    assert set(watched.loaded) == set(val)
    expected = evaluate(cfg, data, {"blg-piaa": model}, shots=[min(cfg.eval.shots)],
                        repeats=cfg.eval.repeats, users=val)
    assert score == expected.stats("blg-piaa", min(cfg.eval.shots)).srocc_mean
    # ...and it is what the step hook reports to Tune
    reports = []
    watched = Watched(data)
    hook = StepHook(cfg, rank=0, dataset=watched,
                    report=lambda step, metrics, trainer, ckpt: reports.append(metrics))
    hook(1, {"data_s": 0.0, "step_s": 1.0, "query_loss": 0.1}, type("T", (), {"model": model})())
    assert reports[0]["val_srocc"] == score and set(watched.loaded) == set(val)


def test_the_winning_configuration_is_refit_to_full_length_and_registered(sweep, tiny_dataset_url, tmp_path):
    from mlflow import MlflowClient

    from piaa_dist.checkpoint import load_model
    from piaa_dist.config import load_config
    from piaa_dist.orchestration.usecases import train

    summary, out, uri = sweep
    # the trials were short (tune.trial_steps), the registered model is full length (meta.meta_steps)
    assert summary.trial_steps == 2 and all((t["step"] or 0) <= 2 for t in summary.trials)
    assert summary.refit and summary.steps == 4
    info = json.loads((out / "sweep" / "best-model" / "info.json").read_text())
    # the refit ran the full length; its model is its best validation checkpoint (issue 15)
    assert info["last_step"] == 4 and info["refit"] is True and info["trial"] == summary.best_trial
    assert info["step"] == info["best_step"] == summary.best_step and 1 <= info["step"] <= 4
    best_cfg = load_config(summary.best_config_file)
    assert best_cfg.meta.meta_steps == 4
    for key, value in summary.best_params.items():
        section, name = key.split(".")
        assert getattr(getattr(best_cfg, section), name) == pytest.approx(value)
    # it is exactly what training the winning configuration to full length gives
    again = train(data=tiny_dataset_url, out=tmp_path / "again", config=summary.best_config_file,
                  overrides=["run.alias="], mlflow=False, progress=False)
    refit, _, _ = load_model(summary.model_dir)
    trained, _, _ = load_model(again.model_dir)
    assert all(torch.equal(a, b) for a, b in zip(refit.state_dict().values(), trained.state_dict().values()))
    # the summary says which trial won, its short-run score and what the refit reached
    lines = summary.summary_lines()
    assert lines[0].startswith(f"best trial {summary.best_trial}: val SROCC {summary.best_score:.3f} after 2 steps")
    assert lines[1].startswith(f"refit of its configuration to 4 steps: val SROCC {summary.refit_val_srocc:.3f}")
    # the registered version is the refit model, with its own validation score
    mv = MlflowClient(tracking_uri=uri).get_model_version("blg-piaa-test", summary.registered.rsplit("/", 1)[1])
    assert float(mv.tags["piaa_dist.val_srocc"]) == summary.registered_val_srocc == summary.promotion.val_srocc


@pytest.mark.slow
def test_no_refit_registers_the_winning_trials_own_model(tiny_dataset_url, tmp_path, capsys):
    from piaa_dist.cli import main

    rc = main(["tune", "--data", tiny_dataset_url, "--config", str(TINY), "--out", str(tmp_path / "sweep"),
               "--samples", "1", "--no-refit", "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               "meta.meta_steps=4", "run.validate_every=2", "run.checkpoint_every=2", "tune.trial_steps=2",
               "run.register_name=blg-piaa-test"])
    assert rc == 0
    assert "no refit:" in capsys.readouterr().out
    info = json.loads((tmp_path / "sweep" / "best-model" / "info.json").read_text())
    assert info["step"] == 2 and "refit" not in info
