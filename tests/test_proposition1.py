"""Proposition 1: Lemma 4's series at μ1 = μ2 = 0 recovers Lemma 3 (Eqs. 17-20)."""

from __future__ import annotations

import pytest

from derivations import proposition1 as p1


@pytest.mark.parametrize("check", p1.CHECKS, ids=lambda c: c.__name__)
def test_proposition1_step(check) -> None:
    assert check() is True


def test_lemma3_numeric_via_series() -> None:
    from derivations.lemma4_series import evaluate_series

    for rho in (-0.9, -0.4, 0.3, 0.85):
        want = p1.lemma3(1.3, 0.7, rho).evalf(30)
        assert abs(evaluate_series(0, 0, 1.3, 0.7, rho, 50) - float(want)) < 1e-13
