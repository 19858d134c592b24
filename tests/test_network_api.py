"""The public API never guesses: how a covariance is read is stated, bad input is named.

Issue #10's list of findings, one test (or more) each: a batch of n means (n, n) with one
shared full covariance, non-symmetric and non-PSD Σ (also with the bad direction in null(A)),
numpy arrays and lists, p = 0, mixed dtypes, NaN parameters, and inputs left unmodified.
Reference values are the per-sample loop of the same public call on one mean at a time with
an unambiguous covariance (a 1-D mean with a full (n, n) matrix): the batched reading must
reproduce it, which the shape-guessing version did not (it read the (n, n) matrix as n
diagonals).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchbridge.moments import relu_moments
from torchbridge.network import AffineReLUAffine

D = torch.float64


def _net(n: int = 6, p: int = 8, d: int = 3, seed: int = 0) -> AffineReLUAffine:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, n, generator=g, dtype=D) / n**0.5
    B = torch.randn(d, p, generator=g, dtype=D) / p**0.5
    return AffineReLUAffine(
        A, 0.3 * torch.randn(p, generator=g, dtype=D), B, torch.randn(d, generator=g, dtype=D)
    )


def _spd(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=D)
    return W @ W.T / n + 0.1 * torch.eye(n, dtype=D)


def _loop(net, means, cov_of, **kw):
    outs = [net.moments(means[i], cov_of(i), **kw) for i in range(len(means))]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


@pytest.mark.parametrize("full", [False, True])
def test_batch_of_n_means_with_one_shared_full_covariance_matches_the_loop(full: bool) -> None:
    n = 6
    net = _net(n)
    means = torch.randn(n, n, generator=torch.Generator().manual_seed(2), dtype=D)
    cov = _spd(n)
    m, v = net.moments(means, cov, cov_kind="full", full=full)
    lm, lv = _loop(net, means, lambda i: cov, full=full)
    assert m.shape == (n, 3) and v.shape == lv.shape
    torch.testing.assert_close(m, lm, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(v, lv, rtol=1e-12, atol=1e-14)


def test_the_ambiguous_shape_is_refused_without_cov_kind() -> None:
    n = 6
    net = _net(n)
    means = torch.zeros(n, n, dtype=D)
    with pytest.raises(ValueError, match=r"cov_kind='full' or cov_kind='diag'"):
        net.moments(means, _spd(n))


def test_cov_kind_diag_reads_one_diagonal_per_mean() -> None:
    n = 6
    net = _net(n)
    means = torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=D)
    variances = torch.rand(n, n, generator=torch.Generator().manual_seed(4), dtype=D) + 0.1
    m, v = net.moments(means, variances, cov_kind="diag")
    lm, lv = _loop(net, means, lambda i: torch.diag(variances[i]))
    torch.testing.assert_close(m, lm, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(v, lv, rtol=1e-12, atol=1e-14)


def test_iso_per_mean_variances_and_batched_full_covariances_match_the_loop() -> None:
    n = 6
    net = _net(n)
    means = torch.randn(4, n, generator=torch.Generator().manual_seed(5), dtype=D)
    s = torch.tensor([0.01, 0.1, 1.0, 3.0], dtype=D)
    m, v = net.moments(means, s, cov_kind="iso")
    lm, lv = _loop(net, means, lambda i: float(s[i]) * torch.eye(n, dtype=D))
    torch.testing.assert_close(m, lm, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(v, lv, rtol=1e-12, atol=1e-14)
    covs = torch.stack([_spd(n, seed) for seed in range(4)])
    _, v = net.moments(means, covs)  # (4, n, n) for 4 means: only the full reading fits
    _, lv = _loop(net, means, lambda i: covs[i])
    torch.testing.assert_close(v, lv, rtol=1e-12, atol=1e-14)
    m1, v1 = net.moments(means[0], covs, cov_kind="full")  # one mean, 4 covariances
    assert v1.shape == (4, 3) and m1.shape == (4, 3)
    torch.testing.assert_close(v1[2], net.moments(means[0], covs[2])[1], rtol=1e-12, atol=0)


def test_scalar_covariance_forms_agree() -> None:
    net = _net()
    mean = torch.linspace(-1, 1, 6, dtype=D)
    ref = net.moments(mean, 0.3 * torch.eye(6, dtype=D))
    for cov, kind in ((0.3, None), (torch.tensor(0.3, dtype=D), None), (0.3, "iso")):
        for a, b in zip(net.moments(mean, cov, cov_kind=kind), ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match=r"Python number.*cov_kind='full'"):
        net.moments(mean, 0.3, cov_kind="full")
    with pytest.raises(ValueError, match=r"cov_kind must be one of"):
        net.moments(mean, 0.3, cov_kind="isotropic")
    with pytest.raises(ValueError, match=r"cov_kind='full' must have shape \(\.\.\., 6, 6\)"):
        net.moments(mean, torch.ones(6, dtype=D), cov_kind="full")


def test_non_symmetric_sigma_is_an_error_not_symmetrised() -> None:
    net = _net()
    cov = _spd(6)
    cov[0, 1] += 1e-3
    with pytest.raises(ValueError, match=r"cov is not symmetric.*\(0, 1\).*not symmetrised"):
        net.moments(torch.zeros(6, dtype=D), cov)
    with pytest.raises(ValueError, match=r"cov is not symmetric"):
        relu_moments(torch.zeros(6, dtype=D), cov)


def test_rounding_level_asymmetry_is_accepted() -> None:
    """Within the stated tolerance (100·eps·max diagonal) Σ is accepted as symmetric."""
    net = _net()
    cov = _spd(6)
    cov[0, 1] += 10 * torch.finfo(D).eps * float(cov.diagonal().max())
    _, v = net.moments(torch.zeros(6, dtype=D), cov)
    assert torch.isfinite(v).all()


def test_non_psd_sigma_with_its_bad_direction_in_the_null_space_of_A() -> None:
    """Σ = 4 I − 5 u uᵀ (eigenvalue −1 along u, positive diagonal) with A u = 0: A Σ Aᵀ = 4 A Aᵀ
    is PSD, so only a check of the user's own Σ can see it; the message is about cov."""
    n, p = 6, 4
    g = torch.Generator().manual_seed(7)
    A = torch.randn(p, n, generator=g, dtype=D)
    u = torch.linalg.svd(A).Vh[-1]  # unit vector with A u = 0 (rank 4 < 6)
    assert float((A @ u).abs().max()) < 1e-12
    cov = 4 * torch.eye(n, dtype=D) - 5 * torch.outer(u, u)
    assert (cov.diagonal() > 0).all()
    torch.testing.assert_close(A @ cov @ A.T, 4 * A @ A.T, rtol=1e-12, atol=1e-12)
    net = AffineReLUAffine(
        A, torch.zeros(p, dtype=D), torch.ones(2, p, dtype=D), torch.zeros(2, dtype=D)
    )
    with pytest.raises(
        ValueError, match=r"^cov is not positive semi-definite: smallest eigenvalue -1\.000e\+00"
    ):
        net.moments(torch.zeros(n, dtype=D), cov)


def test_non_psd_sigma_without_the_eigenvalue_check_is_still_caught_through_A() -> None:
    """check_psd=False skips the O(n³) check; a_vᵀ Σ a_v < 0 beyond rounding still raises."""
    cov = torch.tensor([[1.0, -2.0], [-2.0, 1.0]], dtype=D)  # eigenvalues 3, -1
    net = AffineReLUAffine(
        torch.tensor([[1.0, 1.0]], dtype=D),
        torch.zeros(1, dtype=D),
        torch.ones(1, 1, dtype=D),
        torch.zeros(1, dtype=D),
    )
    with pytest.raises(ValueError, match=r"smallest eigenvalue -1"):
        net.moments(torch.zeros(2, dtype=D), cov)
    with pytest.raises(ValueError, match=r"a_vᵀ cov a_v = -2.*row v = 0 of A"):
        net.moments(torch.zeros(2, dtype=D), cov, check_psd=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_psd_sigma_is_accepted(dtype: torch.dtype) -> None:
    """A rank-2 Σ (PSD, singular: rounding gives eigenvalues of either sign near 0) passes,
    and the variance matches the same call with the exactly equivalent iso/diag form."""
    n = 6
    W = torch.randn(n, 2, generator=torch.Generator().manual_seed(8), dtype=D)
    cov = (W @ W.T).to(dtype)
    net64 = _net(n)
    net = AffineReLUAffine(*(getattr(net64, k).to(dtype) for k in ("A", "c1", "B", "c2")))
    _, v = net.moments(torch.zeros(n, dtype=dtype), cov)
    assert torch.isfinite(v).all() and (v >= 0).all()
    zero = net.moments(torch.zeros(n, dtype=dtype), torch.zeros(n, n, dtype=dtype))[1]
    assert torch.equal(zero, torch.zeros_like(zero))


def test_non_tensor_arguments_are_named() -> None:
    net = _net()
    with pytest.raises(TypeError, match=r"mean must be a torch.Tensor, got numpy.ndarray"):
        net.moments(np.zeros(6), 0.1)
    with pytest.raises(TypeError, match=r"cov must be a torch.Tensor, got numpy.ndarray"):
        net.moments(torch.zeros(6, dtype=D), np.eye(6))
    with pytest.raises(TypeError, match=r"mean must be a torch.Tensor, got list"):
        net.moments([0.0] * 6, 0.1)
    with pytest.raises(TypeError, match=r"mean must be a torch.Tensor, got numpy.ndarray"):
        relu_moments(np.zeros(3), np.eye(3))
    with pytest.raises(TypeError, match=r"cov must be a torch.Tensor, got list"):
        relu_moments(torch.zeros(2, dtype=D), [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(TypeError, match=r"mean must be a torch.Tensor, got list"):
        relu_moments([0.0, 1.0], torch.eye(2, dtype=D))


def test_dtype_and_empty_inputs_are_named() -> None:
    net = _net()
    with pytest.raises(TypeError, match=r"mean has dtype torch.float32 but the network's"):
        net.moments(torch.zeros(6), 0.1)
    with pytest.raises(TypeError, match=r"cov has dtype torch.float32 but"):
        net.moments(torch.zeros(6, dtype=D), torch.eye(6))
    with pytest.raises(TypeError, match=r"mean has dtype torch.int64"):
        relu_moments(torch.zeros(2, dtype=torch.int64), torch.eye(2, dtype=D))
    with pytest.raises(ValueError, match=r"mean has shape \(0,\).*p >= 1"):
        relu_moments(torch.zeros(0, dtype=D), torch.zeros(0, 0, dtype=D))
    with pytest.raises(ValueError, match=r"mean has shape \(\).*p >= 1"):
        relu_moments(torch.tensor(0.0, dtype=D), torch.zeros(1, 1, dtype=D))
    with pytest.raises(ValueError, match=r"cov = 1e\+300 is not finite in torch.float32"):
        AffineReLUAffine(
            torch.ones(2, 2), torch.zeros(2), torch.ones(1, 2), torch.zeros(1)
        ).moments(torch.zeros(2), 1e300)
    with pytest.raises(ValueError, match=r"cov = 1e-50 underflows torch.float32"):
        AffineReLUAffine(
            torch.ones(2, 2), torch.zeros(2), torch.ones(1, 2), torch.zeros(1)
        ).moments(torch.zeros(2), 1e-50)


def test_relu_moments_broadcasts_batch_shapes() -> None:
    """mean (p,) with covariances (2, p, p): the per-covariance results, stacked."""
    mean = torch.tensor([0.3, -0.2, 0.5], dtype=D)
    covs = torch.stack([_spd(3, 1), _spd(3, 2)])
    m, C = relu_moments(mean, covs)
    assert m.shape == (2, 3) and C.shape == (2, 3, 3)
    for i in range(2):
        mi, Ci = relu_moments(mean, covs[i])
        torch.testing.assert_close(C[i], Ci, rtol=0, atol=0)
        torch.testing.assert_close(m[i], mi, rtol=0, atol=0)
    for method in ("zero_mean", "series"):
        _, Cb = relu_moments(mean.expand(4, 3), covs[0], method=method)
        torch.testing.assert_close(Cb[3], relu_moments(mean, covs[0], method=method)[1])


def test_mixed_dtypes_and_nan_parameters_fail_at_construction() -> None:
    A, c1, B, c2 = (
        torch.ones(3, 2, dtype=D),
        torch.zeros(3, dtype=D),
        torch.ones(1, 3),
        torch.zeros(1),
    )
    with pytest.raises(TypeError, match=r"B has dtype torch.float32 but A has torch.float64"):
        AffineReLUAffine(A, c1, B, c2)
    good = {"A": A, "c1": c1, "B": B.double(), "c2": c2.double()}
    for name in good:
        bad = dict(good)
        bad[name] = good[name].clone()
        bad[name].view(-1)[-1] = float("nan")
        with pytest.raises(ValueError, match=rf"^{name} contains NaN or Inf"):
            AffineReLUAffine(**bad)
    with pytest.raises(TypeError, match=r"A must be a torch.Tensor, got numpy.ndarray"):
        AffineReLUAffine(np.ones((3, 2)), c1, B.double(), c2.double())
    with pytest.raises(ValueError, match=r"n, p, d >= 1"):
        AffineReLUAffine(
            torch.ones(0, 2, dtype=D),
            torch.zeros(0, dtype=D),
            torch.ones(1, 0, dtype=D),
            c2.double(),
        )


@pytest.mark.parametrize("cov_kind", ["iso", "diag", "full"])
def test_nothing_passed_in_is_modified(cov_kind: str) -> None:
    net = _net()
    params = {k: getattr(net, k).clone() for k in ("A", "c1", "B", "c2")}
    mean = torch.randn(2, 6, generator=torch.Generator().manual_seed(9), dtype=D)
    cov = {
        "iso": torch.tensor(0.2, dtype=D),
        "diag": torch.full((6,), 0.2, dtype=D),
        "full": _spd(6),
    }[cov_kind]
    kept = (mean.clone(), cov.clone())
    for method in ("exact", "series", "zero_mean"):
        net.moments(mean, cov, method=method, cov_kind=cov_kind, full=True)
    relu_moments(mean, _spd(6))
    assert torch.equal(mean, kept[0]) and torch.equal(cov, kept[1])
    for k, v in params.items():
        assert torch.equal(getattr(net, k), v)


def test_image_shaped_mean_and_diagonal() -> None:
    """One input in its own shape (e.g. an image) is flattened; variances of that shape are
    its diagonal — the same as the flat call."""
    net = _net(6)
    img = torch.linspace(-1, 1, 6, dtype=D).reshape(1, 2, 3)
    var = torch.linspace(0.1, 0.6, 6, dtype=D).reshape(1, 2, 3)
    a = net.moments(img, var)
    b = net.moments(img.reshape(6), torch.diag(var.reshape(6)))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
