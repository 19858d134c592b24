"""Tests for torchbridge.attacks (Gaussian adversarial attacks, Eqs. 7-10) on small networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from standins import pixel_class_data, pixel_class_net
from torch import nn

from torchbridge.attacks import (
    UNCONSTRAINED_LABEL,
    AttackResult,
    AugLagOptions,
    ExpectedLogits,
    PixelBox,
    PixelSupportOptions,
    RelinearizeOptions,
    SlsqpOptions,
    SparseSmoothOptions,
    TargetedOptions,
    pgd_targeted,
    pixel_support,
    run_auglag,
    run_slsqp,
    sparse_smooth,
    targeted,
    total_variation,
)
from torchbridge.attacks.slsqp import value_and_jacobian
from torchbridge.linearize import two_stage_linearize

BOX_TOL = 1e-12


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


def _in_range(res: AttackResult, lo: float = 0.0, hi: float = 1.0) -> bool:
    y = res.image.double() + res.mu.double()
    return bool(float(y.min()) >= lo - BOX_TOL and float(y.max()) <= hi + BOX_TOL)


# --------------------------------------------------------------------------- building blocks


def test_expected_logits_gradcheck() -> None:
    img = _image()
    f = ExpectedLogits(two_stage_linearize(_net(), img), img)
    mu = (0.1 * torch.randn(16, dtype=torch.float64)).requires_grad_()
    sigma = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, s: f(m, s), (mu, sigma))
    x = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: total_variation(m, 1e-2), (x,))


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


def test_pixel_box_intersects_range_and_beta() -> None:
    img = torch.tensor([[0.0, 0.2], [0.95, 1.0]], dtype=torch.float64)
    box = PixelBox.build(img, (0.0, 1.0), beta=0.1)
    assert box.lower.tolist() == pytest.approx([0.0, -0.1, -0.1, -0.1])
    assert box.upper.tolist() == pytest.approx([0.1, 0.1, 0.05, 0.0])
    wild = torch.tensor([[-3.0, 0.5], [0.5, 7.0]], dtype=torch.float64)
    p = box.project(wild)
    y = img + p
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0  # exact, no tolerance
    assert box.violation(p) <= 1e-15  # the beta side only to rounding (1 - 0.95 - 0.05)
    assert box.violation(wild) == pytest.approx(7.0)  # pixel 3: image 1 + 7 exceeds hi by 7
    free = PixelBox.build(img, None)
    assert free.label == UNCONSTRAINED_LABEL and bool(torch.isinf(free.upper).all())
    with pytest.raises(ValueError, match="outside bounds"):
        PixelBox.build(img + 0.5, (0.0, 1.0))
    with pytest.raises(ValueError, match="bounds"):
        PixelBox.build(img, (1.0, 0.0))
    with pytest.raises(ValueError, match="beta"):
        PixelBox.build(img, (0.0, 1.0), beta=0.0)


def test_project_is_exact_after_rounding() -> None:
    # Pixel values like 0.1 + 0.2 make hi - M round so that M + (hi - M) != hi without care.
    g = torch.Generator().manual_seed(4)
    img = torch.rand(5000, generator=g, dtype=torch.float64)
    box = PixelBox.build(img, (0.0, 1.0))
    mu = box.project(10 * torch.randn(5000, generator=g, dtype=torch.float64))
    y = img + mu
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_run_slsqp_toy_closed_form() -> None:
    """min ||x - a||^2 s.t. sum x <= 1: x = a - lambda 1, lambda = (sum a - 1) / n (KKT)."""
    a = torch.tensor([0.9, 0.6, -0.1, 0.4], dtype=torch.float64)

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ((x - a) ** 2).sum(-1), (1 - x.sum(-1))[..., None]

    fit = run_slsqp(fn, np.zeros(4), options=SlsqpOptions(maxiter=50, ftol=1e-12))
    lam = (float(a.sum()) - 1) / 4
    assert fit.converged and not fit.hit_iteration_cap
    assert np.allclose(fit.x, (a - lam).numpy(), atol=1e-7)
    # With bounds x <= 0.3 the solution is min(a, 0.3) clipped, sum 0.3+0.3-0.1+0.3 <= 1.
    fit_b = run_slsqp(fn, np.zeros(4), [(None, 0.3)] * 4, SlsqpOptions(maxiter=50, ftol=1e-12))
    assert np.allclose(fit_b.x, [0.3, 0.3, -0.1, 0.3], atol=1e-7)
    capped = run_slsqp(fn, np.full(4, 5.0), options=SlsqpOptions(maxiter=1))
    assert capped.hit_iteration_cap and not capped.converged
    timed = run_slsqp(fn, np.zeros(4), options=SlsqpOptions(exact=False, time_limit=0.0))
    assert timed.status == -1 and "time limit" in timed.message


def test_run_auglag_toy_closed_form() -> None:
    """The same KKT toy as SLSQP: min ||x - a||^2 s.t. sum x <= 1 -> x = a - lambda 1."""
    a = torch.tensor([0.9, 0.6, -0.1, 0.4], dtype=torch.float64)

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ((x - a) ** 2).sum(-1), (1 - x.sum(-1))[..., None]

    lam = (float(a.sum()) - 1) / 4
    for exact in (True, False):  # the finite-difference variant is the same algorithm
        fit = run_auglag(fn, np.zeros(4), options=AugLagOptions(tol=1e-9, exact=exact))
        assert fit.converged and not fit.hit_iteration_cap and fit.status == 0
        assert np.allclose(fit.x, (a - lam).numpy(), atol=1e-6)
        assert fit.violation <= 1e-9 and (fit.njev > 0) == exact
    # Bounds x <= 0.3 (L-BFGS-B's own): min(a, 0.3), the constraint inactive; exactly in bounds.
    fit_b = run_auglag(fn, np.zeros(4), [(None, 0.3)] * 4, AugLagOptions(tol=1e-9))
    assert np.allclose(fit_b.x, [0.3, 0.3, -0.1, 0.3], atol=1e-7) and fit_b.x.max() <= 0.3
    capped = run_auglag(fn, np.full(4, 5.0), options=AugLagOptions(maxiter=1))
    assert capped.hit_iteration_cap and not capped.converged and capped.nit == 1
    timed = run_auglag(fn, np.zeros(4), options=AugLagOptions(exact=False, time_limit=0.0))
    assert timed.status == -1 and "time limit" in timed.message
    with pytest.raises(ValueError, match="maxiter"):
        run_auglag(fn, np.zeros(4), options=AugLagOptions(maxiter=0))


def test_targeted_auglag_matches_converged_slsqp() -> None:
    """Eq. 7 on a 16-pixel net: the default augmented-Lagrangian solve reaches the margin of a
    fully converged SLSQP solve (an independent solver), within the range."""
    net, img = _net(), _image()
    _, tgt = _source_and_runner_up(net, img)
    ref = targeted(
        net, img, tgt, beta=0.2, options=TargetedOptions(solver=SlsqpOptions(500, 1e-12))
    )
    res = targeted(net, img, tgt, beta=0.2)
    assert ref.converged and res.converged and res.extra["solver"] == "auglag"
    assert res.margin == pytest.approx(ref.margin, abs=1e-5)
    assert _in_range(res) and float(res.mu.abs().max()) <= 0.2 + 1e-12
    with pytest.raises(TypeError, match="solver"):
        targeted(net, img, tgt, options=TargetedOptions(solver=None))


def test_value_and_jacobian_match_central_differences() -> None:
    img = _image()
    f = ExpectedLogits(two_stage_linearize(_net(), img), img)

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = f(0.5 * torch.sin(x[..., :16]), x[..., 16])
        return x[..., 17] - e[..., 1], x[..., 17, None] - e[..., [0, 2, 3]]

    x = torch.cat([0.3 * torch.randn(16, dtype=torch.float64), torch.tensor([0.2, 1.0])])
    val, jac = value_and_jacobian(fn, x, 4)
    h = 1e-6
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = h
        (op, cp), (om, cm) = fn((x + e)[None]), fn((x - e)[None])
        fd = torch.cat([(op - om), (cp - cm)[0]]) / (2 * h)
        assert torch.allclose(fd, jac[:, i], atol=1e-7)
    o, c = fn(x[None])
    assert torch.allclose(val, torch.cat([o, c[0]]))


def test_greedy_support_and_prune_on_a_linear_toy() -> None:
    from torchbridge.attacks.strategies import greedy_support, prune

    # slack(mu) = w . mu - 1 with mu in [0, 1] per pixel (image 0): the fewest pixels pushed to 1
    # that reach slack >= 0 are the largest weights, 0.6 + 0.5 >= 1 -> k_min = 2.
    w = torch.tensor([0.1, 0.6, 0.0, 0.5, 0.3], dtype=torch.float64)
    box = PixelBox.build(torch.zeros(5, dtype=torch.float64), (0.0, 1.0))
    support, start, k_min = greedy_support(
        box, torch.zeros(5), lambda m: (w * m).sum() - 1, kmax=5, expand=1.5
    )
    assert k_min == 2 and support.tolist() == [1, 3, 4]  # ceil(1.5 * 2) = 3 best pixels
    assert start.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    mu = torch.tensor([0.01, 1.0, 0.002, 1.0, 0.05], dtype=torch.float64)
    pruned, t = prune(mu, lambda m: float((w * m).sum()) >= 1.0, (0.1, 0.02, 0.001))
    assert t == 0.1 and pruned.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    same, t0 = prune(mu * 0, lambda m: float((w * m).sum()) >= 1.0, (0.1,))
    assert t0 == 0.0 and bool((same == 0).all())


def test_single_thread_restores_the_thread_count() -> None:
    from torchbridge.attacks.strategies import single_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    with single_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the solvers


def test_targeted_reaches_target_within_range() -> None:
    net = pixel_class_net().double()
    x, _ = pixel_class_data()
    img = x[6].double()  # class 3; brightening pixel 7 makes it a 7
    src, tgt = 3, 7
    res = targeted(net, img, tgt, beta=1.0, sigma2_max=0.01)
    assert isinstance(res, AttackResult) and res.source == src and res.target == tgt
    assert res.margin < 0 and res.success and res.mu.shape == img.shape
    assert _in_range(res) and res.box_violation <= BOX_TOL and res.bounds == (0.0, 1.0)
    assert float(res.mu.abs().max()) <= 1.0 + 1e-12 and 0 < res.sigma2 <= 0.01 + 1e-12
    v = res.verify(samples=1000, seed=0)
    assert v["fooling_rate"] >= 0.9 and v["range"] == "[0, 1]"
    assert 0.0 <= v["mean_image_min"] and v["mean_image_max"] <= 1.0 and v["pixels_outside"] == 0


def test_unconstrained_is_labelled_and_may_leave_the_range() -> None:
    net, img = _net(), _image()
    _, tgt = _source_and_runner_up(net, img)
    res = targeted(net, img, tgt, beta=3.0, sigma2_max=0.01, bounds=None)
    v = res.verify(200)
    assert res.bounds is None and v["range"] == UNCONSTRAINED_LABEL
    assert res.range_label == UNCONSTRAINED_LABEL and v["clipped_pixels_mean"] == 0.0
    bounded = targeted(net, img, tgt, beta=3.0, sigma2_max=0.01)
    assert _in_range(bounded)
    # The unconstrained box is |mu| <= 3, which this solve uses outside [0, 1].
    assert v["pixels_outside"] == 0 or not _in_range(res)


def test_verify_counts_clipped_pixels_independently() -> None:
    net, img = _net(), _image()
    _, tgt = _source_and_runner_up(net, img)
    res = targeted(net, img, tgt, beta=1.0, sigma2_max=0.01)
    res.sigma2 = 0.25  # large noise so that many samples leave [0, 1]
    v = res.verify(300, seed=7)
    x = res.samples(300, seed=7)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0  # what the network saw
    g = torch.Generator().manual_seed(7)
    raw = img + res.mu + 0.5 * torch.randn((300, *img.shape), generator=g, dtype=torch.float64)
    expected = float(((raw < 0) | (raw > 1)).reshape(300, -1).sum(1).double().mean())
    assert v["clipped_pixels_mean"] == pytest.approx(expected)
    with torch.no_grad():
        pred = net(raw.clamp(0, 1)).argmax(1)
    assert v["fooling_rate"] == pytest.approx(float((pred == tgt).double().mean()))


def test_targeted_accepts_linearization() -> None:
    net, img = _net(), _image()
    _, tgt = _source_and_runner_up(net, img)
    lin = two_stage_linearize(net, img)
    res = targeted(lin, img, tgt, beta=1.0, sigma2_max=0.01)
    assert res.network_is_linearization and res.verify(200)["network"] == "linearization"
    assert _in_range(res)


def test_pixel_support_stays_on_support_and_in_range() -> None:
    net, img = _net(), _image()
    r8 = pixel_support(net, img, alpha=0.5, beta=2.0, seed=0)
    support = r8.extra["support"]
    assert int(support.sum()) == 8 and bool((r8.mu[~support] == 0).all())
    assert _in_range(r8)
    r8u = pixel_support(
        net, img, alpha=0.5, beta=2.0, seed=0, bounds=None, options=PixelSupportOptions("lse")
    )
    assert r8u.margin <= r8.margin + 1e-9  # the unconstrained problem has the larger box


def test_sparse_smooth_on_the_pixel_class_standin() -> None:
    """Class c follows pixel c: a sparse bounded mu fools, on the real net, within [0, 1]."""
    net = pixel_class_net()
    x, _ = pixel_class_data()
    img = x[6]  # class 3
    r9 = sparse_smooth(net, img, gamma=0.1)
    assert r9.success and r9.margin <= -0.1 + 1e-9 and _in_range(r9)
    v = r9.verify(500)
    assert v["fooling_rate"] >= 0.9 and v["sparsity"] >= 0.8
    r10 = sparse_smooth(net, img, gamma=0.05, target=7)
    assert r10.success and r10.target == 7 and _in_range(r10)
    assert r10.verify(500)["fooling_rate"] >= 0.9
    assert int((r10.mu.abs() > 0).sum()) <= math.floor(0.2 * 64)
    rounds = r10.extra["rounds"]
    assert 1 <= len(rounds) <= 5 and r10.extra["chosen_round"] < len(rounds)


def test_sparse_smooth_relinearizes_a_two_layer_net() -> None:
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)
    ).double()
    net.eval()
    img = _image()
    src, _ = _source_and_runner_up(net, img)
    res = sparse_smooth(net, img, gamma=0.05, options=SparseSmoothOptions(max_support=0.5))
    assert _in_range(res) and int((res.mu.abs() > 0).sum()) <= 8
    for r in res.extra["rounds"]:
        assert {"real_margin", "linearized_margin", "support", "solve_gamma"} <= set(r)
    # A round that met the constraint on the real network stops the loop.
    met = [r["real_margin"] <= -0.05 for r in res.extra["rounds"]]
    assert not any(met[:-1])
    if met[-1]:
        with torch.no_grad():
            assert int(net((img + res.mu)[None]).argmax()) != src


def test_solves_do_not_depend_on_the_thread_count() -> None:
    net = pixel_class_net()
    x, _ = pixel_class_data()
    before = torch.get_num_threads()
    mus = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        a = targeted(net, x[6], 7, beta=0.3)
        b = sparse_smooth(net, x[6], gamma=0.1, target=7)
        mus.append((a.mu.clone(), a.sigma2, b.mu.clone()))
    torch.set_num_threads(before)
    (a1, s1, b1), (a2, s2, b2) = mus
    assert torch.equal(a1, a2) and s1 == s2 and torch.equal(b1, b2)


def test_targeted_relinearize_rounds() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)
    ).double()
    net.eval()
    img = _image()
    _, tgt = _source_and_runner_up(net, img)
    base = targeted(net, img, tgt, beta=0.3, sigma2_max=1e-4)
    assert base.extra["relinearize"] == 0 and "rounds" not in base.extra
    opts = TargetedOptions(
        relinearize=RelinearizeOptions(rounds=2, trust_radius=0.1, stop_margin=0.1)
    )
    res = targeted(net, img, tgt, beta=0.3, sigma2_max=1e-4, options=opts)
    rounds = res.extra["rounds"]
    assert res.extra["relinearize"] == 2 and 1 <= len(rounds) <= 3
    assert all(r["real_margin"] >= -0.1 for r in rounds[:-1])
    assert res.extra["real_margin"] == min(r["real_margin"] for r in rounds)
    assert rounds[0]["linearized_margin"] == pytest.approx(base.margin)
    assert float(res.mu.abs().max()) <= 0.3 + 1e-12 and _in_range(res)
    lin = two_stage_linearize(net, img)
    with pytest.raises(ValueError, match="relinearize"):
        targeted(lin, img, tgt, options=TargetedOptions(relinearize=RelinearizeOptions(1)))
    with pytest.raises(ValueError, match="relinearize"):
        targeted(net, img, tgt, options=TargetedOptions(relinearize=RelinearizeOptions(-1)))


def test_pgd_respects_bounds() -> None:
    net = pixel_class_net()
    x, _ = pixel_class_data()
    img = x[6]
    mu, m = pgd_targeted(net, img, 7, beta=0.3)
    y = img.double() + mu
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert float(mu.abs().max()) <= 0.3 + 1e-12 and m < 0
    with torch.no_grad():
        assert int(net(y.float()[None]).argmax()) == 7


def test_error_cases() -> None:
    net, img = _net(), _image()
    src, tgt = _source_and_runner_up(net, img)
    with pytest.raises(ValueError, match="alpha"):
        pixel_support(net, img, alpha=0.0)
    with pytest.raises(ValueError, match="source"):
        targeted(net, img, src)
    with pytest.raises(ValueError, match="source"):
        sparse_smooth(net, img, target=src)
    with pytest.raises(ValueError, match="target"):
        targeted(net, img, 7)
    with pytest.raises(ValueError, match="shape"):
        targeted(net, torch.rand(1, 5, 5, dtype=torch.float64), tgt)
    with pytest.raises(ValueError, match="outside bounds"):
        targeted(net, img + 2.0, tgt)
    with pytest.raises(ValueError, match="bounds"):
        sparse_smooth(net, img, bounds=(0.0, 0.0))
    with pytest.raises(ValueError, match="competitor"):
        sparse_smooth(net, img, options=SparseSmoothOptions(competitor="all"))
    lin = two_stage_linearize(net, img)
    with pytest.raises(ValueError, match="linearization expects 16"):
        targeted(lin, torch.rand(1, 5, 5), tgt)
    with pytest.raises(TypeError):
        targeted(nn.Linear(16, 4), img, tgt)


@pytest.mark.slow
def test_lenet_bounded_attacks_slow() -> None:
    from torchbridge.data import mnist
    from torchbridge.models import trained_lenet

    model = trained_lenet(progress=False)
    _, _, tx, ty = mnist()
    img = tx[int((ty == 9).nonzero()[0])]
    res = targeted(model, img, 4, options=TargetedOptions(warm_steps=20))
    assert _in_range(res) and res.verify(1000)["fooling_rate"] >= 0.9
    ss = sparse_smooth(model, img, gamma=0.5)
    v = ss.verify(1000)
    assert _in_range(ss) and v["fooling_rate"] >= 0.5 and v["sparsity"] >= 0.8


@pytest.mark.slow
def test_lenet_thread_independence_slow() -> None:
    """Same mu for 1 and 2 caller threads on LeNet (Eq. 7 and Eq. 9), bit for bit."""
    from torchbridge.data import mnist
    from torchbridge.models import trained_lenet

    model = trained_lenet(progress=False)
    _, _, tx, ty = mnist()
    img = tx[int((ty == 9).nonzero()[0])]
    before = torch.get_num_threads()
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        a = targeted(model, img, 4, options=TargetedOptions(warm_steps=20))
        b = sparse_smooth(model, img, gamma=0.5)
        runs.append((a.mu, a.sigma2, b.mu))
    torch.set_num_threads(before)
    (a1, s1, b1), (a2, s2, b2) = runs
    assert torch.equal(a1, a2) and s1 == s2 and torch.equal(b1, b2)
