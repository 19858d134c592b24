"""Index windows of max-pooling layers, so that max-pooling lowers to pairwise maxima.

``max_pool_windows`` returns, for a pooling of an input of shape (1, C, *spatial), a
``(K, C·prod(out))`` long tensor: row k holds, for every output unit, the flat input index of
the k-th element of its window. Padding never wins a max (it is −∞), so a padded position is
replaced by another element of the same window (max(a, a) = a).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _fixed_windows(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> list[list[int]]:
    """Valid input positions of each output's window along one dimension (PyTorch's rule)."""
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    wins = []
    for o in range(out):
        pos = [o * s - p + j * d for j in range(k)]
        valid = [t for t in pos if 0 <= t < n]
        wins.append([t if 0 <= t < n else valid[0] for t in pos])
    return wins


def _adaptive_windows(n: int, out: int) -> list[list[int]]:
    wins = []
    for o in range(out):
        a, b = (o * n) // out, -(-((o + 1) * n) // out)
        wins.append(list(range(a, b)))
    width = max(len(w) for w in wins)
    return [w + [w[0]] * (width - len(w)) for w in wins]


def _combine(shape: tuple[int, ...], per_dim: list[list[list[int]]]) -> torch.Tensor:
    """(K, C·prod(out)) flat indices from per-dimension windows of an input (1, C, *spatial)."""
    C, spatial = shape[1], shape[2:]
    strides = [math.prod(spatial[i + 1 :]) for i in range(len(spatial))]
    outs = [len(w) for w in per_dim]
    widths = [len(w[0]) for w in per_dim]
    rows = []
    for js in itertools.product(*(range(w) for w in widths)):
        row = []
        for os_ in itertools.product(*(range(o) for o in outs)):
            row.append(sum(per_dim[i][os_[i]][js[i]] * strides[i] for i in range(len(spatial))))
        rows.append(row)
    base = torch.tensor(rows, dtype=torch.long)  # (K, prod(out))
    chan = torch.arange(C, dtype=torch.long)[:, None] * math.prod(spatial)
    return (base[:, None, :] + chan[None]).reshape(base.shape[0], -1)


def max_pool_windows(
    shape: tuple[int, ...],
    kernel: int | Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """Windows of ``max_pool{1,2,3}d`` on an input of ``shape`` = (1, C, *spatial)."""
    nd = len(shape) - 2
    k = _tuple(kernel, nd)
    s = _tuple(stride if stride not in (None, (), []) else k, nd)
    p, d = _tuple(padding, nd), _tuple(dilation, nd)
    per_dim = [_fixed_windows(shape[2 + i], k[i], s[i], p[i], d[i], ceil_mode) for i in range(nd)]
    return _combine(shape, per_dim)


def adaptive_max_pool_windows(
    shape: tuple[int, ...], output_size: int | Sequence[int | None]
) -> torch.Tensor:
    """Windows of ``adaptive_max_pool{1,2,3}d`` on an input of ``shape`` = (1, C, *spatial)."""
    nd = len(shape) - 2
    out = _tuple(output_size, nd)
    per_dim = [
        _adaptive_windows(shape[2 + i], out[i] if out[i] is not None else shape[2 + i])
        for i in range(nd)
    ]
    return _combine(shape, per_dim)
