"""The covariance checks' own machinery (``torchbridge.covariance``): the banded exact-symmetry
test and the blocked Cholesky behind the PSD check, against matrices whose answer is known by
construction (an eigen-decomposition chosen here, an entry changed here) and against
``torch.linalg.cholesky``'s factor."""

from __future__ import annotations

import pytest
import torch

from torchbridge.covariance import (
    CHOLESKY_BLOCK,
    PSD_TOL,
    SYMMETRY_BAND,
    _positive_definite,
    check_full_covariance,
    exactly_symmetric,
)


def _with_spectrum(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    """Q diag(eigs) Qᵀ for a random orthogonal Q, made exactly symmetric."""
    gen = torch.Generator().manual_seed(seed)
    n = eigs.shape[0]
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=eigs.dtype, generator=gen))
    a = (q * eigs) @ q.T
    return 0.5 * (a + a.T)


@pytest.mark.parametrize("n", [1, 5, SYMMETRY_BAND, SYMMETRY_BAND + 1, 2 * SYMMETRY_BAND + 37])
def test_exactly_symmetric_finds_any_single_changed_entry(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, dtype=torch.float64, generator=gen)
    a = a + a.T
    assert exactly_symmetric(a)
    assert exactly_symmetric(a.float())
    assert exactly_symmetric(torch.stack([a, 2 * a]))  # a batch
    if n == 1:
        return
    # one entry off by one ulp, in every kind of place: in a diagonal block, right of one,
    # below one, in the last row and column
    places = {(0, 1), (1, 0), (n - 1, 0), (0, n - 1), (n - 1, n - 2), (n // 2, n // 3)}
    for i, j in places:
        if i == j:
            continue
        b = a.clone()
        b[i, j] = torch.nextafter(b[i, j], torch.tensor(float("inf"), dtype=b.dtype))
        assert not exactly_symmetric(b), (i, j)
        assert not exactly_symmetric(torch.stack([a, b])), (i, j)
    b = a.clone()
    b[0, 0] = float("nan")  # NaN is not equal to itself
    assert not exactly_symmetric(b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [2 * CHOLESKY_BLOCK, 2 * CHOLESKY_BLOCK + 77])
def test_blocked_cholesky_decides_as_the_spectrum_says(n: int, dtype: torch.dtype) -> None:
    """n ≥ 2 blocks (the blocked path): positive definite with λ_min = 1e-3·λ_max (far above
    rounding) is accepted, and the Schur complement left in the last block is the one of
    torch.linalg.cholesky's factor (L33 L33ᵀ); with one eigenvalue −1e-3·λ_max (far below
    −n·eps·λ_max) it is rejected, wherever that eigenvalue's vector points."""
    base = torch.linspace(1e-3, 1.0, n, dtype=torch.float64)
    a = _with_spectrum(base, n).to(dtype)
    work = a.clone()
    assert _positive_definite(work)
    last = (n - 1) // CHOLESKY_BLOCK * CHOLESKY_BLOCK
    l33 = torch.linalg.cholesky(a)[last:, last:]
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert float((work[last:, last:].tril() - (l33 @ l33.T).tril()).abs().max()) < tol
    for spot in (0, CHOLESKY_BLOCK + 3, n - 1):  # the negative eigenvalue's eigenvector varies
        eigs = base.clone()
        eigs[spot] = -1e-3
        bad = _with_spectrum(eigs, n + spot).to(dtype)
        assert not _positive_definite(bad.clone())
        _, info = torch.linalg.cholesky_ex(bad)
        assert int(info) != 0  # the library's factorization agrees


def test_blocked_cholesky_fails_in_a_late_block() -> None:
    """A matrix whose leading 2·CHOLESKY_BLOCK rows are positive definite and whose last
    diagonal entry makes it indefinite: only the last block can find it."""
    n = 2 * CHOLESKY_BLOCK + 10
    a = _with_spectrum(torch.linspace(0.5, 1.0, n, dtype=torch.float64), 3)
    a[-1, -1] = -1.0  # the Schur complement of the last entry is negative
    assert _positive_definite(a[:-1, :-1].clone())
    assert not _positive_definite(a.clone())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_psd_check_on_a_large_cov_follows_the_stated_tolerance(dtype: torch.dtype) -> None:
    """check_full_covariance at n = 600 (the blocked path): λ_min at −0.1 of the tolerance
    PSD_TOL·n·eps·max diagonal is accepted as PSD within rounding; at −1e3 times the tolerance
    it is rejected with the smallest eigenvalue in the message."""
    n = 600
    eps = torch.finfo(dtype).eps
    tol = PSD_TOL * n * eps  # λ_max = 1, diagonal ≤ 1: the tolerance relative to it
    eigs = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    near = eigs.clone()
    near[0] = -0.1 * tol * 0.5  # the largest diagonal entry is about 0.5 here
    check_full_covariance(_with_spectrum(near, 1).to(dtype))
    far = eigs.clone()
    far[0] = -1e3 * tol
    with pytest.raises(ValueError, match="not positive semi-definite: smallest eigenvalue -"):
        check_full_covariance(_with_spectrum(far, 2).to(dtype))


def test_psd_check_on_zero_matrices_in_a_batch() -> None:
    """A zero Σ is PSD (checked as the identity, not with a subnormal shift); a zero diagonal
    with a nonzero entry is not; an indefinite matrix beside a zero one is still found."""
    good = _with_spectrum(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0)
    zero = torch.zeros(3, 3, dtype=torch.float64)
    check_full_covariance(zero)
    check_full_covariance(torch.stack([zero, good]))
    hollow = zero.clone()
    hollow[0, 1] = hollow[1, 0] = 1.0
    with pytest.raises(ValueError, match="its diagonal is zero but not all its entries"):
        check_full_covariance(torch.stack([good, hollow]))
    bad = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"smallest eigenvalue -1\.000e\+00"):
        check_full_covariance(torch.stack([zero, bad]))
