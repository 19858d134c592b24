"""Bivariate normal CDF: mpmath oracle, NumPy (Owen's T) and PyTorch (Genz 2004) kernels."""

from __future__ import annotations

import itertools
import math

import mpmath as mp
import numpy as np
import pytest
import torch
from nmgen.derivations.bvn import GENZ_RULE_SIZES, bvn_cdf_mp, gauss_laguerre, gauss_legendre
from scipy.special import ndtr

from nmruntime.bvn_numpy import bvn_cdf as bvn_np
from nmruntime.bvn_torch import bvn_cdf as bvn_t

S2 = 1 / math.sqrt(2)
RHOS = [
    0.0,
    0.3,
    -0.3,
    S2,
    -S2,
    0.9,
    -0.9,
    0.925 + 1e-9,
    0.925 - 1e-9,
    -0.925 + 1e-9,
    -0.925 - 1e-9,
    0.999999,
    -0.999999,
    1.0,
    -1.0,
    1 - 2**-52,
    -(1 - 2**-52),
]
HS = [-10.0, -3.0, -0.5, 0.0, 1e-8, 0.7, 3.0, 10.0]
EXTRA_HS = [-40.0, 40.0, -math.inf, math.inf, -1e-8, 1.5]

RULES = {
    n: tuple(tuple(float(v) for v in part) for part in gauss_legendre(n)) for n in GENZ_RULE_SIZES
}


def _subset() -> list[tuple[float, float, float]]:
    """A deterministic spread of (h, k, ρ) over the stress grid (4 (h, k) pairs per ρ)."""
    pts = []
    for i, r in enumerate(RHOS):
        for m in range(4):
            pts.append((HS[(i + 3 * m) % 8], HS[(5 * i + 7 * m + 1) % 8], r))
    return pts


# bvn_cdf_mp(h, k, rho, dps=20) on _subset(), frozen so the fast tests need no quadrature;
# test_ref_table_live re-derives a few rows and the slow test all of them.
REF_TABLE: list[tuple[float, float, float, str]] = [
    (-10.0, -3.0, 0.0, "1.0286024598624917249e-26"),
    (0.0, -10.0, 0.0, "3.809926512080263033e-24"),
    (3.0, 10.0, 0.0, "0.99865010196836990547"),
    (-3.0, 3.0, 0.0, "0.001348075806934295723"),
    (-3.0, 3.0, 0.3, "0.001349877025110157824"),
    (1e-08, 0.7, 0.3, "0.41667739691434459949"),
    (10.0, 1e-08, 0.3, "0.50000000398942280401"),
    (-0.5, 0.0, 0.3, "0.19689269305178950407"),
    (-0.5, 0.0, -0.3, "0.11164484567419739229"),
    (0.7, -0.5, -0.3, "0.19888588602491362944"),
    (-10.0, -3.0, -0.3, "1.0099995653700771969e-33"),
    (0.0, -10.0, -0.3, "5.7224329241396470879e-27"),
    (0.0, -10.0, 0.7071067811865475, "7.619853024160526066e-24"),
    (3.0, 10.0, 0.7071067811865475, "0.99865010196836990547"),
    (-3.0, 3.0, 0.7071067811865475, "0.0013498980316300021947"),
    (1e-08, 0.7, 0.7071067811865475, "0.47072679884816504144"),
    (1e-08, 0.7, -0.7071067811865475, "0.28730955562222027324"),
    (10.0, 1e-08, -0.7071067811865475, "0.50000000398942280401"),
    (-0.5, 0.0, -0.7071067811865475, "0.047597706401544942876"),
    (0.7, -0.5, -0.7071067811865475, "0.13996114679645458047"),
    (0.7, -0.5, 0.9, "0.30833449655803289085"),
    (-10.0, -3.0, 0.9, "7.619853024160526066e-24"),
    (0.0, -10.0, 0.9, "7.619853024160526066e-24"),
    (3.0, 10.0, 0.9, "0.99865010196836990547"),
    (3.0, 10.0, -0.9, "0.99865010196836990547"),
    (-3.0, 3.0, -0.9, "0.00073949364632631583963"),
    (1e-08, 0.7, -0.9, "0.26233745502870721467"),
    (10.0, 1e-08, -0.9, "0.50000000398942280401"),
    (10.0, 1e-08, 0.925000001, "0.50000000398942280401"),
    (-0.5, 0.0, 0.925000001, "0.30150189477873166445"),
    (0.7, -0.5, 0.925000001, "0.30849552620684897158"),
    (-10.0, -3.0, 0.925000001, "7.619853024160526066e-24"),
    (-10.0, -3.0, 0.9249999990000001, "7.619853024160526066e-24"),
    (0.0, -10.0, 0.9249999990000001, "7.619853024160526066e-24"),
    (3.0, 10.0, 0.9249999990000001, "0.99865010196836990547"),
    (-3.0, 3.0, 0.9249999990000001, "0.0013498980316300945267"),
    (-3.0, 3.0, -0.9249999990000001, "0.00065125762822519936593"),
    (1e-08, 0.7, -0.9249999990000001, "0.26009885499066247253"),
    (10.0, 1e-08, -0.9249999990000001, "0.50000000398942280401"),
    (-0.5, 0.0, -0.9249999990000001, "0.007035644299700413838"),
    (-0.5, 0.0, -0.925000001, "0.0070356439472552319082"),
    (0.7, -0.5, -0.925000001, "0.091609253635160488757"),
    (-10.0, -3.0, -0.925000001, "2.1337257349400438864e-252"),
    (0.0, -10.0, -0.925000001, "3.6976242488908876809e-155"),
    (0.0, -10.0, 0.999999, "7.619853024160526066e-24"),
    (3.0, 10.0, 0.999999, "0.99865010196836990547"),
    (-3.0, 3.0, 0.999999, "0.0013498980316300945267"),
    (1e-08, 0.7, 0.999999, "0.50000000398942280401"),
    (1e-08, 0.7, -0.999999, "0.2580363517663497754"),
    (10.0, 1e-08, -0.999999, "0.50000000398942280401"),
    (-0.5, 0.0, -0.999999, "6.8663339237152716921e-27153"),
    (0.7, -0.5, -0.999999, "0.066573886502913867746"),
    (0.7, -0.5, 1.0, "0.30853753872598689636"),
    (-10.0, -3.0, 1.0, "7.619853024160526066e-24"),
    (0.0, -10.0, 1.0, "7.619853024160526066e-24"),
    (3.0, 10.0, 1.0, "0.99865010196836990547"),
    (3.0, 10.0, -1.0, "0.99865010196836990547"),
    (-3.0, 3.0, -1.0, "0.0"),
    (1e-08, 0.7, -1.0, "0.2580363517663497754"),
    (10.0, 1e-08, -1.0, "0.50000000398942280401"),
    (10.0, 1e-08, 0.9999999999999998, "0.50000000398942280401"),
    (-0.5, 0.0, 0.9999999999999998, "0.30853753872598689636"),
    (0.7, -0.5, 0.9999999999999998, "0.30853753872598689636"),
    (-10.0, -3.0, 0.9999999999999998, "7.619853024160526066e-24"),
    (-10.0, -3.0, -0.9999999999999998, "2.0904243272068837231e-82636287725196163"),
    (0.0, -10.0, -0.9999999999999998, "1.0179968817241660659e-48897211671713720"),
    (3.0, 10.0, -0.9999999999999998, "0.99865010196836990547"),
    (-3.0, 3.0, -0.9999999999999998, "3.7258903829426898816e-11"),
]


@pytest.fixture(scope="module")
def ref_subset() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    assert [row[:3] for row in REF_TABLE] == _subset()
    h, k, r = (np.array(v) for v in zip(*_subset(), strict=True))
    ref = np.array([float(row[3]) for row in REF_TABLE])
    return h, k, r, ref


def _check_rows(rows: list[tuple[float, float, float, str]]) -> None:
    for h, k, r, v in rows:
        with mp.workdps(30):
            got = bvn_cdf_mp(h, k, r, dps=20)
            assert abs(got - mp.mpf(v)) <= mp.mpf(10) ** -18 * abs(got), (h, k, r)


def test_ref_table_live() -> None:
    _check_rows(REF_TABLE[5::11])


@pytest.mark.slow
def test_ref_table_all() -> None:
    _check_rows(REF_TABLE)


def _full_grid(hs: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.array(list(itertools.product(hs, hs, RHOS)))
    return g[:, 0], g[:, 1], g[:, 2]


def _t(x: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------- oracle --------------------


@pytest.mark.parametrize(("h", "k"), [(-3.0, 0.7), (1.5, -10.0), (0.0, 2.0)])
def test_oracle_independent(h: float, k: float) -> None:
    with mp.workdps(30):
        want = mp.ncdf(h) * mp.ncdf(k)
        assert abs(bvn_cdf_mp(h, k, 0.0) - want) <= mp.mpf(10) ** -25 * want


@pytest.mark.parametrize("rho", [-0.999999, -0.4, 0.6, 0.925 + 1e-9])
def test_oracle_origin(rho: float) -> None:
    with mp.workdps(30):
        want = mp.mpf(1) / 4 + mp.asin(mp.mpf(rho)) / (2 * mp.pi)
        assert abs(bvn_cdf_mp(0.0, 0.0, rho) - want) <= mp.mpf(10) ** -25


@pytest.mark.parametrize(
    ("h", "k", "rho"), [(-3.0, 0.7, 0.3), (1.0, -3.0, -0.999999), (-10.0, 2.0, 0.9)]
)
def test_oracle_reflection(h: float, k: float, rho: float) -> None:
    with mp.workdps(30):
        lhs = bvn_cdf_mp(h, k, rho) + bvn_cdf_mp(h, -k, -rho)
        assert abs(lhs - mp.ncdf(h)) <= mp.mpf(10) ** -25


def test_oracle_tail_relative_and_limits() -> None:
    # Deep tail: independent case has a closed form, so relative accuracy is checkable.
    with mp.workdps(30):
        want = mp.ncdf(-10) * mp.ncdf(-12)
        assert abs(bvn_cdf_mp(-10.0, -12.0, 0.0) / want - 1) < mp.mpf(10) ** -20
        v20, v40 = bvn_cdf_mp(-10.0, -3.0, -0.3, dps=20), bvn_cdf_mp(-10.0, -3.0, -0.3, dps=40)
        assert abs(v20 / v40 - 1) < mp.mpf(10) ** -18
        tol = mp.mpf(10) ** -28
        assert abs(bvn_cdf_mp(1.0, 2.0, 1.0) - mp.ncdf(1)) < tol
        assert abs(bvn_cdf_mp(1.0, 2.0, -1.0) - (mp.ncdf(1) - mp.ncdf(-2))) < tol
        assert bvn_cdf_mp(-1.0, 0.5, -1.0) == 0
        assert abs(bvn_cdf_mp(math.inf, 0.5, 0.3) - mp.ncdf(0.5)) < tol
        assert bvn_cdf_mp(-math.inf, 0.5, 0.3) == 0
    with pytest.raises(ValueError):
        bvn_cdf_mp(0.0, 0.0, 1.5)


@pytest.mark.parametrize("n", [1, 5, *GENZ_RULE_SIZES])
def test_gauss_legendre(n: int) -> None:
    x, w = gauss_legendre(n)
    assert len(x) == len(w) == n
    assert all(
        len(s.replace("-", "").replace(".", "").lstrip("0")) >= 17 or float(s) == 0
        for s in x + w
        if float(s) not in (0.0, 2.0)
    )
    xn, wn = np.polynomial.legendre.leggauss(n)
    np.testing.assert_allclose(np.array(x, float), xn, rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.array(w, float), wn, rtol=0, atol=2e-15)
    with mp.workdps(40):
        xm, wm = [mp.mpf(s) for s in x], [mp.mpf(s) for s in w]
        for p in range(2 * n):  # exact for degree <= 2n - 1 (to the 20 printed digits)
            q = sum(wi * xi**p for xi, wi in zip(xm, wm, strict=True))
            assert abs(q - (mp.mpf(2) / (p + 1) if p % 2 == 0 else 0)) < mp.mpf(10) ** -18


@pytest.mark.parametrize("n", [1, 6, 32])
def test_gauss_laguerre(n: int) -> None:
    """The Gauss–Laguerre rule (the ρ < 0 tail route's): NumPy's rule to rounding, exact for
    x^m e^{−x} (Σ w x^m = m!) up to degree 2n − 1 to the printed 20 digits, and the generated
    ``LAGUERRE`` is the derivation's rule of ``LAGUERRE_SIZE`` points rounded to float64."""
    from nmgen.derivations.cross_covariance import LAGUERRE_SIZE
    from nmgen.generated.gauss_legendre import LAGUERRE

    x, w = gauss_laguerre(n)
    assert len(x) == len(w) == n
    xn, wn = np.polynomial.laguerre.laggauss(n)
    np.testing.assert_allclose(np.array(x, float), xn, rtol=1e-13)
    np.testing.assert_allclose(np.array(w, float), wn, rtol=1e-12, atol=1e-300)
    with mp.workdps(40):
        xm, wm = [mp.mpf(s) for s in x], [mp.mpf(s) for s in w]
        for p in range(2 * n):
            q = sum(wi * xi**p for xi, wi in zip(xm, wm, strict=True))
            assert abs(q / mp.factorial(p) - 1) < mp.mpf(10) ** -17, p
    if n == LAGUERRE_SIZE:
        assert LAGUERRE == (tuple(float(v) for v in x), tuple(float(v) for v in w))


# ---------------------------------------------------------------- kernels vs oracle ---------


def test_numpy_vs_oracle(ref_subset) -> None:
    h, k, r, ref = ref_subset
    err = np.abs(bvn_np(h, k, r) - ref)
    assert err.max() <= 1e-15, (err.max(), (h, k, r))


@pytest.mark.parametrize("rules", ["default", "genz", "single"])
def test_torch_vs_oracle(ref_subset, rules: str) -> None:
    h, k, r, ref = ref_subset
    kw: dict = {}
    if rules == "genz":
        kw = {"rules": RULES}
    elif rules == "single":
        kw = {"nodes": RULES[20][0], "weights": RULES[20][1]}
    out = bvn_t(_t(h), _t(k), _t(r), **kw).numpy()
    err = np.abs(out - ref)
    assert err.max() <= 1e-15, err.max()


def test_float32_vs_float64(ref_subset) -> None:
    h, k, r, _ = ref_subset
    h32, k32, r32 = (v.astype(np.float32) for v in (h, k, r))
    # Reference at the float32-rounded inputs (the float64 NumPy kernel is checked above).
    want = bvn_np(h32.astype(np.float64), k32.astype(np.float64), r32.astype(np.float64))
    out_np = bvn_np(h32, k32, r32)
    out_t = bvn_t(torch.from_numpy(h32), torch.from_numpy(k32), torch.from_numpy(r32))
    assert out_np.dtype == np.float32 and out_t.dtype == torch.float32
    assert np.abs(out_np - want).max() <= 1e-6
    assert np.abs(out_t.numpy() - want).max() <= 1e-6


def test_numpy_torch_full_grid() -> None:
    """Two independent algorithms (Owen's T / Genz) on the whole stress grid, incl. ±40, ±inf."""
    h, k, r = _full_grid(HS + EXTRA_HS)
    a = bvn_np(h, k, r)
    b = bvn_t(_t(h), _t(k), _t(r), rules=RULES).numpy()
    assert np.isfinite(a).all() and np.isfinite(b).all()
    assert np.abs(a - b).max() <= 1e-15
    assert ((a >= 0) & (a <= 1)).all() and ((b >= 0) & (b <= 1)).all()
    h32, k32, r32 = (v.astype(np.float32) for v in (h, k, r))
    want = bvn_np(h32.astype(np.float64), k32.astype(np.float64), r32.astype(np.float64))
    c = bvn_t(torch.from_numpy(h32), torch.from_numpy(k32), torch.from_numpy(r32)).numpy()
    assert np.isfinite(c).all() and np.abs(c - want).max() <= 1e-6


@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_identities_and_limits(impl: str) -> None:
    def f(h, k, r):
        if impl == "numpy":
            return bvn_np(h, k, r)
        return bvn_t(
            _t(np.asarray(h, float)), _t(np.asarray(k, float)), _t(np.asarray(r, float))
        ).numpy()

    h, k, r = _full_grid([*HS, -1e-8, 1.5])
    np.testing.assert_allclose(f(h, k, r) + f(h, -k, -r), ndtr(h), rtol=0, atol=4.5e-16)
    np.testing.assert_allclose(f(h, k, r), f(k, h, r), rtol=0, atol=4.5e-16)
    hh = np.array(HS)
    np.testing.assert_allclose(f(hh, 0.7, 0.0), ndtr(hh) * ndtr(0.7), rtol=0, atol=4.5e-16)
    rr = np.array([-1, -0.999999, -0.5, 0, 0.3, 0.925, 0.999999, 1.0])
    np.testing.assert_allclose(
        f(0.0, 0.0, rr), 0.25 + np.arcsin(rr) / (2 * np.pi), rtol=0, atol=4.5e-16
    )
    np.testing.assert_allclose(f(math.inf, hh, 0.3), ndtr(hh), rtol=1e-14, atol=0)
    np.testing.assert_allclose(f(hh, math.inf, 1.0), ndtr(hh), rtol=1e-14, atol=0)
    assert np.all(f(hh, -math.inf, -0.3) == 0) and np.all(f(-math.inf, hh, 1.0) == 0)
    out = f(np.array([math.nan, 0.0, 0.0]), 0.0, np.array([0.0, math.nan, 1.5]))
    assert np.isnan(out).all()


def test_tail_values() -> None:
    """Tiny probabilities: absolute error far below 1e-15, never negative.

    (Relative accuracy is not guaranteed: both kernels add O(Φ(h)) terms that cancel.)
    """
    pts = [
        (-10.0, -10.0, 0.3),
        (-10.0, -3.0, -0.3),
        (-3.0, -3.0, -0.9),
        (-10.0, 10.0, -0.999999),
        (-10.0, -10.0, 0.999999),
        (-40.0, 3.0, 0.5),
    ]
    for h, k, r in pts:
        ref = float(bvn_cdf_mp(h, k, r, dps=20))
        for got in (float(bvn_np(h, k, r)), bvn_t(_t(h), _t(k), _t(r)).item()):
            assert got >= 0 and abs(got - ref) <= 1e-18, (h, k, r, got, ref)


# ---------------------------------------------------------------- torch API / autograd ------


def test_torch_api() -> None:
    h = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None, None]
    k = torch.linspace(-1, 3, 4, dtype=torch.float64)[None, :, None]
    r = torch.tensor([-1.0, -0.95, 0.1, 0.5, 0.8, 1.0], dtype=torch.float64)
    out = bvn_t(h, k, r)
    assert out.shape == (5, 4, 6) and out.dtype == torch.float64
    want = bvn_np(h.numpy(), k.numpy(), r.numpy())
    assert np.abs(out.numpy() - want).max() <= 1e-15
    out32 = bvn_t(h.float(), k.float(), 0.5)
    assert out32.dtype == torch.float32 and out32.shape == (5, 4, 1)
    for bad in (torch.float16, torch.bfloat16, torch.int64):
        with pytest.raises(TypeError, match=str(bad)):
            bvn_t(torch.zeros(3, dtype=bad), torch.zeros(3, dtype=bad), 0.5)
    with pytest.raises(ValueError):
        bvn_t(h, k, r, rules={6: RULES[6]})
    assert bvn_np(np.float32(0.1), np.float32(0.2), np.float32(0.3)).dtype == np.float32
    assert bvn_np(np.zeros((3, 1)), np.zeros(4), 0.5).shape == (3, 4)


def test_gradcheck_interior() -> None:
    h = torch.tensor([-1.3, 0.4, 2.1, 0.3, -0.8, 1.1], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([0.5, -0.7, 1.2, 0.35, -0.9, -1.5], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.2, -0.6, 0.8, 0.95, -0.97, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bvn_t, (h, k, r))
    assert torch.autograd.gradgradcheck(bvn_t, (h, k, r))
    # Scalar ρ broadcast against vectors: gradient is reduced over the broadcast.
    r0 = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bvn_t, (h, k, r0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_finite_at_edges(dtype: torch.dtype) -> None:
    vals = [-math.inf, -40.0, -3.0, 0.0, 1e-8, 0.7, 40.0, math.inf]
    rhos = [-1.0, -0.999999, -0.925, 0.0, 0.3, 0.925, 0.999999, 1.0]
    g = torch.tensor(list(itertools.product(vals, vals, rhos)), dtype=dtype)
    h, k, r = (g[:, i].clone().requires_grad_() for i in range(3))
    out = bvn_t(h, k, r)
    out.sum().backward()
    for t in (out, h.grad, k.grad, r.grad):
        assert torch.isfinite(t).all()
    # Spot check of the closed-form gradient inside the domain.
    i = ((h == 0.7) & (k == -3.0) & (r == 0.3)).nonzero().item()
    s = math.sqrt(1 - 0.3**2)
    phi = math.exp(-0.5 * 0.49) / math.sqrt(2 * math.pi)
    assert abs(h.grad[i].item() - phi * ndtr((-3 - 0.3 * 0.7) / s)) < 1e-6


# ---------------------------------------------------------------- slow: whole grid vs oracle -


@pytest.mark.slow
def test_full_grid_vs_oracle() -> None:
    pts = [(h, k, r) for r in RHOS for i, h in enumerate(HS) for k in HS[i:]]
    h, k, r = (np.array(v) for v in zip(*pts, strict=True))
    ref = np.array([float(bvn_cdf_mp(*p, dps=20)) for p in pts])
    assert np.abs(bvn_np(h, k, r) - ref).max() <= 1e-15
    assert np.abs(bvn_t(_t(h), _t(k), _t(r)).numpy() - ref).max() <= 1e-15
