"""The meta-testing protocol: seeded splits, same budget per method, reproducible numbers,
fine-tuning that learns, ceilings, the typed result; and the GIAA prior.

Most tests use a tiny hand-built dataset (random JPEGs in memory with chosen scores and truth)
so each property can be checked against values computed by hand; the end-to-end checks on the
synthetic world are in ``tests/test_experiment.py``.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from piaa_dist.config import JobConfig, with_overrides
from piaa_dist.data.stream import split_indices
from piaa_dist.errors import DataError
from piaa_dist.evaluate import (
    METHODS,
    ceilings,
    decode_user,
    evaluate,
    standard_models,
    validation_srocc,
)
from piaa_dist.giaa import HeldOutUserError, train_giaa
from piaa_dist.model import build_model
from piaa_dist.presentation import format_table
from piaa_dist.protocol import FinetuneBudget, finetune, predict
from piaa_dist.results import EvaluationResult
from piaa_dist.train import meta_training_users, validation_users

torch.set_num_threads(1)

SIZE = 16


def _jpeg(rng: np.random.Generator, brightness: float) -> bytes:
    """A small JPEG whose mean brightness carries the 'aesthetic' signal."""
    arr = np.clip(rng.normal(brightness * 255, 30, size=(SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class FakeDataset:
    """In-memory stand-in for :class:`piaa_dist.data.stream.Dataset` (``users``, ``load_user``)."""

    def __init__(self, n_users: int = 4, n_images: int = 30, truth: bool = True, seed: int = 0):
        rng = np.random.default_rng(seed)
        self._users = {}
        for u in range(n_users):
            name = f"U{u:02d}"
            latent = rng.uniform(1, 5, n_images)
            avg = rng.uniform(1, 5, n_images)
            scores = np.clip(np.rint(latent + rng.normal(0, 0.7, n_images)), 1, 5).astype(np.float32)
            self._users[name] = SimpleNamespace(
                user=name,
                images=[f"{name}_{i}.jpg" for i in range(n_images)],
                jpegs=[_jpeg(rng, (s - 1) / 4 * 0.6 + 0.2) for s in scores],
                scores=scores,
                latent=latent.astype(np.float32) if truth else None,
                average_latent=avg.astype(np.float32) if truth else None,
            )
        names = sorted(self._users)
        self._split = {"train": names[: n_users // 2], "test": names[n_users // 2 :]}

    def users(self, split: str) -> list[str]:
        return list(self._split[split])

    def load_user(self, user: str):
        return self._users[user]


def _cfg(**updates) -> JobConfig:
    base = {
        "data.image_size": SIZE,
        "data.augment": False,
        "model.width": 8,
        "model.feature_dim": 16,
        "model.head_hidden": [16],
        "model.dropout": 0.0,
        "eval.shots": [5, 10],
        "eval.repeats": 2,
        "eval.finetune_steps": 5,
        "eval.finetune_lr": 0.05,
        "giaa.steps": 30,
        "giaa.batch_size": 16,
    }
    base.update(updates)
    return with_overrides(JobConfig(), base)


def _model(cfg: JobConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg.model).eval()


def _calibrated(model, images):
    """Give a fresh model the BatchNorm running statistics of `images` (as training would):
    a prior's running statistics describe its inputs, whereas a fresh model's (0, 1) make
    eval-mode predictions unrelated to the train-mode ones that fine-tuning optimizes."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        model(images)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Splits


def test_split_is_deterministic_disjoint_and_depends_on_every_key():
    tr, te = split_indices(40, 10, seed=3, user="A", repeat=0)
    tr2, te2 = split_indices(40, 10, seed=3, user="A", repeat=0)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert len(tr) == 10 and len(te) == 30
    assert set(tr).isdisjoint(te) and set(tr) | set(te) == set(range(40))
    base = set(tr.tolist())
    for kw in ({"seed": 4, "user": "A", "repeat": 0}, {"seed": 3, "user": "B", "repeat": 0},
               {"seed": 3, "user": "A", "repeat": 1}):
        assert set(split_indices(40, 10, **kw)[0].tolist()) != base, kw
    with pytest.raises(DataError):
        split_indices(10, 10, seed=0, user="A", repeat=0)


def test_split_independent_of_method_and_of_which_methods_run():
    """The same prior under two fine-tuned method names gets identical numbers (same splits,
    same fine-tuning stream), and a method scores the same alone or alongside others."""
    cfg = _cfg()
    data = FakeDataset()
    m = _model(cfg)
    both = evaluate(cfg, data, {"blg-piaa": m, "giaa-finetune": m}, seed=1)
    alone = evaluate(cfg, data, {"giaa-finetune": m}, seed=1)
    for k in (5, 10):
        a = both.stats("blg-piaa", k).per_user
        b = both.stats("giaa-finetune", k).per_user
        c = alone.stats("giaa-finetune", k).per_user
        assert a == b == c
        d = both.paired_with("giaa-finetune", k)
        assert d.diff_mean == 0.0 and d.users_better == 0


# ---------------------------------------------------------------------------------------------
# Reproducibility


def test_same_seed_same_numbers_and_other_seed_other_numbers():
    cfg = _cfg(**{"model.dropout": 0.3})  # dropout: the fine-tuning stream must be seeded too
    data = FakeDataset()
    meta, giaa = _model(cfg, 0), _model(cfg, 1)
    models = standard_models(meta, giaa, cfg.eval.methods)
    r1 = evaluate(cfg, data, models, seed=5)
    torch.manual_seed(123)  # the caller's global RNG state must not matter
    r2 = evaluate(cfg, data, models, seed=5)
    r3 = evaluate(cfg, data, models, seed=6)
    assert r1.methods == r2.methods and r1.paired == r2.paired
    assert r1.stats("blg-piaa", 5).per_user != r3.stats("blg-piaa", 5).per_user


def test_no_adapt_method_ignores_finetuning_and_matches_direct_prediction():
    cfg = _cfg(**{"eval.repeats": 1, "eval.shots": [5]})
    data = FakeDataset(n_users=2)
    m = _model(cfg)
    res = evaluate(cfg, data, {"meta-no-adapt": m}, seed=2)
    (user,) = data.users("test")
    r = data.load_user(user)
    _, te = split_indices(len(r.scores), 5, seed=2, user=user, repeat=0)
    pred = predict(m, decode_user(r, SIZE))[te]
    expected = spearmanr(pred, r.scores[te]).statistic
    assert res.stats("meta-no-adapt", 5).per_user[user] == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def test_finetune_lowers_training_loss_and_leaves_the_prior_alone():
    cfg = _cfg()
    data = FakeDataset(n_users=2)
    r = data.load_user("U01")
    images = decode_user(r, SIZE)
    targets = torch.as_tensor(r.scores / 5.0)
    prior = _calibrated(_model(cfg), images)
    before_state = {k: v.clone() for k, v in prior.state_dict().items()}

    def loss(model) -> float:
        # what matters: the loss of the predictions (eval mode) on the training images
        return float(np.mean((predict(model, images) - targets.numpy()) ** 2))

    head = {n for n, _ in prior.named_parameters() if n.startswith("head.")}
    for optimizer, lr, adapt_names, bn in (
        ("sgd", 0.1, None, "batch"),
        # bn="running" optimizes exactly the eval-mode predictor, so even large moves lower its
        # loss (with "batch" they can leave the running statistics stale: the train-mode loss
        # falls while the eval-mode one may rise)
        ("sgd", 0.1, None, "running"),
        ("sgd", 0.5, head, "running"),
        ("adam", 0.003, None, "running"),
    ):
        budget = FinetuneBudget(steps=30, lr=lr, optimizer=optimizer, batch_size=100,
                                adapt_names=adapt_names, bn=bn)
        tuned = finetune(prior, (images, targets), budget, seed=0)
        assert loss(tuned) < 0.6 * loss(prior), (optimizer, adapt_names, bn)
        assert not tuned.training
    for k, v in prior.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    # BN running statistics are those of the prior (frozen during fine-tuning, see finetune()).
    tuned = finetune(prior, (images, targets), FinetuneBudget(steps=5, lr=0.1, batch_size=8), seed=0)
    for name, buf in tuned.named_buffers():
        if "running" in name:
            assert torch.equal(buf, dict(prior.named_buffers())[name]), name
    # head-only adaptation leaves the backbone untouched
    tuned = finetune(prior, (images, targets), FinetuneBudget(steps=5, lr=0.1, adapt_names=head), seed=0)
    for (n, p), (_, q) in zip(prior.named_parameters(), tuned.named_parameters()):
        assert torch.equal(p, q) == (n not in head), n
    # a per-parameter learning rate: a zero rate freezes that parameter
    lrs = {n: (0.0 if n.startswith("backbone.") else 0.1) for n, _ in prior.named_parameters()}
    tuned = finetune(prior, (images, targets), FinetuneBudget(steps=5, lr=lrs), seed=0)
    for (n, p), (_, q) in zip(prior.named_parameters(), tuned.named_parameters()):
        assert torch.equal(p, q) == n.startswith("backbone."), n


def test_head_only_shortcut_is_exact(monkeypatch):
    """Head-only fine-tuning runs the backbone once and predicts from cached features; that must
    give the numbers the plain path gives."""
    import piaa_dist.protocol as protocol

    cfg = _cfg(**{"meta.inner_params": "head", "eval.repeats": 1, "model.dropout": 0.3})
    data = FakeDataset(n_users=4)
    m = _model(cfg)
    fast = evaluate(cfg, data, {"blg-piaa": m}, seed=0)
    monkeypatch.setattr(protocol, "_FIXED_FEATURES", False)
    slow = evaluate(cfg, data, {"blg-piaa": m}, seed=0)
    for k in (5, 10):
        a, b = fast.stats("blg-piaa", k).per_user, slow.stats("blg-piaa", k).per_user
        assert a.keys() == b.keys()
        for u in a:
            assert a[u] == pytest.approx(b[u], abs=1e-6)


@pytest.mark.parametrize("bn", ["batch", "running"])
def test_channels_last_fast_path_gives_the_plain_numbers(tiny_dataset_url, monkeypatch, bn):
    """On CPU, convnets fine-tune and predict on channels-last tensors (several times faster);
    every method's predictions on every split of the tiny world equal the plain (NCHW) path's
    to float tolerance: head-only and all-parameter fine-tuning, SGD and Adam, minibatches,
    ridge and the priors as they are."""
    from pathlib import Path

    import piaa_dist.protocol as protocol
    from piaa_dist.config import load_config
    from piaa_dist.data.stream import Dataset

    adam = "adam lr=0.01" if bn == "running" else None
    cfg = with_overrides(load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"), {
        "eval.protocol": "per-method", "eval.finetune_bn": bn, "eval.batch_size": 6, "model.dropout": 0.3,
        "eval.finetune": ["blg-piaa@4: sgd lr=0.5 steps=5 params=head",
                          # Adam moving every parameter while BatchNorm uses batch statistics is
                          # ill-conditioned in float32 (scale-invariant weights: gradients that
                          # are 0 but for rounding, which Adam's normalization blows up to lr-sized
                          # steps): the plain path itself moves ~5e-3 between 1 and 2 torch threads
                          # there, and so does channels-last. Adam is checked with BatchNorm on
                          # running statistics.
                          f"blg-piaa@10: {adam or 'sgd lr=0.5'} steps=4 params=all",
                          "giaa-finetune@4: sgd lr=0.2 steps=5 params=all",
                          f"giaa-finetune@10: {adam or 'sgd lr=1.0'} steps=3 params=head",
                          "giaa-ridge: penalty=0.1"],
    })
    data = Dataset.open(tiny_dataset_url)
    torch.manual_seed(0)
    meta = build_model(cfg.model)
    torch.manual_seed(1)
    giaa = build_model(cfg.model)
    models = {"blg-piaa": meta, "meta-no-adapt": meta, "giaa-finetune": giaa, "giaa-no-adapt": giaa,
              "giaa-ridge": giaa}
    users = data.users("all")[:4]

    def run() -> tuple[EvaluationResult, dict]:
        preds: dict = {}
        res = evaluate(cfg, data, models, shots=[4, 10], repeats=2, seed=3, users=users,
                       on_split=lambda sp: preds.__setitem__((sp.method, sp.user, sp.shots, sp.repeat),
                                                             sp.predictions))
        return res, preds

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert protocol._CHANNELS_LAST
        fast, fast_preds = run()
        # the fast path is the one taken: the fine-tuned convnet is laid out channels-last
        support = (torch.randn(4, 3, 32, 32), torch.rand(4))
        tuned = finetune(giaa, support, FinetuneBudget(steps=1, lr=0.1), seed=0)
        conv = next(m for m in tuned.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        monkeypatch.setattr(protocol, "_CHANNELS_LAST", False)
        plain, plain_preds = run()
    finally:
        torch.set_num_threads(threads)
    assert fast_preds.keys() == plain_preds.keys() and len(fast_preds) == 5 * len(users) * 2 * 2
    for key, p in plain_preds.items():
        np.testing.assert_allclose(fast_preds[key], p, rtol=0, atol=2e-6, err_msg=str(key))
    for m in models:
        for k in (4, 10):
            a, b = fast.stats(m, k).per_user, plain.stats(m, k).per_user
            assert a.keys() == b.keys()
            for u in a:
                assert a[u] == pytest.approx(b[u], abs=1e-6), (m, k, u)


def test_finetune_is_seeded_with_minibatches_and_dropout():
    cfg = _cfg(**{"model.dropout": 0.5})
    r = FakeDataset(n_users=2).load_user("U00")
    support = (decode_user(r, SIZE), torch.as_tensor(r.scores / 5.0))
    prior = _model(cfg)
    budget = FinetuneBudget(steps=6, lr=0.1, batch_size=7)
    a = finetune(prior, support, budget, seed=9)
    b = finetune(prior, support, budget, seed=9)
    c = finetune(prior, support, budget, seed=10)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    with pytest.raises(ValueError):
        FinetuneBudget(steps=1, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ValueError):
        FinetuneBudget(steps=1, lr=0.1, bn="instance")


# ---------------------------------------------------------------------------------------------
# Ceilings


def test_ceilings_on_a_hand_built_case():
    scores = np.array([1, 2, 3, 4, 5], dtype=np.float32)
    users = {
        # oracle perfectly ordered, average user perfectly reversed
        "A": SimpleNamespace(scores=scores, latent=scores + 0.1, average_latent=-scores),
        # oracle one swap: 1 - 6*2/(5*24) = 0.9; average-user constant -> no ranking -> 0
        "B": SimpleNamespace(scores=scores, latent=np.array([2, 1, 3, 4, 5.0]),
                             average_latent=np.full(5, 3.0)),
    }
    data = SimpleNamespace(load_user=users.__getitem__)
    out = ceilings(data, ["A", "B"])
    assert out.oracle == pytest.approx((1.0 + 0.9) / 2)
    assert out.average_user == pytest.approx((-1.0 + 0.0) / 2)
    users["C"] = SimpleNamespace(scores=scores, latent=None, average_latent=None)
    assert ceilings(data, ["A", "C"]) is None


def test_ceilings_absent_without_truth_sidecar():
    cfg = _cfg(**{"eval.repeats": 1, "eval.shots": [5]})
    res = evaluate(cfg, FakeDataset(truth=False), {"blg-piaa": _model(cfg)})
    assert res.ceilings is None


# ---------------------------------------------------------------------------------------------
# Output


def test_result_shape_table_and_validation_metric():
    cfg = _cfg()
    data = FakeDataset(n_users=6, n_images=14)  # 14 ratings: 10 shots leave 4 test images
    meta, giaa = _model(cfg, 0), _model(cfg, 1)
    res = evaluate(cfg, data, standard_models(meta, giaa, cfg.eval.methods))
    # JSON-ready: no numpy scalars, no tuples-as-keys; and it reads back as the same result
    assert EvaluationResult.from_json(res.to_json()) == res
    assert set(res.methods) == {"blg-piaa", "meta-no-adapt", "giaa-finetune", "giaa-no-adapt", "giaa-ridge"}
    for by_k in res.methods.values():
        assert set(by_k) == {5, 10}
        for cell in by_k.values():
            for value in (cell.srocc_mean, cell.srocc_std, cell.plcc_mean):
                assert isinstance(value, float) and -1.0 <= value <= 1.0 + 1e-9
            assert cell.srocc_std >= 0
            assert set(cell.per_user) == set(data.users("test"))
            # srocc_mean is the mean over users of their mean over repeats
            assert cell.srocc_mean == pytest.approx(np.mean(list(cell.per_user.values())))
    assert res.ceilings is not None and res.ceilings.users + res.ceilings.constant_users == 3
    assert res.users == tuple(data.users("test"))
    for k in (5, 10):
        d = res.paired_with("giaa-finetune", k)
        assert d.ci95[0] <= d.diff_mean <= d.ci95[1]
        assert d.n_users == 3
        per_a = res.stats("blg-piaa", k).per_user
        per_b = res.stats("giaa-finetune", k).per_user
        assert d.diff_mean == pytest.approx(np.mean([per_a[u] - per_b[u] for u in per_a]))
    table = format_table(res)
    for name in ("blg-piaa", "meta-no-adapt", "giaa-finetune", "oracle", "paired"):
        assert name in table
    v = validation_srocc(cfg, data, meta, data.users("test"), shots=5, repeats=2)
    assert v == pytest.approx(res.stats("blg-piaa", 5).srocc_mean)


def test_users_with_too_few_ratings_are_skipped_and_reported():
    cfg = _cfg(**{"eval.shots": [5, 10], "eval.repeats": 1})
    data = FakeDataset(n_users=4, n_images=12)  # 10 shots leave 2 < 3 test images
    res = evaluate(cfg, data, {"blg-piaa": _model(cfg)})
    assert set(res.methods["blg-piaa"]) == {5}
    assert res.skipped[10] == tuple(data.users("test"))


def test_srocc_std_is_the_spread_over_repeats():
    cfg = _cfg(**{"eval.shots": [5], "eval.repeats": 3})
    data = FakeDataset(n_users=6)
    res = evaluate(cfg, data, {"meta-no-adapt": _model(cfg)}, seed=0)
    users = data.users("test")
    m = _model(cfg)
    per_repeat = []
    for r in range(3):
        vals = []
        for u in users:
            rr = data.load_user(u)
            _, te = split_indices(len(rr.scores), 5, seed=0, user=u, repeat=r)
            vals.append(spearmanr(predict(m, decode_user(rr, SIZE))[te], rr.scores[te]).statistic)
        per_repeat.append(np.mean(vals))
    assert res.stats("meta-no-adapt", 5).srocc_std == pytest.approx(np.std(per_repeat, ddof=1))


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match=r"eval\.methods: unknown method 'nope'; known: \[.*'blg-piaa'.*\]"):
        standard_models(None, None, ["nope"])
    assert "blg-piaa" in METHODS


def test_the_protocol_is_the_arguments_given_else_the_config():
    from piaa_dist.evaluate import protocol_of

    cfg = with_overrides(JobConfig(), {"eval.shots": [10, 100], "eval.repeats": 7, "run.seed": 3})
    assert protocol_of(cfg) == ([10, 100], 7, 3)
    assert protocol_of(cfg, shots=(5,), repeats=2, seed=9) == ([5], 2, 9)
    assert protocol_of(cfg, repeats=2) == ([10, 100], 2, 3)
    assert protocol_of(cfg, seed=0, repeats=0) == ([10, 100], 0, 0)  # 0 is given, not "unset"


# ---------------------------------------------------------------------------------------------
# GIAA


def test_giaa_is_seeded_and_learns_the_pooled_ratings():
    # No validation users held out: the pool is every training user (train_giaa refuses
    # held-out users, see the next test).
    cfg = _cfg(**{"giaa.steps": 60, "giaa.lr": 3e-3, "data.validation_users": 0})
    data = FakeDataset(n_users=4)
    users = data.users("train")
    a = train_giaa(cfg, data, users)
    b = train_giaa(cfg, data, users)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not a.training
    images = torch.cat([decode_user(data.load_user(u), SIZE) for u in users])
    scores = np.concatenate([data.load_user(u).scores for u in users])
    untrained = _model(cfg)
    err = lambda m: float(np.mean((predict(m, images) - scores / 5.0) ** 2))  # noqa: E731
    assert err(a) < err(untrained)
    # brightness carries the score in this fake world: the pooled model ranks images by it
    assert spearmanr(predict(a, images), scores).statistic > 0.5
    with pytest.raises(ValueError):
        train_giaa(cfg, data, [])


def test_giaa_never_trains_on_test_or_validation_users():
    """The baseline's pool excludes the test users and the validation users, whoever calls it:
    the library refuses them, naming them, before any training."""
    cfg = _cfg(**{"giaa.steps": 2, "data.validation_users": 1})
    data = FakeDataset(n_users=6)  # train U00-U02 (one held out for validation), test U03-U05
    test, val = data.users("test"), validation_users(cfg, data)
    pool = meta_training_users(cfg, data)
    assert len(val) == 1 and set(pool) == set(data.users("train")) - set(val)
    assert not set(pool) & set(test)
    train_giaa(cfg, data, pool)  # the meta-learner's own users: accepted
    for extra in (test[1], *val):
        with pytest.raises(HeldOutUserError, match=rf"\b{extra}\b"):
            train_giaa(cfg, data, pool + [extra])
    everyone = sorted(set(data.users("train")) | set(test))
    with pytest.raises(HeldOutUserError, match="3 test user.*1 validation user"):
        train_giaa(cfg, data, everyone)


# ---------------------------------------------------------------------------------------------
# What fine-tuning sees


def _watch_training_inputs(model: torch.nn.Module, seen: list) -> torch.nn.Module:
    """Record every batch the backbone sees in train mode (fine-tuning: the prior's copies keep
    the hook; predictions run in eval mode and are not recorded)."""

    def hook(module, args):
        if module.training:
            seen.append(args[0].detach().clone())

    model.backbone.register_forward_pre_hook(hook)
    return model


def _rows(batches: list, index: dict[bytes, int]) -> list[int]:
    """Positions in the user's ratings of every recorded image (exact tensor match)."""
    return [index[row.numpy().tobytes()] for b in batches for row in b]


@pytest.mark.parametrize(("inner_params", "batch_size"), [
    ("all", 100),   # full batch, every parameter
    ("head", 100),  # full batch, head only: the backbone runs once on the shots
    ("all", 4),     # minibatches of the shots
])
def test_finetuning_sees_exactly_the_shots_and_never_a_scored_image(inner_params, batch_size):
    """For every method and split: a fine-tuned method trains on exactly the k support images
    (never one of the scored test images, never the user's other images); a method that does
    not adapt trains on nothing."""
    cfg = _cfg(**{"meta.inner_params": inner_params, "eval.batch_size": batch_size,
                  "eval.finetune_steps": 3, "eval.repeats": 2})
    data = FakeDataset(n_users=4)
    seen: list = []
    meta = _watch_training_inputs(_model(cfg, 0), seen)
    giaa = _watch_training_inputs(_model(cfg, 1), seen)
    models = standard_models(meta, giaa, METHODS)
    assert set(models) == set(METHODS)
    index = {}
    for user in data.users("test"):
        images = decode_user(data.load_user(user), SIZE)
        index[user] = {row.numpy().tobytes(): i for i, row in enumerate(images)}
        assert len(index[user]) == len(images)  # every image of the user is distinct
    checked = []

    def on_split(split):
        rows = _rows(seen, index[split.user])
        seen.clear()
        k = split.shots
        assert len(split.train_indices) == k
        assert not set(split.train_indices) & set(split.test_indices)
        if not METHODS[split.method].adapt or split.method == "giaa-ridge":
            # giaa-ridge takes no gradient step (a closed-form fit on the shots' frozen
            # features: tests/test_baselines.py checks it uses exactly the shots)
            assert rows == [], split.method
            return
        # each step's batch: distinct shots, never a scored image
        assert set(rows) <= set(split.train_indices.tolist()), (split.method, split.user, k)
        assert not set(rows) & set(split.test_indices.tolist())
        if batch_size >= k:  # full batch: every step sees all k shots, each once
            per_step = len(rows) // k
            assert per_step >= 1 and len(rows) == per_step * k
            assert sorted(rows) == sorted(split.train_indices.tolist() * per_step)
        checked.append(split.method)

    evaluate(cfg, data, models, seed=3, on_split=on_split)
    assert seen == []
    # 2 test users x 2 shot counts x 2 repeats for each of the two fine-tuned methods
    assert sorted(set(checked)) == ["blg-piaa", "giaa-finetune"] and len(checked) == 16


def test_a_method_outside_the_table_adapts_unless_its_name_says_no_adapt():
    """Custom method names (not in METHODS): ``...-no-adapt`` scores the prior as is, any other
    name is fine-tuned on the shots, like the table's own methods."""
    cfg = _cfg(**{"eval.shots": [5], "eval.repeats": 1, "eval.finetune_steps": 3})
    data = FakeDataset(n_users=4)
    seen: list = []
    model = _watch_training_inputs(_model(cfg, 0), seen)
    trained: dict[str, int] = {}

    def on_split(split):
        trained[split.method] = trained.get(split.method, 0) + len(seen)
        seen.clear()

    evaluate(cfg, data, {"mine": model, "mine-no-adapt": model}, seed=1, on_split=on_split)
    assert trained["mine"] > 0 and trained["mine-no-adapt"] == 0, trained


# ---------------------------------------------------------------------------------------------
# Choosing each method's fine-tuning on validation users (the search), fast: the end-to-end
# checks through the evaluate use-case are in tests/test_baselines.py


#: A small search grid: 3 rates x 2 step counts for a fine-tuned method, 2 ridge penalties.
SEARCH = {"eval.search_sgd_lrs": [0.05, 0.5], "eval.search_adam_lrs": [0.01], "eval.search_steps": [1, 3],
          "eval.search_params": ["head"], "eval.search_ridge": [0.1, 10.0], "eval.search_repeats": 2,
          "eval.shots": [5]}


def test_search_scores_each_candidate_as_evaluate_does_on_the_given_users_and_keeps_the_best():
    """Every candidate's validation score is what :func:`evaluate` reports for that setting on
    the same users, seed and repeats (same splits, same fine-tuning stream, SROCC averaged per
    user then over users); the highest wins, the first of equals in grid order."""
    import hashlib

    from piaa_dist.evaluate import search_finetuning

    cfg = _cfg(**SEARCH)
    data = FakeDataset(n_users=4, n_images=20, seed=5)
    meta, giaa = _model(cfg, 0), _model(cfg, 1)
    val = data.users("train")
    models = {"blg-piaa": meta, "meta-no-adapt": meta, "giaa-ridge": giaa}
    choice = search_finetuning(cfg, data, models, val, seed=3)

    assert choice.source == "search" and choice.protocol == "per-method" and choice.repeats == 2
    assert set(choice.chosen) == {"blg-piaa", "giaa-ridge"}  # meta-no-adapt has nothing to choose
    assert list(choice.grid["blg-piaa"][5]) == [
        f"blg-piaa@5: {opt} lr={lr!r} steps={steps} params=head"
        for opt, lr in (("sgd", 0.05), ("sgd", 0.5), ("adam", 0.01)) for steps in (1, 3)]
    assert list(choice.grid["giaa-ridge"][5]) == ["giaa-ridge@5: penalty=0.1", "giaa-ridge@5: penalty=10.0"]
    for method, by_k in choice.grid.items():
        cands = by_k[5]
        for text, score in cands.items():
            alone = evaluate(with_overrides(cfg, {"eval.finetune": [text]}), data, {method: models[method]},
                             shots=[5], repeats=2, seed=3, users=val)
            assert score == pytest.approx(alone.stats(method, 5).srocc_mean, abs=1e-9), text
        assert len(set(cands.values())) > 1, cands  # the candidates differ: the choice means something
        best = max(cands.values())
        assert choice.chosen[method][5] == next(t for t, v in cands.items() if v == best)
        assert choice.validation_srocc[method][5] == best
    assert choice.validation_users == len(val)
    assert choice.validation_sha256 == hashlib.sha256("\n".join(sorted(val)).encode("utf-8")).hexdigest()


def test_search_plan_explicit_settings_and_with_choice():
    """The search chooses only what the config leaves open: every fine-tuned method under the
    per-method protocol, only the ridge penalty under the shared one; an explicit
    ``eval.finetune`` setting of a method being evaluated is kept as is (no validation score),
    one of a method not evaluated is not reported; ``with_choice`` adds the chosen settings."""
    from piaa_dist.evaluate import search_finetuning, search_plan, with_choice

    methods = ["blg-piaa", "meta-no-adapt", "giaa-finetune", "giaa-no-adapt", "giaa-ridge", "mine"]
    given = ["blg-piaa@10: sgd lr=0.1 steps=2 params=head", "giaa-finetune: adam lr=0.01 steps=2 params=all"]
    cfg = _cfg(**{**SEARCH, "eval.shots": [5, 10], "eval.finetune": given})
    assert search_plan(cfg, methods, [5, 10]) == {"blg-piaa": [5], "giaa-ridge": [5, 10], "mine": [5, 10]}
    shared = with_overrides(cfg, {"eval.protocol": "shared", "eval.finetune": []})
    assert search_plan(shared, methods, [5, 10]) == {"giaa-ridge": [5, 10]}

    data = FakeDataset(n_users=4, n_images=20, seed=5)
    choice = search_finetuning(cfg, data, {"blg-piaa": _model(cfg, 0)}, data.users("train"), seed=3)
    assert set(choice.chosen) == {"blg-piaa"}  # giaa-finetune's setting: not evaluated, not reported
    assert choice.chosen["blg-piaa"][10] == given[0] and choice.validation_srocc["blg-piaa"][10] is None
    searched = choice.chosen["blg-piaa"][5]
    assert searched in choice.grid["blg-piaa"][5] and choice.validation_srocc["blg-piaa"][5] is not None

    chosen_cfg = with_choice(cfg, choice)
    assert list(chosen_cfg.eval.finetune) == [*given, searched]
    assert with_choice(chosen_cfg, choice) is chosen_cfg  # nothing new to add


def test_search_key_is_equal_for_equal_inputs_and_moves_with_each_one():
    """The search cache's key: the same for the same priors (by value), data, validation users
    (in any order), grid, protocol, shots and seed; another for a change in any of them."""
    from piaa_dist.evaluate import search_key

    cfg = _cfg(**SEARCH)
    users = ["U00", "U01"]
    key = search_key(cfg, {"blg-piaa": _model(cfg, 0)}, users, "s3://b/d", [5], 3)
    assert key == search_key(cfg, {"blg-piaa": _model(cfg, 0)}, users[::-1], "s3://b/d", [5], 3)
    changed = [search_key(with_overrides(cfg, {field: value}), {"blg-piaa": _model(cfg, 0)}, users, "s3://b/d",
                          [5], 3)
               for field, value in (("eval.search_ridge", [0.2]), ("eval.search_sgd_lrs", [0.1]),
                                    ("eval.search_adam_lrs", [0.02]), ("eval.search_steps", [2]),
                                    ("eval.search_params", ["all"]), ("eval.protocol", "shared"),
                                    ("eval.search_repeats", 1), ("eval.finetune_bn", "running"),
                                    ("eval.batch_size", 7), ("data.image_size", 24),
                                    ("eval.finetune", ["blg-piaa: sgd lr=0.1 steps=2 params=head"]))]
    changed += [search_key(cfg, {"blg-piaa": _model(cfg, 1)}, users, "s3://b/d", [5], 3),
                search_key(cfg, {"blg-piaa": _model(cfg, 0)}, ["U00"], "s3://b/d", [5], 3),
                search_key(cfg, {"blg-piaa": _model(cfg, 0)}, users, "s3://b/e", [5], 3),
                search_key(cfg, {"blg-piaa": _model(cfg, 0)}, users, "s3://b/d", [6], 3),
                search_key(cfg, {"blg-piaa": _model(cfg, 0)}, users, "s3://b/d", [5], 4)]
    assert len({key, *changed}) == 1 + len(changed)


def test_a_user_with_exactly_k_plus_three_ratings_is_scored_and_one_fewer_is_skipped():
    """A split needs 3 test images: k + 3 ratings are enough for k shots, k + 2 are not."""
    cfg = _cfg(**{"eval.shots": [5, 6], "eval.repeats": 1})
    data = FakeDataset(n_users=4, n_images=8)
    res = evaluate(cfg, data, {"blg-piaa": _model(cfg)})
    assert set(res.methods["blg-piaa"]) == {5} and res.methods["blg-piaa"][5].n_users == 2
    assert res.skipped == {5: (), 6: tuple(data.users("test"))}


def test_merging_outcomes_names_what_does_not_match():
    """``merge_outcomes`` refuses outcomes that do not match the users, naming the missing and
    unexpected ones, and says so when no user had enough ratings for any k."""
    from piaa_dist.evaluate import evaluate_users, merge_outcomes

    cfg = _cfg(**{"eval.shots": [5], "eval.repeats": 1})
    data = FakeDataset(n_users=4, n_images=8)
    models = {"blg-piaa": _model(cfg)}
    users = data.users("test")
    outcomes = evaluate_users(cfg, data, models, users, shots=[5], repeats=1, seed=0)
    kw = dict(methods=["blg-piaa"], shots=[5], repeats=1, seed=0)
    with pytest.raises(ValueError, match=rf"missing \['{users[1]}'\], unexpected \[\]"):
        merge_outcomes(cfg, outcomes[:1], users=users, **kw)
    with pytest.raises(ValueError, match=rf"missing \[\], unexpected \['{users[1]}'\]"):
        merge_outcomes(cfg, outcomes, users=users[:1], **kw)
    too_few = evaluate_users(cfg, data, models, users, shots=[6], repeats=1, seed=0)
    with pytest.raises(ValueError, match=r"none of the 2 users has enough ratings for shots \[6\]"):
        merge_outcomes(cfg, too_few, users=users, **{**kw, "shots": [6]})


class _TwoLevels(torch.nn.Module):
    """Predicts exactly 0 or 1 (bright images 1): a ranking with a spread of exactly 1.0."""

    def __init__(self, model):
        super().__init__()
        # the model's parts, so that the budget's rule finds a head; the forward ignores them
        self.backbone, self.head = model.backbone, model.head

    def forward(self, images):
        return (images.mean(dim=(1, 2, 3)) > 0).float()


class _Constant(_TwoLevels):
    def forward(self, images):
        return torch.full((images.shape[0],), 0.6)


def test_only_constant_predictions_are_degenerate():
    """A split's predictions are degenerate (SROCC and PLCC 0) when they carry no ranking
    (constant); predictions on two levels 1.0 apart do rank and are scored."""
    from piaa_dist.metrics import plcc

    cfg = _cfg(**{"eval.shots": [5], "eval.repeats": 1})
    data = FakeDataset(n_users=4, n_images=30)
    splits = []
    res = evaluate(cfg, data, {"two-no-adapt": _TwoLevels(_model(cfg))}, on_split=splits.append)
    assert splits and all(np.ptp(s.predictions) == 1.0 for s in splits)
    assert res.methods["two-no-adapt"][5].degenerate == 0
    for s in splits:
        observed = np.asarray(data.load_user(s.user).scores, dtype=np.float64)[s.test_indices]
        got = res.methods["two-no-adapt"][5]
        assert got.per_user[s.user] == pytest.approx(spearmanr(s.predictions, observed)[0])
        assert got.per_user_plcc[s.user] == pytest.approx(float(plcc(s.predictions, observed)))
    flat = evaluate(cfg, data, {"flat-no-adapt": _Constant(_model(cfg))}).methods["flat-no-adapt"][5]
    assert flat.degenerate == len(splits) and flat.srocc_mean == flat.plcc_mean == 0.0
