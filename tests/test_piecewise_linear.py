"""derivations/piecewise_linear.py: SymPy checks, and propagation of each PL operation against
mpmath quadrature of its definition (one nonlinearity: propagation is exact there)."""

from __future__ import annotations

import mpmath as mp
import pytest
import torch
from nmgen.derivations import piecewise_linear as P
from torch import nn

import torchbridge as tb

D = torch.float64


@pytest.mark.parametrize("check", P.CHECKS, ids=[c.__name__ for c in P.CHECKS])
def test_symbolic_check(check):
    assert check() is True


def test_max_reference_against_clark_identity():
    """The definition-based max reference agrees with b + relu(a − b) built from the (separately
    verified) ReLU mean reference: E[max(a, b)] = μ_b + E[relu(d)]."""
    from nmgen.derivations.reference import relu_mean_ref

    with mp.workdps(30):
        m, _ = P.max_moments_ref(0.3, -0.2, 1.0, 0.7, 0.4)
        sa, sb, r = mp.mpf(1.0), mp.mpf(0.7), mp.mpf(0.4)
        theta = mp.sqrt(sa**2 + sb**2 - 2 * r * sa * sb)
        want = mp.mpf(-0.2) + relu_mean_ref(mp.mpf(0.3) - mp.mpf(-0.2), theta)
        assert abs(m - want) < 1e-25


class _Act(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act(x)


@pytest.mark.parametrize(
    ("act", "ref"),
    [
        (nn.ReLU6(), lambda m, s: P.hardtanh_moments_ref(m, s, 0, 6)),
        (nn.Hardtanh(-0.5, 2.0), lambda m, s: P.hardtanh_moments_ref(m, s, -0.5, 2.0)),
        (
            lambda x: torch.clamp(x, min=-1.0, max=0.5),
            lambda m, s: P.hardtanh_moments_ref(m, s, -1, 0.5),
        ),
        (lambda x: x.clamp_min(0.25), lambda m, s: P.hardtanh_moments_ref(m, s, 0.25, mp.inf)),
        (nn.LeakyReLU(0.1), lambda m, s: P.leaky_moments_ref(m, s, 0.1)),
        (torch.abs, lambda m, s: P.leaky_moments_ref(m, s, -1)),
    ],
    ids=["relu6", "hardtanh", "clamp", "clamp_min", "leaky", "abs"],
)
def test_elementwise_moments_exact(act, ref):
    mean = torch.tensor([[-1.3, 0.2, 2.5, 5.9]], dtype=D)
    var = torch.tensor([0.7, 1.5, 4.0, 0.09], dtype=D)
    model = _Act(act).eval()
    out = tb.output_moments(model, mean, var)
    for i in range(4):
        m, s = float(mean[0, i]), float(var[i].sqrt())
        rm, rv = ref(m, s)
        scale = abs(m) + s  # clamp(z) = lo + relu(z − lo) − relu(z − hi) cancels when
        # both ReLUs are active: an absolute error of 1e-14·scale² is the DESIGN.md bar there
        assert abs(out.mean[0, i].item() - float(rm)) <= 1e-12 * (abs(float(rm)) + 1)
        assert abs(out.var[0, i].item() - float(rv)) <= 1e-11 * float(rv) + 1e-14 * scale**2


def test_prelu_per_channel_exact():
    model = nn.PReLU(2).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([0.2, -0.3], dtype=D))
    mean = torch.tensor([[[0.4, -1.0], [1.5, -0.2]]], dtype=D)  # (1, C=2, L=2)
    var = torch.tensor([[0.5, 2.0], [0.3, 1.1]], dtype=D)
    out = tb.output_moments(model, mean, var)
    for c, slope in enumerate((0.2, -0.3)):
        for j in range(2):
            rm, rv = P.leaky_moments_ref(float(mean[0, c, j]), float(var[c, j].sqrt()), slope)
            k = 2 * c + j
            assert abs(out.mean[0, k].item() - float(rm)) <= 1e-12
            assert abs(out.var[0, k].item() - float(rv)) <= 1e-11 * float(rv)


@pytest.mark.parametrize("fn", [torch.maximum, torch.minimum], ids=["max", "min"])
def test_max_min_of_correlated_pair_exact(fn):
    mu_a, mu_b, s_a, s_b, rho = 0.3, -0.2, 1.0, 0.7, 0.4
    cov = torch.tensor([[s_a**2, rho * s_a * s_b], [rho * s_a * s_b, s_b**2]], dtype=D)
    model = _Act(lambda x: fn(x[:, :1], x[:, 1:])).eval()
    out = tb.output_moments(model, torch.tensor([[mu_a, mu_b]], dtype=D), cov)
    if fn is torch.maximum:
        rm, rv = P.max_moments_ref(mu_a, mu_b, s_a, s_b, rho)
    else:  # min(a, b) = −max(−a, −b)
        rm, rv = P.max_moments_ref(-mu_a, -mu_b, s_a, s_b, rho)
        rm = -rm
    assert abs(out.mean.item() - float(rm)) <= 1e-13
    assert abs(out.var.item() - float(rv)) <= 1e-12 * float(rv)


def test_stein_cross_covariance_exact():
    """Cov[relu(x1), x2] of the propagated output vs nested quadrature of the definition."""
    m1, m2, s1, s2, rho = 0.4, -0.7, 1.3, 0.6, 0.45
    cov = torch.tensor([[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]], dtype=D)
    model = _Act(lambda x: torch.cat([torch.relu(x[:, :1]), x[:, 1:]], dim=1)).eval()
    out = tb.output_moments(model, torch.tensor([[m1, m2]], dtype=D), cov, full=True)
    ref = P.relu_linear_covariance_ref(m1, m2, s1, s2, rho)
    assert abs(out.cov[0, 0, 1].item() - float(ref)) <= 1e-13 * abs(float(ref))


@pytest.mark.slow
def test_relu6_pair_covariance_exact():
    """Both ReLUs of clamp(z, 0, 6) = relu(z) − relu(z − 6) are taken jointly: the covariance
    of two correlated ReLU6 units is exact (nested quadrature of the definition)."""
    mu = [1.0, 2.0]
    s1, s2, rho = 2.0, 3.0, 0.6
    cov = torch.tensor([[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]], dtype=D)
    out = tb.output_moments(_Act(nn.ReLU6()).eval(), torch.tensor([mu], dtype=D), cov, full=True)
    g = lambda t: min(max(t, 0), 6)  # noqa: E731
    ref = P.pair_covariance_ref(g, g, *mu, s1, s2, rho, [0, 6], [0, 6], dps=12)
    assert abs(out.cov[0, 0, 1].item() - float(ref)) <= 1e-9 * abs(float(ref))


@pytest.mark.parametrize("mu, theta", [(0.0, 1.0), (0.8, 0.3), (-2.5, 1.7), (3.0, 0.5)])
def test_pair_nonlinear_variance_against_quadrature(mu, theta):
    """The pairing score of a 4-element max-pool window vs quadrature of its definition."""
    from torchbridge.propagate.state import _nonlinear

    got = _nonlinear(torch.tensor([mu], dtype=D), torch.tensor([theta**2], dtype=D)).item()
    ref = float(P.relu_nonlinear_variance_ref(mu, theta))
    assert abs(got - ref) <= 1e-12 * theta**2, (got, ref)
