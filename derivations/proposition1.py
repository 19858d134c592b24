r"""Proposition 1 (appendix): with μ1 = μ2 = 0 the series of Lemma 4 recovers Lemma 3.

Lemma 3: E[x1⁺ x2⁺] = σ1σ2/(2π) (ρ sin⁻¹ρ + √(1-ρ²)) + ρσ1σ2/4.

Steps (paper Eqs. 17-20), each checked by a ``check_*`` function that returns True or
raises AssertionError:

- Eq. 17: Ω(0,0,σ1,σ2,ρ) = σ1σ2√(1-ρ²)/(2π) + ρσ1σ2/4 and I_{a,0}(0) = 0, so
  E = Ω0 + ρσ1σ2/π I_{a,0}(∞) (|ρ| < 1/√2), Ω0 + ρσ1σ2/π sign ρ (π/4 - I_{1/|a|,0}(∞))
  (|ρ| > 1/√2), a = ρ/√(1-ρ²) (the paper's "I_{√(1-ρ²)|ρ|/,0}" is I_{√(1-ρ²)/|ρ|,0}).
- Eq. 18: erf(0) = 0, P(·,∞) = 1, H_odd(0) = 0 leave √π/2 Σ (a/2)^(2u+1)/Γ(u+3/2) H_2u(0).
- Eq. 19: H_2u(0) = (-1)^u (2u)!/u! and Γ(u+3/2) = (u+1/2)(2u)!√π/(4^u u!) give
  I_{a,0}(∞) = ½ Σ (-1)^u a^(2u+1)/(2u+1) = ½ tan⁻¹(a)  (|a| ≤ 1).
- Eq. 20: tan⁻¹(ρ/√(1-ρ²)) = sin⁻¹ρ, and sign ρ (π/2 - tan⁻¹(√(1-ρ²)/|ρ|)) = sin⁻¹ρ
  (the paper's closing remark, printed "π/2 = tan⁻¹(√(1-ρ²)/2)", reads
  π/2 - tan⁻¹(√(1-ρ²)/ρ) = π/2 - cos⁻¹ρ = sin⁻¹ρ).
"""

from __future__ import annotations

import sympy as sp

from .functions import to_elementary
from .lemma4_series import (
    HermiteH,
    I_series,
    omega,
    series_branches,
)

s1, s2 = sp.symbols("sigma1 sigma2", positive=True)
rho = sp.Symbol("rho", real=True)
a = sp.Symbol("a", real=True)
u = sp.Symbol("u", integer=True, nonnegative=True)
r = sp.Symbol("r", positive=True)


def lemma3(s1: sp.Expr, s2: sp.Expr, rho: sp.Expr) -> sp.Expr:
    """Lemma 3 with σ12 = ρσ1σ2."""
    return s1 * s2 / (2 * sp.pi) * (rho * sp.asin(rho) + sp.sqrt(1 - rho**2)) + rho * s1 * s2 / 4


def _zero(expr: sp.Expr, what: str) -> None:
    d = sp.simplify(to_elementary(expr))
    if d != 0:
        raise AssertionError(f"{what}: difference does not simplify to 0: {d}")


def check_omega0() -> bool:
    """Ω(0, 0, σ1, σ2, ρ) = σ1σ2√(1-ρ²)/(2π) + ρσ1σ2/4."""
    _zero(
        omega(0, 0, s1, s2, rho)
        - (s1 * s2 * sp.sqrt(1 - rho**2) / (2 * sp.pi) + rho * s1 * s2 / 4),
        "Omega(0,0)",
    )
    return True


def check_eq17(terms: int = 6) -> bool:
    """Eq. 17: I_{a,0}(0) = 0 and Eq. 1 at μ = 0 reduces to the two I(∞) forms."""
    if sp.simplify(I_series(a, 0, 0, terms)) != 0:
        raise AssertionError("I_{a,0}(0) != 0")
    om0 = s1 * s2 * sp.sqrt(1 - rho**2) / (2 * sp.pi) + rho * s1 * s2 / 4
    ar = rho / sp.sqrt(1 - rho**2)
    b1, b2 = series_branches(0, 0, s1, s2, rho, terms)
    e17_1 = om0 + rho * s1 * s2 / sp.pi * I_series(ar, 0, sp.oo, terms)
    a2 = sp.sqrt(1 - rho**2) / sp.Abs(rho)
    e17_2 = om0 + rho * s1 * s2 / sp.pi * sp.sign(rho) * (sp.pi / 4 - I_series(a2, 0, sp.oo, terms))
    _zero(b1 - e17_1, "Eq. 17 branch 1")
    _zero(b2 - e17_2, "Eq. 17 branch 2")
    return True


def check_eq18(terms: int = 30) -> bool:
    """Eq. 18 (truncated) and H_2u(0) = (-1)^u (2u)!/u!, H_(2u+1)(0) = 0."""
    eq18 = (
        sp.sqrt(sp.pi)
        / 2
        * sp.Add(
            *[
                (a / 2) ** (2 * k + 1) / sp.gamma(k + sp.Rational(3, 2)) * sp.hermite(2 * k, 0)
                for k in range(terms)
            ]
        )
    )
    if sp.expand(I_series(a, 0, sp.oo, terms) - eq18) != 0:
        raise AssertionError("Eq. 18 mismatch")
    for k in range(terms):
        if sp.hermite(2 * k + 1, 0) != 0 or HermiteH(2 * k + 1, 0) != 0:
            raise AssertionError(f"H_{2 * k + 1}(0) != 0")
        want = (-1) ** k * sp.factorial(2 * k) / sp.factorial(k)
        if sp.hermite(2 * k, 0) != want or HermiteH(2 * k, 0) != want:
            raise AssertionError(f"H_{2 * k}(0) != (-1)^u (2u)!/u!")
    return True


def check_eq19(terms: int = 60) -> bool:
    """Eq. 19: termwise identity for symbolic u, sum = atan(a)/2 (symbolic + 30 digits)."""
    term = (
        sp.sqrt(sp.pi)
        / 2
        * (a / 2) ** (2 * u + 1)
        / sp.gamma(u + sp.Rational(3, 2))
        * (-1) ** u
        * sp.factorial(2 * u)
        / sp.factorial(u)
    )
    target = (-1) ** u * a ** (2 * u + 1) / (2 * (2 * u + 1))
    if sp.simplify(sp.gammasimp(sp.combsimp(term / target))) != 1:
        raise AssertionError("Eq. 19 termwise identity failed")
    # Γ(u+3/2) = (u+1/2)(2u)!√π/(4^u u!)
    g = (u + sp.Rational(1, 2)) * sp.factorial(2 * u) * sp.sqrt(sp.pi) / (4**u * sp.factorial(u))
    if sp.simplify(sp.gammasimp(sp.gamma(u + sp.Rational(3, 2)) / g)) != 1:
        raise AssertionError("Gamma(u+3/2) identity failed")
    # Σ (-1)^u a^(2u+1)/(2u+1) is the Maclaurin series of atan(a)
    n = 12
    ser = sp.series(sp.atan(a), a, 0, 2 * n + 1).removeO()
    partial = sp.Add(*[(-1) ** k * a ** (2 * k + 1) / (2 * k + 1) for k in range(n)])
    if sp.expand(ser - partial) != 0:
        raise AssertionError("atan Maclaurin series mismatch")
    summed = sp.summation(2 * target, (u, 0, sp.oo))
    if isinstance(summed, sp.Piecewise):
        summed = summed.args[0][0]
    if sp.simplify(summed - sp.atan(a)) != 0:
        # sympy may return an equivalent hypergeometric form; compare numerically below
        for av in (sp.Rational(3, 10), sp.Rational(-7, 10)):
            if abs(sp.N(summed.subs(a, av) - sp.atan(av), 40)) > 1e-30:
                raise AssertionError(f"summation gives {summed}")
    # the truncated I_series itself, to 30 digits
    for av in (sp.Rational(1, 10), sp.Rational(-3, 10), sp.Rational(1, 2)):
        val = sp.N(I_series(av, 0, sp.oo, terms), 40)
        err = abs(val - sp.N(sp.atan(av) / 2, 40))
        if err > sp.Float("1e-30") and abs(av) < sp.Rational(1, 2):
            raise AssertionError(f"I_(a,0)(oo) at a={av}: error {err}")
    return True


def check_eq20() -> bool:
    """Eq. 20: atan(ρ/√(1-ρ²)) = asin ρ and sign ρ (π/2 - atan(√(1-ρ²)/|ρ|)) = asin ρ."""
    f1 = sp.atan(rho / sp.sqrt(1 - rho**2)) - sp.asin(rho)
    if sp.simplify(sp.diff(f1, rho)) != 0 or f1.subs(rho, 0) != 0:
        raise AssertionError("atan(rho/sqrt(1-rho^2)) != asin(rho)")
    # ρ = ±r, r ∈ (0, 1]: derivative 0 on (0, 1) and value 0 at r = 1 (continuous there)
    for sgn in (1, -1):
        rr = sgn * r
        f2 = sp.sign(rr) * (sp.pi / 2 - sp.atan(sp.sqrt(1 - rr**2) / sp.Abs(rr))) - sp.asin(rr)
        if sp.simplify(sp.diff(f2, r)) != 0 or f2.subs(r, 1) != 0:
            raise AssertionError(f"branch-2 identity failed for sign {sgn}")
    for rv in ("0.3", "-0.6", "0.75", "-0.95"):
        x = sp.Float(rv, 40)
        d1 = sp.N(f1.subs(rho, x), 40)
        d2 = sp.N((sp.sign(x) * (sp.pi / 2 - sp.atan(sp.sqrt(1 - x**2) / abs(x))) - sp.asin(x)), 40)
        if abs(d1) > 1e-35 or abs(d2) > 1e-35:
            raise AssertionError(f"Eq. 20 numeric failure at rho={rv}")
    return True


def check_lemma3(terms: int = 70) -> bool:
    """Final identity: both branches of Eq. 1 at μ = 0 equal Lemma 3 (symbolic + 30 digits)."""
    # with Eq. 19 (I_{a,0}(∞) = atan(a)/2) the difference to Lemma 3 is ρσ1σ2/(2π) times
    # the Eq. 20 identities (checked to vanish in check_eq20)
    check_eq20()
    om0 = s1 * s2 * sp.sqrt(1 - rho**2) / (2 * sp.pi) + rho * s1 * s2 / 4
    e1 = om0 + rho * s1 * s2 / sp.pi * sp.atan(rho / sp.sqrt(1 - rho**2)) / 2
    f1 = sp.atan(rho / sp.sqrt(1 - rho**2)) - sp.asin(rho)
    if sp.simplify(e1 - lemma3(s1, s2, rho) - rho * s1 * s2 / (2 * sp.pi) * f1) != 0:
        raise AssertionError("branch 1 != Lemma 3")
    for sgn in (1, -1):
        rr = sgn * r
        a2 = sp.sqrt(1 - rr**2) / sp.Abs(rr)
        e2 = om0.subs(rho, rr) + rr * s1 * s2 / sp.pi * sp.sign(rr) * (sp.pi / 4 - sp.atan(a2) / 2)
        f2 = sp.sign(rr) * (sp.pi / 2 - sp.atan(a2)) - sp.asin(rr)
        if sp.simplify(e2 - lemma3(s1, s2, rr) - rr * s1 * s2 / (2 * sp.pi) * f2) != 0:
            raise AssertionError(f"branch 2 != Lemma 3 (sign {sgn})")
    # the truncated series themselves (μ = 0), 30 digits
    b1, b2 = series_branches(0, 0, s1, s2, rho, terms)
    for rv, br in (("-0.5", b1), ("0.2", b1), ("0.45", b1), ("0.9", b2), ("-0.9", b2)):
        vals = {s1: sp.Float("1.3", 50), s2: sp.Float("0.7", 50), rho: sp.Float(rv, 50)}
        got = to_elementary(br).evalf(45, subs=vals)
        want = lemma3(s1, s2, rho).evalf(45, subs=vals)
        if abs(got - want) > 1e-30:
            raise AssertionError(f"series at rho={rv}: {got} vs Lemma 3 {want}")
    return True


CHECKS = (check_omega0, check_eq17, check_eq18, check_eq19, check_eq20, check_lemma3)


def main() -> None:
    for chk in CHECKS:
        print(f"{chk.__name__}: {chk()}")


if __name__ == "__main__":
    main()
