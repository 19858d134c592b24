"""Cov[relu(x1), relu(x2)] without cancellation (ours; issue #10), and tail-exact ReLU moments.

Result. For x_i = μ_i + σ_i Z_i, corr(Z1, Z2) = ρ, h = μ1/σ1, k = μ2/σ2, C = Cov/(σ1σ2):

    ∂C/∂ρ = Φ2(h, k; ρ)  (Lemma 2 with Ψ = relu·relu; E[relu x_i] does not depend on ρ),
    C(h, k, 0) = 0       (independence),   hence   C = ∫_0^ρ Φ2(h, k; r) dr.

Writing Φ2(h, k; r) = Φ(h)Φ(k) + ∫_0^r φ2(t) dt for r ≥ 0 and Φ2 = L + ∫_{−1}^r φ2(t) dt,
L = Φ2(h, k; −1) = max(0, Φ(h) + Φ(k) − 1), for r < 0 and swapping the order of integration:

    ρ ≥ 0:  C = ρ Φ(h)Φ(k) + ∫_0^ρ (ρ − t) φ2(h, k; t) dt,
    ρ < 0:  C = −[ |ρ| L + |ρ| ∫_{−1}^{ρ} φ2 dt + ∫_ρ^0 |t| φ2 dt ],

sums of non-negative terms (inside the bracket): nothing cancels, unlike
E[relu x1 relu x2] − E[relu x1]E[relu x2]. With t = sin θ, φ2 dt = e^{G(θ)}/(2π) dθ,
G = −(h² − 2hk sin θ + k²)/(2cos²θ), a bounded smooth integrand. For h, k > 0,
relu(x) = x + relu(−x) gives C(h, k, ρ) = ρ P(−h < Z < k) + C(−h, −k, ρ) (two terms of the
sign of ρ), so |μ|/σ up to 1e8 and beyond keeps every digit. The cross moment is
E = E[relu x1]E[relu x2] + σ1σ2 C for ρ ≥ 0 (positive terms) and, for ρ < 0,
E = σ1σ2[E(h, k, −1) + (1 + ρ) L + ∫_{−1}^ρ (ρ − t) φ2 dt] (positive terms).
The one-variable moments use Laplace's continued fraction for the Mills ratio below
μ/σ = −2 (``nmruntime/relu_pair.py``), so they too keep relative accuracy to underflow.

Numerics (``nmruntime/relu_pair.py``): every integral is a ``RULE_SIZE``-point
Gauss–Legendre rule (nodes and weights computed here with mpmath, printed by nmgen) on a
sinh-mapped variable centred at the integrand's peak, with the part near |θ| = π/2 in
v = −log cos θ. Checks: the ρ-derivative and the value at ρ = 0 symbolically (through the
exact closed form of ``exact_cross_moment``), the swapped integral forms and the reflection
identity against mpmath quadrature, and the kernels against the definition-based reference
``relu_cross_covariance_ref`` by ``nmgen verify``.
"""

from __future__ import annotations

import mpmath as mp
import sympy as sp

from .bvn import bvn_cdf_mp
from .exact_cross_moment import exact_expr, h, k, mu1, mu2, rho, sigma1, sigma2
from .functions import BVN, Phi, ReluCovStd, phi, to_elementary
from .reference import DPS, ReferenceError, relu_mean_ref
from .spec import PAIR_ARGS, PAIR_SYMBOLS, Case, KernelSpec

#: Gauss–Legendre rule size of the runtime's pair integrals.
RULE_SIZE = 32
#: Rule sizes of the runtime's direct route (``nmruntime.pair_direct._cov_direct``: the bulk of
#: moderate pairs, C = ρΦ(h)Φ(k) + ∫_0^ρ (ρ − t) φ2(h, k; t) dt on t = ρ(1 + x)/2, one size
#: per |ρ| group and dtype; 48 and 80: the group 0.925 ≤ |ρ| < 0.99 of float32 and float64,
#: in float64 arithmetic; 15: float32's compiled one pass, ``nmruntime.pair_direct.
#: DIRECT_ONE_PASS``; 22: float64's second compiled pass, in s, ``DIRECT_S_GROUPS``).
DIRECT_RULE_SIZES: tuple[int, ...] = (6, 8, 10, 12, 14, 15, 16, 18, 20, 22, 24, 28, 32, 48, 80)
#: Gauss–Laguerre rule size of the runtime's ρ < 0 tail route (``nmruntime.pair_direct.
#: cov_neg_tail``: Φ2(h, k; ρ) = ∫_{−1}^ρ φ2 dt in the variable u = B(1/(1 + t) − 1/(1 + ρ))).
LAGUERRE_SIZE = 32

_m = lambda t: t * Phi(t) + phi(t)  # noqa: E731 - E[(t + Z)⁺]
cov_expr = exact_expr - sigma1 * sigma2 * _m(h) * _m(k)


def check_rho_derivative() -> bool:
    """∂Cov/∂ρ = σ1σ2 Φ2(h, k; ρ): the Φ2 terms cancel exactly; the rest vanishes to 40 digits."""
    d = sp.expand(sp.diff(cov_expr, rho) - sigma1 * sigma2 * BVN(h, k, rho))
    assert not d.has(BVN)
    d = to_elementary(d)
    R = sp.Rational
    for pt in (
        (R(2, 5), R(-3, 10), R(6, 5), R(7, 10), R(7, 20)),
        (R(-1), R(2), R(1, 2), 1, R(-4, 5)),
    ):
        val = sp.N(d.subs(dict(zip((mu1, mu2, sigma1, sigma2, rho), pt, strict=True))), 50)
        assert abs(val) < sp.Float(10) ** -40, val
    return True


def check_zero_at_rho_zero() -> bool:
    """Cov = 0 at ρ = 0 (Φ2(h, k; 0) = Φ(h)Φ(k)), symbolically."""
    e = cov_expr.subs(rho, 0).subs(BVN(h, k, 0), Phi(h) * Phi(k))
    e = sp.expand(e).subs({Phi(-h): 1 - Phi(h), Phi(-k): 1 - Phi(k)})
    assert sp.simplify(sp.expand(to_elementary(e))) == 0
    return True


def cov_integral_forms_mp(hv, kv, r, dps: int = 30) -> tuple[mp.mpf, mp.mpf]:
    """(∫_0^ρ Φ2 dr by quadrature, the positive-term form) at 30 digits, for the checks."""
    with mp.workdps(dps + 10):
        hv, kv, r = mp.mpf(hv), mp.mpf(kv), mp.mpf(r)

        def phi2(t):
            s2 = (1 - t) * (1 + t)
            return mp.exp(-(hv * hv - 2 * hv * kv * t + kv * kv) / (2 * s2)) / (
                2 * mp.pi * mp.sqrt(s2)
            )

        direct = mp.quad(lambda t: bvn_cdf_mp(hv, kv, t, dps), [0, r])
        if r >= 0:
            form = r * mp.ncdf(hv) * mp.ncdf(kv) + mp.quad(lambda t: (r - t) * phi2(t), [0, r])
        else:
            low = max(mp.mpf(0), mp.ncdf(hv) + mp.ncdf(kv) - 1)
            form = -(-r * (low + mp.quad(phi2, [-1, r])) + mp.quad(lambda t: -t * phi2(t), [r, 0]))
    return direct, form


#: (h, k, ρ) of ``check_positive_forms`` (both signs of ρ: the swapped form differs).
POSITIVE_FORMS_POINTS = ((0.4, -0.3, 0.35), (-1.0, 2.0, -0.8), (1.5, 0.5, -0.3), (-2.0, -1.0, 0.9))
#: (h, k, ρ) of ``check_reflection``.
REFLECTION_POINTS = ((0.7, 1.2, 0.5), (2.0, 0.3, -0.6))


def check_positive_forms(points=POSITIVE_FORMS_POINTS, dps: int = 30) -> bool:
    """The swapped (positive-term) forms equal ∫_0^ρ Φ2 dr and Cov from the closed form
    (``cov_expr`` evaluated by mpmath at dps + 10 digits, Φ2 by ``bvn_cdf_mp``), within
    10^−(dps − 5), at ``points`` ((h, k, ρ)). ∫_0^ρ Φ2 dr is a quadrature of quadratures:
    tens of seconds per point at 30 digits."""
    closed = sp.lambdify(
        (mu1, mu2, rho, sp.Symbol("P2")),
        to_elementary(
            cov_expr.subs({sigma1: 1, sigma2: 1}).replace(BVN, lambda *a: sp.Symbol("P2"))
        ),
        modules="mpmath",
    )
    tol = mp.mpf(10) ** -(dps - 5)
    for hv, kv, r in points:
        direct, form = cov_integral_forms_mp(hv, kv, r, dps)
        with mp.workdps(dps + 10):
            c = closed(mp.mpf(hv), mp.mpf(kv), mp.mpf(r), bvn_cdf_mp(hv, kv, r, dps + 10))
        assert abs(direct - form) < tol, (hv, kv, r, direct, form)
        assert abs(c - form) < tol, (hv, kv, r, c, form)
    return True


def check_reflection(points=REFLECTION_POINTS, dps: int = 30) -> bool:
    """C(h, k, ρ) = ρ P(−h < Z < k) + C(−h, −k, ρ) (relu(x) = x + relu(−x)) at ``points``
    ((h, k, ρ)), within 10^−(dps − 5)."""
    tol = mp.mpf(10) ** -(dps - 5)
    for hv, kv, r in points:
        lhs, _ = cov_integral_forms_mp(hv, kv, r, dps)
        rhs0, _ = cov_integral_forms_mp(-hv, -kv, r, dps)
        with mp.workdps(dps + 10):
            rhs = r * (mp.ncdf(kv) - mp.ncdf(-hv)) + rhs0
        assert abs(lhs - rhs) < tol, (hv, kv, r)
    return True


CHECKS = (check_rho_derivative, check_zero_at_rho_zero, check_positive_forms, check_reflection)


def relu_cross_covariance_ref(m1, m2, s1, s2, r, dps: int = DPS) -> mp.mpf:
    """Cov[relu(x1), relu(x2)] from the definition, without cancellation.

    Cov = E[(relu(x2) − E relu x2)(g(x2) − E relu x1)], g(x2) = E[relu(x1) | x2] (the
    conditional mean of a Gaussian's ReLU, evaluated by mpmath), by quadrature over z2
    (split at the kink x2 = 0, at the kink of g and around the bulk), at dps + 20 +
    log10(1 + |h| + |k|) working digits so the centred factors keep ``dps`` digits.
    Where that quadrature's error estimate exceeds 10^−dps·|value| (deep tails), the closed
    form at dps + 60 digits (``_cov_closed_ref``; |ρ| < 1) or ∫_0^ρ Φ2 (|ρ| = 1) is used.
    """
    m1, m2, s1, s2, r = (mp.mpf(v) for v in (m1, m2, s1, s2, r))
    if s1 == 0 or s2 == 0 or r == 0:  # a constant, or independent variables: Cov = 0 exactly
        return mp.mpf(0)
    if (s1, s2) != (1, 1):  # Cov scales with σ1σ2: evaluate at unit scale (exact in mpmath)
        with mp.workdps(dps + 30):
            return s1 * s2 * relu_cross_covariance_ref(m1 / s1, m2 / s2, 1, 1, r, dps)
    extra = int(mp.log10(1 + abs(m1 / s1) + abs(m2 / s2))) + 20
    with mp.workdps(dps + extra):
        e1 = relu_mean_ref(m1, s1, dps + extra)
        e2 = relu_mean_ref(m2, s2, dps + extra)
        cs = s1 * mp.sqrt(max((1 - r) * (1 + r), 0))
        kk = m2 / s2

        def g(z2):
            m = m1 + r * s1 * z2
            if cs == 0:
                return max(m, 0)
            t = m / cs
            return m * mp.ncdf(t) + cs * mp.npdf(t)

        def f(z2):
            x2 = m2 + s2 * z2
            return (max(x2, 0) - e2) * (g(z2) - e1) * mp.npdf(z2)

        pts = {mp.mpf(0), -kk}
        w = 1 / (1 + abs(kk))
        pts |= {-kk + c * w for c in (-16, -4, -1, -mp.mpf(1) / 4, mp.mpf(1) / 4, 1, 4, 16)}
        if r != 0:
            zk = -m1 / (r * s1)  # kink of g (its conditional mean crosses 0)
            wk = cs / (abs(r) * s1) if cs > 0 else mp.mpf(1)
            pts |= {zk + c * wk for c in (-8, -1, 0, 1, 8)}
        pts |= {mp.mpf(c) for c in (-40, -10, -3, 3, 10, 40)}
        grid = [-mp.inf, *sorted(p for p in pts if abs(p) < 60), mp.inf]
        val, err = mp.quad(f, grid, error=True, maxdegree=10)
        if err > mp.mpf(10) ** (-dps) * abs(val) + mp.mpf(10) ** (-(dps + extra + 300)):
            if abs(r) < 1:
                try:  # 30 guard digits first: Φ2 at dps + 60 digits costs ~70x more
                    return _cov_closed_ref(m1, m2, r, dps, guard=30)
                except ReferenceError:
                    return _cov_closed_ref(m1, m2, r, dps)
            for guard in (30, 60):  # |ρ| = 1: the closed forms, then ∫_0^ρ Φ2 (slow)
                try:
                    return _cov_pm1_closed_ref(m1, m2, r, dps, guard)
                except ReferenceError:
                    pass
            return _cov_rho_integral_ref(m1, m2, r, dps)
    return +val


def _cov_pm1_closed_ref(hv, kv, r, dps: int, guard: int) -> mp.mpf:
    """|ρ| = 1, σ1 = σ2 = 1: C = E − m(h)m(k) with E(h, k, 1) = ∫_c^∞ (h + z)(k + z)φ(z) dz
    (c = max(−h, −k)) = hkΦ(−c) + (h + k + c)φ(c) + Φ(−c), and E(h, k, −1) =
    ∫_{−h}^{k} (h + z)(k − z)φ(z) dz = (hk − 1)(Φ(h) − Φ(−k)) + kφ(h) + hφ(k) (h + k > 0, else
    0), at dps + ``guard`` digits; rejected when the subtraction cancels beyond ``guard`` − 5."""
    with mp.workdps(dps + guard):
        h, k = mp.mpf(hv), mp.mpf(kv)
        if r > 0:
            c = max(-h, -k)
            e = h * k * mp.ncdf(-c) + (h + k + c) * mp.npdf(c) + mp.ncdf(-c)
        elif h + k > 0:
            e = (h * k - 1) * (mp.ncdf(h) - mp.ncdf(-k)) + k * mp.npdf(h) + h * mp.npdf(k)
        else:
            e = mp.mpf(0)
        mm = (h * mp.ncdf(h) + mp.npdf(h)) * (k * mp.ncdf(k) + mp.npdf(k))
        cov = e - mm
        if abs(cov) < mp.mpf(10) ** (5 - guard) * max(abs(e), abs(mm)):
            raise ReferenceError(f"cov reference (|ρ| = 1 closed form): cancels beyond {guard}")
    return +cov


def _cov_closed_ref(hv, kv, r, dps: int, guard: int = 60) -> mp.mpf:
    """Fallback where the centred quadrature cannot certify itself (deep tails), |ρ| < 1:
    σ1σ2 = 1, C = E − m(h)m(k) with Rosenbaum's E and Φ2 by quadrature of its definition
    (``bvn_cdf_mp``), all at dps + ``guard`` digits; rejected when the subtraction cancels
    more than ``guard`` − 5 digits (|C| < 10^{5−guard} E)."""
    with mp.workdps(dps + guard):
        h, k, r = mp.mpf(hv), mp.mpf(kv), mp.mpf(r)
        s = mp.sqrt((1 - r) * (1 + r))
        e = (
            (h * k + r) * bvn_cdf_mp(h, k, r, dps + guard)
            + h * mp.npdf(k) * mp.ncdf((h - r * k) / s)
            + k * mp.npdf(h) * mp.ncdf((k - r * h) / s)
            + s * mp.npdf(h) * mp.npdf((k - r * h) / s)
        )
        c = e - (h * mp.ncdf(h) + mp.npdf(h)) * (k * mp.ncdf(k) + mp.npdf(k))
        if abs(c) < mp.mpf(10) ** (5 - guard) * abs(e):
            raise ReferenceError(f"cov reference (closed form): cancels beyond {guard} digits")
    return +c


def _cov_rho_integral_ref(hv, kv, r, dps: int) -> mp.mpf:
    """Fallback where the centred quadrature cannot certify itself (deep tails): C =
    ∫_0^ρ Φ2(h, k; t) dt (Lemma 2, proved above) with Φ2 by quadrature of its definition
    (``bvn_cdf_mp``), split geometrically towards the end where Φ2 is largest."""
    with mp.workdps(dps + 10):
        hv, kv, r = mp.mpf(hv), mp.mpf(kv), mp.mpf(r)
        if r == 0:
            return mp.mpf(0)
        # Φ2 increases with t: its mass sits at t = ρ (ρ > 0) or at t = 0 (ρ < 0)
        if r > 0:
            pts = [mp.mpf(0)] + [r * (1 - mp.mpf(2) ** -j) for j in range(1, 14)] + [r]
        else:
            pts = [r] + [r * mp.mpf(2) ** -j for j in range(1, 14)] + [mp.mpf(0)]
        val, err = mp.quad(lambda t: bvn_cdf_mp(hv, kv, t, dps), pts, error=True, maxdegree=8)
        val = val if r > 0 else -val  # pts ascend, so for ρ < 0 quad gave ∫_ρ^0
        if abs(val) < mp.mpf(10) ** (-300) and err <= abs(val) / 10 + mp.mpf(10) ** (-330):
            return +val  # below float64's normal range: only sign and size are checked
        if err > mp.mpf(10) ** (-(dps - 5)) * abs(val) + mp.mpf(10) ** (-(dps + 330)):
            raise ReferenceError(f"cov reference (ρ-integral): error {mp.nstr(err, 3)} for {val}")
    return +val


_m1, _m2, _s1, _s2, _r = PAIR_SYMBOLS


def _pair_scale(a: float, b: float, c: float, d: float, r: float) -> float:
    return (abs(a) + c) * (abs(b) + d)


KERNELS = (
    KernelSpec(
        name="relu_cross_covariance",
        args=PAIR_ARGS,
        cases=(
            Case(
                _s1 * _s2 * ReluCovStd(_m1 / _s1, _m2 / _s2, _r),
                sp.And(_s1 > 0, _s2 > 0),
                {_s1: 1.0, _s2: 1.0},
                "σ1, σ2 > 0: σ1σ2 ∫_0^ρ Φ2(h, k; r) dr in positive-term form",
            ),
            Case(sp.Integer(0) * _r, sp.true, {}, "σ1 = 0 or σ2 = 0: a constant has no covariance"),
        ),
        doc="Cov[max(x1,0), max(x2,0)] for a bivariate Gaussian: means mu1, mu2, stds sigma1, "
        "sigma2, correlation rho (no cancellation: relative accuracy in every regime).",
        source="derivations/cross_covariance.py",
        equation="the ReLU covariance σ1σ2∫_0^ρ Φ2 dr (ours; Lemma 2 with Ψ = relu·relu)",
        reference=relu_cross_covariance_ref,
        scale=_pair_scale,
        grid="pair_cov",
    ),
)
