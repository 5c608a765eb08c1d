"""No Tune refit when the sweep's winner is the run already trained (issue 15).

The demo meta-trains its config, then sweeps; when the sweep's winner is the config's own values
the refit would train that same run again. ``usecases.tune(trained=...)`` then skips the refit
and the trained run, already registered and already decided champion or challenger, is the
sweep's winner. When the winner trains anything differently, the refit runs as before.

Real components: a real Ray Tune sweep (local Ray, 2 CPUs), in-process training, MLflow on a
SQLite store in a temp folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
NAME = "blg-piaa-skip"
#: the sweep's settings: 2-step trials of the config's full 4, one trial (the config's own values)
SWEEP = ["meta.meta_steps=4", "run.validate_every=2", "run.checkpoint_every=2", "data.validation_users=2",
         f"run.register_name={NAME}", "tune.max_concurrent=1", "tune.trial_steps=2",
         # the searched ranges hold the config's own values (tune.start_from_config: the one trial runs them)
         "tune.shots=[4, 5]"]


def _base():
    from piaa_dist.config import load_config

    return load_config(TINY, SWEEP)


def test_bookkeeping_settings_do_not_count_as_training_differently():
    from piaa_dist.config import with_overrides
    from piaa_dist.orchestration.tune import training_differences

    base = _base()
    # the demo's train and tune stages differ in exactly such settings (cadence, workers, sweep)
    other = with_overrides(base, {"run.validate_every": 4, "run.checkpoint_every": 1, "run.workers": 2,
                                  "run.log_every": 0, "run.alias": "champion", "tune.trial_steps": 0,
                                  "tune.samples": 7, "giaa.steps": 5, "data.s3_endpoint": "http://x:1"})
    assert training_differences(base, other) == {}
    assert training_differences(base, base) == {}


@pytest.mark.parametrize("key, value", [
    ("meta.inner_lr", 0.07), ("meta.inner_steps", 3), ("data.shots", 5), ("meta.meta_lr", 0.002),
    ("meta.meta_steps", 6), ("model.width", 16), ("run.seed", 1), ("run.patience", 2), ("data.url", "/elsewhere"),
])
def test_a_hyperparameter_that_differs_is_a_training_difference(key, value):
    from piaa_dist.config import flat_params, with_overrides
    from piaa_dist.orchestration.tune import training_differences

    base = _base()
    other = with_overrides(base, {key: value})
    assert training_differences(base, other) == {key: (flat_params(base)[key], value)}


def _train(data: str, out: Path, uri: str, extra: list[str]):
    from piaa_dist.orchestration.usecases import train

    # a cadence of its own (as the demo's train stage has): not a training difference
    return train(data=data, out=out, config=TINY, overrides=[*SWEEP, "run.checkpoint_every=1", *extra],
                 alias="champion", mlflow_uri=uri, progress=False)


def _sweep(data: str, out: Path, uri: str, trained):
    from piaa_dist.orchestration.usecases import tune

    return tune(data=data, out=out, config=TINY, overrides=SWEEP, samples=1, workers_per_trial=1,
                mlflow_uri=uri, alias="champion", trained=trained, progress=False)


def _nested_kinds(uri: str, run_id: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("piaa-dist")
    return [r.data.tags.get("piaa_dist.kind") for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("mlflow.parentRunId") == run_id]


def _versions(uri: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(int(v.version) for v in MlflowClient(tracking_uri=uri).search_model_versions(f"name='{NAME}'"))


def _weights_equal(a: Path, b: Path) -> bool:
    from piaa_dist.checkpoint import load_model

    ma, _, _ = load_model(a)
    mb, _, _ = load_model(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_no_refit_when_the_winner_is_the_trained_config(ray_session, tiny_dataset_url, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # trained with the config's own values; the sweep's one trial runs those values
    # (tune.start_from_config), so its winner is the trained configuration: no refit
    trained = _train(tiny_dataset_url, tmp_path / "train", uri, [])
    assert _versions(uri) == [1] and trained.registered == f"models:/{NAME}/1"
    sweep = _sweep(tiny_dataset_url, tmp_path / "tune", uri, trained)
    assert sweep.best_params["meta.inner_lr"] == pytest.approx(0.05)
    assert sweep.winner_is_trained and sweep.registration_reused and not sweep.refit
    assert "tune-refit" not in _nested_kinds(uri, sweep.mlflow_run_id)
    # the winner is the registered run: nothing new registered, its promotion is the outcome
    assert _versions(uri) == [1]
    assert sweep.registered == trained.registered and sweep.promotion == trained.promotion
    assert int(MlflowClient(tracking_uri=uri).get_model_version_by_alias(NAME, "champion").version) == 1
    # best-model/ is the trained run's model (its best validation checkpoint), and says so
    assert _weights_equal(sweep.model_dir, trained.model_dir)
    info = json.loads((sweep.model_dir / "info.json").read_text())
    assert info["winner_is_trained"] is True and info["trained_registered"] == trained.registered
    assert info["step"] == trained.best_step == sweep.best_step and sweep.steps == trained.step
    lines = sweep.summary_lines()
    assert lines[1].startswith("no refit: its configuration is the one already trained")
    assert lines[2].startswith(f"already registered as {trained.registered}")


@pytest.mark.slow
def test_the_refit_runs_when_the_winner_trains_differently_from_the_trained_run(
        ray_session, tiny_dataset_url, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # trained with another inner_lr: the sweep's winner (the config's own 0.05) trains
    # differently, so it is refit, registered, and decided against the champion
    other = _train(tiny_dataset_url, tmp_path / "train-other", uri, ["meta.inner_lr=0.07"])
    assert _versions(uri) == [1]
    sweep = _sweep(tiny_dataset_url, tmp_path / "tune", uri, other)
    assert sweep.best_params["meta.inner_lr"] == pytest.approx(0.05)
    assert sweep.refit and not sweep.winner_is_trained and sweep.steps == 4
    assert _nested_kinds(uri, sweep.mlflow_run_id).count("tune-refit") == 1
    assert _versions(uri) == [1, 2] and sweep.registered == f"models:/{NAME}/2"
    assert sweep.promotion.version == 2 and sweep.promotion.champion_version == 1
    assert not _weights_equal(sweep.model_dir, other.model_dir)
