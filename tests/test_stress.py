"""nmgen stress: the seeded stress set and its independent references."""

from __future__ import annotations

import mpmath as mp
import pytest

from nmgen import stress


def test_draw_points_seeded_and_in_range():
    a, b = stress.draw_points(50, 3), stress.draw_points(50, 3)
    assert a == b and a != stress.draw_points(50, 4)
    for m1, m2, s1, s2, r in a:
        assert 1e-3 <= s1 <= 1e3 and 1e-3 <= s2 <= 1e3 and -1.0 <= r <= 1.0
        assert -38.0 - 1e-9 <= m1 / s1 <= 1e8 and -38.0 - 1e-9 <= m2 / s2 <= 1e8
    assert any(abs(p[4]) == 1.0 for p in a) and any(p[0] / p[2] < -10 for p in a)
    for m1, m2, s1, s2, _ in stress.draw_points(20, 3, pow2_sigma=True):
        for m, s in ((m1, s1), (m2, s2)):
            assert mp.log(s, 2) == int(mp.log(s, 2)) and (m / s) * s == m


def test_rho_minus_one_reference_in_a_far_tail():
    """ρ = −1, h = −32, k = 60: Φ(h) + Φ(k) − 1 must not round 1 + 1e-225 − 1 to 0 (it did,
    giving 1.05e-221 for 4.75e-225); checked against quadrature of the definition."""
    e, c = stress.pair_reference((-32.0, 60.0, 1.0, 1.0, -1.0))
    with mp.workdps(40):  # z = 32 + u, φ(32 + u) = φ(32) e^{−32u − u²/2}
        pts = [0, mp.mpf(1) / 64, mp.mpf(1) / 8, 1, 4, 28]
        ref = mp.npdf(32) * mp.quad(lambda u: u * (28 - u) * mp.exp(-32 * u - u * u / 2), pts)
        m1 = mp.npdf(32) * mp.quad(lambda u: u * mp.exp(-32 * u - u * u / 2), [*pts, mp.inf])
        m2 = 60 + mp.npdf(60) - 60 * mp.ncdf(-60)
        assert abs(e - ref) <= 1e-15 * ref
        assert abs(c - (ref - m1 * m2)) <= 1e-15 * abs(c)


@pytest.mark.slow
def test_stress_run_reports_every_row():
    rows = stress.run(n=4, seed=9, jobs=1)
    assert len(rows) == 2 * 2 * (len(stress.PAIR_KERNELS) + len(stress.SINGLE_KERNELS))
    assert all(r.bad_sign == 0 for r in rows)
