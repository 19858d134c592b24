"""Tests for torchbridge.montecarlo.monte_carlo_moments."""

from __future__ import annotations

import math

import pytest
import torch

from torchbridge.montecarlo import monte_carlo_moments

N_IN, D_OUT = 6, 3


def _linear(dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(123)
    W = torch.randn(D_OUT, N_IN, generator=gen, dtype=dtype)
    b = torch.randn(D_OUT, generator=gen, dtype=dtype)

    def fn(x: torch.Tensor) -> torch.Tensor:  # (batch, 2, 3) -> (batch, 3)
        return x.reshape(x.shape[0], -1) @ W.T + b

    return fn, W, b


def _covariances(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor | float]:
    gen = torch.Generator().manual_seed(7)
    M = torch.randn(N_IN, N_IN, generator=gen, dtype=dtype)
    return {
        "isotropic": 0.3,
        "diagonal": torch.rand(2, 3, generator=gen, dtype=dtype) + 0.1,
        "full": M @ M.T / N_IN + 0.05 * torch.eye(N_IN, dtype=dtype),
    }


def _dense(cov: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(cov, float):
        return cov * torch.eye(N_IN, dtype=dtype)
    if cov.shape != (N_IN, N_IN):
        return torch.diag(cov.reshape(-1))
    return cov


def _check_against_exact(mean_hat, var_hat, mu, W, b, sigma, samples, full=False) -> None:
    # Exact moments of a linear map of a Gaussian: mean W mu + b, covariance S = W Sigma W^T.
    # The outputs are Gaussian, so the sample mean has standard error sqrt(S_ii / N), the
    # unbiased sample variance has standard error S_ii sqrt(2 / (N - 1)) and the sample
    # covariance entry (i, j) has standard error sqrt((S_ij^2 + S_ii S_jj) / (N - 1)).
    # We accept 5 standard errors (two-sided Gaussian tail ~6e-7 per entry; the draws are
    # seeded, so the test is deterministic anyway).
    S = W @ sigma @ W.T
    exact_mean = W @ mu.reshape(-1) + b
    se_mean = (S.diagonal() / samples).sqrt()
    assert ((mean_hat.double() - exact_mean).abs() <= 5 * se_mean).all()
    if full:
        se = ((S**2 + torch.outer(S.diagonal(), S.diagonal())) / (samples - 1)).sqrt()
        assert var_hat.shape == (D_OUT, D_OUT)
        assert ((var_hat.double() - S).abs() <= 5 * se).all()
    else:
        se_var = S.diagonal() * math.sqrt(2 / (samples - 1))
        assert ((var_hat.double() - S.diagonal()).abs() <= 5 * se_var).all()


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
@pytest.mark.parametrize("full", [False, True])
def test_linear_map_matches_exact(kind: str, full: bool) -> None:
    fn, W, b = _linear()
    mu = torch.linspace(-1, 1, N_IN, dtype=torch.float64).reshape(2, 3)
    cov = _covariances()[kind]
    samples = 20_000
    m, v = monte_carlo_moments(fn, mu, cov, samples=samples, seed=1, full=full)
    assert m.shape == (D_OUT,) and m.dtype == torch.float64
    _check_against_exact(m, v, mu, W, b, _dense(cov, torch.float64), samples, full=full)


def test_cov_forms_agree() -> None:
    # With the same seed the same standard normals are drawn, and sqrt(s) I is the
    # Cholesky factor of s I, so all three forms give the same samples.
    fn, _, _ = _linear()
    mu = torch.zeros(N_IN, dtype=torch.float64)
    s = 0.25
    ref = monte_carlo_moments(fn, mu, s, samples=500)
    forms = (
        torch.tensor(s, dtype=torch.float64),
        torch.full((N_IN,), s, dtype=torch.float64),
        s * torch.eye(N_IN, dtype=torch.float64),
    )
    for cov in forms:
        got = monte_carlo_moments(fn, mu, cov, samples=500)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_seed_reproducible() -> None:
    fn, _, _ = _linear()
    mu = torch.zeros(2, 3, dtype=torch.float64)
    a = monte_carlo_moments(fn, mu, 0.1, samples=300, seed=5, batch_size=64)
    b = monte_carlo_moments(fn, mu, 0.1, samples=300, seed=5, batch_size=64)
    c = monte_carlo_moments(fn, mu, 0.1, samples=300, seed=6, batch_size=64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_chunked_accumulation_equals_two_pass() -> None:
    fn, _, _ = _linear()
    outputs: list[torch.Tensor] = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        y = fn(x)
        outputs.append(y)
        return y

    mu = torch.full((2, 3), 100.0, dtype=torch.float64)  # large offset: stresses stability
    m, v = monte_carlo_moments(recording, mu, 0.01, samples=1000, batch_size=37)
    _, c = monte_carlo_moments(fn, mu, 0.01, samples=1000, batch_size=37, full=True)
    ys = torch.cat(outputs)
    assert ys.shape == (1000, D_OUT) and len(outputs) == math.ceil(1000 / 37)
    torch.testing.assert_close(m, ys.mean(0), rtol=0, atol=1e-10)
    torch.testing.assert_close(v, ys.var(0, unbiased=True), rtol=1e-10, atol=0)
    torch.testing.assert_close(c, torch.cov(ys.T), rtol=1e-10, atol=1e-14)


def test_float32() -> None:
    fn, W, b = _linear(torch.float32)
    mu = torch.linspace(0, 1, N_IN).reshape(2, 3)
    cov = _covariances(torch.float32)["full"]
    samples = 20_000
    m, v = monte_carlo_moments(fn, mu, cov, samples=samples, seed=2)
    assert m.dtype == torch.float32 and v.dtype == torch.float32
    _check_against_exact(
        m, v, mu.double(), W.double(), b.double(), cov.double(), samples, full=False
    )


def test_singular_psd_covariance() -> None:
    # Rank-one covariance: Cholesky fails, eigh fallback must still sample correctly.
    fn, W, b = _linear()
    u = torch.linspace(-1, 1, N_IN, dtype=torch.float64)
    cov = torch.outer(u, u)
    mu = torch.zeros(N_IN, dtype=torch.float64)
    m, v = monte_carlo_moments(fn, mu, cov, samples=20_000, full=True)
    _check_against_exact(m, v, mu, W, b, cov, 20_000, full=True)


def test_non_psd_error() -> None:
    fn, _, _ = _linear()
    cov = torch.eye(N_IN, dtype=torch.float64)
    cov[0, 0] = -0.5
    with pytest.raises(ValueError, match=r"not positive semi-definite.*-0\.5"):
        monte_carlo_moments(fn, torch.zeros(N_IN, dtype=torch.float64), cov)
    with pytest.raises(ValueError, match="not symmetric"):
        bad = torch.eye(N_IN, dtype=torch.float64)
        bad[0, 1] = 0.3
        monte_carlo_moments(fn, torch.zeros(N_IN, dtype=torch.float64), bad)


def test_input_errors() -> None:
    fn, _, _ = _linear()
    mu = torch.zeros(N_IN, dtype=torch.float64)
    with pytest.raises(ValueError, match="mean contains NaN"):
        monte_carlo_moments(fn, torch.full((N_IN,), float("nan")), 0.1)
    with pytest.raises(ValueError, match="cov contains NaN"):
        monte_carlo_moments(fn, mu, torch.full((N_IN,), float("nan")))
    with pytest.raises(ValueError, match=r"cov has shape \(7,\).*\(\.\.\., 6\)"):
        monte_carlo_moments(fn, mu, torch.ones(N_IN + 1))
    with pytest.raises(ValueError, match=r"cov has shape \(7, 7\)"):
        monte_carlo_moments(fn, mu, torch.eye(N_IN + 1))
    with pytest.raises(ValueError, match="negative variance -1"):
        monte_carlo_moments(fn, mu, -1.0)
    with pytest.raises(ValueError, match="batch"):
        monte_carlo_moments(lambda x: x[:1].reshape(1, -1), mu, 0.1, samples=10)
    with pytest.raises(ValueError, match="NaN or infinite"):
        monte_carlo_moments(lambda x: x.reshape(x.shape[0], -1) / 0.0, mu, 0.1, samples=10)
    with pytest.raises(ValueError, match="samples"):
        monte_carlo_moments(fn, mu, 0.1, samples=1)


def test_python_float_covariance_stays_float64() -> None:
    """A Python float variance never passes through float32: 1e-50 is not 0 and 1e300 is finite.

    fn is linear without bias (at mean 0 nothing is lost to the scale of an offset), so the
    output variance is exactly s·‖W_i‖²; the sample variance of N Gaussian draws is within
    5 SE = 5·sqrt(2/(N-1)) of it, relative.
    """
    _, W, _ = _linear()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) @ W.T

    mu = torch.zeros(N_IN, dtype=torch.float64)
    for s in (1e-50, 1e300):
        _, v = monte_carlo_moments(fn, mu, s, samples=4000, seed=3)
        exact = s * (W**2).sum(1)
        assert torch.isfinite(v).all() and (v > 0).all()
        assert ((v / exact - 1).abs() <= 5 * math.sqrt(2 / 3999)).all()


def test_float32_mean_with_unrepresentable_variance_is_refused() -> None:
    fn, _, _ = _linear(torch.float32)
    mu = torch.zeros(N_IN, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"overflow mean's dtype torch.float32"):
        monte_carlo_moments(fn, mu, 1e300, samples=10)
    with pytest.raises(ValueError, match=r"underflow mean's dtype torch.float32"):
        monte_carlo_moments(fn, mu, 1e-100, samples=10)


def test_non_tensor_arguments_are_named() -> None:
    np = pytest.importorskip("numpy")
    fn, _, _ = _linear()
    mu = torch.zeros(N_IN, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"mean must be a torch.Tensor, got numpy.ndarray"):
        monte_carlo_moments(fn, np.zeros(N_IN), 0.1)
    with pytest.raises(TypeError, match=r"cov must be a torch.Tensor, got numpy.ndarray"):
        monte_carlo_moments(fn, mu, np.eye(N_IN))
    with pytest.raises(TypeError, match=r"cov must be a torch.Tensor, got list"):
        monte_carlo_moments(fn, mu, [0.1] * N_IN)
    with pytest.raises(TypeError, match=r"cov has dtype torch.int64"):
        monte_carlo_moments(fn, mu, torch.ones(N_IN, dtype=torch.int64))


def test_cov_kind_states_the_reading() -> None:
    """cov_kind='diag' on (n,) equals the diagonal matrix; a wrong kind for the shape is named."""
    fn, _, _ = _linear()
    mu = torch.zeros(N_IN, dtype=torch.float64)
    v = torch.linspace(0.1, 0.6, N_IN, dtype=torch.float64)
    a = monte_carlo_moments(fn, mu, v, samples=300, seed=4, cov_kind="diag")
    b = monte_carlo_moments(fn, mu, v, samples=300, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match=r"cov_kind='full' must have shape \(\.\.\., 6, 6\)"):
        monte_carlo_moments(fn, mu, v, cov_kind="full")
    with pytest.raises(TypeError, match=r"Python number.*cov_kind='diag'"):
        monte_carlo_moments(fn, mu, 0.1, cov_kind="diag")
    with pytest.raises(ValueError, match="cov_kind must be one of"):
        monte_carlo_moments(fn, mu, 0.1, cov_kind="diagonal")
    with pytest.raises(ValueError, match=r"batch shape \(2,\).*one covariance"):
        monte_carlo_moments(fn, mu, torch.ones(2, N_IN, dtype=torch.float64), cov_kind="diag")
    with pytest.raises(ValueError, match=r"batch shape \(3,\).*one covariance"):
        monte_carlo_moments(fn, mu, torch.ones(3, dtype=torch.float64), cov_kind="iso")


def test_inputs_are_not_mutated() -> None:
    """An in-place fn (ReLU(inplace=True) first) sees fresh samples; mean and cov are intact."""
    mu = torch.linspace(-1, 1, N_IN, dtype=torch.float64)
    cov = torch.eye(N_IN, dtype=torch.float64) * 0.2
    mu0, cov0 = mu.clone(), cov.clone()
    relu = torch.nn.ReLU(inplace=True)
    monte_carlo_moments(lambda x: relu(x).reshape(x.shape[0], -1), mu, cov, samples=50)
    assert torch.equal(mu, mu0) and torch.equal(cov, cov0)
