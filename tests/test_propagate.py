"""torchbridge.output_moments and layer-wise propagation (torchbridge.propagate)."""

from __future__ import annotations

import warnings

import pytest
import torch
from standins import tiny_net
from torch import nn
from torch.nn import functional as F

import torchbridge as tb
from torchbridge.propagate import NotPiecewiseLinearError, UntraceableModelError, trace
from torchbridge.propagate.lowering import commute_relu_max_pool
from torchbridge.propagate.pooling import adaptive_max_pool_windows, max_pool_windows

D = torch.float64


def _ara(seed: int = 0, n: int = 6, p: int = 9, d: int = 4):
    gen = torch.Generator().manual_seed(seed)
    A, c1 = torch.randn(p, n, generator=gen, dtype=D), torch.randn(p, generator=gen, dtype=D)
    B, c2 = torch.randn(d, p, generator=gen, dtype=D), torch.randn(d, generator=gen, dtype=D)
    net = nn.Sequential(nn.Linear(n, p), nn.ReLU(), nn.Linear(p, d)).to(D).eval()
    with torch.no_grad():
        net[0].weight.copy_(A), net[0].bias.copy_(c1), net[2].weight.copy_(B), net[2].bias.copy_(c2)
    L = torch.randn(n, n, generator=gen, dtype=D)
    return net, tb.AffineReLUAffine(A, c1, B, c2), torch.randn(n, generator=gen, dtype=D), L @ L.T


def test_top_level_names():
    for name in ("relu_moments", "AffineReLUAffine", "two_stage_linearize", "monte_carlo_moments"):
        assert callable(getattr(tb, name))


@pytest.mark.parametrize("cov_kind", ["full", "diag", "scalar"])
def test_affine_relu_affine_equals_theorem1_exact_variance(cov_kind):
    """Bar: propagation through (Affine, ReLU, Affine) equals AffineReLUAffine.moments to 1e-12."""
    net, g, mu, S = _ara()
    cov = {"full": S, "diag": S.diagonal().clone(), "scalar": torch.tensor(0.3, dtype=D)}[cov_kind]
    m_ref, C_ref = g.moments(mu, cov, full=True)
    out = tb.output_moments(net, mu[None], cov, full=True)
    assert ((out.mean[0] - m_ref).abs() / m_ref.abs()).max() <= 1e-12
    assert ((out.cov[0] - C_ref).abs() / C_ref.abs()).max() <= 1e-12
    _, var = tb.output_moments(net, mu[None], cov)
    assert ((var[0] - C_ref.diagonal()).abs() / C_ref.diagonal()).max() <= 1e-12


def test_one_relu_layer_is_exact_in_every_representation():
    """With one ReLU last, the marginal variances are exact in full, low-rank and diagonal form."""
    net, _, mu, S = _ara()
    net = net[:2]
    ref = tb.relu_moments(mu @ net[0].weight.T + net[0].bias, net[0].weight @ S @ net[0].weight.T)
    for cov in ("full", "lowrank", "diagonal"):
        out = tb.output_moments(net, mu[None], S, options=tb.PropagateOptions(covariance=cov))
        torch.testing.assert_close(out.mean[0], ref[0], rtol=1e-13, atol=0)
        torch.testing.assert_close(out.var[0], ref[1].diagonal(), rtol=1e-12, atol=0)


class Residual(nn.Module):
    """A plain nn.Module: conv, functional ReLU, skip addition, flatten by a method call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 5 * 5, 3)

    def forward(self, x):
        h = x + F.relu(self.conv(x)).sum(1, keepdim=True)
        return self.fc(torch.cat([h, -h], 1).view(x.size(0), -1))


def test_residual_module_accepted_and_exact_against_monte_carlo():
    """One ReLU stage plus a skip path: propagation is exact (Stein cross-covariance), so it
    must agree with Monte Carlo within 5 standard errors."""
    model = Residual().double().eval()
    x = torch.rand(1, 1, 5, 5, dtype=D)
    out = tb.output_moments(model, x, 0.04)
    mc = tb.output_moments(
        model, x, 0.04, method="montecarlo", options=tb.MonteCarloOptions(samples=40_000)
    )
    assert ((out.mean - mc.mean).abs() <= 5 * mc.mean_se).all()
    assert ((out.var - mc.var).abs() <= 5 * mc.var_se).all()


def test_batch_and_float32():
    net = tiny_net().double()
    x = torch.rand(2, 1, 8, 8, dtype=D)
    both = tb.output_moments(net, x, 0.01)
    for b in range(2):
        one = tb.output_moments(net, x[b : b + 1], 0.01)
        torch.testing.assert_close(both.mean[b], one.mean[0], rtol=0, atol=0)
        torch.testing.assert_close(both.var[b], one.var[0], rtol=0, atol=0)
    f32 = tb.output_moments(tiny_net(), x.float(), 0.01)
    assert f32.mean.dtype == torch.float32
    torch.testing.assert_close(f32.var.double(), both.var, rtol=1e-4, atol=1e-7)


def test_linearize_on_graph_equals_two_stage_linearize():
    net = tiny_net().double()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    x = torch.rand(1, 1, 8, 8, dtype=D)
    for idx in (0, -1):
        seq = tb.output_moments(net, x, 0.01, method="linearize", relu_index=idx)
        graph = tb.output_moments(Wrapped().eval(), x, 0.01, method="linearize", relu_index=idx)
        torch.testing.assert_close(graph.mean, seq.mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(graph.var, seq.var, rtol=1e-10, atol=1e-16)
    by_name = tb.output_moments(Wrapped().eval(), x, 0.01, method="linearize", relu_index="net.5")
    torch.testing.assert_close(by_name.var, seq.var, rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize(
    ("act", "name"),
    [(nn.GELU(), "GELU"), (nn.Sigmoid(), "Sigmoid"), (lambda x: F.softmax(x, 1), "softmax")],
)
def test_non_piecewise_linear_refused_with_its_name(act, name):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = act if isinstance(act, nn.Module) else None

        def forward(self, x):
            h = self.fc(x)
            return self.act(h) if self.act is not None else act(h)

    with pytest.raises(NotPiecewiseLinearError, match=name):
        tb.output_moments(M().eval(), torch.zeros(1, 4), 0.1)


def test_product_of_random_tensors_refused():
    class M(nn.Module):
        def forward(self, x):
            return x * x

    with pytest.raises(NotPiecewiseLinearError, match="multiplies two random"):
        tb.output_moments(M(), torch.zeros(1, 3), 0.1)


def test_data_dependent_control_flow_refused():
    class M(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UntraceableModelError, match="control flow"):
        tb.output_moments(M(), torch.zeros(1, 3), 0.1)


def test_argument_errors():
    net = tiny_net()
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="method"):
        tb.output_moments(net, x, 0.1, method="magic")
    with pytest.raises(ValueError, match="batch"):
        tb.output_moments(net, x[0, 0, 0], 0.1)
    with pytest.raises(ValueError, match="cov has shape"):
        tb.output_moments(net, x, torch.ones(5))
    with pytest.raises(ValueError, match="covariance must be"):
        tb.PropagateOptions(covariance="sparse")
    with pytest.raises(NotPiecewiseLinearError, match=r"Dropout.*training mode"):
        tb.output_moments(nn.Sequential(nn.Dropout(0.5)).train(), x, 0.1)


def test_montecarlo_method_returns_standard_errors():
    net = tiny_net()
    out = tb.output_moments(
        net,
        torch.rand(2, 1, 8, 8),
        0.01,
        method="montecarlo",
        options=tb.MonteCarloOptions(samples=2000, groups=4),
    )
    assert out.mean.shape == out.mean_se.shape == out.var_se.shape == (2, 3)
    assert (out.mean_se > 0).all() and (out.var_se > 0).all()


@pytest.mark.parametrize(
    ("shape", "k", "s", "p", "d", "ceil"),
    [
        ((1, 3, 8, 8), 2, 2, 0, 1, False),
        ((1, 2, 7, 9), 3, 2, 1, 1, True),
        ((1, 2, 7, 9), (3, 2), (2, 1), (1, 0), (1, 2), False),
    ],
)
def test_max_pool_windows_match_torch(shape, k, s, p, d, ceil):
    x = torch.randn(shape)
    ref = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil)
    got = x.reshape(-1)[max_pool_windows(shape, k, s, p, d, ceil)].amax(0)
    assert torch.equal(got.reshape(ref.shape), ref)
    ref = F.adaptive_max_pool2d(x, (3, 2))
    got = x.reshape(-1)[adaptive_max_pool_windows(shape, (3, 2))].amax(0)
    assert torch.equal(got.reshape(ref.shape), ref)


def test_relu_max_pool_commutation_keeps_the_function():
    net = tiny_net()
    gm = commute_relu_max_pool(trace(net))
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(gm(x), net(x))
    ops = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert ops.index("2") < ops.index("1")  # the pool now runs before the ReLU


def test_max_of_two_pair_is_exact_against_monte_carlo():
    """max(a, b) of a correlated pair through a 2×2 max-pool with one window of 2 elements."""
    model = nn.Sequential(nn.MaxPool1d(2)).eval()
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=D)
    x = torch.tensor([[[0.2, -0.1]]], dtype=D)
    out = tb.output_moments(model, x, cov)
    mc = tb.output_moments(
        model, x, cov, method="montecarlo", options=tb.MonteCarloOptions(samples=100_000)
    )
    assert abs(out.mean - mc.mean).item() <= 5 * mc.mean_se.item()
    assert abs(out.var - mc.var).item() <= 5 * mc.var_se.item()


def test_max_pool_pairing_puts_near_identical_elements_together():
    """Window [a, c, b, d] with b ≈ a (correlation 0.999), c and d independent: the adaptive
    pairing sends (a, b) to one pair — max(a, b) ≈ a is nearly Gaussian — and (c, d) to the
    other; the same rule on a window already in that order keeps it."""
    from torchbridge.propagate.state import _pair_window

    cov = torch.eye(4, dtype=D)
    cov[0, 2] = cov[2, 0] = 0.999
    mu = torch.zeros(1, 4, dtype=D)
    F = torch.arange(4, dtype=D).reshape(1, 4, 1)
    _, S2, F2, _ = _pair_window(mu, cov[None], F, None)
    pairs = {frozenset(F2[0, :2, 0].tolist()), frozenset(F2[0, 2:, 0].tolist())}
    assert pairs == {frozenset({0.0, 2.0}), frozenset({1.0, 3.0})}
    assert torch.equal(S2[0, 0, 1], cov[0, 2])


@pytest.mark.parametrize("pairing", ["adaptive", "fixed"])
def test_factor_form_max_pool_has_the_full_trees_marginals(pairing):
    """In the diagonal-plus-low-rank form a max-pooling window is evaluated with its own
    covariance held in full, so on a Gaussian input each pooled unit's mean and variance equal
    the full-covariance tree's (only cross-window residual covariances are dropped)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.MaxPool2d(2)).to(D).eval()
    x = torch.randn(1, 1, 6, 6, dtype=D)
    opts = {c: tb.PropagateOptions(covariance=c, pool_pairing=pairing) for c in ("full", "lowrank")}
    full = tb.output_moments(model, x, 0.3, options=opts["full"])
    low = tb.output_moments(model, x, 0.3, options=opts["lowrank"])
    torch.testing.assert_close(low.mean, full.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(low.var, full.var, rtol=1e-12, atol=0)


def test_demo_shows_propagation(monkeypatch, tmp_path):
    from test_demo import _run

    argv = ["--skip-verify", "--skip-attacks", "--images", "1", "--samples", "4000"]
    report = _run(monkeypatch, tmp_path, argv)
    (rec,) = report["propagation"]["images"]
    assert 0 <= rec["er_var"] < 0.2 and 0 <= rec["er_mean"] < 0.2
    assert "layer-wise propagation" in (tmp_path / "demo.md").read_text()


class AllLinear(nn.Module):
    """Every supported linear layer, no nonlinearity: the output covariance is J Σ Jᵀ."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.up = nn.ConvTranspose2d(3, 2, 2, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.apool = nn.AdaptiveAvgPool2d((3, 2))
        self.conv1d = nn.Conv1d(2, 2, 3)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.pool(self.up(self.bn(self.conv(x))))  # (1, 2, 5, 5)
        h = self.apool(F.pad(h, (1, 0, 0, 1)))  # (1, 2, 3, 2): non-uniform windows
        h = self.conv1d(h.flatten(2)) * 0.5 - 1.0  # (1, 2, 4)
        return self.fc(self.drop(torch.flatten(h, 1)))


@pytest.mark.parametrize("covariance", ["full", "lowrank"])
def test_linear_layers_exact(covariance):
    model = AllLinear().double().eval()
    x = torch.rand(1, 2, 5, 5, dtype=D)
    var = torch.rand(50, dtype=D) + 0.1  # diagonal input covariance
    J = torch.autograd.functional.jacobian(lambda v: model(v.reshape(1, 2, 5, 5))[0], x.flatten())
    ref = (J * var) @ J.T
    opts = tb.PropagateOptions(covariance=covariance)
    out = tb.output_moments(model, x, var, options=opts, full=True)
    torch.testing.assert_close(out.mean[0], model(x)[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.var[0], ref.diagonal(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.cov[0], ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5)),
        (nn.ConvTranspose2d(2, 2, 2, stride=2), (2, 3, 3)),
        (nn.AvgPool2d(2), (2, 4, 4)),
        (nn.AvgPool2d(3, stride=2, padding=1), (2, 5, 5)),  # by columns
        (nn.AdaptiveAvgPool2d((3, 2)), (2, 6, 5)),
        (nn.Conv1d(2, 2, 3), (2, 6)),
        (nn.Linear(6, 3), (6,)),
        (nn.BatchNorm1d(6), (6,)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_diagonal_adf_one_linear_layer_exact(layer, shape):
    """ADF's variance map (squared weights, or column by column) is exact for one layer with
    a diagonal input covariance (across layers ADF drops the covariances, by design)."""
    torch.manual_seed(4)
    model = layer.double().eval()
    if isinstance(model, nn.BatchNorm1d):
        with torch.no_grad():
            model.running_var.uniform_(0.5, 2)
            model.weight.uniform_(0.5, 1.5)
    x = torch.rand(1, *shape, dtype=D)
    n = x.numel()
    var = torch.rand(n, dtype=D) + 0.1
    J = torch.autograd.functional.jacobian(lambda v: model(v.reshape(x.shape))[0], x.flatten())
    J = J.reshape(-1, n)
    opts = tb.PropagateOptions(covariance="diagonal")
    out = tb.output_moments(model, x, var, options=opts)
    torch.testing.assert_close(out.var[0], (J * J) @ var, rtol=1e-12, atol=1e-15)


def test_additive_forms_exact():
    """x.sub(y), 1 − x, torch.add(x, y, alpha=2), -x, x / 4, constant @ x: linear, so the output
    covariance is J Σ Jᵀ."""

    class M(nn.Module):
        def forward(self, x):
            a, b = x[:, :3], x[:, 3:]
            c = torch.add(a.sub(b), 1 - b, alpha=2.0) - (-a) / 4
            return torch.cat([c, a @ torch.arange(6.0, dtype=x.dtype).reshape(3, 2)], 1)

    model = M()
    x = torch.rand(1, 6, dtype=D)
    L = torch.randn(6, 6, dtype=D)
    S = L @ L.T
    J = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], x[0])
    out = tb.output_moments(model, x, S, full=True)
    torch.testing.assert_close(out.mean[0], model(x)[0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out.cov[0], J @ S @ J.T, rtol=1e-12, atol=1e-13)


def test_torchscript_refused():
    with warnings.catch_warnings():  # torch.jit.script is deprecated, still in use
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UntraceableModelError, match="TorchScript"):
        tb.output_moments(scripted, torch.zeros(1, 2), 0.1)


def test_differentiable_moments_match_affine_relu_affine_gradients():
    """With differentiable=True the output variance is differentiable w.r.t. the model's
    parameters; its gradient equals autograd through AffineReLUAffine.moments."""
    net, _, mu, S = _ara()
    opts = tb.PropagateOptions(differentiable=True)
    tb.output_moments(net, mu[None], S, options=opts).var.sum().backward()
    got = net[0].weight.grad.clone()
    A = net[0].weight.detach().clone().requires_grad_(True)
    g = tb.AffineReLUAffine(A, net[0].bias.detach(), net[2].weight.detach(), net[2].bias.detach())
    g.moments(mu, S)[1].sum().backward()
    torch.testing.assert_close(got, A.grad, rtol=1e-10, atol=1e-12)
    assert not tb.output_moments(net, mu[None], S).var.requires_grad  # default: no graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("covariance", ["auto", "lowrank", "diagonal"])
def test_cuda_path_matches_cpu(covariance):
    """The same propagation on a CUDA device (float64) equals the CPU's to rounding, with the
    windowed max-pool, conv, ReLU and linear layers; float32 on the device runs and is close."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5)
    )
    model = model.to(D).eval()
    x = torch.rand(2, 1, 8, 8, dtype=D)
    opts = tb.PropagateOptions(covariance=covariance, max_full=100)
    cpu = tb.output_moments(model, x, 0.1**2, options=opts)
    dev = tb.output_moments(model.cuda(), x.cuda(), 0.1**2, options=opts)
    torch.testing.assert_close(dev.mean.cpu(), cpu.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dev.var.cpu(), cpu.var, rtol=1e-10, atol=1e-12)
    f32 = tb.output_moments(model.float(), x.float().cuda(), 0.1**2, options=opts)
    assert f32.mean.device.type == "cuda" and f32.mean.dtype == torch.float32
    torch.testing.assert_close(f32.var.double().cpu(), cpu.var, rtol=1e-3, atol=1e-6)


def test_models_without_max_pool_are_unchanged_by_the_pool_options():
    """The MLP and residual CNN of the benchmark have no max-pooling: the windowed max-pool
    and the adaptive pairing cannot change their moments (bit for bit)."""
    from torchbridge.extra_models import mlp, residual_cnn

    torch.manual_seed(0)
    x = torch.rand(1, 1, 28, 28, dtype=D)
    old = tb.PropagateOptions(pool_window=False, pool_pairing="fixed")
    for model in (mlp(8).to(D).eval(), residual_cnn(1).to(D).eval()):
        new = tb.output_moments(model, x, 0.1**2)
        ref = tb.output_moments(model, x, 0.1**2, options=old)
        assert torch.equal(new.mean, ref.mean) and torch.equal(new.var, ref.var)
