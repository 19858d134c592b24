"""Tests for torchbridge.attacks (Gaussian adversarial attacks, Eqs. 7-10)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchbridge.attacks import (
    AttackResult,
    ExpectedLogits,
    pixel_support,
    run_slsqp,
    sparse_smooth,
    targeted,
    total_variation,
)
from torchbridge.linearize import two_stage_linearize
from torchbridge.network import AffineReLUAffine


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).double()
    return net.eval()


def _image() -> torch.Tensor:
    return torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _source_and_runner_up(net: nn.Module, img: torch.Tensor) -> tuple[int, int]:
    with torch.no_grad():
        out = net(img[None])[0]
    order = out.argsort(descending=True)
    return int(order[0]), int(order[1])


def test_expected_logits_gradcheck() -> None:
    img = _image()
    f = ExpectedLogits(two_stage_linearize(_net(), img), img)
    mu = (0.1 * torch.randn(16, dtype=torch.float64)).requires_grad_()
    sigma = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, s: f(m, s), (mu, sigma))
    x = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: total_variation(m, 1e-2), (x,))


def test_slsqp_gradients_match_finite_differences() -> None:
    """The exact autograd gradient/Jacobian used by run_slsqp equals central differences."""
    img = _image()
    f = ExpectedLogits(two_stage_linearize(_net(), img), img)

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = f(0.5 * torch.sin(x[:16]), x[16])
        return x[17] - e[1], x[17] - e[[0, 2, 3]]

    x = torch.cat([0.3 * torch.randn(16, dtype=torch.float64), torch.tensor([0.2, 1.0])])
    xt = x.clone().requires_grad_()
    obj, cons = fn(xt)
    g = torch.autograd.grad(obj, xt, retain_graph=True)[0]
    jac = torch.stack([torch.autograd.grad(c, xt, retain_graph=True)[0] for c in cons])
    h = 1e-6
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = h
        (op, cp), (om, cm) = fn(x + e), fn(x - e)
        assert abs(float((op - om) / (2 * h)) - float(g[i])) < 1e-6
        assert torch.allclose((cp - cm) / (2 * h), jac[:, i], atol=1e-6)


def test_expected_logits_match_monte_carlo() -> None:
    img = _image()
    lin = two_stage_linearize(_net(), img)
    mu = 0.2 * torch.randn(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = 0.5
    exact = ExpectedLogits(lin, img)(mu, sigma)
    g = torch.Generator().manual_seed(3)
    x = img.reshape(1, 16) + mu + sigma * torch.randn(200_000, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = lin(x)
    se = out.std(0) / math.sqrt(out.shape[0])
    assert ((out.mean(0) - exact).abs() <= 4 * se + 1e-12).all()


def test_targeted_reaches_target() -> None:
    net, img = _net(), _image()
    src, tgt = _source_and_runner_up(net, img)
    res = targeted(net, img, tgt, beta=1.0, sigma2_max=0.01, maxiter=100)
    assert isinstance(res, AttackResult)
    assert res.margin < 0 and res.mu.shape == img.shape
    assert float(res.mu.abs().max()) <= 1.0 + 1e-9
    assert 0 < res.sigma2 <= 0.01 + 1e-12
    v = res.verify(samples=1000, seed=0)
    assert v["fooling_rate"] >= 0.9
    assert {"fooling_rate", "sparsity", "tv"} <= set(v)
    for name in ("status", "success", "iterations", "wall_time", "expected_logits", "source"):
        assert hasattr(res, name)
    assert res.source == src


def test_targeted_accepts_linearization() -> None:
    net, img = _net(), _image()
    _, tgt = _source_and_runner_up(net, img)
    lin = two_stage_linearize(net, img)
    res = targeted(lin, img, tgt, beta=1.0, sigma2_max=0.01, maxiter=100)
    assert res.network_is_linearization and res.verify(200)["network"] == "linearization"


def test_pixel_support_and_sparse_smooth_run() -> None:
    net, img = _net(), _image()
    _src, tgt = _source_and_runner_up(net, img)
    r8 = pixel_support(net, img, alpha=0.5, beta=2.0, seed=0)
    support = r8.extra["support"]
    assert int(support.sum()) == 8 and bool((r8.mu[~support] == 0).all())
    assert r8.margin < 0 and r8.verify(500)["fooling_rate"] >= 0.9
    r9 = sparse_smooth(net, img, gamma=0.1, maxiter=100)
    assert r9.margin <= -0.1 + 1e-6 and r9.success
    r10 = sparse_smooth(net, img, target=tgt, maxiter=100)
    assert r10.margin <= 1e-6 and r10.target == tgt
    for r in (r8, r9, r10):
        assert set(r.verify(100)) >= {"fooling_rate", "sparsity", "tv"}


def test_error_cases() -> None:
    net, img = _net(), _image()
    src, tgt = _source_and_runner_up(net, img)
    with pytest.raises(ValueError, match="alpha"):
        pixel_support(net, img, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        pixel_support(net, img, alpha=1.5)
    with pytest.raises(ValueError, match="source"):
        targeted(net, img, src)
    with pytest.raises(ValueError, match="source"):
        sparse_smooth(net, img, target=src)
    with pytest.raises(ValueError, match="target"):
        targeted(net, img, 7)
    with pytest.raises(ValueError, match="shape"):
        targeted(net, torch.rand(1, 5, 5, dtype=torch.float64), tgt)
    lin = two_stage_linearize(net, img)
    with pytest.raises(ValueError, match="linearization expects 16"):
        targeted(lin, torch.rand(1, 5, 5), tgt)
    with pytest.raises(TypeError):
        targeted(nn.Linear(16, 4), img, tgt)


def test_non_converged_returns_best_point() -> None:
    net, img = _net(), _image()
    _, tgt = _source_and_runner_up(net, img)
    res = targeted(net, img, tgt, beta=1.0, maxiter=1)
    assert not res.converged and not res.success and res.status == 9
    assert torch.isfinite(res.mu).all()


def test_run_slsqp_time_limit() -> None:
    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x**2).sum(), 1 - x[:1]

    fit = run_slsqp(fn, [2.0, 3.0], exact=False, time_limit=0.0)
    assert fit["status"] == -1 and "time limit" in fit["message"]


@pytest.mark.slow
def test_lenet_targeted_slow() -> None:
    from torchbridge.data import mnist
    from torchbridge.models import trained_lenet

    model = trained_lenet(progress=False)
    _, _, tx, ty = mnist()
    img = tx[int((ty == 9).nonzero()[0])]
    res = targeted(model, img, 7)
    assert res.verify(1000)["fooling_rate"] >= 0.9
    assert isinstance(AffineReLUAffine, type)


def test_targeted_relinearize_rounds() -> None:
    # Two hidden ReLU layers: the two-stage linearization at the image is not exact, so the
    # re-linearization rounds (extension of the paper's Eq. 7 procedure) are exercised.
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)
    ).double()
    img = _image()
    _, tgt = _source_and_runner_up(net.eval(), img)
    base = targeted(net, img, tgt, beta=0.3, sigma2_max=1e-4, maxiter=50)
    assert base.extra["relinearize"] == 0 and "rounds" not in base.extra
    res = targeted(
        net,
        img,
        tgt,
        beta=0.3,
        sigma2_max=1e-4,
        maxiter=50,
        relinearize=2,
        trust_radius=0.1,
        stop_margin=0.1,
    )
    rounds = res.extra["rounds"]
    assert res.extra["relinearize"] == 2 and 1 <= len(rounds) <= 3
    # Re-solves only while the real margin is >= -stop_margin.
    assert all(r["real_margin"] >= -0.1 for r in rounds[:-1])
    assert res.extra["real_margin"] == min(r["real_margin"] for r in rounds)
    assert rounds[0]["linearized_margin"] == pytest.approx(base.margin)
    assert float(res.mu.abs().max()) <= 0.3 + 1e-9 and 0 < res.sigma2 <= 1e-4 + 1e-12
    assert res.wall_time >= sum(r["wall"] for r in rounds) - 1e-9
    if res.extra["real_margin"] < 0:
        assert res.verify(200)["mean_prediction"] == tgt
    lin = two_stage_linearize(net, img)
    with pytest.raises(ValueError, match="relinearize"):
        targeted(lin, img, tgt, relinearize=1)
    with pytest.raises(ValueError, match="relinearize"):
        targeted(net, img, tgt, relinearize=-1)
    with pytest.raises(ValueError, match="stop_margin"):
        targeted(net, img, tgt, relinearize=1, stop_margin=-1.0)
    with pytest.raises(ValueError, match="trust_radius"):
        targeted(net, img, tgt, box="sin", trust_radius=0.1, mu0=torch.zeros_like(img))


def test_sparse_smooth_refine_schedules() -> None:
    # Two hidden ReLU layers, so re-linearizing at M + mu changes the model ("moving").
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)
    ).double()
    net.eval()
    img = _image()
    src, _ = _source_and_runner_up(net, img)
    runs = {}
    for schedule in ("fixed", "moving", "both"):
        res = sparse_smooth(
            net, img, gamma=0.05, maxiter=80, refine=True, refine_linearization=schedule
        )
        runs[schedule] = res
        assert res.extra["schedule"] in ({"fixed", "moving"} if schedule == "both" else {schedule})
        assert 0 <= res.extra["chosen_round"] <= 3 and len(res.extra["refined_supports"]) == 3
        assert int((res.mu.abs() > 0).sum()) <= 16
        with torch.no_grad():
            fooled = int(net((img + res.mu)[None]).argmax()) != src
        assert fooled  # the kept candidate fools the real (noise-free) network
    # "both" keeps the better of the two single schedules: at least as many zero pixels.
    assert runs["both"].sparsity() >= max(runs["fixed"].sparsity(), runs["moving"].sparsity())
    with pytest.raises(ValueError, match="refine_linearization"):
        sparse_smooth(net, img, refine=True, refine_linearization="sometimes")
