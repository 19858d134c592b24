"""The joint-tail ρ-integrals (``nmruntime/pair_tail.py``) against their mpmath oracle.

The oracle (``derivations/pair_tail.py``) integrates w(t)φ2(h, k; t) over t from the
definition; the runtime integrates the inverted form. Points are seeded random draws
(|h|, |k| up to 38, both signs of hk, ρ to −(1 − 1e-6)), not the ones the rule was tuned on.
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from nmgen.derivations.pair_tail import tail_integral_ref
from nmgen.generated.gauss_legendre import PAIR_SIZE, RULES

from nmruntime import pair_ops as po
from nmruntime import pair_tail

RULE = tuple(np.asarray(v, dtype=np.float64) for v in RULES[PAIR_SIZE])
OPS = {"numpy": po.numpy_ops, "torch": po.torch_ops}


def _points(n=8, seed=11):
    """hk > 0 (both negative) and hk < 0 (k > 0) draws, |h| + |k| up to 76."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h = -float(np.exp(rng.uniform(np.log(0.05), np.log(38.0))))
        k = float(np.exp(rng.uniform(np.log(2.0), np.log(38.0)))) * (1 if i % 2 else -1)
        r = -float(rng.choice([1e-6, 1e-3, 0.1, 0.5, 0.9, 0.999, 1 - 1e-6]))
        out.append((h, k, r))
    return out


def _eval(backend, h, k, te, ta, weight):
    o = OPS[backend]()
    if backend == "numpy":
        args = [np.array([v], dtype=np.float64) for v in (h, k, te, ta)]
        return float(pair_tail.tail_integral(o, *args, weight, RULE)[0])
    args = [torch.tensor([v], dtype=torch.float64) for v in (h, k, te, ta)]
    rule = tuple(torch.as_tensor(v) for v in RULE)
    return float(pair_tail.tail_integral(o, *args, weight, rule)[0])


@pytest.mark.parametrize("backend", sorted(OPS))
def test_tail_integrals_relative_1e13(backend):
    """Φ2's lower piece, the |t|-weighted piece and the cross moment's (ρ − t) piece."""
    worst, used = 0.0, 0
    o = po.numpy_ops()
    for h, k, r in _points():
        for te, ta, weight in ((r, -1.0, "one"), (0.0, r, "abs"), (r, -1.0, "gap")):
            if not pair_tail.tail_ok(o, np.float64(h), np.float64(k), np.float64(te)):
                continue
            used += 1
            ref = tail_integral_ref(h, k, te, ta, weight)
            if ref < 1e-300:  # below the normal range: the value underflows or is tiny
                assert 0.0 <= _eval(backend, h, k, te, ta, weight) < 1e-290
                continue
            got = _eval(backend, h, k, te, ta, weight)
            rel = float(abs((mp.mpf(got) - ref) / ref))
            worst = max(worst, rel)
            assert rel < 2e-13, (h, k, r, weight, got, ref)
    assert worst > 0.0 and used >= 12  # the comparison ran, on normal values


def test_routing_mask():
    o = po.numpy_ops()
    h = np.array([-20.0, -20.0, 0.5, -1.0, 3.0, -20.0])
    k = np.array([-3.0, 2.0, 0.4, -0.5, 1.5, -3.0])
    te = np.array([-0.5, -0.5, -0.5, -0.5, -0.5, -1.0])
    got = pair_tail.tail_ok(o, h, k, te)
    assert got.tolist() == [True, True, False, False, True, False]


def test_masked_out_elements_have_finite_gradients():
    """tail_or evaluates masked-out elements at a safe point: no NaN leaks into gradients."""
    o = po.torch_ops()
    rule = tuple(torch.as_tensor(v) for v in RULE)
    h = torch.tensor([-20.0, 3.0, 0.0, -25.0], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([-10.0, -4.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    te = torch.tensor([-0.5, -0.5, -0.5, -1.0], dtype=torch.float64)
    out = pair_tail.tail_or(o, h, k, te, te * 0 - 1.0, "gap", rule, lambda h, *_: 0.0 * h)
    (gh, gk) = torch.autograd.grad(out.sum() * 1e100, (h, k))
    assert torch.isfinite(gh).all() and torch.isfinite(gk).all()
    assert out[0] > 0 and math.isfinite(float(out[0].detach()))
    assert out[1] > 0  # (3, −4): not tail_ok, but the Gaussian route (gauss_ok) takes it
    assert out[2:].eq(0).all()  # h = k = 0: the fallback; t_e = t_a = −1: an empty interval


@pytest.mark.parametrize("backend", ["numpy", "torch", "torch sync-free"])
def test_the_fallback_runs_only_where_neither_route_applies(backend):
    """``tail_or``'s fallback (the callers' general θ-quadrature, the most work per element)
    gets only the elements neither the tail nor the Gaussian route takes (eager; under
    ``sync_free`` every element, masked), and its value is used exactly there."""
    from nmruntime.torch_support import force_sync_free

    rng = np.random.default_rng(7)
    h, k = rng.uniform(-30, 6, 400), rng.uniform(-30, 6, 400)
    te = rng.uniform(-0.99, 0.0, 400)
    k[:40] = rng.uniform(0.5, 5.0, 40)
    h[:40] = -k[:40]  # |h| = |k|: no Gaussian route; h + k = 0 with hk < 0: no tail route
    ta = -np.ones(400)
    o = po.numpy_ops() if backend == "numpy" else po.torch_ops()
    rule = RULE
    if backend != "numpy":
        h, k, te, ta = (torch.as_tensor(v) for v in (h, k, te, ta))
        rule = tuple(torch.as_tensor(v) for v in RULE)
    seen = []

    def fallback(h, k, te, ta):
        seen.append(int(h.shape[0]))
        return 1e3 + h

    with force_sync_free(backend == "torch sync-free"):
        out = pair_tail.tail_or(o, h, k, te, ta, "gap", rule, fallback)
        ok = pair_tail.tail_ok(o, h, k, te)
        left = ~(ok | pair_tail.gauss_ok(o, h, k, ta, te))
    n_left = int(left.sum())
    assert 40 <= n_left < 400
    assert seen == [400 if backend == "torch sync-free" else n_left]
    assert (out[left] == 1e3 + h[left]).all()
    assert (out[~left] < 1e3).all() and (out[~left] >= 0).all()


def _gauss_points(n=10, seed=2026):
    """Seeded held-out draws for the Gaussian route: |h|, |k| up to 38 (log-uniform), both
    signs of hk, intervals [t_a, t_b] ⊂ [−1, 1) that hold the peak t = ts or not."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        h, k = (
            float(rng.choice([-1.0, 1.0]) * np.exp(rng.uniform(np.log(0.3), np.log(38.0))))
            for _ in range(2)
        )
        ta = -1.0 if rng.uniform() < 0.4 else float(rng.uniform(-1.0, 0.9))
        tb = float(rng.uniform(ta, 1.0))
        if abs(abs(h) - abs(k)) * (abs(h) + abs(k)) >= pair_tail.GAUSS_MIN_ROOT**2:
            out.append((h, k, ta, tb, "one" if len(out) % 2 else "gap"))
    return out


@pytest.mark.parametrize("backend", sorted(OPS))
def test_gauss_integral_relative(backend):
    """The Gaussian substitution against quadrature of the definition (``interval_integral_ref``)."""
    from nmgen.derivations.pair_tail import interval_integral_ref

    worst, used = 0.0, 0
    for h, k, ta, tb, weight in _gauss_points():
        ref = interval_integral_ref(h, k, ta, tb, weight)
        o = OPS[backend]()
        if backend == "numpy":
            args = [np.array([v], dtype=np.float64) for v in (h, k, ta, tb)]
            rule = RULE
        else:
            args = [torch.tensor([v], dtype=torch.float64) for v in (h, k, ta, tb)]
            rule = tuple(torch.as_tensor(v) for v in RULE)
        got = float(pair_tail.gauss_integral(o, *args, weight, rule)[0])
        if ref < 1e-300:
            assert 0.0 <= got < 1e-290
            continue
        used += 1
        rel = float(abs((mp.mpf(got) - ref) / ref))
        worst = max(worst, rel)
        assert rel < 2e-13, (h, k, ta, tb, weight, got, ref)
    assert used >= 6
