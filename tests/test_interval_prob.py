"""P(a < Z < b) and Φ2 at ρ = −1 without cancellation (issue #10; verify found 2.98e-9
relative at (h, k, ρ) = (0, 1e-8, −1) in float64 and 0 in Torch float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nmgen.derivations.bvn import bvn_cdf_mp, interval_prob_mp, narrow_rule_error_bound

from nmruntime.bvn_numpy import bvn_cdf as bvn_np
from nmruntime.bvn_numpy import interval_prob as ip_np
from nmruntime.bvn_torch import bvn_cdf as bvn_t
from nmruntime.bvn_torch import interval_prob as ip_t


def _draws(seed: int, n: int) -> list[tuple[float, float]]:
    """Seeded intervals (a, b): narrow (relative width 1e-12..1e-1) and wide, both sides of 0
    and straddling it, centres up to 37 in magnitude (held out: not on the verify grid)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = float(rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(-9, np.log10(37.0)))
        width = (
            float(10.0 ** rng.uniform(-12, 0.5)) * (1.0 + abs(m)) if i % 3 else 5.0 * rng.random()
        )
        a, b = m - width / 2, m + width / 2
        if i % 5 == 0:
            a, b = -abs(b), abs(b) * rng.random()  # straddles 0
        out.append((a, b))
    return out


def test_narrow_rule_bound() -> None:
    assert narrow_rule_error_bound(12) < 1e-16


def _rel(v: float, ref) -> float:
    return abs(v - float(ref)) / float(ref) if ref != 0 else abs(v)


def test_interval_prob_float64_held_out() -> None:
    pts = _draws(2026, 60)
    a = np.array([p[0] for p in pts])
    b = np.array([p[1] for p in pts])
    got_np = ip_np(a, b)
    got_t = ip_t(torch.tensor(a), torch.tensor(b)).numpy()
    worst = 0.0
    for i, (lo, hi) in enumerate(pts):
        ref = interval_prob_mp(lo, hi)
        if float(ref) < 1e-300:
            continue
        # input condition of φ(m): about m²·eps relative
        tol = 2e-15 + 4 * (lo * lo + hi * hi) * 2.0**-53
        for got in (got_np[i], got_t[i]):
            worst = max(worst, _rel(float(got), ref) / tol)
            assert _rel(float(got), ref) <= tol, (lo, hi, float(got), float(ref))
    assert worst > 0.0


def test_interval_prob_float32_torch() -> None:
    pts = _draws(7, 40)
    a = torch.tensor([p[0] for p in pts], dtype=torch.float32)
    b = torch.tensor([p[1] for p in pts], dtype=torch.float32)
    got = ip_t(a, b)
    for i in range(len(pts)):
        lo, hi = float(a[i]), float(b[i])
        ref = interval_prob_mp(lo, hi)
        if float(ref) < 1e-35:
            continue
        tol = 1e-6 + 4 * (lo * lo + hi * hi) * 2.0**-24
        assert _rel(float(got[i]), ref) <= tol, (lo, hi, float(got[i]), float(ref))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bvn_minus_one_near_zero(dtype: str) -> None:
    """The verify point (0, 1e-8, −1) and its mirror, both backends."""
    for h, k in [(0.0, 1e-8), (1e-8, 0.0), (-1e-8, 2e-8), (0.5, -0.5 + 1e-7)]:
        hf, kf = (float(np.asarray(v, dtype)) for v in (h, k))
        ref = bvn_cdf_mp(hf, kf, -1.0)
        tol = 1e-15 if dtype == "float64" else 1e-6
        v_np = float(bvn_np(np.asarray(hf, dtype), np.asarray(kf, dtype), np.asarray(-1.0, dtype)))
        tdt = getattr(torch, dtype)
        v_t = float(
            bvn_t(
                torch.tensor(hf, dtype=tdt),
                torch.tensor(kf, dtype=tdt),
                torch.tensor(-1.0, dtype=tdt),
            )
        )
        for v in (v_np, v_t):
            assert _rel(v, ref) <= tol, (h, k, v, float(ref))
