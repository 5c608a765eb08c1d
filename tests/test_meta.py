"""Property tests of the bilevel meta-learning math (closed forms, `higher`, hand-built refs)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from piaa_dist.config import MetaConfig, ModelConfig
from piaa_dist.meta import (
    adapt,
    apply_buffer_update,
    loss_fn,
    meta_gradient,
    meta_kwargs,
    predict,
)
from piaa_dist.model import build_model, head_names

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _task(gen: torch.Generator, shots: int, query: int, shape: tuple[int, ...]) -> SimpleNamespace:
    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, *shape, generator=gen, dtype=DT), torch.rand(n, generator=gen, dtype=DT)

    return SimpleNamespace(support=batch(shots), query=batch(query))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_buffers())


# ---------------------------------------------------------------------------------------------
# Linear regression with MSE: everything has a closed form.


class LinReg(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze(-1)


def _design(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=DT)], dim=1)  # θ = [w, b]


def _grad(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a = _design(x)
    return 2.0 / len(y) * a.T @ (a @ theta - y)


def _hess(x: torch.Tensor) -> torch.Tensor:
    a = _design(x)
    return 2.0 / a.shape[0] * a.T @ a


def _sgd(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: float, k: int) -> torch.Tensor:
    for _ in range(k):
        theta = theta - lr * _grad(theta, x, y)
    return theta


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d["lin.weight"].reshape(-1), d["lin.bias"].reshape(-1)])


@pytest.fixture()
def linreg():
    torch.manual_seed(0)
    d = 5
    model = LinReg(d).to(DT)
    gen = torch.Generator().manual_seed(1)
    tasks = [_task(gen, 8, 12, (d,)) for _ in range(3)]
    return model, tasks


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_matches_closed_form_linear_regression(linreg, steps):
    model, tasks = linreg
    lr = 0.1
    theta = _flat(_params(model)).detach()
    expected = torch.zeros_like(theta)
    for t in tasks:
        (xs, ys), (xq, yq) = t.support, t.query
        adapted = _sgd(theta, xs, ys, lr, steps)
        jac = torch.linalg.matrix_power(torch.eye(len(theta), dtype=DT) - lr * _hess(xs), steps)
        expected += jac @ _grad(adapted, xq, yq)  # (I − αH_s)^K ∇L_q(θ_K); H_s is constant
    mg = meta_gradient(model, _params(model), _buffers(model), tasks, flavour="second_order",
                       steps=steps, inner_lr=lr, optimizer="sgd")
    assert mg.n_tasks == 3
    torch.testing.assert_close(_flat(mg.grads), expected, rtol=1e-10, atol=1e-12)
    # The losses are sums of per-task means.
    q = sum(F.mse_loss(_design(t.query[0]) @ _sgd(theta, *t.support, lr, steps), t.query[1])
            for t in tasks)
    s = sum(F.mse_loss(_design(t.support[0]) @ theta, t.support[1]) for t in tasks)
    assert mg.query_loss == pytest.approx(float(q), rel=1e-12)
    assert mg.support_loss == pytest.approx(float(s), rel=1e-12)


def test_first_order_and_reptile_match_hand_built_linear_regression(linreg):
    model, tasks = linreg
    lr, steps = 0.1, 2
    theta = _flat(_params(model)).detach()
    fo = torch.zeros_like(theta)
    rep = torch.zeros_like(theta)
    for t in tasks:
        (xs, ys), (xq, yq) = t.support, t.query
        adapted = _sgd(theta, xs, ys, lr, steps)
        fo += _grad(adapted, xq, yq)
        rep += theta - _sgd(adapted, xq, yq, lr, steps)  # support steps, then query steps
    kw = dict(steps=steps, inner_lr=lr, optimizer="sgd")
    mg_fo = meta_gradient(model, _params(model), _buffers(model), tasks, flavour="first_order", **kw)
    mg_rep = meta_gradient(model, _params(model), _buffers(model), tasks, flavour="reptile", **kw)
    torch.testing.assert_close(_flat(mg_fo.grads), fo, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(mg_rep.grads), rep, rtol=1e-10, atol=1e-12)


def test_reptile_sgd_lr_one_reproduces_reference_move(linreg):
    """meta − 1.0 · mean_i(meta − θ_i) == meta + Σ_i (θ_i − meta) / meta_batch."""
    model, tasks = linreg
    lr, steps = 0.05, 3
    theta = _flat(_params(model)).detach()
    mg = meta_gradient(model, _params(model), _buffers(model), tasks, flavour="reptile",
                       steps=steps, inner_lr=lr)
    finals = [_sgd(_sgd(theta, *t.support, lr, steps), *t.query, lr, steps) for t in tasks]
    ref = theta + sum((f - theta) / len(tasks) for f in finals)
    torch.testing.assert_close(theta - 1.0 * _flat(mg.grads) / mg.n_tasks, ref)


def _adam_ref(theta, x, y, lr, k, state=None):
    """Plain torch.optim.Adam on the closed-form gradient: the functional Adam's reference."""
    p = theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    if state is not None:
        opt.load_state_dict(state)
    for _ in range(k):
        opt.zero_grad()
        p.grad = _grad(p.detach(), x, y)
        opt.step()
    return p.detach(), opt.state_dict()


def test_functional_adam_matches_torch_adam_and_reptile_keeps_state(linreg):
    model, tasks = linreg
    lr, steps = 0.01, 3
    theta = _flat(_params(model)).detach()
    t = tasks[0]
    adapted = adapt(model, _params(model), _buffers(model), t.support, steps=steps, inner_lr=lr,
                    optimizer="adam")
    ref, state = _adam_ref(theta, *t.support, lr, steps)
    torch.testing.assert_close(_flat(adapted).detach(), ref, rtol=1e-9, atol=1e-12)
    # Reptile with Adam: the query steps continue the support steps' Adam state.
    final, _ = _adam_ref(ref, *t.query, lr, steps, state)
    mg = meta_gradient(model, _params(model), _buffers(model), [t], flavour="reptile",
                       steps=steps, inner_lr=lr, optimizer="adam")
    torch.testing.assert_close(_flat(mg.grads), theta - final, rtol=1e-9, atol=1e-12)


def test_second_order_adam_matches_finite_differences(linreg):
    """d/dθ L_q(Adam^K(θ; support)), torch.optim.Adam as the independent forward reference."""
    model, tasks = linreg
    lr, steps = 0.05, 3
    t = tasks[0]
    theta = _flat(_params(model)).detach()

    def outer(th: torch.Tensor) -> float:
        adapted, _ = _adam_ref(th, *t.support, lr, steps)
        return float(F.mse_loss(_design(t.query[0]) @ adapted, t.query[1]))

    h = 1e-6
    numeric = torch.stack([
        torch.tensor((outer(theta + h * e) - outer(theta - h * e)) / (2 * h), dtype=DT)
        for e in torch.eye(len(theta), dtype=DT)
    ])
    mg = meta_gradient(model, _params(model), _buffers(model), [t], flavour="second_order",
                       steps=steps, inner_lr=lr, optimizer="adam")
    torch.testing.assert_close(_flat(mg.grads), numeric, rtol=1e-6, atol=1e-8)
    # ... and it is not the first-order one: the Adam Jacobian matters.
    fo = meta_gradient(model, _params(model), _buffers(model), [t], flavour="first_order",
                       steps=steps, inner_lr=lr, optimizer="adam")
    assert not torch.allclose(_flat(fo.grads), numeric, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# A small CNN with BatchNorm (train mode), against `higher`.


def _small_cnn(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="convnet", pretrained="none", width=4, conv_blocks=2,
                      feature_dim=6, head_hidden=(5,), dropout=dropout)
    return build_model(cfg).to(DT)


def _cnn_tasks(n: int = 2, shots: int = 6, query: int = 8) -> list[SimpleNamespace]:
    gen = torch.Generator().manual_seed(2)
    return [_task(gen, shots, query, (3, 12, 12)) for _ in range(n)]


def _higher_meta_grad(model: nn.Module, tasks, *, steps: int, lr: float, optimizer: str):
    higher = pytest.importorskip("higher")
    net = copy.deepcopy(model).train()
    assert optimizer == "sgd"
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    total = [torch.zeros_like(p) for p in net.parameters()]
    for t in tasks:
        with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(F.mse_loss(fnet(t.support[0]), t.support[1]))
            q = F.mse_loss(fnet(t.query[0]), t.query[1])
            grads = torch.autograd.grad(q, list(net.parameters()))
        total = [a + g for a, g in zip(total, grads)]
    return dict(zip([n for n, _ in net.named_parameters()], total))


def test_second_order_matches_higher_on_small_cnn():
    # SGD only: higher's DifferentiableAdam uses the pre-1.6 torch Adam (eps added to sqrt(v)
    # before bias correction), and Adam's second derivative is dominated by eps, so the two
    # conventions differ by design. Our functional Adam follows today's torch.optim.Adam and
    # is checked against it (values) and against finite differences (second order) below.
    model = _small_cnn()
    tasks = _cnn_tasks()
    expected = _higher_meta_grad(model, tasks, steps=3, lr=0.1, optimizer="sgd")
    mg = meta_gradient(model, _params(model), _buffers(model), tasks, flavour="second_order",
                       steps=3, inner_lr=0.1, optimizer="sgd")
    assert set(mg.grads) == set(expected)
    for name in expected:
        torch.testing.assert_close(mg.grads[name], expected[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_first_order_on_cnn_is_query_gradient_at_adapted_params():
    model = _small_cnn()
    tasks = _cnn_tasks()
    params, buffers = _params(model), _buffers(model)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in tasks:
        adapted = adapt(model, params, buffers, t.support, steps=2, inner_lr=0.1)
        leaves = {n: p.detach().requires_grad_(True) for n, p in adapted.items()}
        fresh = {n: b.clone() for n, b in buffers.items()}
        model.train()  # the query loss uses batch statistics, as in meta_gradient
        q = loss_fn(model, leaves, fresh, t.query)
        for n, g in zip(leaves, torch.autograd.grad(q, list(leaves.values()))):
            expected[n] += g
    mg = meta_gradient(model, params, buffers, tasks, flavour="first_order", steps=2,
                       inner_lr=0.1)
    for n in expected:
        torch.testing.assert_close(mg.grads[n], expected[n], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Inner loop properties


def test_inner_steps_lower_support_loss():
    model = _small_cnn()
    t = _cnn_tasks(1)[0]
    params, buffers = _params(model), _buffers(model)
    model.train()
    losses = []
    current = params
    for _ in range(4):
        fresh = {n: b.clone() for n, b in buffers.items()}
        losses.append(float(loss_fn(model, current, fresh, t.support).detach()))
        current = adapt(model, current, buffers, t.support, steps=1, inner_lr=0.05)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_adapt_names_leaves_others_untouched_but_differentiable():
    model = _small_cnn()
    t = _cnn_tasks(1)[0]
    params, buffers = _params(model), _buffers(model)
    heads = head_names(model)
    assert heads and all(n.startswith("head.") for n in heads)
    adapted = adapt(model, params, buffers, t.support, steps=2, inner_lr=0.1, adapt_names=heads,
                    create_graph=True)
    for n in params:
        if n in heads:
            assert not torch.equal(adapted[n], params[n]), n
        else:
            assert adapted[n] is params[n], n
    # Second-order, head-only: the backbone still gets a meta-gradient (through the features
    # the inner loop saw), and it differs from the first-order one.
    kw = dict(steps=2, inner_lr=0.1, adapt_names=heads)
    so = meta_gradient(model, params, buffers, [t], flavour="second_order", **kw)
    fo = meta_gradient(model, params, buffers, [t], flavour="first_order", **kw)
    rep = meta_gradient(model, params, buffers, [t], flavour="reptile", **kw)
    name = "backbone.fc.weight"
    assert so.grads[name].abs().sum() > 0
    assert not torch.allclose(so.grads[name], fo.grads[name])
    assert torch.count_nonzero(rep.grads[name]) == 0  # reptile: not adapted → no move
    with pytest.raises(ValueError, match="adapt_names"):
        adapt(model, params, buffers, t.support, steps=1, inner_lr=0.1, adapt_names={"nope"})


def test_meta_gradient_has_no_side_effects():
    model = _small_cnn(dropout=0.3)
    model.eval()
    before_p = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_b = {n: b.clone() for n, b in model.named_buffers()}
    meta_gradient(model, _params(model), _buffers(model), _cnn_tasks(), flavour="second_order",
                  steps=2, inner_lr=0.1, seeds=[0, 1])
    assert not model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before_p[n])
    for n, b in model.named_buffers():
        assert torch.equal(b, before_b[n]), n


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics and determinism across a split meta-batch


def test_buffer_update_is_ema_of_task_averaged_query_statistics():
    model = _small_cnn()
    params, buffers = _params(model), _buffers(model)
    tasks = _cnn_tasks(3)
    heads = head_names(model)
    # Head-only adaptation: the first BN layer sees conv1(x_query) with the meta conv weights.
    mg = meta_gradient(model, params, buffers, tasks, flavour="first_order", steps=2,
                       inner_lr=0.1, adapt_names=heads)
    conv = params["backbone.features.0.weight"].detach()
    means, variances = [], []
    for t in tasks:
        z = F.conv2d(t.query[0], conv, padding=1)
        means.append(z.mean(dim=(0, 2, 3)))
        variances.append(z.var(dim=(0, 2, 3), unbiased=True))
    m = 0.1  # nn.BatchNorm2d's default momentum
    r_mean = buffers["backbone.features.1.running_mean"]
    r_var = buffers["backbone.features.1.running_var"]
    exp_mean = (1 - m) * r_mean + m * torch.stack(means).mean(0)
    exp_var = (1 - m) * r_var + m * torch.stack(variances).mean(0)
    assert "backbone.features.1.num_batches_tracked" not in mg.buffers
    apply_buffer_update(model, mg.buffers, mg.n_tasks)
    torch.testing.assert_close(model.backbone.features[1].running_mean, exp_mean)
    torch.testing.assert_close(model.backbone.features[1].running_var, exp_var)
    assert int(model.backbone.features[1].num_batches_tracked) == 1


@pytest.mark.parametrize("flavour", ["second_order", "first_order", "reptile"])
def test_split_meta_batch_equals_whole_with_seeded_dropout(flavour):
    """1 worker on 4 tasks == 2 'ranks' on tasks[0::2] and tasks[1::2], summed."""
    model = _small_cnn(dropout=0.5)
    params, buffers = _params(model), _buffers(model)
    tasks = _cnn_tasks(4)
    seeds = [11, 12, 13, 14]
    kw = dict(flavour=flavour, steps=2, inner_lr=0.05, optimizer="sgd")
    whole = meta_gradient(model, params, buffers, tasks, seeds=seeds, **kw)
    again = meta_gradient(model, params, buffers, tasks, seeds=seeds, **kw)
    r0 = meta_gradient(model, params, buffers, tasks[0::2], seeds=seeds[0::2], **kw)
    r1 = meta_gradient(model, params, buffers, tasks[1::2], seeds=seeds[1::2], **kw)
    for n in whole.grads:
        assert torch.equal(whole.grads[n], again.grads[n])  # bitwise deterministic
        torch.testing.assert_close(r0.grads[n] + r1.grads[n], whole.grads[n], rtol=1e-12,
                                   atol=1e-14)
    for n in whole.buffers:
        torch.testing.assert_close(r0.buffers[n] + r1.buffers[n], whole.buffers[n])
    assert r0.n_tasks + r1.n_tasks == whole.n_tasks
    assert r0.query_loss + r1.query_loss == pytest.approx(whole.query_loss, rel=1e-12)
    # Dropout is really on: other seeds give another gradient.
    other = meta_gradient(model, params, buffers, tasks, seeds=[1, 2, 3, 4], **kw)
    assert not torch.equal(other.grads["head.mlp.0.weight"], whole.grads["head.mlp.0.weight"])


def test_meta_kwargs_and_predict():
    model = _small_cnn()
    cfg = MetaConfig(inner_params="head", inner_head_lr_scale=10.0, inner_lr=0.01)
    kw = meta_kwargs(model, cfg)
    assert kw["adapt_names"] == head_names(model)
    assert kw["inner_lr"]["head.mlp.0.weight"] == pytest.approx(0.1)
    assert kw["inner_lr"]["backbone.fc.weight"] == pytest.approx(0.01)
    t = _cnn_tasks(1)[0]
    out = predict(model, _params(model), _buffers(model), t.query[0], batch_size=3)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model(t.query[0]))
    with pytest.raises(ValueError, match="flavour"):
        meta_gradient(model, _params(model), _buffers(model), [t], flavour="maml++", steps=1,
                      inner_lr=0.1)


def test_adapt_is_first_order_unless_asked(linreg):
    """By default the adapted parameters depend on the meta parameters with Jacobian I (the
    inner gradients are constants); create_graph=True gives the unrolled (I - lr H)^K."""
    model, tasks = linreg
    lr, steps = 0.1, 2
    xs = tasks[0].support[0]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in _params(model).items()}
    v = torch.arange(1.0, 7.0, dtype=DT)  # a direction in θ = [w (5), b]
    jac = torch.linalg.matrix_power(torch.eye(6, dtype=DT) - lr * _hess(xs), steps)
    for kwargs, expected in (({}, v), ({"create_graph": True}, jac.T @ v)):
        adapted = adapt(model, params, _buffers(model), tasks[0].support, steps=steps, inner_lr=lr,
                        **kwargs)
        grads = torch.autograd.grad(_flat(adapted) @ v, [params["lin.weight"], params["lin.bias"]])
        torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads]), expected,
                                   rtol=1e-10, atol=1e-12)


def test_grad_norm_is_the_global_l2_norm():
    from piaa_dist.meta import grad_norm

    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]], dtype=torch.float64)}
    assert grad_norm(grads) == pytest.approx(5.0, rel=1e-15)
    assert grad_norm({}) == 0.0
