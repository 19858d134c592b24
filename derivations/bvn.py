"""Bivariate standard normal CDF: mpmath reference and Gauss-Legendre constants.

``bvn_cdf_mp(h, k, rho)`` computes Φ2(h, k; ρ) = P(Z1 < h, Z2 < k), corr(Z1, Z2) = ρ, from
the definition

    Φ2(h, k; ρ) = ∫_{-∞}^{h} φ(z) Φ((k − ρ z)/√(1 − ρ²)) dz,

with mpmath's tanh-sinh quadrature at ``dps`` + 15 working digits, split at the points where
the integrand has its mass or its steep step (so values down to 1e-300 keep their relative
accuracy), and with the exact limits Φ(min(h, k)) for ρ = 1 and
max(0, Φ(h) + Φ(k) − 1) = max(0, Φ(min(h, k)) − Φ(−max(h, k))) for ρ = −1. A quadrature
whose error estimate is not tiny (relative to the value) raises ``ArithmeticError``.

``gauss_legendre(n, dps)`` returns the n-point Gauss-Legendre rule on [−1, 1] as decimal
strings (20 significant digits), computed by Newton iteration on the Legendre polynomial in
mpmath. The PyTorch kernel ``nmruntime.bvn_torch.bvn_cdf`` uses the rules of sizes 6, 12
and 20 (the choice of [Genz2004]_, following [DW1990]_).

References
----------
.. [Genz2004] A. Genz, "Numerical computation of rectangular bivariate and trivariate normal
   and t probabilities", Statistics and Computing 14 (2004) 251-260.
.. [DW1990] Z. Drezner and G. O. Wesolowsky, "On the computation of the bivariate normal
   integral", Journal of Statistical Computation and Simulation 35 (1990) 101-107.
"""

from __future__ import annotations

import mpmath as mp

__all__ = [
    "GENZ_RULE_SIZES",
    "bvn_cdf_mp",
    "gauss_legendre",
    "interval_prob_mp",
    "narrow_rule_error_bound",
]

#: Rule sizes used by the PyTorch kernel (|ρ| < 0.3, < 0.75, otherwise).
GENZ_RULE_SIZES: tuple[int, ...] = (6, 12, 20)


def _ncdf(x: mp.mpf) -> mp.mpf:
    """Φ(x) with full relative accuracy in both tails."""
    return mp.erfc(-x / mp.sqrt(2)) / 2


def bvn_cdf_mp(
    h: float | str | mp.mpf, k: float | str | mp.mpf, rho: float | str | mp.mpf, dps: int = 30
) -> mp.mpf:
    """Reference Φ2(h, k; ρ) as an ``mpf`` accurate to about ``dps`` significant digits.

    Inputs may be floats (taken exactly), strings or ``mpf``; h, k may be ±inf.
    """
    with mp.workdps(dps + 15):
        h, k, rho = mp.mpf(h), mp.mpf(k), mp.mpf(rho)
        if mp.isnan(h) or mp.isnan(k) or mp.isnan(rho):
            raise ValueError("bvn_cdf_mp: NaN input")
        if not -1 <= rho <= 1:
            raise ValueError(f"bvn_cdf_mp: rho={rho} outside [-1, 1]")
        if h == -mp.inf or k == -mp.inf:
            return mp.mpf(0)
        if h == mp.inf:
            return +_ncdf(k)
        if k == mp.inf:
            return +_ncdf(h)
        lo, hi = min(h, k), max(h, k)
        if rho == 1:
            return +_ncdf(lo)
        if rho == -1:
            return max(mp.mpf(0), _ncdf(lo) - _ncdf(-hi))
        s = mp.sqrt((1 - rho) * (1 + rho))

        def f(z: mp.mpf) -> mp.mpf:
            return mp.npdf(z) * _ncdf((k - rho * z) / s)

        # Break points: where the integrand has its mass (0, ρk, the corner) and where the
        # conditional CDF steps (z = k/ρ, width s/|ρ|).
        sc = 1 / max(abs(h), 1)
        cand = [mp.mpf(0), rho * k] + [h - c * sc for c in (mp.mpf(1) / 4, 1, 4, 16)]
        if rho != 0:
            z0, w = k / rho, s / abs(rho)
            cand += [z0 + c * w for c in (-30, -8, -3, -1, 0, 1, 3, 8, 30)]
        cand += [mp.mpf(c) for c in (-40, -20, -10, -5, -2, 2, 5)]
        pts = sorted({c for c in cand if c < h})
        # Drop break points closer than 1e-3 of the local scale to avoid degenerate pieces.
        grid = [-mp.inf]
        for p in pts:
            if grid[-1] == -mp.inf or p - grid[-1] > mp.mpf(10) ** (-6) * min(s, 1):
                grid.append(p)
        if len(grid) > 1 and h - grid[-1] <= mp.mpf(10) ** (-6) * min(s, 1):
            grid.pop()
        grid.append(h)
        # Scale by the largest sampled integrand value: mpmath's error estimate has an absolute
        # floor near 10**-(working dps), which must sit far below the (possibly tiny) value.
        scale = max(f(p) for p in grid[1:])
        if scale == 0:
            return mp.mpf(0)
        val, err = mp.quad(lambda z: f(z) / scale, grid, error=True, maxdegree=10)
        val, err = val * scale, err * scale
        if not err <= mp.mpf(10) ** (-dps) * abs(val) + mp.mpf(10) ** (-(dps + 300)):
            raise ArithmeticError(
                f"bvn_cdf_mp({h}, {k}, {rho}): quadrature error estimate {err} for {val}"
            )
        return val


def gauss_legendre(n: int, dps: int = 40) -> tuple[list[str], list[str]]:
    """n-point Gauss-Legendre rule on [−1, 1]: (nodes ascending, weights) as 20-digit strings.

    Nodes are the roots of P_n found by Newton's method in mpmath at ``dps`` digits; weights
    are 2 / ((1 − x²) P_n'(x)²).
    """
    if n < 1:
        raise ValueError("gauss_legendre: n must be >= 1")
    with mp.workdps(dps + 10):

        def legendre(x: mp.mpf) -> tuple[mp.mpf, mp.mpf]:
            p0, p1 = mp.mpf(1), x
            for j in range(2, n + 1):
                p0, p1 = p1, ((2 * j - 1) * x * p1 - (j - 1) * p0) / j
            dp = n * (x * p1 - p0) / (x * x - 1)
            return p1, dp

        nodes: list[mp.mpf] = []
        weights: list[mp.mpf] = []
        tol = mp.mpf(10) ** (-(dps + 5))
        for i in range(1, n + 1):
            x = mp.cos(mp.pi * (i - mp.mpf(1) / 4) / (n + mp.mpf(1) / 2))
            for _ in range(100):
                p, dp = legendre(x)
                dx = p / dp
                x -= dx
                if abs(dx) < tol:
                    break
            else:  # pragma: no cover - Newton converges quadratically from this start
                raise ArithmeticError(f"gauss_legendre({n}): Newton did not converge")
            if abs(x) < tol:
                x = mp.mpf(0)
            _, dp = legendre(x)
            nodes.append(x)
            weights.append(2 / ((1 - x * x) * dp * dp))
        order = sorted(range(n), key=lambda j: nodes[j])
        return ([mp.nstr(nodes[j], 20) for j in order], [mp.nstr(weights[j], 20) for j in order])


def gauss_laguerre(n: int, dps: int = 40) -> tuple[list[str], list[str]]:
    """n-point Gauss–Laguerre rule, ∫_0^∞ e^{−x} f(x) dx ≈ Σ w_i f(x_i): (nodes ascending,
    weights) as 20-digit strings, from mpmath's ``gauss_quadrature`` (Golub–Welsch: the
    eigenvalues and eigenvectors of the Jacobi matrix) at ``dps`` + 10 digits."""
    if n < 1:
        raise ValueError("gauss_laguerre: n must be >= 1")
    with mp.workdps(dps + 10):
        x, w = mp.gauss_quadrature(n, "laguerre")
        order = sorted(range(n), key=lambda j: x[j])
        return ([mp.nstr(x[j], 20) for j in order], [mp.nstr(w[j], 20) for j in order])


def interval_prob_mp(a: float | str | mp.mpf, b: float | str | mp.mpf, dps: int = 30) -> mp.mpf:
    """Reference P(a < Z < b) (0 if b ≤ a): ½(erfc(a/√2) − erfc(b/√2)) at enough extra digits
    that the difference does not cancel (the working precision grows with −log10 of the
    relative width, and the result is checked against the same difference at 20 more digits).
    """
    a, b = mp.mpf(a), mp.mpf(b)
    if b <= a:
        return mp.mpf(0)

    def diff(extra: int) -> mp.mpf:
        with mp.workdps(dps + extra):
            lo, hi = (a, b) if a >= 0 else (-b, -a)  # the tail side: no 1 − erfc
            return (mp.erfc(lo / mp.sqrt(2)) - mp.erfc(hi / mp.sqrt(2))) / 2

    with mp.workdps(30):
        width = (b - a) / (1 + abs(a) + abs(b))
        extra = 20 + int(max(0, -mp.log10(width))) + int(mp.log10(1 + a * a + b * b))
    v, w = diff(extra), diff(extra + 20)
    with mp.workdps(dps + 5):
        if not abs(v - w) <= mp.mpf(10) ** (-dps) * abs(w):
            raise ArithmeticError(f"interval_prob_mp({a}, {b}): not certified")
        return +w


def narrow_rule_error_bound(n: int = 12, ellipse: float = 8.0) -> mp.mpf:
    """Relative error bound of the n-point Gauss–Legendre rule used by the kernels'
    ``interval_prob`` on narrow intervals (d·(|m| + 1) ≤ 1, m = (a + b)/2, d = (b − a)/2).

    There P(a < Z < b) = d φ(m) ∫_{−1}^{1} g(x) dx, g(x) = exp(−d x (m + d x/2)), entire in x.
    On the Bernstein ellipse E_ϱ (foci ±1, ϱ = ``ellipse``), |x| ≤ (ϱ + 1/ϱ)/2 = X, so
    |g| ≤ M = exp(X d|m| + X² d²/2) ≤ exp(X + X²/2) (d|m| ≤ 1, d ≤ 1), and the rule's error is
    at most (64/15) M ϱ^{−2n}/(ϱ² − 1) (Trefethen, *Approximation Theory and Approximation
    Practice*, Thm 19.3). On [−1, 1], g ≥ exp(−d|m| − d²/2) ≥ e^{−3/2}, so ∫g ≥ 2e^{−3/2}:
    the bound returned is the absolute bound divided by that.

    The wide intervals use erfc (or erf) differences. For a ≥ 0 (b ≤ 0 by symmetry), log Φc is
    concave with slope −λ(x), λ = φ/Φc ≥ max(λ(0), x), λ(0) = √(2/π) > 0.797, so
    Φc(b)/Φc(a) ≤ exp(−2d·max(0.797, a)): d ≥ ½ gives ≤ e^{−0.797} < 0.46; d < ½ outside the
    narrow set gives a = m − d > 1/d − 1 − d, 2da > 2 − 2d − 2d² > ½, ratio ≤ e^{−1/2} < 0.61.
    The difference then loses at most a factor 1/(1 − 0.61) < 2.6; a < 0 < b adds two terms of
    one sign.
    """
    with mp.workdps(30):
        rho = mp.mpf(ellipse)
        x = (rho + 1 / rho) / 2
        big = mp.exp(x + x * x / 2)
        err = mp.mpf(64) / 15 * big * rho ** (-2 * n) / (rho**2 - 1)
        return err / (2 * mp.exp(mp.mpf(-3) / 2))
