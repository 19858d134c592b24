"""nmgen verify: a point whose mpmath reference cannot certify itself is skipped and listed,
never counted as verified (the full grids reach such points in the deep tails)."""

from __future__ import annotations

import dataclasses

from nmgen.derivations.reference import ReferenceError as UncertifiedReference

from nmgen import registry, verify


class _FailsAt:
    """A kernel's reference that cannot certify itself at one point (picklable for the pool)."""

    def __init__(self, reference, bad: tuple) -> None:
        self.reference, self.bad = reference, bad

    def __call__(self, *pt):
        if pt == self.bad:
            raise UncertifiedReference("quadrature cannot certify itself here")
        return self.reference(*pt)


def test_uncertified_reference_point_is_skipped_and_listed():
    k = next(s for s in registry.kernel_specs() if s.name == "relu_mean")
    base = verify.GRIDS[k.grid](True)
    bad = tuple(float(v) for v in base[0])
    spec = dataclasses.replace(k, reference=_FailsAt(k.reference, bad))
    rows = verify.verify_kernel(spec, verify._References(), True)
    f64 = [r for r in rows if r.dtype == "float64"]
    assert f64 and all(r.points == len(base) - 1 for r in f64)
    assert all(r.uncertified.startswith("1 points skipped") for r in f64)
    assert all(r.passed for r in f64)
    table = verify.format_table(rows)
    assert "NOT verified" in table and "relu_mean numpy float64: 1 points skipped" in table


class _Shifted:
    """A reference shifted by ``delta`` (picklable): a kernel that misses it by ``delta``."""

    def __init__(self, reference, delta: float) -> None:
        self.reference, self.delta = reference, delta

    def __call__(self, *pt):
        return self.reference(*pt) + self.delta


def _series_rows(monkeypatch, delta: float = 0.0, both: bool = True):
    """verify rows of the 1-term series kernel on a cancelling point (μ = 0, ρ = −0.999: the
    truncated series is 1e-42 next to Σ|terms| ≈ 0.9) and a well-conditioned one."""
    pts = [(0.0, 0.0, 1.0, 1.0, -0.999), (1.2, -0.6, 0.4, 1.4, 0.3)][: 2 if both else 1]
    monkeypatch.setitem(verify.GRIDS, "series", lambda quick: pts)
    k = next(s for s in registry.kernel_specs() if s.name == "_relu_cross_moment_series_1")
    if delta:
        k = dataclasses.replace(k, reference=_Shifted(k.reference, delta))
    return verify.verify_kernel(k, verify._References(jobs=1), True)


def test_series_cancellation_is_held_to_the_condition_aware_bar(monkeypatch):
    rows = _series_rows(monkeypatch)
    f64 = [r for r in rows if r.dtype == "float64"]
    assert all(r.passed for r in rows), verify.format_table(rows)
    # the cancelling point is listed in its known-hard region, not hidden
    assert all(
        "the truncated series cancels" in r.known_hard and ": 1 points" in r.known_hard for r in f64
    )


def test_series_condition_aware_bar_can_fail(monkeypatch):
    """A kernel off by 1e-12 absolute at the cancelling point (≫ 64u·Σ|terms|) fails."""
    rows = _series_rows(monkeypatch, delta=1e-12, both=False)
    f64 = [r for r in rows if r.dtype == "float64"]
    assert f64 and not any(r.passed for r in f64)
    assert all("the truncated series cancels" in r.known_hard for r in f64)
