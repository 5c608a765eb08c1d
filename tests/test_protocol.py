"""One protocol: the same budget, fine-tuning and scoring wherever a model adapts to a person.

* ``personalize`` predicts, bit for bit, what ``evaluate`` predicts for the same user, ratings
  and seed, also when the config sets ``meta.inner_head_lr_scale`` and ``eval.finetune_bn``
  (which ``personalize`` used to ignore) and for both head-only (cached backbone features)
  and all-parameter adaptation;
* the fine-tuning budget and the inner loop's kwargs follow one rule for which parameters
  adapt and at what rate;
* ``evaluate``'s ceilings and the synthetic world's are one function with one rule for users
  whose ratings are all equal.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from piaa_dist.config import MetaConfig, load_config, with_overrides
from piaa_dist.data import synth
from piaa_dist.data.stream import Dataset, split_indices
from piaa_dist.evaluate import ceilings, evaluate, finetune_seed, validation_srocc
from piaa_dist.meta import meta_kwargs
from piaa_dist.metrics import plcc, srocc
from piaa_dist.model import build_model, head_names
from piaa_dist.personalize import personalize, read_ratings
from piaa_dist.protocol import FinetuneBudget, finetune_budget

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _write_user(tmp_path: Path, ratings, train_idx) -> tuple[Path, Path, list[Path]]:
    """The user's images as files (the very bytes in the shards) and a ratings CSV of the
    training images, in split order: what a person would hand to ``personalize``."""
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for name, jpeg in zip(ratings.images, ratings.jpegs):
        (images / name).write_bytes(jpeg)
        paths.append(images / name)
    csv_path = tmp_path / "ratings.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "score"])
        for i in train_idx:
            w.writerow([ratings.images[i], repr(float(ratings.scores[i]))])
    return csv_path, images, paths


@pytest.mark.parametrize(("inner_params", "batch_size", "chosen"), [
    ("head", 8, None),    # cached backbone features for prediction; minibatches drawn from the seed
    ("head", 100, None),  # full batch: the backbone also runs once while fine-tuning
    ("all", 8, None),     # every parameter adapts: the full forward pass
    # The setting the per-method search chose (evaluate under eval.protocol per-method; personalize
    # given the same setting, as the registry hands it over): another optimizer, rate, step count
    # and parameter set than the shared budget's.
    ("head", 8, "blg-piaa@10: adam lr=0.02 steps=3 params=all"),
    ("all", 100, "blg-piaa@10: sgd lr=0.3 steps=5 params=head"),
])
def test_personalize_predicts_exactly_what_evaluate_scores(tiny_dataset_url, tmp_path, inner_params,
                                                          batch_size, chosen):
    # Non-default head rate scale and BatchNorm mode: the two settings personalize ignored.
    cfg = load_config(TINY, [
        f"meta.inner_params={inner_params}", "meta.inner_head_lr_scale=7.0",
        "eval.finetune_bn=running", "eval.finetune_steps=4", "eval.finetune_lr=0.05",
        f"eval.batch_size={batch_size}",
    ])
    # evaluate's config carries the chosen setting; personalize gets the model's own config and
    # the setting (what the use-case reads from the registered version).
    eval_cfg = cfg if chosen is None else with_overrides(cfg, {"eval.protocol": "per-method",
                                                                "eval.finetune": [chosen]})
    assert cfg.meta.inner_head_lr_scale != MetaConfig().inner_head_lr_scale
    assert cfg.eval.finetune_bn != "batch"
    data = Dataset.open(tiny_dataset_url)
    user = data.users("test")[0]
    r = data.load_user(user)
    k, seed = 10, 3
    torch.manual_seed(0)
    model = build_model(cfg.model)

    splits = []
    res = evaluate(eval_cfg, data, {"blg-piaa": model}, shots=[k], repeats=1, seed=seed, users=[user],
                   on_split=splits.append)
    (split,) = splits
    tr, te = split_indices(len(r.scores), k, seed=seed, user=user, repeat=0)
    assert np.array_equal(split.train_indices, tr) and np.array_equal(split.test_indices, te)
    assert split.seed == finetune_seed(seed, user, k, 0)

    csv_path, images, paths = _write_user(tmp_path, r, tr)
    ratings = read_ratings(csv_path, images)
    assert not ratings.skipped and len(ratings.images) == k
    ranked = personalize(model, cfg, ratings, paths, seed=split.seed, setting=chosen)
    by_path = dict(ranked)
    mine = np.array([by_path[paths[i]] for i in te])
    if chosen is not None:
        # the setting is what adapted (the shared budget predicts otherwise), and the output says so
        shared = dict(personalize(model, cfg, ratings, paths, seed=split.seed))
        assert not np.allclose([shared[paths[i]] for i in te], mine)
        optimizer, lr, steps, params = chosen.split(": ")[1].split()
        assert ranked.finetune.startswith(f"{optimizer} {lr} {steps} params=")
        assert (params == "params=all") == ("params=all" in ranked.finetune)

    # The same numbers, bit for bit: personalize returns evaluate's predictions on the 1-5 scale.
    assert np.array_equal(mine, split.predictions * 5.0)
    # ...and so the user's score in evaluate's result is the score of personalize's ranking.
    cell = res.stats("blg-piaa", k)
    assert cell.per_user[user] == srocc(mine, r.scores[te])
    assert cell.per_user_plcc[user] == pytest.approx(plcc(mine, r.scores[te]), abs=1e-12)
    # Adaptation is real here (the check above would be empty if nothing moved).
    frozen = with_overrides(cfg, {"eval.finetune_steps": 0})
    unadapted = dict(personalize(model, frozen, ratings, paths, seed=split.seed))
    assert not np.allclose([unadapted[paths[i]] for i in te], mine)


def test_validation_metric_is_evaluate_with_the_same_budget(tiny_dataset_url):
    cfg = load_config(TINY, ["meta.inner_params=head", "meta.inner_head_lr_scale=5.0",
                             "eval.finetune_bn=running", "eval.finetune_steps=3", "eval.finetune_lr=0.1"])
    data = Dataset.open(tiny_dataset_url)
    users = data.users("train")[:2]
    torch.manual_seed(1)
    model = build_model(cfg.model)
    v = validation_srocc(cfg, data, model, users, shots=4, repeats=2)
    res = evaluate(cfg, data, {"blg-piaa": model}, shots=[4], repeats=2, users=users)
    assert v == res.stats("blg-piaa", 4).srocc_mean
    # the head rate scale is really part of that budget: another scale, another number
    other = with_overrides(cfg, {"meta.inner_head_lr_scale": 1.0})
    assert validation_srocc(other, data, model, users, shots=4, repeats=2) != v


def test_budget_and_inner_loop_share_the_parameter_rule():
    cfg = load_config(TINY, ["meta.inner_params=head", "meta.inner_head_lr_scale=10.0",
                             "meta.inner_lr=0.02", "eval.finetune_lr=0.3",
                             "eval.finetune_optimizer=adam", "eval.finetune_bn=running"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    budget = finetune_budget(cfg, model)
    kw = meta_kwargs(model, cfg.meta)
    heads = head_names(model)
    assert budget.adapt_names == kw["adapt_names"] == heads
    for name, _ in model.named_parameters():
        scale = 10.0 if name in heads else 1.0
        assert budget.lr_of(name) == pytest.approx(0.3 * scale)
        assert kw["inner_lr"][name] == pytest.approx(0.02 * scale)
    assert (budget.steps, budget.optimizer, budget.bn, budget.batch_size) == (
        cfg.eval.finetune_steps, "adam", "running", cfg.eval.batch_size)
    # all parameters, one rate
    plain = finetune_budget(with_overrides(cfg, {"meta.inner_params": "all",
                                                 "meta.inner_head_lr_scale": 1.0}), model)
    assert plain.adapt_names is None and plain.lr == pytest.approx(0.3)
    # a bad setting is a config error naming the key
    with pytest.raises(ValueError, match="eval.finetune_bn"):
        finetune_budget(with_overrides(cfg, {"eval.finetune_bn": "instance"}), model)
    with pytest.raises(ValueError, match="meta.inner_params"):
        finetune_budget(with_overrides(cfg, {"meta.inner_params": "neck"}), model)
    with pytest.raises(ValueError, match="eval.batch_size"):
        FinetuneBudget(steps=1, lr=0.1, batch_size=0)


def test_evaluate_and_the_synthetic_world_share_one_ceilings_rule():
    x = np.arange(1.0, 9.0)
    per_user = {
        "a": (x, -x, x),                            # oracle 1, average -1
        "b": (x, np.full(8, 2.0), x[::-1].copy()),  # a constant average-user score: kept, 0
        "c": (x, x, np.full(8, 3.0)),               # rated everything 3: left out, counted
        "d": (x[:1], x[:1], x[:1]),                 # a single rating: left out, counted
    }
    users = {u: SimpleNamespace(latent=lat, average_latent=avg, scores=obs)
             for u, (lat, avg, obs) in per_user.items()}
    data = SimpleNamespace(load_user=users.__getitem__)
    from_evaluate = ceilings(data, list(per_user))
    flat = {key: np.concatenate([v[i] for v in per_user.values()])
            for i, key in enumerate(("latent", "average_latent", "observed"))}
    labels = np.concatenate([[u] * len(v[0]) for u, v in per_user.items()])
    from_world = synth.ceilings(flat["latent"], flat["average_latent"], flat["observed"], labels)
    assert from_evaluate.to_dict() == from_world
    assert from_world == {"oracle": pytest.approx(0.0), "average_user": pytest.approx(-0.5),
                          "users": 2, "constant_users": 2}
    assert from_evaluate.oracle == pytest.approx((1.0 - 1.0) / 2)


# ---------------------------------------------------------------------------------------------
# Minibatches of the fine-tuning


def _finetune_setup(k: int = 8):
    from piaa_dist.protocol import score_targets

    cfg = load_config(TINY, ["model.dropout=0.3"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(k, 3, cfg.data.image_size, cfg.data.image_size, generator=gen)
    targets = score_targets(np.arange(1, k + 1) % 5 + 1.0)
    return model, (images, targets)


def test_a_minibatch_as_large_as_the_shots_is_full_batch_fine_tuning():
    """batch_size == k is the full-batch path (the same permuted batch every step), bit for bit
    what any larger batch_size gives; a smaller one is not."""
    from piaa_dist.protocol import finetune

    model, support = _finetune_setup(8)
    tuned = {b: finetune(model, support, FinetuneBudget(steps=3, lr=0.05, batch_size=b), seed=4)
             for b in (8, 100, 4)}
    same = [torch.equal(a, b) for a, b in zip(tuned[8].state_dict().values(), tuned[100].state_dict().values())]
    assert all(same)
    assert not all(torch.equal(a, b) for a, b in zip(tuned[8].state_dict().values(), tuned[4].state_dict().values()))


def test_minibatch_fine_tuning_sees_every_shot_once_per_epoch():
    """k=6 shots in minibatches of 3 for 4 steps: two epochs, each visiting every shot exactly
    once (a shot left out of an epoch would be a rating the model never used)."""
    from piaa_dist.protocol import finetune

    model, support = _finetune_setup(6)
    seen: list[torch.Tensor] = []

    def hook(module, args):
        if module.training:
            seen.append(args[0].detach().clone())

    model.backbone.register_forward_pre_hook(hook)
    finetune(model, support, FinetuneBudget(steps=4, lr=0.05, batch_size=3), seed=2)
    rows = {img.numpy().tobytes(): i for i, img in enumerate(support[0])}
    batches = [[rows[x.numpy().tobytes()] for x in b] for b in seen]
    assert [len(b) for b in batches] == [3, 3, 3, 3]
    assert sorted(batches[0] + batches[1]) == list(range(6))
    assert sorted(batches[2] + batches[3]) == list(range(6))


# ---------------------------------------------------------------------------------------------
# The search's building blocks: one run scores every step count; a setting's budget; ridge


def _support(cfg, n: int = 12, k: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, cfg.data.image_size, cfg.data.image_size, generator=gen)
    targets = torch.rand(n, generator=gen) * 0.8 + 0.2
    return images, (images[:k], targets[:k])


@pytest.mark.parametrize(("optimizer", "lr", "head"), [("sgd", 0.3, True), ("adam", 0.01, False)])
def test_one_run_scores_every_step_count_as_separate_runs_would(optimizer, lr, head):
    """``score_steps`` equals, bit for bit, a separate :meth:`Scorer.score` at each step count
    (same seed, or both at their default seed), head-only or all parameters."""
    import dataclasses

    from piaa_dist.protocol import Scorer

    cfg = load_config(TINY)
    torch.manual_seed(1)
    model = build_model(cfg.model)
    images, support = _support(cfg)
    budget = FinetuneBudget(steps=7, lr=lr, optimizer=optimizer, batch_size=4,
                            adapt_names=frozenset(head_names(model)) if head else None)
    scorer = Scorer(model, budget, images)
    for kw in ({"seed": 11}, {}):
        got = scorer.score_steps(support, [3, 1, 7], **kw)
        assert sorted(got) == [1, 3, 7]
        for steps, pred in got.items():
            alone = Scorer(model, dataclasses.replace(budget, steps=steps), images).score(support, **kw)
            assert np.array_equal(pred, alone), (kw, steps)
        assert not np.array_equal(got[1], got[7])  # the steps did something
    with pytest.raises(ValueError, match=">= 1"):
        scorer.score_steps(support, [0, 2])


def test_a_settings_budget_is_what_it_says():
    """``budget_of_setting``: the setting's rate, steps and optimizer (SGD when it names none),
    the head's parameters for ``params=head`` and every parameter for ``all``; minibatch and
    BatchNorm mode from ``cfg.eval``."""
    from piaa_dist.protocol import budget_of_setting

    cfg = with_overrides(load_config(TINY), {"eval.batch_size": 7, "eval.finetune_bn": "running"})
    model = build_model(cfg.model)
    adam = budget_of_setting(cfg, model, {"optimizer": "adam", "lr": 0.01, "steps": 4, "params": "all"})
    assert (adam.optimizer, adam.lr, adam.steps, adam.adapt_names) == ("adam", 0.01, 4, None)
    assert (adam.batch_size, adam.bn) == (7, "running")
    plain = budget_of_setting(cfg, model, {"lr": 0.5, "steps": 2, "params": "head"})
    assert (plain.optimizer, plain.lr, plain.steps) == ("sgd", 0.5, 2)
    assert plain.adapt_names == frozenset(head_names(model))


def _ridge_closed_form(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    """Ridge with an unpenalized intercept from the augmented normal equations (another
    derivation than the centred one the code uses), ``lam = penalty * ||X - mean||_F^2 / k``."""
    k, d = x.shape
    xc = x - x.mean(axis=0)
    lam = penalty * float((xc * xc).sum()) / k
    a = np.zeros((d + 1, d + 1))
    a[:d, :d] = x.T @ x + lam * np.eye(d)
    a[:d, d] = a[d, :d] = x.sum(axis=0)
    a[d, d] = k
    sol = np.linalg.solve(a, np.concatenate([x.T @ y, [y.sum()]]))
    return sol[:d], float(sol[d])


@pytest.mark.parametrize("scale", [1.0, 1e-3])
@pytest.mark.parametrize("penalty", [0.05, 3.0])
def test_ridge_fit_is_the_closed_form_at_any_feature_scale(scale, penalty):
    """``ridge_fit`` is the ridge regression with a relative penalty, computed in float64 from
    float32 features (as the backbone gives them), also for small features and penalties; shots
    whose features are all equal give the mean target and no weights."""
    from piaa_dist.protocol import ridge_fit

    rng = np.random.default_rng(0)
    x32 = (rng.normal(size=(8, 5)) * scale).astype(np.float32)
    y = rng.uniform(0.2, 1.0, size=8)
    w, b = ridge_fit(x32, y, penalty)
    w_ref, b_ref = _ridge_closed_form(x32.astype(np.float64), y, penalty)
    np.testing.assert_allclose(w, w_ref, rtol=1e-9, atol=0)
    assert b == pytest.approx(b_ref, rel=1e-12)
    w0, b0 = ridge_fit(np.ones((4, 5), dtype=np.float32), y[:4], penalty)
    assert not w0.any() and b0 == pytest.approx(float(y[:4].mean()))


def test_finetune_shows_the_model_at_the_asked_steps_only():
    """``at_stop`` sees the model after each step count in ``stops`` and after no other (the
    last step included only when asked for); the fine-tuned model is the same either way."""
    from piaa_dist.protocol import finetune

    cfg = load_config(TINY)
    torch.manual_seed(2)
    model = build_model(cfg.model)
    _, support = _support(cfg)
    budget = FinetuneBudget(steps=3, lr=0.1, batch_size=4)
    for stops, seen in (({1}, [1]), ({1, 3}, [1, 3]), ((), [])):
        got: list[int] = []
        tuned = finetune(model, support, budget, seed=5, stops=stops, at_stop=lambda d, m, got=got: got.append(d))
        assert got == seen, stops
        alone = finetune(model, support, budget, seed=5)
        for a, b in zip(tuned.state_dict().values(), alone.state_dict().values()):
            assert torch.equal(a, b)


def test_a_budget_takes_any_collection_of_names_and_refuses_bad_values_by_name():
    """``FinetuneBudget``: parameter names given as a list or set are the same budget as the
    frozenset (equal, hashable: budgets key caches); a bad value is a ConfigError naming it."""
    from piaa_dist.errors import ConfigError

    names = ["head.0.weight", "head.0.bias"]
    as_list = FinetuneBudget(steps=2, lr=0.1, adapt_names=names)
    assert as_list.adapt_names == frozenset(names) and isinstance(as_list.adapt_names, frozenset)
    assert as_list == FinetuneBudget(steps=2, lr=0.1, adapt_names=frozenset(names))
    assert hash(as_list) == hash(FinetuneBudget(steps=2, lr=0.1, adapt_names=set(names)))
    for kw, message in (({"steps": -1}, r"eval\.finetune_steps must be >= 0, got -1"),
                        ({"batch_size": 0}, r"eval\.batch_size must be >= 1, got 0"),
                        ({"optimizer": "rmsprop"}, r"eval\.finetune_optimizer: unknown 'rmsprop'"),
                        ({"bn": "frozen"}, r"eval\.finetune_bn: unknown 'frozen'"),
                        ({"ridge": -1.0}, r"ridge penalty must be > 0, got -1\.0")):
        with pytest.raises(ConfigError, match=message):
            FinetuneBudget(**{"steps": 1, "lr": 0.1, **kw})
