"""`bivariate_normal_cdf` to relative accuracy in the tails (issue #10).

Below 1e-2 the public Φ2 is the positive-term form Φ(h)Φ(k) + ∫_0^ρ φ2 (ρ ≥ 0) or
Φ2(h, k; −1) + ∫_{−1}^ρ φ2 (ρ < 0) (``nmruntime.relu_pair.phi2_std``); the backends' own Φ2
(Owen's T, Gauss–Legendre) is accurate only absolutely there: Φ2(−2, −2; −0.9) = 3.7e-21 came
out 0, (−10, −10, −0.75) = 2.9e-178 came out 5e-56. References: ``bvn_cdf_mp`` (mpmath, from
the definition), at the float32-rounded point for float32.
"""

import math

import numpy as np
import pytest
import torch
from nmgen.derivations.bvn import bvn_cdf_mp
from nmgen.generated import numpy_kernels as nk
from nmgen.generated import torch_kernels as tk


def _points(n: int = 24, seed: int = 4242) -> list[tuple[float, float, float]]:
    rng = np.random.default_rng(seed)  # held out: not used to tune anything
    pts = [(-2.0, -2.0, -0.9), (-10.0, -10.0, -0.75), (-6.0, 2.0, -0.95), (-0.5, -0.5, -0.9)]
    for _ in range(n):
        r = rng.choice(
            [rng.uniform(-1, 1), -1 + 10 ** rng.uniform(-8, -1), 1 - 10 ** rng.uniform(-8, -1)]
        )
        pts.append((float(rng.uniform(-14, 3)), float(rng.uniform(-14, 3)), float(r)))
    return pts


POINTS = _points()


def _value(backend: str, dtype: str, p) -> float:
    if backend == "numpy":
        return float(nk.bivariate_normal_cdf(*np.asarray(p, dtype=dtype)))
    t = torch.tensor(p, dtype=getattr(torch, dtype))
    return float(tk.bivariate_normal_cdf(*t.unbind(0)))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype,tol,normal", [("float64", 1e-12, 1e-300), ("float32", 1e-5, 1e-35)])
def test_phi2_relative_in_the_tails(backend, dtype, tol, normal):
    worst, where, checked = 0.0, None, 0
    for p in POINTS:
        q = [float(np.asarray(v, dtype=dtype)) for v in p]
        ref = float(bvn_cdf_mp(*q, dps=30))
        v = _value(backend, dtype, q)
        assert v >= 0 and not math.isnan(v), (p, v)
        if ref < normal:
            continue
        checked += 1
        if abs(v / ref - 1) > worst:
            worst, where = abs(v / ref - 1), (p, v, ref)
    assert checked >= 10
    assert worst <= tol, (worst, where)


def test_phi2_gradient_is_the_analytic_one_in_the_refined_region():
    # ∂Φ2/∂h = φ(h) Φ((k − ρh)/√(1 − ρ²)) (differentiate under the integral), also where the
    # value comes from the positive-term form
    h = torch.tensor([-2.0, -7.0, 0.5], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([-2.0, -1.0, 0.3], dtype=torch.float64)
    r = torch.tensor([-0.9, 0.4, 0.2], dtype=torch.float64)
    tk.bivariate_normal_cdf(h, k, r).sum().backward()
    z = (k - r * h.detach()) / torch.sqrt(1 - r * r)
    want = (
        torch.exp(-0.5 * h.detach() ** 2)
        / math.sqrt(2 * math.pi)
        * 0.5
        * torch.erfc(-z / math.sqrt(2))
    )
    assert torch.allclose(h.grad, want, rtol=1e-10, atol=0)
