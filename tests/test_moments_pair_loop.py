"""relu_moments' pair loop shortcuts (issue #13 fixed costs): the same values as the general
path, bit for bit, and the symmetry flag honoured.

The shortcuts (eager CPU, no autograd): the exact kernel's runtime called without the
generated wrapper's masks on h = μ/σ gathered per pair, and one Σ gather per pair when cov is
exactly symmetric. Accuracy against mpmath is tested elsewhere (tests/test_pair_*.py,
``nm bench floor --check-entries``); here the reference is the general path through the
generated kernel ``relu_cross_covariance`` with the symmetrised Σ_ij.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from torchbridge import moments
from torchbridge.covariance import check_full_covariance
from torchbridge.moments import (
    _pair_blocks_nd,
    _pair_covariances,
    _safe_sqrt,
    _shared,
    relu_moments,
)


def _problem(p: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(p, p // 2, generator=g, dtype=torch.float64)
    cov = w @ w.T / (p // 2) + 0.05 * torch.eye(p, dtype=torch.float64)
    cov = 0.5 * (cov + cov.T)  # exactly symmetric (a matmul's W Wᵀ need not be)
    mean = 2.0 * torch.randn(p, generator=g, dtype=torch.float64)
    return mean.to(dtype), cov.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shortcut_pair_loop_matches_general_path_bitwise(dtype):
    mean, cov = _problem(96, 7, dtype)
    sigma = _safe_sqrt(cov.diagonal())
    fast = _shared(mean, cov, sigma)  # symmetry tested there
    assert fast.direct and fast.symmetric
    general = dataclasses.replace(fast, symmetric=False, direct=False, h=None)
    i, j, nd = next(_pair_blocks_nd(96, 1 << 20, mean.device))
    args = (mean, cov.flatten(), sigma, fast.rmean, "exact", 0, i, j, nd)
    a = _pair_covariances(*args, fast)
    b = _pair_covariances(*args, general)
    assert torch.equal(a, b)


def test_check_full_covariance_reports_exact_symmetry():
    _, cov = _problem(16, 3, torch.float64)
    assert check_full_covariance(cov) is True
    bumped = cov.clone()
    bumped[0, 1] = torch.nextafter(bumped[0, 1], torch.tensor(10.0, dtype=torch.float64))
    assert check_full_covariance(bumped) is False  # within the tolerance: accepted, not exact


def test_asymmetric_cov_within_tolerance_is_symmetrised_per_pair():
    """A rounding-level asymmetry takes the averaged Σ_ij: the same result as passing the
    symmetrised matrix (whose entries are the same averages)."""
    mean, cov = _problem(40, 5, torch.float64)
    bumped = cov.clone()
    up = torch.tensor(10.0, dtype=torch.float64)
    for a, b in ((0, 1), (3, 7), (12, 30)):
        bumped[a, b] = torch.nextafter(torch.nextafter(bumped[a, b], up), up)
    sym = 0.5 * (bumped + bumped.T)
    assert not torch.equal(sym, cov)
    _, c1 = relu_moments(mean, bumped, "exact", check_psd=False)
    _, c2 = relu_moments(mean, sym, "exact", check_psd=False)
    assert torch.equal(c1, c2)


def test_compiled_option_falls_back_where_compile_does_not_apply():
    """``relu_moments(..., compiled=True)`` under autograd is the default call (no compile is
    attempted there: the compiled bulk takes eager CPU tensors outside autograd only): the
    same values bit for bit, and gradients."""
    mean, cov = _problem(24, 3, torch.float64)
    m = mean.clone().requires_grad_()
    ref = relu_moments(m, cov, "exact", check_psd=False)[1].detach()
    got = relu_moments(m, cov, "exact", check_psd=False, compiled=True)[1]
    assert torch.equal(got.detach(), ref)
    (g,) = torch.autograd.grad(got.sum(), m)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_compiled_option_without_a_working_compiler_warns_and_runs_eagerly(monkeypatch):
    """Where ``torch.compile`` fails (here: every compiled call raises, and inductor's
    ``standalone_compile`` too, as without a C++ compiler), ``compiled=True`` warns once and
    gives the default call's values."""
    from nmruntime import torch_support

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler (simulated)")

        return run

    def broken_standalone(graph, inputs, **kwargs):
        raise RuntimeError("no C++ compiler (simulated)")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(torch._inductor, "standalone_compile", broken_standalone)
    monkeypatch.setattr(torch_support, "_COMPILED", {})
    monkeypatch.setattr(torch_support, "_COMPILE_FAILED", [None])
    mean, cov = _problem(40, 4, torch.float64)
    ref = relu_moments(mean, cov, "exact", check_psd=False)[1]
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got = relu_moments(mean, cov, "exact", check_psd=False, compiled=True)[1]
    eps = torch.finfo(torch.float64).eps
    assert ((got - ref).abs() <= 16 * eps * ref.abs() + 1e-300).all()
    assert torch.equal(relu_moments(mean, cov, "exact", check_psd=False, compiled=True)[1], ref)


def test_compiled_validation_rejects_what_eager_rejects():
    """Under ``compiled=True`` the symmetry test is one compiled pass (``_symmetry_gap``): an
    asymmetry beyond the tolerance still raises, naming the place; one within it is accepted,
    and a NaN or an Inf is still refused (``all_finite``)."""
    from nmruntime.torch_support import compiled_bulk

    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, 6, generator=g, dtype=torch.float64)
    cov = w @ w.T / 6 + 0.1 * torch.eye(40, dtype=torch.float64)
    cov = 0.5 * (cov + cov.T)
    mean = torch.randn(40, generator=g, dtype=torch.float64)
    bad = cov.clone()
    bad[3, 17] += 1e-6
    with pytest.raises(ValueError, match=r"not symmetric.*\(3, 17\)"):
        relu_moments(mean, bad, compiled=True)
    near = cov.clone()
    near[3, 17] += 4 * torch.finfo(torch.float64).eps * float(cov[3, 17])
    with compiled_bulk():  # exactly symmetric: True; within the tolerance: False, no error
        assert check_full_covariance(cov, False) and not check_full_covariance(near, False)
    for v in (float("nan"), float("inf"), float("-inf")):
        odd = cov.clone()
        odd[5, 5] = v
        with pytest.raises(ValueError, match="cov contains NaN or Inf"):
            relu_moments(mean, odd, compiled=True)
        odd = cov.clone()  # symmetric: the compiled symmetry gap alone proves non-finiteness
        odd[2, 7] = odd[7, 2] = v
        with pytest.raises(ValueError, match="cov contains NaN or Inf"):
            relu_moments(mean, odd, compiled=True)
        with pytest.raises(ValueError, match="mean contains NaN or Inf"):
            relu_moments(torch.where(torch.arange(40) == 2, v, mean), cov, compiled=True)


def test_all_finite_matches_isfinite():
    """``all_finite`` (a sum, then the elementwise test where the sum is not finite) agrees
    with ``torch.isfinite(x).all()``, including finite values whose sum overflows."""
    from torchbridge.covariance import all_finite

    big = torch.full((4,), 1e308, dtype=torch.float64)
    assert all_finite(big) and not math.isfinite(float(big.sum()))
    for v in (float("nan"), float("inf"), -float("inf")):
        x = big.clone()
        x[2] = v
        assert not all_finite(x)
    assert all_finite(torch.zeros(0)) and all_finite(torch.arange(5.0))


def test_compiled_bulk_on_an_inexactly_symmetric_cov(monkeypatch):
    """A cov symmetric only within rounding (W Wᵀ from BLAS often is) takes the compiled bulk
    too, Σ_ij read as (Σ_ij + Σ_ji)/2 as the eager path reads it (from a symmetrised copy,
    ``moments._symmetrised``): bit for bit the compiled call on (Σ + Σᵀ)/2 formed here, the
    eager covariance to 32 eps relative off the diagonal (the rounding test's bound where C
    cancels) and, where the two differ most, mpmath to 50 eps; the user's cov unchanged. The
    diagonal (the ReLU variances: the same kernel, compiled and eager, up to 22 eps apart near
    h = −2, each about 70 eps from mpmath there) to 32 eps of the eager one, and to 256 eps
    of mpmath's quadrature on the 12 variables nearest h = −1.9 and 12 others."""
    from nmgen.derivations.cross_covariance import relu_cross_covariance_ref
    from nmgen.derivations.reference import relu_variance_ref, to_float

    mean, cov = _problem(200, 13, torch.float64)
    g = torch.Generator().manual_seed(14)
    skew = torch.randn(200, 200, generator=g, dtype=torch.float64).triu(1)
    cov = cov + 8 * torch.finfo(torch.float64).eps * cov.abs() * torch.sign(skew)
    assert not torch.equal(cov, cov.T)
    ref = relu_moments(mean, cov, "exact", check_psd=False)[1]
    before, copies = cov.clone(), []
    symmetrised = moments._symmetrised
    monkeypatch.setattr(moments, "_symmetrised", lambda c: copies.append(c) or symmetrised(c))
    got = relu_moments(mean, cov, "exact", check_psd=False, compiled=True)[1]
    assert len(copies) == 1 and torch.equal(cov, before)  # the bulk ran, on a copy
    sym = relu_moments(mean, 0.5 * (cov + cov.T), "exact", check_psd=False, compiled=True)[1]
    assert len(copies) == 1 and torch.equal(got, sym)
    eps = torch.finfo(torch.float64).eps
    off = ~torch.eye(200, dtype=torch.bool)
    gap = (got - ref).abs() / ref.abs().clamp_min(torch.finfo(torch.float64).tiny)
    assert (gap[off] <= 32 * eps).all()
    # where the two differ most (both within rounding where C cancels: ρ < 0, |μ/σ| up to 5;
    # every rule from 14 to 32 points was 14–23 eps from mpmath on session 42's worst pair):
    # the compiled values against the covariance's definition (mpmath)
    c, sd = 0.5 * (cov + cov.T), cov.diagonal().sqrt()
    for q in torch.where(off, gap, 0.0).flatten().argsort(descending=True)[:3].tolist():
        i, j = divmod(q, 200)
        rho = float(c[i, j] / (sd[i] * sd[j]))
        want = to_float(
            relu_cross_covariance_ref(
                float(mean[i]), float(mean[j]), float(sd[i]), float(sd[j]), rho, dps=30
            )
        )
        assert abs(float(got[i, j]) - want) <= 50 * eps * abs(want), (i, j)
    var, var_eager = got.diagonal(), ref.diagonal()
    assert ((var - var_eager).abs() <= 32 * eps * var_eager.abs()).all()
    s = cov.diagonal().sqrt()
    near = (mean / s + 1.9).abs().argsort()
    for i in [*near[:12].tolist(), *near[12:][torch.randperm(188, generator=g)[:12]].tolist()]:
        want = to_float(relu_variance_ref(float(mean[i]), float(s[i])))
        assert abs(float(var[i]) - want) <= 256 * eps * abs(want), i


def test_left_pairs_are_torchs_nonzero():
    """``_left`` (NumPy's nonzero on the int32 flags' low bytes) gives ``torch.nonzero``'s
    indices: empty, one flag, all set, none set, sparse and dense random flags, and a slice
    of a longer flag tensor (a pass given one pair returns two flags)."""
    from torchbridge.moments import _left

    gen = torch.Generator().manual_seed(5)
    cases = [torch.zeros(0), torch.ones(1), torch.zeros(1), torch.ones(1000), torch.zeros(999)]
    cases += [(torch.rand(n, generator=gen) < q).float() for n in (7, 4097) for q in (0.1, 0.9)]
    cases.append(torch.tensor([1.0, 1.0])[:1])
    for flags in cases:
        flag = flags.to(torch.int32)
        got = _left(flag)
        assert got.dtype == torch.int64
        assert torch.equal(got, flag.nonzero().squeeze(1))
    # flags it cannot view as bytes (not int32, strided) take torch's nonzero: the same
    flag = (torch.rand(64, generator=gen) < 0.5).to(torch.int32)
    for other in (flag.to(torch.int64), flag[::2], flag.bool()):
        assert torch.equal(_left(other), other.nonzero().squeeze(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_passes_run_as_standalone_graphs(dtype, monkeypatch):
    """The compiled passes of ``relu_moments(..., compiled=True)`` run as inductor's
    standalone graphs (``compiled_graph``), none through dynamo's fallback, on a problem
    whose pairs reach the band pass (bands of 16 rows here: its rows and columns are views
    with offsets, which did not trace as 2-d blocks), every float64 pass on pairs (the tail
    route included) and float32's first two."""
    from nmruntime import torch_support
    from nmruntime.pair_direct import direct_passes
    from torchbridge import moments
    from torchbridge.experiments.bench_kernels import random_problem

    monkeypatch.setattr(moments, "PASS_BAND", 16)
    mean, cov = (t.to(dtype) for t in random_problem(64, 0))
    relu_moments(mean, cov, "exact", check_psd=False, compiled=True)
    rules = direct_passes(dtype == torch.float64)
    names = [f"{r.name}:{dtype}:pairs" for r in rules]
    ran = []
    for name in [f"{rules[0].name}:{dtype}:band", *names]:
        graphs = torch_support._COMPILED[f"graph:{name}"]
        assert graphs.failed is None, name
        assert all(run is not graphs.fallback for run in graphs.runs.values()), name
        ran += [name] if graphs.runs else []
    assert ran[0].endswith(":band"), ran
    ran = ran[1:]
    assert ran == names if dtype == torch.float64 else set(names[:2]) <= set(ran), ran
