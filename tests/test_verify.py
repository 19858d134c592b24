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
