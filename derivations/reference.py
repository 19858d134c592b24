"""mpmath references computed from the *definition* (quadrature), never from a formula under test.

Every expectation over a Gaussian is written as a 1-D quadrature on the standardized
variable, split at the ReLU kink, with the Gaussian tail factored out by hand:

    E[g(x) 1{x > 0}] = ∫_{t0}^∞ g(μ + σt) φ(t) dt,   t0 = −μ/σ,
                     = φ(t0) ∫_0^∞ g(σu) exp(−t0·u − u²/2) du        (t = t0 + u).

The second form keeps full relative accuracy when t0 ≫ 0 (μ ≪ 0: the whole mass is in a
far tail; plain quadrature of the first form is off by 7% at μ/σ = −8) and, splitting at the
peak u = −t0 when t0 < 0, stays exact for μ ≫ 0 too.

The bivariate cross moment E[relu(x1) relu(x2)] is the outer quadrature of
relu(x2)·E[relu(x1) | x2] over x2; the inner conditional expectation is itself the quadrature
above (``inner="quad"``, slow) or the textbook value m Φ(m/s) + s φ(m/s) evaluated by mpmath's
own ``ncdf``/``npdf`` (``inner="closed"``, default; the two agree to 30 digits, see
tests/test_reference.py). Each quadrature is run with ``error=True`` and rejected when its error
estimate is not tiny.
"""

from __future__ import annotations

from collections.abc import Callable

import mpmath as mp

DPS = 30


class ReferenceError(ArithmeticError):
    """Raised when a quadrature's own error estimate is too large to trust the reference."""


def _quad(f: Callable, points: list, tol_digits: int, factor=1, floor=0) -> mp.mpf:
    """factor·∫f, rejected unless its error estimate is ≤ 10^−tol_digits·max(|value|, floor).

    ``floor`` is the problem's scale (DESIGN.md): an error of 1e-32 × scale is far below
    every tolerance, so a 1e-60 value need not be relatively exact to 30 digits.
    """
    val, err = mp.quad(f, points, error=True, maxdegree=10)
    val, err = factor * val, factor * err
    tiny = abs(val) < mp.mpf(10) ** (-300)  # below float64's normal range: sign/size only
    if tiny and err <= abs(val) / 10 + mp.mpf(10) ** (-330):
        return val
    if err > mp.mpf(10) ** (-tol_digits) * max(abs(val), floor, mp.mpf(10) ** (-300)):
        raise ReferenceError(f"quadrature error estimate {mp.nstr(err, 3)} for value {val}")
    return val


def positive_part_expectation(g: Callable, mu, sigma, dps: int = DPS) -> mp.mpf:
    """E[g(x)·1{x>0}] for x ~ N(mu, sigma²), sigma > 0, by tail-factored quadrature.

    ``g`` is an mpmath-callable, smooth on x > 0.
    """
    with mp.workdps(dps + 15):
        mu, sigma = mp.mpf(mu), mp.mpf(sigma)
        t0 = -mu / sigma
        if t0 >= 0:  # mass in a tail: factor it out

            def integrand(u):
                return g(sigma * u) * mp.exp(-t0 * u - u * u / 2)

            floor = (abs(mu) + sigma) ** 2  # 1e-32 × scale² is plenty
            val = _quad(integrand, [0, mp.inf], dps + 2, factor=mp.npdf(t0), floor=floor)
        else:  # the kink lies left of the bulk: integrate φ directly from the kink

            def integrand(t):
                return g(mu + sigma * t) * mp.npdf(t)

            pts = [t0] + ([mp.mpf(-12)] if t0 < -12 else []) + [0, mp.inf]
            val = _quad(integrand, pts, dps + 2)
    return +val


def relu_mean_ref(mu, sigma, dps: int = DPS) -> mp.mpf:
    """E[max(x, 0)], x ~ N(mu, sigma²); sigma = 0 gives max(mu, 0)."""
    if sigma == 0:
        return mp.mpf(max(mu, 0))
    # homogeneity E[relu(μ + σZ)] = σ E[relu(μ/σ + Z)]: the quadrature runs at unit scale
    # (mpmath's error estimates have absolute floors that tiny σ such as 1e-300 would hit)
    with mp.workdps(dps + 15):
        h = mp.mpf(mu) / mp.mpf(sigma)
        return mp.mpf(sigma) * positive_part_expectation(lambda x: x, h, 1, dps)


def relu_second_moment_ref(mu, sigma, dps: int = DPS) -> mp.mpf:
    """E[max(x, 0)²], x ~ N(mu, sigma²)."""
    if sigma == 0:
        return mp.mpf(max(mu, 0)) ** 2
    with mp.workdps(dps + 15):
        h = mp.mpf(mu) / mp.mpf(sigma)
        return mp.mpf(sigma) ** 2 * positive_part_expectation(lambda x: x * x, h, 1, dps)


def relu_variance_ref(mu, sigma, dps: int = DPS) -> mp.mpf:
    """Var[max(x, 0)], from the two quadratures above at extra precision."""
    with mp.workdps(dps + 20):
        m = relu_mean_ref(mu, sigma, dps + 20)
        s = relu_second_moment_ref(mu, sigma, dps + 20)
        v = s - m * m
    return +v


def _conditional_relu_mean(m, s, inner: str, dps: int):
    if s == 0:
        return max(m, 0)
    if inner == "quad":
        return positive_part_expectation(lambda x: x, m, s, dps)
    h = m / s
    return m * mp.ncdf(h) + s * mp.npdf(h)


def relu_cross_moment_ref(
    mu1, mu2, sigma1, sigma2, rho, dps: int = DPS, inner: str = "closed"
) -> mp.mpf:
    """E[max(x1,0)·max(x2,0)] for a bivariate Gaussian (means mu, stds sigma, correlation rho).

    Outer quadrature over x2 (tail-factored, split at the kink of the inner term), inner
    conditional expectation over x1 | x2 ~ N(mu1 + rho·sigma1·(x2 − mu2)/sigma2,
    sigma1²(1 − rho²)). sigma = 0 and |rho| = 1 are handled from the definition too.
    """
    with mp.workdps(dps + 15):
        mu1, mu2, s1, s2, rho = (mp.mpf(v) for v in (mu1, mu2, sigma1, sigma2, rho))
        if s2 == 0:
            if mu2 <= 0:
                return mp.mpf(0)
            return mu2 * (relu_mean_ref(mu1, s1, dps) if s1 > 0 else max(mu1, 0))
        if s1 == 0:
            return max(mu1, 0) * relu_mean_ref(mu2, s2, dps)
        cs = s1 * mp.sqrt(max(1 - rho * rho, 0))

        def g(x2):
            m = mu1 + rho * s1 * (x2 - mu2) / s2
            return x2 * _conditional_relu_mean(m, cs, inner, dps + 10)

        t0 = -mu2 / s2
        pts = [mp.mpf(0)]
        if t0 < 0:
            pts += [p for p in (-t0 - 8, -t0, -t0 + 8) if p > 0]
        if rho != 0:
            # the inner term changes regime where its conditional mean crosses 0
            x2k = mu2 - mu1 * s2 / (rho * s1)
            uk = x2k / s2  # x2 = s2·u on the tail-factored axis
            if uk > 0:
                pts += [uk]
        pts = sorted(set(pts)) + [mp.inf]

        def integrand(u):
            return g(s2 * u) * mp.exp(-t0 * u - u * u / 2)

        try:  # relative certification (issue #10): no absolute floor
            val = _quad(integrand, pts, dps + 2, factor=mp.npdf(t0))
        except ReferenceError:
            if s1 > 0 and s2 > 0 and abs(rho) == 1:
                # |ρ| = 1: the one-dimensional integrals of the definition in closed form
                # (a value that is exactly 0, e.g. ρ = −1 with h + k < 0, cannot certify
                # relative digits by quadrature)
                e, _ = standard_pair_closed_form(mu1 / s1, mu2 / s2, rho, dps + 30)
                return +(s1 * s2 * e)
            if not (s1 > 0 and s2 > 0 and abs(rho) < 1):
                raise
            try:  # 30 guard digits first: Φ2 at dps + 60 digits costs ~70x more
                val = s1 * s2 * _cross_closed_ref(mu1 / s1, mu2 / s2, rho, dps, guard=30)
            except ReferenceError:
                val = s1 * s2 * _cross_closed_ref(mu1 / s1, mu2 / s2, rho, dps)
    return +val


def _cross_closed_ref(hv, kv, r, dps: int, guard: int = 60) -> mp.mpf:
    """Fallback where the quadrature above cannot certify ``dps`` relative digits (deep tails,
    where its absolute error criterion meets a tiny value): E(h, k, ρ) for σ1 = σ2 = 1, |ρ| < 1,
    by Rosenbaum's closed form with Φ2 by quadrature of its definition (``bvn_cdf_mp``), at
    dps + ``guard`` digits; rejected when its terms cancel more than ``guard`` − 5 digits."""
    from .bvn import bvn_cdf_mp

    with mp.workdps(dps + guard):
        h, k, r = mp.mpf(hv), mp.mpf(kv), mp.mpf(r)
        s = mp.sqrt((1 - r) * (1 + r))
        terms = (
            (h * k + r) * bvn_cdf_mp(h, k, r, dps + guard),
            h * mp.npdf(k) * mp.ncdf((h - r * k) / s),
            k * mp.npdf(h) * mp.ncdf((k - r * h) / s),
            s * mp.npdf(h) * mp.npdf((k - r * h) / s),
        )
        e = mp.fsum(terms)
        if abs(e) < mp.mpf(10) ** (5 - guard) * max(abs(t) for t in terms):
            raise ReferenceError(f"cross moment reference (closed form): cancels beyond {guard}")
    return +e


def relu_cross_moment_zero_mean_ref(sigma1, sigma2, rho, dps: int = DPS) -> mp.mpf:
    """E[max(x1,0)·max(x2,0)] with zero means (Lemma 3's setting), from the definition."""
    return relu_cross_moment_ref(0, 0, sigma1, sigma2, rho, dps)


def to_float(x) -> float:
    """mpf -> float through 17 significant digits (exactly the nearest double)."""
    return float(mp.nstr(x, 17, strip_zeros=False))


def standard_pair_closed_form(h, k, r, dps: int) -> tuple[mp.mpf, mp.mpf]:
    """(E, C) of the standardized pair (σ1 = σ2 = 1) at ``dps`` digits: Rosenbaum's E with
    Φ2 by quadrature of its definition; at ρ = ±1 the one-dimensional integrals."""
    from .bvn import bvn_cdf_mp

    with mp.workdps(dps):
        h, k, r = mp.mpf(h), mp.mpf(k), mp.mpf(r)

        def m(x):
            return x * mp.ncdf(x) + mp.npdf(x)

        if r == 1:  # E[(h + Z)⁺(k + Z)⁺] = ∫_c^∞ (h + z)(k + z) φ(z) dz, c = max(−h, −k)
            c = max(-h, -k)
            e = h * k * mp.ncdf(-c) + (h + k) * mp.npdf(c) + c * mp.npdf(c) + mp.ncdf(-c)
        elif r == -1:  # ∫_{−h}^{k} (h + z)(k − z) φ(z) dz for h + k > 0
            # Φ(h) + Φ(k) − 1 = Φ(h) − Φ(−k): no 1 + tiny − 1 at the working precision
            e = (h * k - 1) * (mp.ncdf(h) - mp.ncdf(-k)) + k * mp.npdf(h) + h * mp.npdf(k)
            e = e if h + k > 0 else mp.mpf(0)
        else:
            s = mp.sqrt((1 - r) * (1 + r))
            e = (
                (h * k + r) * bvn_cdf_mp(h, k, r, dps)
                + h * mp.npdf(k) * mp.ncdf((h - r * k) / s)
                + k * mp.npdf(h) * mp.ncdf((k - r * h) / s)
                + s * mp.npdf(h) * mp.npdf((k - r * h) / s)
            )
        return e, e - m(h) * m(k)
