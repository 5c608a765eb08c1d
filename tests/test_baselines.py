"""Honest comparisons (issue 14): every baseline at its best, chosen on validation users.

* The fine-tuning search reads validation users only: permuting the test users' ratings
  leaves every candidate's score and every choice identical (while the test numbers move);
  permuting the validation users' ratings changes the choice. Checked end to end through the
  ``evaluate`` use-case on real ingested datasets.
* ``giaa-ridge`` equals the closed-form ridge regression on the frozen GIAA features of the
  shots, computed here independently (the augmented normal equations).
* One run of the longest step count scores every step count of the grid, bit for bit.
* A second evaluation reuses the cached search (MLflow, SQLite store) with the same choice.
* The headline compares with the *strongest* baseline; the ceilings carry a 95% CI.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from piaa_dist.checkpoint import WEIGHTS_FILE
from piaa_dist.config import load_config, with_overrides
from piaa_dist.data.stream import Dataset
from piaa_dist.data.synth import WorldSpec, make_world
from piaa_dist.evaluate import decode_user, evaluate
from piaa_dist.giaa import train_giaa
from piaa_dist.metrics import Ceilings, mean_ci95, srocc
from piaa_dist.presentation import format_table, markdown_table
from piaa_dist.protocol import FinetuneBudget, Scorer, score_targets
from piaa_dist.results import EvaluationResult, FinetuneChoice, PairedDiff, ShotStats
from piaa_dist.train import meta_training_users, validation_users

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
RATINGS_CSV = "FLICKR-AES_image_labeled_by_each_worker.csv"
#: A small grid so the end-to-end tests stay fast; the same for every method.
GRID = ["eval.search_sgd_lrs=[0.05,0.5]", "eval.search_adam_lrs=[0.01]", "eval.search_steps=[1,4]",
        "eval.search_params=[head,all]", "eval.search_ridge=[0.1,10.0]", "eval.search_repeats=2"]

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Worlds whose test or validation users' ratings are permuted


def _permute_users(src: Path, dst: Path, users: set[str], seed: int = 1) -> None:
    """Copy a FLICKR-AES world, shuffling each of `users`' scores over their own images."""
    shutil.copytree(src, dst)
    path = dst / RATINGS_CSV
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    rng = np.random.default_rng(seed)
    for user in sorted(users):
        idx = [i for i, r in enumerate(body) if r[0].strip() == user]
        scores = [body[i][2] for i in idx]
        perm = rng.permutation(len(scores))
        for i, j in zip(idx, perm):
            body[i][2] = scores[j]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *body])


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """The original world, one with the test users' ratings permuted, one with the validation
    users' ratings permuted: each ingested; plus a meta-learner trained on the original (the
    meta-training users' ratings are the same in all three)."""
    from piaa_dist.cli import main
    from piaa_dist.data.ingest import ingest

    root = tmp_path_factory.mktemp("honest")
    spec = WorldSpec(users=14, images=160, seed=3, test_fraction=0.2, ratings_per_user=(40, 50), image_size=32)
    make_world(root / "w", spec)
    out = {}
    ingest("flickr-aes", root / "w", str(root / "d-orig"), workers=1)
    ds = Dataset.open(str(root / "d-orig"))
    cfg = load_config(TINY)
    test, val = set(ds.users("test")), set(validation_users(cfg, ds))
    assert test and val and not test & val
    for name, users in (("test", test), ("val", val)):
        _permute_users(root / "w", root / f"w-{name}", users)
        ingest("flickr-aes", root / f"w-{name}", str(root / f"d-{name}"), workers=1)
    for name in ("orig", "test", "val"):
        out[name] = str(root / f"d-{name}")
    assert main(["train", "--data", out["orig"], "--config", str(TINY), "--out", str(root / "run"),
                 "--workers", "0", "--no-mlflow"]) == 0
    return {"data": out, "model": root / "run" / "model", "root": root, "test": test, "val": val}


def _evaluate(worlds, which: str, *extra: str, **kw) -> EvaluationResult:
    from piaa_dist.orchestration import usecases

    root = worlds["root"]
    giaa = root / "giaa"
    return usecases.evaluate(
        data=worlds["data"][which], model=worlds["model"], shots=[4, 8], repeats=2,
        overrides=["giaa.steps=10", "giaa.batch_size=16", *GRID, *extra],
        giaa=giaa if (giaa / WEIGHTS_FILE).is_file() else None,
        giaa_out=None if (giaa / WEIGHTS_FILE).is_file() else giaa,
        mlflow=kw.pop("mlflow", False), progress=False, **kw)


def test_test_ratings_cannot_influence_any_fine_tuning_choice(worlds):
    orig = _evaluate(worlds, "orig")
    ch = orig.finetune
    assert ch is not None and ch.source == "search" and ch.protocol == "per-method"
    # every fine-tuned method got a setting per shot count from the same grid
    assert set(ch.chosen) == {"blg-piaa", "giaa-finetune", "giaa-ridge"}
    assert all(set(by_k) == {4, 8} for by_k in ch.chosen.values())
    sizes = {m: {k: len(c) for k, c in by_k.items()} for m, by_k in ch.grid.items() if m != "giaa-ridge"}
    assert sizes == {"blg-piaa": {4: 12, 8: 12}, "giaa-finetune": {4: 12, 8: 12}}  # 2 params x 3 lrs x 2 steps
    # ... scored on the validation users, which are not test users
    assert ch.validation_users == len(worlds["val"])
    # and the evaluation used exactly the chosen settings (recorded in the result's config)
    assert set(ch.settings()) <= set(orig.config["eval"]["finetune"])

    permuted_test = _evaluate(worlds, "test")
    # the test users' ratings moved (so did the test numbers) ...
    assert permuted_test.methods["blg-piaa"][4].per_user != orig.methods["blg-piaa"][4].per_user
    # ... and not one candidate's validation score, hence not one choice
    assert permuted_test.finetune.grid == ch.grid
    assert permuted_test.finetune.chosen == ch.chosen

    permuted_val = _evaluate(worlds, "val")
    assert permuted_val.finetune.grid != ch.grid
    assert permuted_val.finetune.chosen != ch.chosen


def test_shared_protocol_is_the_papers_budget_for_every_method(worlds):
    res = _evaluate(worlds, "orig", "eval.protocol=shared")
    ch = res.finetune
    # only the ridge penalty is chosen (it has no fine-tuning budget to share)
    assert ch.protocol == "shared" and set(ch.chosen) == {"giaa-ridge"}
    assert [t for t in res.config["eval"]["finetune"] if not t.startswith("giaa-ridge")] == []


def test_a_second_evaluation_reuses_the_cached_search(worlds, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _evaluate(worlds, "orig", mlflow_uri=uri, mlflow=True)
    second = _evaluate(worlds, "orig", mlflow_uri=uri, mlflow=True)
    assert first.finetune.source == "search" and second.finetune.source == "cache"
    assert second.finetune.key == first.finetune.key
    assert second.finetune.chosen == first.finetune.chosen
    assert second.methods == first.methods
    # the choice is in MLflow: the evaluate run's params and artifact
    from piaa_dist.orchestration import tracking

    client = tracking.client(uri)
    runs = client.search_runs([client.get_experiment_by_name("piaa-dist").experiment_id],
                              filter_string="tags.`piaa_dist.kind` = 'evaluate'")
    params = runs[0].data.params
    for m, by_k in first.finetune.chosen.items():
        for k, text in by_k.items():
            assert params[f"finetune.{m}.k{k}"] == text.partition(": ")[2]
    # another grid is another search
    third = _evaluate(worlds, "orig", "eval.search_repeats=1", mlflow_uri=uri, mlflow=True)
    assert third.finetune.source == "search" and third.finetune.key != first.finetune.key


# ---------------------------------------------------------------------------------------------
# The ridge baseline


def _closed_form(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    """Ridge with an unpenalized intercept from the augmented normal equations
    ``[[X'X + lam I, X'1], [1'X, k]] [w; b] = [X'y; 1'y]`` (another derivation than the
    centred one the code uses), ``lam = penalty * ||X - mean||_F^2 / k``."""
    k, d = x.shape
    xc = x - x.mean(axis=0)
    lam = penalty * float((xc * xc).sum()) / k
    a = np.zeros((d + 1, d + 1))
    a[:d, :d] = x.T @ x + lam * np.eye(d)
    a[:d, d] = x.sum(axis=0)
    a[d, :d] = x.sum(axis=0)
    a[d, d] = k
    rhs = np.concatenate([x.T @ y, [y.sum()]])
    sol = np.linalg.solve(a, rhs)
    return sol[:d], float(sol[d])


def test_ridge_baseline_equals_its_closed_form_on_the_tiny_world(tiny_dataset_url):
    ds = Dataset.open(tiny_dataset_url)
    cfg = with_overrides(load_config(TINY), {
        "eval.methods": ["giaa-ridge"], "eval.finetune": ["giaa-ridge: penalty=0.3"], "eval.shots": [4, 8],
        "eval.repeats": 2, "giaa.steps": 10, "giaa.batch_size": 16})
    torch.manual_seed(0)
    giaa = train_giaa(cfg, ds, meta_training_users(cfg, ds))
    splits = []
    res = evaluate(cfg, ds, {"giaa-ridge": giaa}, on_split=splits.append)
    assert len(splits) == len(res.users) * 2 * 2
    giaa.eval()
    for sp in splits:
        ratings = ds.load_user(sp.user)
        with torch.no_grad():
            feats = giaa.backbone(decode_user(ratings, cfg.data.image_size)).double().numpy()
        y = score_targets(ratings.scores).double().numpy()
        w, b = _closed_form(feats[sp.train_indices], y[sp.train_indices], 0.3)
        np.testing.assert_allclose(sp.predictions, feats[sp.test_indices] @ w + b, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Scoring every step count of the grid from one run


@pytest.mark.parametrize(("optimizer", "lr", "head"), [("sgd", 0.3, True), ("adam", 0.01, False), ("sgd", 0.1, False)])
def test_one_run_scores_every_step_count_bit_for_bit(tiny_dataset_url, optimizer, lr, head):
    from piaa_dist.model import build_model, head_names

    ds = Dataset.open(tiny_dataset_url)
    cfg = load_config(TINY)
    torch.manual_seed(1)
    model = build_model(cfg.model)
    ratings = ds.load_user(ds.users("test")[0])
    images = decode_user(ratings, cfg.data.image_size)
    targets = score_targets(ratings.scores)
    support = (images[:6], targets[:6])
    budget = FinetuneBudget(steps=7, lr=lr, optimizer=optimizer, batch_size=4,
                            adapt_names=frozenset(head_names(model)) if head else None)
    scorer = Scorer(model, budget, images)
    got = scorer.score_steps(support, [1, 3, 7], seed=11)
    assert sorted(got) == [1, 3, 7]
    for steps, pred in got.items():
        alone = Scorer(model, dataclasses.replace(budget, steps=steps), images).score(support, seed=11)
        assert np.array_equal(pred, alone), steps
    assert not np.array_equal(got[1], got[7])  # the steps did something


# ---------------------------------------------------------------------------------------------
# Reporting: the strongest baseline, ceilings with a CI, the choice in the JSON


def _cell(mean: float, per_user: dict[str, float]) -> ShotStats:
    return ShotStats(mean, 0.01, mean, 0.01, per_user, per_user, len(per_user), 0)


def _result() -> EvaluationResult:
    users = {"u1": 0.0, "u2": 0.0, "u3": 0.0}
    return EvaluationResult(
        methods={"blg-piaa": {10: _cell(0.50, users)}, "giaa-finetune": {10: _cell(0.30, users)},
                 "giaa-no-adapt": {10: _cell(0.44, users)}, "meta-no-adapt": {10: _cell(0.35, users)}},
        reference="blg-piaa",
        paired={"giaa-finetune": {10: PairedDiff(0.20, (0.1, 0.3), 3, 3)},
                "giaa-no-adapt": {10: PairedDiff(0.06, (-0.02, 0.14), 3, 2)},
                "meta-no-adapt": {10: PairedDiff(0.15, (0.05, 0.25), 3, 3)}},
        ceilings=Ceilings(oracle=0.83, average_user=0.41, users=3, constant_users=0),
        ceilings_ci95={"oracle": (0.80, 0.86), "average_user": (0.35, 0.47)},
        users=("u1", "u2", "u3"), skipped={10: ()}, shots=(10,), repeats=3, seed=0,
        finetune=FinetuneChoice(protocol="per-method", source="search",
                                chosen={"blg-piaa": {10: "blg-piaa@10: sgd lr=0.5 steps=20 params=head"}},
                                validation_srocc={"blg-piaa": {10: 0.48}},
                                grid={"blg-piaa": {10: {"blg-piaa@10: sgd lr=0.5 steps=20 params=head": 0.48}}},
                                validation_users=8, validation_sha256="ab", repeats=3, key="k"),
    )


def test_headline_compares_with_the_strongest_baseline_and_ceilings_have_a_ci():
    res = _result()
    assert res.strongest_baseline(10)[0] == "giaa-no-adapt"
    md = markdown_table(res)
    assert ("- 10-shot: `blg-piaa` − `giaa-no-adapt` = +0.060 (95% CI -0.020 … +0.140; 2/3 test users better)"
            in md)
    assert "strongest baseline" in md and "reporting, not model selection" in md
    assert "| average-user ceiling | 0.410 (95% CI 0.350 … 0.470) |" in md
    assert "| `blg-piaa` | 10 | sgd lr=0.5 steps=20 params=head | 0.480 |" in md
    table = format_table(res)
    assert "10-shot: blg-piaa − strongest baseline giaa-no-adapt = +0.060" in table
    assert "better on 2/3 test users" in table and "average user 0.410 (95% CI 0.350 … 0.470)" in table
    # the choice and the intervals survive the JSON
    assert EvaluationResult.from_json(res.to_json()) == res


def test_ceilings_ci_is_over_the_test_users(tiny_dataset_url):
    ds = Dataset.open(tiny_dataset_url)
    cfg = with_overrides(load_config(TINY), {"eval.methods": ["meta-no-adapt"], "eval.shots": [4]})
    torch.manual_seed(0)
    from piaa_dist.model import build_model

    res = evaluate(cfg, ds, {"meta-no-adapt": build_model(cfg.model)}, users=ds.users("all"))
    per = [srocc(r.latent, r.scores) for r in map(ds.load_user, ds.users("all")) if np.ptp(r.scores) > 0]
    mean, lo, hi = mean_ci95(per)
    assert res.ceilings.oracle == pytest.approx(mean)
    assert res.ceilings_ci95["oracle"] == pytest.approx((lo, hi))
    assert lo < res.ceilings.oracle < hi


# ---------------------------------------------------------------------------------------------
# Per-method settings in the config


@pytest.mark.parametrize(("setting", "problem"), [
    ("giaa-finetune: sgd lr=0.1 steps=5", "needs lr, steps and params"),
    ("giaa-finetune: rmsprop lr=0.1 steps=5 params=head", "unknown optimizer 'rmsprop'"),
    ("giaa-finetune: lr=-1 steps=5 params=head", "lr must be > 0"),
    ("giaa-finetune: lr=0.1 steps=5 params=backbone", "params must be one of"),
    ("giaa-ridge: lr=0.1", "giaa-ridge takes exactly 'penalty=...'"),
    ("meta-no-adapt: lr=0.1 steps=5 params=head", "is not fine-tuned"),
    ("maml@10: lr=0.1 steps=5 params=head", "unknown method 'maml'"),
    ("blg-piaa@ten: lr=0.1 steps=5 params=head", "expected a shot count"),
    ("blg-piaa lr=0.1", "expected 'METHOD[@K]: key=value ...'"),
])
def test_a_bad_per_method_setting_is_a_one_line_error_naming_it(setting, problem):
    from piaa_dist.config import ConfigError

    with pytest.raises(ConfigError, match="eval.finetune") as err:
        load_config(None, [f"eval.finetune=['{setting}']"])
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_per_method_settings_give_each_method_its_budget():
    from piaa_dist.model import build_model, head_names
    from piaa_dist.protocol import finetune_budget

    cfg = load_config(None, [("eval.finetune=['giaa-finetune@10: adam lr=0.001 steps=7 params=all', "
                             "'giaa-finetune: sgd lr=0.2 steps=3 params=head', 'giaa-ridge: penalty=4']"),
                             "eval.finetune_lr=0.5", "eval.finetune_steps=20"])
    model = build_model(cfg.model)
    at10 = finetune_budget(cfg, model, "giaa-finetune", 10)
    assert (at10.optimizer, at10.lr, at10.steps, at10.adapt_names) == ("adam", 0.001, 7, None)
    other = finetune_budget(cfg, model, "giaa-finetune", 100)
    assert (other.optimizer, other.lr, other.steps, other.adapt_names) == ("sgd", 0.2, 3, frozenset(head_names(model)))
    assert finetune_budget(cfg, model, "giaa-ridge", 10).ridge == 4.0
    # a method without a setting, and the shared protocol, get the shared budget
    assert finetune_budget(cfg, model, "blg-piaa", 10) == finetune_budget(cfg, model)
    shared = with_overrides(cfg, {"eval.protocol": "shared"})
    assert finetune_budget(shared, model, "giaa-finetune", 10) == finetune_budget(cfg, model)
    assert finetune_budget(cfg, model).steps == 20
    with pytest.raises(Exception, match="twice"):
        load_config(None, ["eval.finetune=['giaa-ridge: penalty=1', 'giaa-ridge: penalty=2']"])


def test_demo_report_and_readme_block_say_how_settings_were_chosen(tmp_path):
    from piaa_dist.orchestration.report import readme_block, write_report

    res = _result()
    text = write_report(tmp_path, {"results": res}).read_text()
    assert "chosen for it on validation users, never test users" in text
    assert "`blg-piaa` − `giaa-no-adapt` = +0.060" in text and "strongest baseline" in text
    shared = dataclasses.replace(res, finetune=dataclasses.replace(res.finetune, protocol="shared"))
    assert "`eval.protocol: shared`, the paper's protocol" in write_report(tmp_path, {"results": shared}).read_text()
    assert "Fine-tuning settings (protocol `per-method`; chosen on 8 validation users" in readme_block(res, 64)
