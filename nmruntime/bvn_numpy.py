"""Bivariate standard normal CDF Φ2(h, k; ρ) = P(Z1 < h, Z2 < k) in NumPy via Owen's T.

For h k ≠ 0 and |ρ| < 1 (Owen 1956; e.g. [Genz2004]_ eq. (3) ff.)

    Φ2(h, k; ρ) = ½Φ(h) + ½Φ(k) − T(h, a_h) − T(k, a_k) − β,
    a_h = (k − ρh)/(h√(1−ρ²)),  a_k = (h − ρk)/(k√(1−ρ²)),  β = ½ if h k < 0 else 0,

and for k = 0 (the limit k → 0, valid for every h, including h = 0)

    Φ2(h, 0; ρ) = ½Φ(h) − T(h, −ρ/√(1−ρ²))     (symmetrically for h = 0).

The ρ = −1 value (also the lower Fréchet bound) is the interval probability
P(−max(h, k) < Z < min(h, k)) without cancellation (``interval_prob``).

Care taken: k − ρh is evaluated as (k − h) + (1 − ρ)h for ρ > ½ (and (k + h) − (1 + ρ)h for
ρ < −½) so that a_h keeps its accuracy near |ρ| = 1; √(1−ρ²) = √((1−ρ)(1+ρ)); β = ½ uses
½(Φ(min) − Φ(−max)) instead of ½(Φ(h) + Φ(k)) − ½; |ρ| = 1 uses the exact limits
Φ(min(h, k)) and P(−max(h, k) < Z < min(h, k)); h, k are clipped to ±40 (exact in
double precision: Φ(−40) < 1e-349), which also covers ±inf; the result is clipped to the
Fréchet bounds [max(0, Φ(h) + Φ(k) − 1), Φ(min(h, k))]. NaN or |ρ| > 1 gives NaN.

.. [Genz2004] A. Genz, "Numerical computation of rectangular bivariate and trivariate normal
   and t probabilities", Statistics and Computing 14 (2004) 251-260.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import erf, erfc, ndtr, owens_t

__all__ = ["bvn_cdf", "interval_prob"]

_CLIP = 40.0
_SQRT1_2 = np.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)
#: Gauss–Legendre size of the narrow-interval rule (see ``interval_prob``).
NARROW_RULE = 12


def interval_prob(a: NDArray, b: NDArray) -> NDArray:
    """P(a < Z < b) for Z standard normal (0 where b ≤ a), float64 arrays, relatively accurate.

    With m = (a + b)/2, d = (b − a)/2 (derivation and error bound:
    ``derivations/bvn.py``, ``interval_prob_bound``):

    * narrow, d·(|m| + 1) ≤ 1: P = d φ(m) ∫_{−1}^{1} exp(−d x (m + d x/2)) dx, a 12-point
      Gauss–Legendre rule on a positive integrand (rule error below 1e-16 relative);
    * otherwise a ≥ 0: ½(erfc(a/√2) − erfc(b/√2)); b ≤ 0: ½(erfc(−b/√2) − erfc(−a/√2));
      a < 0 < b: ½(erf(b/√2) − erf(a/√2)) (two terms of one sign). The two same-side
      differences lose at most a factor 2.5 to cancellation (log-concavity of Φc).
    """
    from nmgen.generated.gauss_legendre import RULES

    x, w = (np.asarray(v) for v in RULES[NARROW_RULE])
    m = 0.5 * a + 0.5 * b
    d = 0.5 * b - 0.5 * a
    up = 0.5 * (erfc(a * _SQRT1_2) - erfc(b * _SQRT1_2))
    dn = 0.5 * (erfc(-b * _SQRT1_2) - erfc(-a * _SQRT1_2))
    mid = 0.5 * (erf(b * _SQRT1_2) - erf(a * _SQRT1_2))
    wide = np.where(a >= 0, up, np.where(b <= 0, dn, mid))
    narrow_ok = d * (np.abs(m) + 1.0) <= 1.0
    dn_ = np.where(narrow_ok, d, 0.0)[..., None] * x
    f = np.exp(-dn_ * (m[..., None] + 0.5 * dn_))
    narrow = d * np.exp(-0.5 * m * m) * _INV_SQRT_2PI * (f @ w)
    return np.where(b <= a, 0.0, np.where(narrow_ok, narrow, wide))


def bvn_cdf(h: ArrayLike, k: ArrayLike, rho: ArrayLike) -> NDArray[np.floating]:
    """Φ2(h, k; ρ), elementwise with broadcasting.

    h, k: any real values including ±inf; rho in [−1, 1]. Output has the broadcast shape and
    the common float dtype of the inputs (float32 stays float32, float64 stays float64;
    integer/other inputs give float64). Computation is in float64.
    """
    h_a, k_a, r_a = np.asarray(h), np.asarray(k), np.asarray(rho)
    dt = np.result_type(h_a, k_a, r_a)
    if dt not in (np.float32, np.float64):
        dt = np.dtype(np.float64)
    h64, k64, r = np.broadcast_arrays(
        np.asarray(h_a, np.float64), np.asarray(k_a, np.float64), np.asarray(r_a, np.float64)
    )
    with np.errstate(all="ignore"):
        out = _bvn64(np.clip(h64, -_CLIP, _CLIP), np.clip(k64, -_CLIP, _CLIP), r)
    return np.asarray(out, dtype=dt)


def _num(k: NDArray, h: NDArray, r: NDArray) -> NDArray:
    """k − ρh with small absolute error for |ρ| near 1."""
    return np.where(
        r > 0.5, (k - h) + (1.0 - r) * h, np.where(r < -0.5, (k + h) - (1.0 + r) * h, k - r * h)
    )


def _bvn64(h: NDArray, k: NDArray, r: NDArray) -> NDArray:
    inner = np.abs(r) < 1.0
    rs = np.where(inner, r, 0.0)  # safe ρ for the |ρ| < 1 formulas
    s = np.sqrt((1.0 - rs) * (1.0 + rs))
    lo, hi = np.minimum(h, k), np.maximum(h, k)
    p_lo = ndtr(lo)
    # ρ = ±1 exactly.
    upper = p_lo
    lower = interval_prob(-hi, lo)
    # One argument zero: ½Φ(x) − T(x, −ρ/s) with x the other argument.
    hz, kz = h == 0.0, k == 0.0
    x = np.where(kz, h, k)
    zero = 0.5 * ndtr(x) - owens_t(x, -rs / s)
    # General case h k ≠ 0.
    hs = np.where(hz, 1.0, h)
    ks = np.where(kz, 1.0, k)
    a_h = _num(ks, hs, rs) / (hs * s)
    a_k = _num(hs, ks, rs) / (ks * s)
    opposite = (hs * ks) < 0
    base = np.where(opposite, 0.5 * (p_lo - ndtr(-hi)), 0.5 * (ndtr(hs) + ndtr(ks)))
    gen = base - owens_t(hs, a_h) - owens_t(ks, a_k)
    res = np.where(hz | kz, zero, gen)
    res = np.clip(res, lower, upper)  # Fréchet bounds (the ρ = ∓1 values)
    res = np.where(r == 1.0, upper, np.where(r == -1.0, lower, res))
    res = np.where(np.abs(r) <= 1.0, res, np.nan)  # |ρ| > 1 or NaN ρ
    res = np.where(np.isnan(h) | np.isnan(k), np.nan, res)
    return np.clip(res, 0.0, 1.0)
