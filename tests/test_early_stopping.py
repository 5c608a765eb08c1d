"""Training that runs until it is done: early stopping on a validation plateau, and the best
validation checkpoint as the model a run keeps and registers.

Real components: the tiny synthetic world in a local folder, the in-process runner with its
checkpoint storage, MLflow on SQLite for the registry, and a real local Ray with 2 Train
workers for the distributed stop.

The schedule below (``EARLY``) was picked so that on the tiny world the validation SROCC rises
for 3 steps, then falls: its best (step 3) is neither the first nor the last validation, and
early stopping fires at step 7 (patience 4). Each test checks the rule against the series the
run itself reported, and first that the series still has that shape.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from piaa_dist.config import load_config, with_overrides
from piaa_dist.orchestration.checkpoint_store import BEST, BEST_DIR, IN_PROCESS_DIR, RunStorage
from piaa_dist.orchestration.in_process import run_in_process
from piaa_dist.schedule import EarlyStopping, meta_lr_at

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
#: validation every step on 2 held-out training users; checkpoints only every 5 steps, so the
#: best step (3) is stored only because it is the best
EARLY = ["meta.meta_steps=16", "run.validate_every=1", "run.checkpoint_every=5", "run.log_every=1",
         "data.validation_users=2", "run.patience=4", "eval.repeats=2", "data.augment=false",
         "meta.inner_params=head", "meta.inner_lr=0.5", "eval.finetune_lr=0.5", "meta.meta_lr=0.01",
         "model.dropout=0"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _expected(series: list[tuple[int, float]], patience: int, min_delta: float = 0.0) -> tuple[int, int | None]:
    """The rule written out independently: (best step, step it stops at or None)."""
    best, best_step, since = -math.inf, None, 0
    for step, score in series:
        if best_step is None or score > best + min_delta:
            best, best_step, since = score, step, 0
        else:
            since += 1
            if patience and since >= patience:
                return best_step, step
    return best_step, None


def _run(url: str, storage: Path, overrides=(), **kw):
    cfg = load_config(TINY, [*EARLY, *overrides])
    rows: list[tuple[int, dict]] = []
    callback = kw.pop("metrics_callback", None)

    def sink(step, metrics):
        rows.append((step, metrics))
        if callback is not None:
            callback(step, metrics)

    result = run_in_process(cfg, url, RunStorage.from_url(str(storage)), metrics_callback=sink, **kw)
    series = [(s, m["val_srocc"]) for s, m in rows if "val_srocc" in m]
    return cfg, result, series, rows


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# The rule


def test_the_rule_stops_after_patience_validations_without_improvement():
    rule = EarlyStopping(patience=2, min_delta=0.01)
    assert rule.update(10, 0.30) is True          # first score: the best
    assert rule.update(20, 0.305) is False        # +0.005 <= min_delta: not an improvement
    assert rule.update(30, 0.40) is True and rule.since_best == 0
    assert rule.update(40, 0.39) is False and not rule.stopped
    assert rule.update(50, 0.41) is False         # +0.01 is not MORE than min_delta
    assert rule.stopped and rule.stopped_at == 50 and (rule.best_step, rule.best_score) == (30, 0.40)
    with pytest.raises(ValueError):
        rule.update(60, 0.9)                      # nothing after the stop
    never = EarlyStopping(patience=0)
    for step, score in enumerate([0.5, 0.4, 0.3, 0.2, 0.1], 1):
        never.update(step, score)
    assert not never.stopped and never.best_step == 1  # patience 0 never stops, still tracks the best
    with pytest.raises(ValueError, match="finite"):
        EarlyStopping(patience=1).update(1, float("nan"))


def test_the_rule_state_round_trips_and_more_patience_on_resume_lifts_a_stop():
    rule = EarlyStopping(patience=1)
    rule.update(1, 0.5)
    rule.update(2, 0.4)
    assert rule.stopped
    again = EarlyStopping(patience=1)
    again.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert again == rule
    patient = EarlyStopping(patience=3)
    patient.load_state_dict(rule.state_dict())
    assert not patient.stopped and (patient.best_step, patient.since_best) == (1, 1)


def test_meta_lr_schedules():
    cfg = load_config(TINY, ["meta.meta_lr=0.01", "meta.meta_steps=100", "meta.lr_schedule=cosine",
                             "meta.warmup_steps=10", "meta.lr_floor=0.1"])
    lrs = [meta_lr_at(cfg.meta, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.01)   # linear warm-up
    assert lrs[10] == pytest.approx(0.01) and all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert meta_lr_at(cfg.meta, 100) == pytest.approx(0.001)                  # floor at the end
    step = load_config(TINY, ["meta.meta_lr=0.01", "meta.lr_decay=0.5", "meta.decay_every=10"])
    assert [meta_lr_at(step.meta, s) for s in (0, 9, 10, 25)] == pytest.approx([0.01, 0.01, 0.005, 0.0025])


def test_patience_without_validation_is_a_config_error():
    from piaa_dist.config import ConfigError

    with pytest.raises(ConfigError, match="run.patience.*validate_every"):
        load_config(TINY, ["run.patience=3", "run.validate_every=0"])
    with pytest.raises(ConfigError, match="validation_users"):
        load_config(TINY, ["run.patience=3", "run.validate_every=2", "data.validation_users=0"])


# ---------------------------------------------------------------------------------------------
# In-process


def test_a_run_stops_on_the_plateau_and_keeps_the_best_validation_checkpoint(tiny_dataset_url, tmp_path):
    cfg, result, series, rows = _run(tiny_dataset_url, tmp_path / "run")
    best_step, stop = _expected(series, cfg.run.patience)
    steps = [s for s, _ in series]
    # the shape the test relies on: a best inside the series, and a stop before meta.meta_steps
    assert steps[0] < best_step < steps[-1] and stop is not None and stop < cfg.meta.meta_steps, series
    assert result.step == stop and steps[-1] == stop           # no step after the stop
    assert result.early_stopping["stopped_at"] == stop
    assert rows[-1][1]["stopped_early"] == 1 and rows[-1][1]["best_step"] == best_step
    assert result.best.step == best_step and result.best.score == dict(series)[best_step]
    # BEST beside LATEST names the copy of that step; the regular pruning kept newest + previous
    local = tmp_path / "run" / "meta-train" / IN_PROCESS_DIR
    assert (local / BEST).read_text() == f"{BEST_DIR}/checkpoint_{best_step:06d}"
    assert sorted(p.name for p in (local / BEST_DIR).iterdir()) == [f"checkpoint_{best_step:06d}"]
    assert f"checkpoint_{best_step:06d}" not in {p.name for p in local.glob("checkpoint_*")}
    # the selected model is the meta-learner after exactly `best_step` updates
    short = run_in_process(with_overrides(cfg, {"meta.meta_steps": best_step, "run.patience": 0}),
                           tiny_dataset_url, RunStorage.from_url(str(tmp_path / "short")))
    assert _same_weights(_weights(result.selected_model), _weights(short.model))
    assert not _same_weights(_weights(result.selected_model), _weights(result.model))


def test_a_resumed_run_stops_where_an_uninterrupted_one_stops(tiny_dataset_url, tmp_path):
    """Interrupted after the step-5 checkpoint (best at 3, two validations without improvement
    since): the re-run resumes with that early-stopping state and stops at the same step."""
    _, whole, whole_series, _ = _run(tiny_dataset_url, tmp_path / "whole")

    class Interrupted(Exception):
        pass

    def die_at_6(step, metrics):
        if step == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(tiny_dataset_url, tmp_path / "broken", metrics_callback=die_at_6)
    _, resumed, series, rows = _run(tiny_dataset_url, tmp_path / "broken")
    assert rows[0][0] == 6 and rows[0][1]["resumed_from"] == 5
    assert resumed.step == whole.step and resumed.best.step == whole.best.step
    assert series == [(s, v) for s, v in whole_series if s >= 6]
    assert _same_weights(_weights(resumed.selected_model), _weights(whole.selected_model))
    # a finished (stopped) run started again does nothing more
    _, again, _, rows = _run(tiny_dataset_url, tmp_path / "broken")
    assert rows == [] and again.step == whole.step and again.best.step == whole.best.step


def test_train_writes_and_registers_the_best_checkpoint_not_the_last(tiny_dataset_url, tmp_path):
    from piaa_dist.checkpoint import load_model
    from piaa_dist.orchestration.tracking import load_model_uri
    from piaa_dist.orchestration.usecases import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = train(data=tiny_dataset_url, out=tmp_path / "train", config=TINY,
                overrides=[*EARLY, "run.register_name=blg-piaa-es"], workers=0, mlflow_uri=uri,
                alias="champion", progress=False)
    series = [(r["step"], r["val_srocc"]) for r in map(json.loads, out.metrics_file.read_text().splitlines())
              if "val_srocc" in r]
    best_step, stop = _expected(series, 4)
    assert out.step == stop and out.stopped_early and out.best_step == best_step
    assert out.best_val_srocc == dict(series)[best_step] == out.val_srocc
    first_line = out.summary_lines()[0]
    assert "best validation SROCC" in first_line and f"early stopping at step {stop}" in first_line
    written, _, info = load_model(out.model_dir)
    assert info["step"] == best_step and info["last_step"] == stop and info["stopped_early"] is True
    # the registered version's weights are the best checkpoint's, not the last step's
    registered, _, _ = load_model_uri(out.registered, uri=uri)
    from piaa_dist.orchestration.checkpoint_store import load_checkpoint

    storage = RunStorage.from_url(str(tmp_path / "train" / "checkpoints"))
    best_state = load_checkpoint(storage, storage.run_path(IN_PROCESS_DIR, BEST_DIR, f"checkpoint_{best_step:06d}"))
    last_state = load_checkpoint(storage, storage.run_path(IN_PROCESS_DIR, f"checkpoint_{stop:06d}"))
    assert _same_weights(_weights(registered), best_state["model"])
    assert _same_weights(_weights(written), best_state["model"])
    assert not _same_weights(_weights(registered), last_state["model"])
    # ...and the registry records its validation score, on the same validation users
    assert out.registered_val_srocc == pytest.approx(dict(series)[best_step], abs=1e-12)


def _world_with_other_test_ratings(world: Path, dest: Path) -> Path:
    """A copy of a world whose test users rated differently (each test user's scores shuffled
    among their images); training users' ratings are unchanged."""
    from piaa_dist.data.synth import RATINGS_FILE, TEST_WORKERS_FILE

    shutil.copytree(world, dest)
    test = {r["ID"].strip() for r in csv.DictReader((world / TEST_WORKERS_FILE).open())}
    with (world / RATINGS_FILE).open(newline="") as f:
        header, *rows = list(csv.reader(f))
    rng = random.Random(7)
    for user in test:
        mine = [i for i, r in enumerate(rows) if r[0].strip() == user]
        scores = [rows[i][2] for i in mine]
        while scores == [rows[i][2] for i in mine]:
            rng.shuffle(scores)
        for i, s in zip(mine, scores):
            rows[i][2] = s
    with (dest / RATINGS_FILE).open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return dest


def test_a_test_users_score_can_never_influence_which_checkpoint_is_chosen(tiny_world, tiny_dataset_url, tmp_path):
    """Two datasets that differ only in what the test users rated: the test users' scores of
    the same model differ, yet training stops at the same step and keeps the same checkpoint,
    bit for bit (the choice reads held-out training users only)."""
    from piaa_dist.data.ingest import ingest
    from piaa_dist.data.stream import Dataset
    from piaa_dist.data.synth import TEST_WORKERS_FILE
    from piaa_dist.evaluate import evaluate

    other_world = _world_with_other_test_ratings(tiny_world, tmp_path / "world")
    other_url = str(tmp_path / "data")
    ingest("flickr-aes", other_world, other_url, test_users=other_world / TEST_WORKERS_FILE, workers=2)
    cfg, a, series_a, _ = _run(tiny_dataset_url, tmp_path / "a")
    _, b, series_b, _ = _run(other_url, tmp_path / "b")
    # the test users' scores of one and the same model do depend on the test ratings...
    test_a = evaluate(cfg, Dataset.open(tiny_dataset_url), {"blg-piaa": a.selected_model}, shots=[4], repeats=2)
    test_b = evaluate(cfg, Dataset.open(other_url), {"blg-piaa": a.selected_model}, shots=[4], repeats=2)
    assert test_a.stats("blg-piaa", 4).srocc_mean != test_b.stats("blg-piaa", 4).srocc_mean
    # ...the choice does not
    assert series_a == series_b
    assert (a.step, a.best.step, a.best.score) == (b.step, b.best.step, b.best.score)
    assert _same_weights(_weights(a.selected_model), _weights(b.selected_model))


# ---------------------------------------------------------------------------------------------
# Ray Train: rank 0 decides, every rank stops after the same step


def test_two_ray_workers_stop_together_at_the_in_process_step(tiny_dataset_url, tmp_path):
    from piaa_dist.orchestration.ray_train import run_distributed

    cfg, alone, series, _ = _run(tiny_dataset_url, tmp_path / "alone")
    two = run_distributed(cfg, tiny_dataset_url, tmp_path / "two", workers=2)
    assert two.step == alone.step and two.early_stopping["stopped_at"] == alone.step
    assert two.best.step == alone.best.step and two.best.score == pytest.approx(alone.best.score, abs=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == alone.step
    two_series = [(r["step"], r["val_srocc"]) for r in rows if "val_srocc" in r]
    assert [s for s, _ in two_series] == [s for s, _ in series]
    assert [v for _, v in two_series] == pytest.approx([v for _, v in series], abs=1e-6)
    # BEST beside Ray's own checkpoint folders
    run_dir = tmp_path / "two" / "checkpoints" / "meta-train"
    assert (run_dir / BEST).read_text() == f"{BEST_DIR}/checkpoint_{alone.best.step:06d}"
    for name, tensor in _weights(alone.selected_model).items():
        torch.testing.assert_close(two.selected_model.state_dict()[name], tensor, rtol=1e-5, atol=1e-7)
