"""Lemma 2 (extended Price theorem), checked numerically in the bivariate case.

Statement (p = 2): for x ~ N(μ, Σ) and a nonlinearity Ψ of moderate growth,

    ∂E[Ψ(x)]/∂σ12 = E[∂²Ψ/∂x1∂x2],     σ12 = Σ(1, 2), σ1², σ2², μ held fixed.

The paper proves it for zero-mean inputs in Price's setting; the Fourier argument of the proof
does not use μ = 0, and the checks below include non-zero means. Both sides are computed
independently: the left by mpmath numerical differentiation of a quadrature of E[Ψ], the right
by quadrature of the mixed derivative (for Ψ = relu·relu it is u(x1)u(x2), so the right side
is P(x1 > 0, x2 > 0)). Nothing here uses a formula of the paper.
"""

from __future__ import annotations

from collections.abc import Callable

import mpmath as mp

from .reference import relu_cross_moment_ref


def gaussian_expectation_2d(f: Callable, mu1, mu2, s1, s2, rho, dps: int = 20) -> mp.mpf:
    """E[f(x1, x2)] by 2-D quadrature on the standardized variables (smooth f)."""
    with mp.workdps(dps + 10):
        c = mp.sqrt(1 - mp.mpf(rho) ** 2)

        def integrand(z1, z2):
            x1 = mu1 + s1 * z1
            x2 = mu2 + s2 * (rho * z1 + c * z2)
            return f(x1, x2) * mp.npdf(z1) * mp.npdf(z2)

        val = mp.quad(integrand, [-mp.inf, 0, mp.inf], [-mp.inf, 0, mp.inf])
    return +val


def orthant_probability(mu1, mu2, s1, s2, rho, dps: int = 20) -> mp.mpf:
    """P(x1 > 0, x2 > 0) = E[u(x1) u(x2)] by quadrature over x2 of P(x1 > 0 | x2)."""
    with mp.workdps(dps + 10):
        cs = s1 * mp.sqrt(1 - mp.mpf(rho) ** 2)

        def integrand(x2):
            m = mu1 + rho * s1 * (x2 - mu2) / s2
            return mp.ncdf(m / cs) * mp.npdf((x2 - mu2) / s2) / s2

        val = mp.quad(integrand, [0, mu2 + 0 * s2 if mu2 > 0 else 1, mp.inf])
    return +val


def price_sides(psi: str, mu1, mu2, s1, s2, rho, dps: int = 20) -> tuple[mp.mpf, mp.mpf]:
    """(∂E[Ψ]/∂σ12, E[∂²Ψ/∂x1∂x2]) for Ψ in {"relu_product", "smooth"}.

    "smooth" is Ψ = sin(x1 + 1)·exp(x2/2), whose mixed derivative is cos(x1 + 1)·exp(x2/2)/2.
    """
    with mp.workdps(dps + 10):
        s1, s2 = mp.mpf(s1), mp.mpf(s2)
        s12 = mp.mpf(rho) * s1 * s2

        if psi == "relu_product":

            def expectation(c):
                return relu_cross_moment_ref(mu1, mu2, s1, s2, c / (s1 * s2), dps + 10)

            rhs = orthant_probability(mu1, mu2, s1, s2, rho, dps)
        elif psi == "smooth":

            def expectation(c):
                return gaussian_expectation_2d(
                    lambda a, b: mp.sin(a + 1) * mp.exp(b / 2),
                    mu1,
                    mu2,
                    s1,
                    s2,
                    c / (s1 * s2),
                    dps + 10,
                )

            rhs = gaussian_expectation_2d(
                lambda a, b: mp.cos(a + 1) * mp.exp(b / 2) / 2, mu1, mu2, s1, s2, rho, dps
            )
        else:
            raise ValueError(f"unknown Ψ {psi!r}; use 'relu_product' or 'smooth'")
        lhs = mp.diff(expectation, s12, h=mp.mpf(10) ** (-(dps // 3)))
    return +lhs, +rhs


CASES = (
    ("relu_product", 0.0, 0.0, 1.0, 1.0, 0.3),
    ("relu_product", 0.7, -0.4, 1.3, 0.8, -0.5),
    ("relu_product", -1.2, 2.0, 0.5, 2.0, 0.8),
    ("smooth", 0.0, 0.0, 1.0, 1.0, 0.3),
    ("smooth", 0.5, -1.0, 0.7, 1.2, -0.6),
)


def check_price(tol: float = 1e-8, cases=CASES) -> bool:
    """Both sides agree to ``tol`` relative for every case in ``cases``."""
    for case in cases:
        lhs, rhs = price_sides(*case)
        rel = abs(lhs - rhs) / max(abs(rhs), mp.mpf(1e-30))
        assert rel < tol, f"Lemma 2 fails at {case}: {lhs} vs {rhs} (rel {mp.nstr(rel, 3)})"
    return True


def check_price_relu_product() -> bool:
    """Lemma 2 for Ψ = relu(x1)relu(x2) at three (μ, Σ), non-zero means included (seconds)."""
    return check_price(cases=[c for c in CASES if c[0] == "relu_product"])


def check_price_smooth() -> bool:
    """Lemma 2 for a smooth Ψ (2-D quadratures: minutes; ``nmgen prove --slow``)."""
    return check_price(tol=1e-6, cases=[c for c in CASES if c[0] == "smooth"])


CHECKS = (check_price_relu_product,)
SLOW_CHECKS = (check_price_smooth,)
KERNELS = ()
