"""Piecewise-linear operations as ReLUs of affine functions, and their Gaussian moments.

Layer-wise propagation (``torchbridge.propagate``) needs the moments of every PL operation of
a network under a Gaussian. Each is written through ReLUs of affine functions of its inputs,
so the exact ReLU kernels give them (no new kernel):

1. LeakyReLU / PReLU with slope a:   leaky(z) = a·z + (1 − a)·relu(z).
2. Hardtanh(lo, hi), ReLU6 = Hardtanh(0, 6), clamp(lo, hi):
                                     clamp(z) = lo + relu(z − lo) − relu(z − hi).
3. abs:                              |z| = 2·relu(z) − z.
4. max / min of two:                 max(a, b) = b + relu(a − b),  min(a, b) = a − relu(a − b).
5. Max-pooling after a ReLU:         max_k relu(z_k) = relu(max_k z_k)  (relu is monotone).

Moments. For (x, y) jointly Gaussian, x ~ N(μ, σ²), Stein's lemma gives the cross-covariance
of a ReLU with any Gaussian unit (proved below by integration, from the definition):

6. Cov[relu(x), y] = Cov[x, y] · Φ(μ/σ).

Hence, for jointly Gaussian inputs, the mean and covariance of each operation above are
*exact* combinations of: the ReLU mean and covariance of the (jointly Gaussian) affine
arguments (Theorem 1, Lemma 1, the exact cross moment), Stein's lemma for the ReLU–linear
cross terms, and the input covariance. E.g. with d = a − b ~ N(μ_d, θ²):
E[max(a, b)] = μ_b + E[relu(d)], Var[max(a, b)] = Var[b] + Var[relu(d)]
+ 2 Φ(μ_d/θ) (Cov[a, b] − Var[b])  (Clark 1961).

The one approximation of propagation through several layers is the Gaussian *re-fit*: the
output of each ReLU (and so of each operation above) is replaced by the Gaussian with its
exact mean and covariance before the next layer. Max-pooling over k > 2 elements is a tree of
pairwise maxima, re-fitted after each level.

7. Pairing of a 4-element window. The part of relu(d), d ~ N(μ, θ²), that no linear
   function of d explains has variance
                                     N(μ, θ²) = Var[relu(d)] − Cov[relu(d), d]²/θ²
                                              = Var[relu(d)] − Φ(μ/θ)² θ²      (by 6.)
   (≥ 0 by Cauchy–Schwarz). max(a, b) = b + relu(a − b) is Gaussian exactly when N = 0, so of
   the three pairings of a window {z1..z4} the one with the smallest N(a−b) + N(c−d) sends
   the most nearly Gaussian pair of maxima to the second level's re-fit. A selection rule
   only (no moment depends on it being optimal); the reference below integrates the
   definition.
8. Max-pooling in the diagonal-plus-low-rank form (Cov = F Fᵀ + diag D): a window's K × K
   covariance F_w F_wᵀ + diag D_w is formed in full and its tree evaluated with items 4 and 6
   exactly as with a full covariance (no new formula); its output keeps the factor row
   F_out (the exact cross-covariance with the input noise, by 6. through the tree) and
   D_out = Var[out] − |F_out|². ``tests/test_propagate.py`` checks that its marginals equal
   the full-covariance tree's to 1e-12.

References here are mpmath quadratures of the definition (kinks split, ≥ 25 digits).
"""

from __future__ import annotations

import mpmath as mp
import sympy as sp

from .functions import Phi, to_elementary
from .theorem1 import gaussian_density

z, a_, lo, b_ = sp.symbols("z a lo b", real=True)
u, v = sp.symbols("u v", positive=True)


def relu(t: sp.Expr) -> sp.Expr:
    return sp.Max(t, 0)


def _same(lhs: sp.Expr, rhs: sp.Expr) -> bool:
    return sp.simplify(lhs - rhs) == 0


def check_leaky() -> bool:
    """a·z + (1 − a)·relu(z) equals z for z > 0 and a·z for z < 0."""
    for zz, want in ((u, u), (-u, -a_ * u)):
        assert _same(a_ * zz + (1 - a_) * relu(zz), want)
    return True


def check_hardtanh() -> bool:
    """lo + relu(z − lo) − relu(z − hi) = min(max(z, lo), hi) in all three regions."""
    cases = [  # (z, hi, expected)
        (lo - u, lo + v, lo),  # z < lo
        (lo + u, lo + u + v, lo + u),  # lo < z < hi
        (lo + v + u, lo + v, lo + v),  # z > hi
    ]
    for zz, hi, want in cases:
        got = lo + relu(zz - lo) - relu(zz - hi)
        assert _same(got, want), (zz, hi, got)
        assert _same(sp.Min(sp.Max(zz, lo), hi), want)
    return True


def check_abs() -> bool:
    """2·relu(z) − z = |z| on both sides of 0."""
    return all(_same(2 * relu(zz) - zz, sp.Abs(zz)) for zz in (u, -u))


def check_max_min() -> bool:
    """b + relu(a − b) = max(a, b) and a − relu(a − b) = min(a, b) (a > b and a < b)."""
    for aa in (b_ + u, b_ - u):
        assert _same(b_ + relu(aa - b_), sp.Max(aa, b_))
        assert _same(aa - relu(aa - b_), sp.Min(aa, b_))
    return True


def check_relu_max_commute() -> bool:
    """relu(max(a, b)) = max(relu(a), relu(b)) in every sign / order region."""
    regions = [(u + v, v), (v, u + v), (v, -u), (-u, v), (-u, -u - v), (-u - v, -u)]
    for aa, bb in regions:
        assert _same(relu(sp.Max(aa, bb)), sp.Max(relu(aa), relu(bb)))
    return True


def check_stein_relu() -> bool:
    """Cov[relu(x), y] = Cov[x, y]·Φ(μ/σ) for (x, y) jointly Gaussian.

    y − E[y] = β(x − μ) + e with β = Cov[x, y]/σ² and e independent of x, so
    Cov[relu(x), y] = β·E[relu(x)(x − μ)]; the integral ∫_0^∞ t (t − μ) N(t; μ, σ²) dt is
    σ²Φ(μ/σ) (SymPy, from the definition)."""
    mu = sp.Symbol("mu", real=True)
    sigma = sp.Symbol("sigma", positive=True)
    t = sp.Symbol("t", real=True)
    integral = sp.integrate(
        t * (t - mu) * gaussian_density(t, mu, sigma), (t, 0, sp.oo), conds="none"
    )
    diff = sp.simplify(sp.expand_func(integral - to_elementary(sigma**2 * Phi(mu / sigma))))
    assert diff == 0, f"Stein's lemma mismatch: {diff}"
    return True


CHECKS = (
    check_leaky,
    check_hardtanh,
    check_abs,
    check_max_min,
    check_relu_max_commute,
    check_stein_relu,
)

# ---- mpmath references from the definition ---------------------------------------------
DPS = 30


def _gauss_expect(g, mu, sigma, kinks) -> mp.mpf:
    """E[g(x)], x ~ N(mu, sigma²), by quadrature of g(μ + σt)φ(t) split at the kinks."""
    mu, sigma = mp.mpf(mu), mp.mpf(sigma)
    # the standard normal mass beyond |t| = 40 is below 1e-340: integrate over [-40, 40]
    pts = sorted({0, *(t for t in ((mp.mpf(k) - mu) / sigma for k in kinks) if -40 < t < 40)})
    val, err = mp.quad(lambda t: g(mu + sigma * t) * mp.npdf(t), [-40, *pts, 40], error=True)
    if err > mp.mpf(10) ** (8 - mp.mp.dps) * max(abs(val), 1):
        raise ArithmeticError(f"quadrature error {err} for {val}")
    return val


def hardtanh_moments_ref(mu, sigma, lo, hi, dps: int = DPS) -> tuple[mp.mpf, mp.mpf]:
    """(mean, variance) of min(max(x, lo), hi), x ~ N(mu, sigma²), from the definition."""
    with mp.workdps(dps):
        lo_, hi_ = mp.mpf(lo), mp.mpf(hi)

        def g(t):
            return min(max(t, lo_), hi_)

        m = _gauss_expect(g, mu, sigma, [lo, hi])
        s = _gauss_expect(lambda t: g(t) ** 2, mu, sigma, [lo, hi])
        return m, s - m * m


def leaky_moments_ref(mu, sigma, slope, dps: int = DPS) -> tuple[mp.mpf, mp.mpf]:
    """(mean, variance) of leaky(x) = x if x > 0 else slope·x, x ~ N(mu, sigma²)."""
    with mp.workdps(dps):
        a = mp.mpf(slope)

        def g(t):
            return t if t > 0 else a * t

        m = _gauss_expect(g, mu, sigma, [0])
        s = _gauss_expect(lambda t: g(t) ** 2, mu, sigma, [0])
        return m, s - m * m


def pair_covariance_ref(g1, g2, mu1, mu2, s1, s2, rho, kinks1, kinks2, dps: int = 20) -> mp.mpf:
    """Cov[g1(x1), g2(x2)] for a bivariate normal, by nested quadrature of the definition:
    outer over x1 (split at ``kinks1``), inner E[g2(x2) | x1] over the conditional normal
    (split at ``kinks2``)."""
    with mp.workdps(dps):
        mu1, mu2, s1, s2, rho = (mp.mpf(t) for t in (mu1, mu2, s1, s2, rho))
        cs = s2 * mp.sqrt(1 - rho * rho)

        def inner(x1):
            cm = mu2 + rho * s2 * (x1 - mu1) / s1
            return _gauss_expect(g2, cm, cs, kinks2)

        e12 = _gauss_expect(lambda x1: g1(x1) * inner(x1), mu1, s1, kinks1)
        e1 = _gauss_expect(g1, mu1, s1, kinks1)
        e2 = _gauss_expect(g2, mu2, s2, kinks2)
        return e12 - e1 * e2


def relu_linear_covariance_ref(mu1, mu2, s1, s2, rho, dps: int = DPS) -> mp.mpf:
    """Cov[relu(x1), x2] = E[relu(x1)·(E[x2 | x1] − μ2)] with E[x2 | x1] = μ2 + ρ s2 (x1 − μ1)/s1:
    one quadrature over x1 (split at the kink), from the definition."""
    with mp.workdps(dps):
        mu1, s1, s2, rho = (mp.mpf(t) for t in (mu1, s1, s2, rho))
        del mu2  # the covariance does not depend on E[x2]
        return _gauss_expect(lambda x: max(x, 0) * rho * s2 * (x - mu1) / s1, mu1, s1, [0])


def relu_nonlinear_variance_ref(mu, theta, dps: int = DPS) -> mp.mpf:
    """Var[relu(d)] − Cov[relu(d), d]²/θ² for d ~ N(mu, theta²), every expectation by
    quadrature of the definition (item 7 of the module docstring)."""
    with mp.workdps(dps):
        m = _gauss_expect(lambda t: max(t, 0), mu, theta, [0])
        s = _gauss_expect(lambda t: max(t, 0) ** 2, mu, theta, [0])
        c = _gauss_expect(lambda t: max(t, 0) * (t - mp.mpf(mu)), mu, theta, [0])
        return s - m * m - c * c / mp.mpf(theta) ** 2


def max_moments_ref(mu_a, mu_b, s_a, s_b, rho, dps: int = DPS) -> tuple[mp.mpf, mp.mpf]:
    """(mean, variance) of max(a, b) for a bivariate normal, from the definition: a and b are
    written in two independent standard normals, s along a − b and w orthogonal to it; both
    carry the same w-term γw, so E_w[max(a, b)^k] is elementary (E w = 0, E w² = 1) and max()
    is integrated literally over s, split at the kink a = b."""
    with mp.workdps(dps):
        mu_a, mu_b, s_a, s_b, rho = (mp.mpf(t) for t in (mu_a, mu_b, s_a, s_b, rho))
        cab = rho * s_a * s_b
        theta = mp.sqrt(s_a**2 + s_b**2 - 2 * cab)  # sd of d = a − b
        beta = (cab - s_b**2) / theta  # Cov(b, d)/θ
        gamma = mp.sqrt(max(s_b**2 - beta**2, 0))
        kink = -(mu_a - mu_b) / theta  # d = 0

        def top(s):  # max(a, b) at w = 0
            b = mu_b + beta * s
            return max(b + (mu_a - mu_b) + theta * s, b)

        def moment(k):
            f = (lambda s: top(s)) if k == 1 else (lambda s: top(s) ** 2 + gamma**2)
            return _gauss_expect(f, 0, 1, [kink])

        m = moment(1)
        return m, moment(2) - m * m
