"""The one-variable ReLU moments' tail (h = μ/σ < −2, ``nmruntime.relu_pair._tail_where``):
evaluated only on the tail's elements on eager CPU, its continued fraction by NumPy there
(``_fused(..., by_numpy=True)``). Both must leave every value as the masked evaluation of all
elements gives it, bit for bit; accuracy against mpmath: tests/test_accuracy.py."""

from __future__ import annotations

import pytest
import torch
from nmgen.generated import torch_kernels as K

from nmruntime.pair_ops import torch_ops
from nmruntime.relu_pair import _BY_SCALARS, _cf, _fused
from nmruntime.torch_support import force_sync_free


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_continued_fraction_by_numpy_is_torchs_bit_for_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    x = 2.0 + torch.rand(20_000, generator=gen, dtype=torch.float64).to(dtype) * 60.0
    by_torch = _cf(torch_ops(), x)
    by_numpy = _cf(None, x.numpy())
    for a, b in zip(by_torch, by_numpy, strict=True):
        assert b.dtype == x.numpy().dtype
        assert torch.equal(a, torch.from_numpy(b))


@pytest.mark.parametrize("n", [1, 2, _BY_SCALARS, _BY_SCALARS + 1])
def test_continued_fraction_on_few_elements_is_torchs_bit_for_bit(n: int) -> None:
    """On at most ``_BY_SCALARS`` float64 elements ``_fused`` runs the fraction on Python
    floats, element by element (above, by NumPy): the same values as torch's, bit for bit,
    at x = 2 (the deepest), in the bulk and far out."""
    x = torch.tensor([2.0, 2.5, 7.25, 63.9, 3.1, 40.0, 2.000001, 11.0, 5.5], dtype=torch.float64)
    x = x[:n].reshape(-1, 1) if n > 1 else x[:n]
    got = _fused(torch_ops(), "continued_fraction", _cf, x, by_numpy=True)
    for a, b in zip(_cf(torch_ops(), x), got, strict=True):
        assert b.shape == x.shape and b.dtype == torch.float64
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tail_values_do_not_depend_on_the_path(dtype: torch.dtype) -> None:
    """A vector of mostly h ≥ −2 with a few tail elements (and none at all): the eager call
    (tail gathered, NumPy fraction) against the masked sync-free evaluation of every element
    and against the autograd path, bit for bit; each tail element alone as well."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(3001, generator=gen, dtype=torch.float64) * 2.0
    h[::97] = -2.0 - torch.rand(31, generator=gen, dtype=torch.float64) * 36.0
    s = (0.05 + torch.rand(3001, generator=gen, dtype=torch.float64) * 3.0).to(dtype)
    mu = h.to(dtype) * s
    eager = K.relu_mean_variance(mu, s)
    with force_sync_free():
        masked = K.relu_mean_variance(mu, s)
    graded = K.relu_mean_variance(mu.clone().requires_grad_(True), s)
    tail = (mu / s < -2.0).nonzero().squeeze(1)
    assert tail.numel() >= 31
    alone = [K.relu_mean_variance(mu[i : i + 1], s[i : i + 1]) for i in tail[:8].tolist()]
    for k in range(2):
        assert torch.equal(eager[k], masked[k])
        assert torch.equal(eager[k], graded[k].detach())
        for i, one in zip(tail[:8].tolist(), alone, strict=True):
            assert torch.equal(one[k], eager[k][i : i + 1])
    mid = h.abs() < 1.9  # no tail element at all
    sub = K.relu_mean_variance(mu[mid], s[mid])
    assert all(torch.equal(a, b[mid]) for a, b in zip(sub, eager, strict=True))
