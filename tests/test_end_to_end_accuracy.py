"""What users read, end to end, against mpmath from the definition (issue #10, Deliver 3).

A small (Affine, ReLU, Affine) network g(x) = B relu(A x + c1) + c2, x ~ N(μx, Σx), with
hidden units in the bulk, in the deep negative tail (μ/σ ≈ −12) and at huge μ/σ (≈ 60).
Reference: z = A x + c1 ~ N(A μx + c1, A Σx Aᵀ) formed in mpmath from the same float inputs,
each ReLU covariance from Rosenbaum's closed form at 60 digits with Φ2 by quadrature of its
definition (``bvn_cdf_mp``; E − m(h)m(k) cancels < 5 of the 60 digits here), each ReLU
variance from the quadratures of the first two moments (``relu_variance_ref``),
and Var[g_a] = Σ_ij B_ai B_aj C_ij summed at 40 digits. None of it calls a kernel.
"""

from __future__ import annotations

import mpmath as mp
import pytest
import torch
from nmgen.derivations.reference import relu_variance_ref, standard_pair_closed_form

from torchbridge import AffineReLUAffine, relu_moments

A = [[1.0, 0.5, -0.25], [-0.8, 0.3, 0.4], [0.6, 0.9, 0.2]]
C1 = [0.1, -6.0, 40.0]  # unit 1: bulk; unit 2: μ/σ ≈ −12; unit 3: μ/σ ≈ 60
B = [[1.0, 0.7, 0.2], [-0.5, 1.5, 0.8]]
MUX = [0.2, -0.1, 0.3]
SIGX = [[0.25, 0.05, -0.02], [0.05, 0.16, 0.03], [-0.02, 0.03, 0.09]]


def _cov_closed(m1, m2, s1, s2, r, dps=60):
    """Cov[relu x1, relu x2] = σ1σ2 C(h, k, ρ), Rosenbaum's closed form at ``dps`` digits."""
    with mp.workdps(dps):
        _, c = standard_pair_closed_form(mp.mpf(m1) / s1, mp.mpf(m2) / s2, r, dps)
        return s1 * s2 * c


def _reference():
    """(μ̄, C = Cov[relu(z)], Var[g]) at 40 digits from the definition."""
    with mp.workdps(40):
        a, sx, mx = mp.matrix(A), mp.matrix(SIGX), mp.matrix(MUX)
        mu = a * mx + mp.matrix(C1)
        sig = a * sx * a.T
        p = len(C1)
        c = mp.matrix(p, p)
        for i in range(p):
            si = mp.sqrt(sig[i, i])
            c[i, i] = relu_variance_ref(mu[i], si)
            for j in range(i):
                sj = mp.sqrt(sig[j, j])
                r = sig[i, j] / (si * sj)
                c[i, j] = c[j, i] = _cov_closed(mu[i], mu[j], si, sj, r)
        b = mp.matrix(B)
        var = [
            mp.fsum(b[q, i] * b[q, j] * c[i, j] for i in range(p) for j in range(p))
            for q in range(2)
        ]
    return mu, sig, c, var


@pytest.fixture(scope="module")
def reference():
    return _reference()


def _rel(got: float, ref) -> float:
    return float(abs((mp.mpf(got) - ref) / ref))


def test_reference_has_the_tail_cases(reference):
    mu, sig, _, _ = reference
    h = [float(mu[i] / mp.sqrt(sig[i, i])) for i in range(3)]
    assert h[1] < -10 and h[2] > 50 and abs(h[0]) < 2


#: The (bulk, tail) pair has h = 0.30, k = −14.1, ρ = −0.78, whose ρ-integrand ∫_ρ^0 |t| φ2 dt
#: peaks inside the interval (at t = −h/k): the θ-rule reached only 2.1e-12 there; the Gaussian
#: substitution (``nmruntime.pair_tail.gauss_integral``) meets the 1e-12 bar like every entry.


def test_relu_moments_covariance_relative(reference):
    _, _, c, _ = reference
    a = torch.tensor(A, dtype=torch.float64)
    zmean = a @ torch.tensor(MUX, dtype=torch.float64) + torch.tensor(C1, dtype=torch.float64)
    zcov = a @ torch.tensor(SIGX, dtype=torch.float64) @ a.T
    _, got = relu_moments(zmean, zcov)
    for i in range(3):
        for j in range(3):
            assert _rel(float(got[i, j]), c[i, j]) < 1e-12, (i, j, float(got[i, j]), c[i, j])


def test_network_output_variance_relative(reference):
    _, _, _, var = reference
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    net = AffineReLUAffine(t(A), t(C1), t(B), t([0.5, -2.0]))
    _, out_var = net.moments(t(MUX), t(SIGX), cov_kind="full")
    for q in range(2):
        assert _rel(float(out_var[q]), var[q]) < 1e-12, (q, float(out_var[q]), var[q])
