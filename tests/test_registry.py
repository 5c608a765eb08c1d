"""The registry workflow users rely on (issue 10): champion/challenger aliases, one GIAA baseline
per dataset, validation SROCC on the progress line, and a ``models:/`` reference that never
creates an empty store.

Real components: the tiny synthetic world ingested to a folder, in-process training through the
real CLI, MLflow on a SQLite file in the test's folder, the registry read back with MLflow's
own client.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from piaa_dist import cli

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "jobs" / "configs" / "tiny.yaml")
NAME = "blg-piaa-reg"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _version(uri: str, version: int):
    return _client(uri).get_model_version(NAME, str(version))


def _holder(uri: str) -> int:
    return int(_client(uri).get_model_version_by_alias(NAME, "champion").version)


def _score(uri: str, version: int) -> float:
    return float(_version(uri, version).tags["piaa_dist.val_srocc"])


@pytest.fixture
def train(tiny_dataset_url, tmp_path, capsys):
    """``piaa-dist train`` on the tiny world into a store in ``tmp_path``; returns its stdout."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def run(out: str, *extra: str, rc: int = 0) -> str:
        code = cli.main(["train", "--data", tiny_dataset_url, "--config", TINY, "--out", str(tmp_path / out),
                         "--workers", "0", "--mlflow-uri", uri, *extra, f"run.register_name={NAME}"])
        printed = capsys.readouterr().out
        assert code == rc, printed
        return printed

    run.uri = uri
    return run


# ---------------------------------------------------------------------------------------------
# Champion / challenger


def test_the_alias_moves_only_to_a_better_version_and_the_command_says_why(train, tiny_dataset_url):
    uri = train.uri
    # the first version takes the alias: nothing held it
    out = train("a", "--alias", "champion")
    assert "champion -> version 1: val SROCC" in out and "no version held @champion before" in out
    assert _holder(uri) == 1

    # the same configuration again scores the same on the same users: a tie keeps the champion,
    # and the new version is registered as a challenger
    out = train("a-again", "--alias", "champion")
    line = next(x for x in out.splitlines() if x.startswith("champion stays at version 1"))
    assert "a tie keeps the champion" in line and "version 2 registered as a challenger" in line
    assert _holder(uri) == 1
    assert _score(uri, 2) == _score(uri, 1)
    assert _version(uri, 2).tags["piaa_dist.role"] == "challenger"
    assert _version(uri, 1).tags["piaa_dist.role"] == "champion"

    # another configuration: the alias ends on whichever scores higher on the same users
    out = train("b", "--alias", "champion", "meta.meta_lr=0.03", "meta.meta_steps=2")
    s1, s3 = _score(uri, 1), _score(uri, 3)
    assert s1 != s3
    if s3 > s1:
        assert _holder(uri) == 3
        assert f"champion moves to version 3: val SROCC {s3:.3f} vs {s1:.3f} for version 1" in out
    else:
        assert _holder(uri) == 1
        assert f"champion stays at version 1: val SROCC {s1:.3f} vs {s3:.3f} for version 3" in out
    winner, loser = (3, 1) if s3 > s1 else (1, 3)

    # --force-alias moves it to a worse version, and says it was forced
    loser_flags = ("meta.meta_lr=0.03", "meta.meta_steps=2") if loser == 3 else ()
    out = train("forced", "--alias", "champion", "--force-alias", *loser_flags)
    assert _holder(uri) == 4 and _score(uri, 4) == _score(uri, loser) < _score(uri, winner)
    assert "champion moves to version 4" in out and "forced (--force-alias)" in out


def test_every_version_carries_its_score_and_what_it_was_measured_on(train, tiny_dataset_url):
    from piaa_dist.config import load_config, with_overrides
    from piaa_dist.data.stream import Dataset
    from piaa_dist.orchestration.promotion import users_sha256
    from piaa_dist.train import validation_users

    train("a", "--alias", "champion", "run.use_gpu=no")  # the documented value works as typed
    mv = _version(train.uri, 1)
    dataset = Dataset.open(tiny_dataset_url)
    cfg = with_overrides(load_config(TINY), {"data.url": tiny_dataset_url})
    users = validation_users(cfg, dataset)
    tags = mv.tags
    assert tags["piaa_dist.val_users"] == str(len(users)) == "2"
    assert tags["piaa_dist.val_users_sha256"] == users_sha256(users)
    assert tags["piaa_dist.dataset_version"] == dataset.version_id != ""
    protocol = json.loads(tags["piaa_dist.val_protocol"])
    assert protocol == {"shots": 4, "repeats": 1, "seed": 0, "finetune_steps": 2, "finetune_lr": 0.01,
                        "finetune_optimizer": "sgd", "finetune_bn": "batch", "batch_size": 100}
    # the description says the same in words, for the registry UI
    assert mv.description.startswith(f"val SROCC {float(tags['piaa_dist.val_srocc']):.4f} on 2 validation users")
    assert users_sha256(users)[:12] in mv.description and "@champion" in mv.description


def test_a_champion_scored_on_other_users_is_rescored_on_these(train, tiny_dataset_url, tmp_path):
    from piaa_dist.checkpoint import load_model
    from piaa_dist.config import load_config, with_overrides
    from piaa_dist.data.stream import Dataset
    from piaa_dist.orchestration import promotion
    from piaa_dist.orchestration.usecases import register

    train("a", "--alias", "champion")
    champion_tags = _version(train.uri, 1).tags
    # a new version measured on 3 validation users: the champion's recorded score (on 2) is
    # not comparable, so the champion is scored again on these 3
    reg = register(tmp_path / "a", name=NAME, alias="champion", mlflow_uri=train.uri,
                   overrides=["data.validation_users=3"])
    p = reg.promotion
    assert p.rescored and len(p.validation.users) == 3
    assert p.validation.users_sha256 != champion_tags["piaa_dist.val_users_sha256"]
    # the champion's number is its score on the 3 users, measured independently here
    model, model_cfg, _ = load_model(tmp_path / "a" / "model")
    cfg = with_overrides(load_config(TINY), {"data.url": tiny_dataset_url, "data.validation_users": 3})
    dataset = Dataset.open(tiny_dataset_url)
    expected = promotion.score(promotion.validation_set(cfg, dataset), dataset, model, model_cfg)
    assert p.champion_val_srocc == expected
    # the same model on the same users: a tie, the champion stays
    assert p.val_srocc == expected and not p.promoted and _holder(train.uri) == 1
    assert p.message.startswith("champion stays at version 1")


def test_an_alias_needs_validation_users_unless_forced(train):
    train("a", "--alias", "champion", "data.validation_users=0", rc=2)
    out = train("a", "--alias", "champion", "--force-alias", "data.validation_users=0")
    assert "registered models:/" in out and _holder(train.uri) == 1


# ---------------------------------------------------------------------------------------------
# Validation SROCC on the progress line


def test_validation_srocc_is_on_the_progress_line_and_in_the_summary(tiny_dataset_url, tmp_path, caplog, capsys):
    from piaa_dist.orchestration.usecases import train

    caplog.set_level(logging.INFO)
    outcome = train(data=tiny_dataset_url, out=tmp_path / "run", config=TINY, workers=0, mlflow=False,
                    overrides=["run.validate_every=2"], progress=True)
    lines = [r.getMessage() for r in caplog.records]
    for step in (2, 4):
        assert any(line.startswith(f"step {step}/4 val_srocc ") for line in lines), lines
    # the tqdm bar shows it beside the query loss
    assert "val_srocc=" in capsys.readouterr().err
    # and the command's summary has it
    summary = "\n".join(outcome.summary_lines())
    # (the model written is the best validation checkpoint: its step and score, and how long it trained)
    assert outcome.best_step in (2, 4) and outcome.best_val_srocc is not None
    assert (f"meta-learner of step {outcome.best_step} (best validation SROCC {outcome.best_val_srocc:.3f}; "
            "trained 4 steps)") in summary


# ---------------------------------------------------------------------------------------------
# A models:/ reference with no store behind it


@pytest.mark.parametrize("command", ["evaluate", "personalize"])
def test_a_models_reference_without_a_store_says_so_and_creates_nothing(command, tmp_path, monkeypatch,
                                                                          tiny_dataset_url, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if command == "evaluate":
        argv = ["evaluate", "--data", tiny_dataset_url, "--model", "models:/blg-piaa@champion"]
    else:
        argv = ["personalize", "--model", "models:/blg-piaa@champion", "--ratings", "me.csv",
                "--images", ".", "--score", ".", "--out", "ranking.csv"]
    assert cli.main(argv) == 2
    message = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert f"no MLflow store at sqlite:///{tmp_path / 'mlflow.db'}" in message
    assert "set --mlflow-uri or MLFLOW_TRACKING_URI" in message
    assert list(tmp_path.iterdir()) == []  # no empty mlflow.db, no mlruns/


# ---------------------------------------------------------------------------------------------
# One GIAA baseline per dataset


def test_two_meta_learners_on_the_same_data_get_the_same_giaa_baseline(tiny_dataset_url, tmp_path):
    """Whatever giaa section each meta-learner carries, evaluation uses its own (defaults here)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = []
    for name, giaa_steps in (("a", 20), ("b", 40)):
        assert cli.main(["train", "--data", tiny_dataset_url, "--config", TINY, "--out", str(tmp_path / name),
                         "--workers", "0", "--no-mlflow", f"giaa.steps={giaa_steps}"]) == 0
        out = tmp_path / f"{name}.json"
        assert cli.main(["evaluate", "--data", tiny_dataset_url, "--model", str(tmp_path / name), "--mlflow-uri",
                         uri, "--shots", "4", "--repeats", "1", "--json", str(out), "--no-progress",
                         "eval.methods=[blg-piaa,giaa-finetune]"]) == 0
        results.append(json.loads(out.read_text()))
    first, second = results
    assert first["giaa_key"] and first["giaa_key"] == second["giaa_key"]
    assert first["giaa_model"] == second["giaa_model"] == "models:/piaa-giaa/1"
    assert first["giaa"] == "trained by evaluate" and second["giaa"] == "models:/piaa-giaa/1"
    assert first["dataset_version"] and first["dataset_version"] == second["dataset_version"]
    # the very same baseline: the same giaa-finetune numbers, split by split
    assert first["methods"]["giaa-finetune"] == second["methods"]["giaa-finetune"]
    # trained once, registered once, with what it was trained from
    versions = _client(uri).search_model_versions("name='piaa-giaa'")
    assert len(versions) == 1
    recipe = json.loads(versions[0].tags["piaa_dist.giaa_recipe"])
    assert recipe["giaa"]["steps"] == 600  # the evaluation's default budget, not 20 or 40
    assert recipe["users"] == 6 and recipe["data"] == first["dataset_version"]


# ---------------------------------------------------------------------------------------------
# S3 errors through the commands that start Ray


@pytest.mark.parametrize("command", ["train", "tune"])
def test_missing_s3_credentials_are_one_line_before_ray_or_mlflow_start(command, tiny_s3_dataset_url, s3_endpoint,
                                                                        tmp_path, monkeypatch, caplog):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    argv = [command, "--data", tiny_s3_dataset_url, "--config", TINY, "--out", str(tmp_path / "out"),
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "run.validate_every=2"]
    if command == "train":
        argv += ["--workers", "2"]
    assert cli.main(argv) == 2
    message = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "no S3 credentials" in message and tiny_s3_dataset_url.split("/")[2] in message
    assert "AWS_ENDPOINT_URL" in message and "piaa-dist s3-local" in message
    # found before any work: no MLflow run was opened (no store), no checkpoint written
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out" / "checkpoints").exists()
