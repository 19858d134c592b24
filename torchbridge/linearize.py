"""Two-stage linearization of a piecewise-linear ``nn.Sequential`` (paper, Section 3.3).

A deep PL-DNN ``R(x) = R_{l+1}(ReLU_l(R_{l-1}(x)))`` is cut at its l-th ReLU and replaced by
the (Affine, ReLU, Affine) network ``g(x) = B relu(A x + c1) + c2`` where

* ``A = dR_{l-1}/dx (x0)`` and ``c1 = R_{l-1}(x0) - A x0``    (first-order Taylor at x0),
* ``B = dR_{l+1}/dy (y0)`` and ``c2 = R_{l+1}(y0) - B y0``    with ``y0 = ReLU(R_{l-1}(x0))``.

All vectors are the flattened per-sample tensors. Because every supported layer is piecewise
linear, each Jacobian is exact: at the linearization point it is the linear map obtained by
freezing the ReLU masks and max-pool argmax indices and dropping the biases (BatchNorm in eval
mode keeps only its per-channel scale). One forward pass at the point records these, then the
frozen map is applied to an identity batch (forward mode, when the sub-network's input is
smaller than its output) or transposed by one batched backward pass over identity rows
(reverse mode). The identity is processed in chunks bounded by the largest intermediate
activation; for LeNet the whole identity fits in one batch, which oneDNN convolutions run
fastest. Layers whose input lacks the leading batch dimension (e.g. an unbatched Conv2d input
after an Unflatten) fall back to ``torch.func.vmap`` over JVPs / VJPs.

Measured on the trained LeNet (float32, 2 CPU cores shared with other jobs, median of 5 per
image, test images 0-2): about 0.5-0.65 s for each of relu_index -1, 0 and 1, the same for
every image, versus 0.7-2.1 s (varying per image) for the previous vmap-of-JVP version with
bitwise-identical A, c1, B, c2; ``torch.autograd.functional.jacobian`` (row-by-row reverse
mode) takes 41 s for A alone at relu_index 2.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional

from torchbridge.network import AffineReLUAffine

__all__ = [
    "SUPPORTED_LAYERS",
    "flatten_sequential",
    "relu_layers",
    "split_at_relu",
    "two_stage_linearize",
]

#: Layer types accepted inside the Sequential (all piecewise linear in eval mode).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Dropout,
    nn.Identity,
    nn.ZeroPad2d,
)

# Elements per chunk of the largest intermediate activation (2**25 ~ 256 MiB in float64).
_CHUNK_ELEMENTS = 2**25


def flatten_sequential(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaves of a (possibly nested) ``nn.Sequential`` as ``(path, module)`` pairs.

    ``path`` is the dotted child index, e.g. ``"3.1"`` for the second child of a nested
    Sequential at index 3. Raises ``TypeError`` if ``model`` is not an ``nn.Sequential`` or a
    leaf is not one of :data:`SUPPORTED_LAYERS` (naming the layer and its path).
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            "two-stage linearization needs an nn.Sequential of piecewise-linear layers, got "
            f"{type(model).__name__}"
        )
    leaves: list[tuple[str, nn.Module]] = []

    def visit(seq: nn.Sequential, prefix: str) -> None:
        for name, child in seq.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.Sequential):
                visit(child, path + ".")
                continue
            if type(child) not in SUPPORTED_LAYERS:
                raise TypeError(
                    f"unsupported layer {type(child).__name__} at index/path '{path}': only "
                    "piecewise-linear layers (Linear, Conv, ReLU, Max/AvgPool, Flatten, "
                    "BatchNorm (eval), Dropout (eval), Identity, nested Sequential) are allowed"
                )
            if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)) and (
                child.running_mean is None or child.running_var is None
            ):
                raise TypeError(
                    f"unsupported layer {type(child).__name__} at index/path '{path}': "
                    "track_running_stats=False normalizes with the statistics of each batch, "
                    "which is not piecewise linear in the input (even in eval mode)"
                )
            if isinstance(child, (nn.MaxPool1d, nn.MaxPool2d)) and child.return_indices:
                raise TypeError(
                    f"unsupported layer {type(child).__name__} at index/path '{path}': "
                    "return_indices=True is not allowed"
                )
            leaves.append((path, child))

    visit(model, "")
    return leaves


def _check_eval(model: nn.Sequential, leaves: list[tuple[str, nn.Module]]) -> None:
    """Require eval mode everywhere; name a BatchNorm/Dropout in training mode first."""
    mode_dependent = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout)
    ordered = [pl for pl in leaves if isinstance(pl[1], mode_dependent)] + leaves
    for path, layer in ordered:
        if layer.training:
            raise ValueError(
                f"model must be in eval mode (call model.eval()): layer "
                f"{type(layer).__name__} at index/path '{path}' is in training mode"
            )
    for name, module in model.named_modules():
        if module.training:
            where = f"submodule '{name}'" if name else "the model"
            raise ValueError(
                f"model must be in eval mode (call model.eval()): {where} "
                f"({type(module).__name__}) is in training mode"
            )


def relu_layers(model: nn.Sequential) -> list[tuple[str, nn.ReLU]]:
    """The ``nn.ReLU`` leaves of ``model`` in order, as ``(path, module)`` pairs."""
    return [(p, m) for p, m in flatten_sequential(model) if isinstance(m, nn.ReLU)]


def _resolve_relu_index(leaves: list[tuple[str, nn.Module]], relu_index: int) -> int:
    positions = [i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.ReLU)]
    if not positions:
        raise ValueError("model has no nn.ReLU layer to linearize around")
    if isinstance(relu_index, bool) or not isinstance(relu_index, int):
        raise TypeError(f"relu_index must be an int, got {type(relu_index).__name__}")
    k = len(positions)
    if not -k <= relu_index < k:
        paths = ", ".join(leaves[i][0] for i in positions)
        raise ValueError(
            f"relu_index {relu_index} out of range: model has {k} ReLU layer(s) "
            f"(at paths {paths}); valid indices are {-k}..{k - 1}"
        )
    return positions[relu_index]


def split_at_relu(
    model: nn.Sequential, relu_index: int = -1
) -> tuple[nn.Sequential, nn.Sequential]:
    """Split ``model`` around its ``relu_index``-th ReLU into ``(R_{l-1}, R_{l+1})``.

    Nested Sequentials are flattened; the returned Sequentials share the layer objects with
    ``model`` (no copies). Either part may be empty (the identity).
    """
    leaves = flatten_sequential(model)
    pos = _resolve_relu_index(leaves, relu_index)
    before = nn.Sequential(*[m for _, m in leaves[:pos]])
    after = nn.Sequential(*[m for _, m in leaves[pos + 1 :]])
    return before, after


def _model_dtype_device(model: nn.Module, x0: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    dtype = x0.dtype if x0.is_floating_point() else torch.get_default_dtype()
    return dtype, x0.device


def _per_sample_ndim(leaves: list[tuple[str, nn.Module]]) -> int | None:
    """Per-sample input rank implied by the first shape-sensitive layer (None: ambiguous)."""
    for _, m in leaves:
        if isinstance(
            m,
            (
                nn.Conv2d,
                nn.MaxPool2d,
                nn.AvgPool2d,
                nn.BatchNorm2d,
                nn.AdaptiveAvgPool2d,
                nn.ZeroPad2d,
            ),
        ):
            return 3
        if isinstance(m, (nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d)):
            return 2
        if isinstance(m, (nn.Linear, nn.BatchNorm1d)):
            return 1
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return None
    return None


def _sample_shape(x0: torch.Tensor, leaves: list[tuple[str, nn.Module]]) -> tuple[int, ...]:
    """Per-sample shape of ``x0`` (dropping a leading batch dimension of size 1 if present)."""
    if x0.ndim == 0:
        raise ValueError("x0 must have at least one dimension")
    k = _per_sample_ndim(leaves)
    if k is None:
        batched = x0.ndim >= 2 and x0.shape[0] == 1
    elif x0.ndim == k + 1:
        if x0.shape[0] != 1:
            raise ValueError(
                f"x0 has shape {tuple(x0.shape)}: a batch dimension is allowed only with size 1 "
                "(linearize one input at a time)"
            )
        batched = True
    elif x0.ndim == k:
        batched = False
    else:
        raise ValueError(
            f"x0 has shape {tuple(x0.shape)} but the first layer expects a per-sample tensor with "
            f"{k} dimension(s) (optionally with a leading batch dimension of size 1)"
        )
    return tuple(x0.shape[1:]) if batched else tuple(x0.shape)


def _expected_input(layer: nn.Module) -> str:
    """What ``layer`` needs of its per-sample input, in words ("" if nothing simple)."""
    if isinstance(layer, nn.Linear):
        return f"{layer.in_features} input features"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return f"{layer.in_channels} input channels"
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return f"{layer.num_features} features"
    return ""


def _check_input_fits(
    leaves: list[tuple[str, nn.Module]], x0: torch.Tensor, shape: tuple[int, ...]
) -> None:
    """ValueError naming x0 and the size the failing layer expects if the model cannot take
    one input of per-sample ``shape`` (one forward pass on zeros, layer by layer)."""
    dtype, device = _model_dtype_device(nn.Sequential(*[m for _, m in leaves]), x0)
    x = torch.zeros(1, *shape, dtype=dtype, device=device)
    numel_kept = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)
    with torch.no_grad():
        for idx, (path, layer) in enumerate(leaves):
            try:
                x = layer(x)
            except RuntimeError as err:
                want = _expected_input(layer)
                direct = isinstance(layer, nn.Linear) and all(
                    isinstance(m, numel_kept) for _, m in leaves[:idx]
                )
                raise ValueError(
                    f"x0 has shape {tuple(x0.shape)} ({int(x0.numel())} elements) and does not "
                    f"fit the model"
                    + (f": x0 must have {layer.in_features} elements" if direct else "")
                    + f"; layer {type(layer).__name__} at index/path '{path}' "
                    + (f"expects {want} but " if want else "")
                    + f"receives a per-sample input of shape {tuple(x.shape[1:])} ({err})"
                ) from None


def _flat_fn(seq: nn.Sequential, shape: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(v: torch.Tensor) -> torch.Tensor:
        return seq(v.reshape(1, *shape)).reshape(-1)

    return fn


def _max_activation(seq: nn.Sequential, x: torch.Tensor) -> int:
    largest = x.numel()
    with torch.no_grad():
        for layer in seq:
            x = layer(x)
            largest = max(largest, x.numel())
    return largest


def _identity_chunk(start: int, stop: int, size: int, like: torch.Tensor) -> torch.Tensor:
    eye = torch.zeros(stop - start, size, dtype=like.dtype, device=like.device)
    idx = torch.arange(stop - start, device=like.device)
    eye[idx, idx + start] = 1
    return eye


def _grad_mode(create_graph: bool) -> contextlib.AbstractContextManager:
    """Autograd on (the result stays differentiable w.r.t. the parameters) or off."""
    return torch.enable_grad() if create_graph else torch.no_grad()


def _jacobian_functorch(
    seq: nn.Sequential, x: torch.Tensor, in_shape: tuple[int, ...], create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback Jacobian via ``torch.func`` (vmap of JVPs / VJPs) for unusual layer shapes.

    torch.func transforms compose with ordinary autograd, so with ``create_graph`` the
    Jacobian keeps its graph back to the parameters ``seq`` closes over.
    """
    keep = (lambda t: t) if create_graph else (lambda t: t.detach())
    fn = _flat_fn(seq, in_shape)
    with _grad_mode(create_graph):
        value = fn(x)
    m, k = x.numel(), value.numel()
    chunk = max(1, _CHUNK_ELEMENTS // _max_activation(seq, x.reshape(1, *in_shape)))
    pieces = []
    if m <= k:  # forward mode: one JVP per input coordinate, batched with vmap

        def jvp_col(v: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(fn, (x,), (v,))[1]

        batched = torch.func.vmap(jvp_col)
        with warnings.catch_warnings():
            # torch's first forward-AD call scripts decompositions with the deprecated
            # torch.jit.script (torch-internal DeprecationWarning, not actionable here).
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.script", category=DeprecationWarning
            )
            for start in range(0, m, chunk):
                stop = min(m, start + chunk)
                pieces.append(keep(batched(_identity_chunk(start, stop, m, x))))
        jac = torch.cat(pieces, dim=0).T.contiguous()
    else:  # reverse mode: one VJP per output coordinate, batched with vmap
        _, vjp_fn = torch.func.vjp(fn, x)

        def vjp_row(u: torch.Tensor) -> torch.Tensor:
            return vjp_fn(u)[0]

        batched = torch.func.vmap(vjp_row)
        for start in range(0, k, chunk):
            stop = min(k, start + chunk)
            pieces.append(keep(batched(_identity_chunk(start, stop, k, value))))
        jac = torch.cat(pieces, dim=0)
    return jac, keep(value)


# A frozen linear op maps a batch ``v`` of shape ``(N, *per-sample in)`` to ``(N, *per-sample
# out)``; the flag allows overwriting ``v`` (forward mode, no autograd graph).
_FrozenOp = Callable[[torch.Tensor, bool], torch.Tensor]

# Batched input rank each shape-sensitive layer needs for the frozen (batched) path.
_BATCHED_NDIM: tuple[tuple[tuple[type[nn.Module], ...], int], ...] = (
    ((nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d), 4),
    ((nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d), 3),
)


def _frozen_op(
    layer: nn.Module, x_in: torch.Tensor, x_out: torch.Tensor, create_graph: bool = False
) -> _FrozenOp | None:
    """The Jacobian of ``layer`` at ``x_in`` as a batched linear op (None: use the fallback).

    ReLU masks and max-pool argmax indices are frozen at ``x_in``; conv/linear drop their bias;
    BatchNorm (eval) keeps only its per-channel scale. Same subgradient conventions as
    autograd: ReLU'(0) = 0 and max-pool routes to the index the kernel returns. With
    ``create_graph`` the weights and scales are used as they are (not detached), so the op's
    output is differentiable w.r.t. them; masks and indices are piecewise constant in the
    parameters (zero derivative almost everywhere) and stay frozen either way.
    """
    keep = (lambda t: t) if create_graph else (lambda t: t.detach())
    for types, ndim in _BATCHED_NDIM:
        if isinstance(layer, types) and x_in.ndim != ndim:
            return None
    out_shape = tuple(x_out.shape[1:])
    if isinstance(layer, nn.Linear):
        weight = keep(layer.weight)
        return lambda v, inplace: functional.linear(v, weight)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        conv, kernel = layer, keep(layer.weight)
        return lambda v, inplace: conv._conv_forward(v, kernel, None)
    if isinstance(layer, nn.ReLU):
        dead = x_in <= 0  # threshold_backward: zero gradient where x <= 0

        def relu_op(v: torch.Tensor, inplace: bool) -> torch.Tensor:
            return v.masked_fill_(dead, 0) if inplace else v.masked_fill(dead, 0)

        return relu_op
    if isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d)):
        pool = functional.max_pool2d if isinstance(layer, nn.MaxPool2d) else functional.max_pool1d
        _, idx = pool(
            x_in,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            ceil_mode=layer.ceil_mode,
            return_indices=True,
        )
        if tuple(idx.shape) != tuple(x_out.shape):
            return None
        flat_idx = idx.flatten(2)

        def maxpool_op(v: torch.Tensor, inplace: bool) -> torch.Tensor:
            n = v.shape[0]
            picked = v.flatten(2).gather(2, flat_idx.expand(n, -1, -1))
            return picked.view(n, *out_shape)

        return maxpool_op
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if layer.running_var is None or x_in.ndim < 2:
            return None  # eval-mode BatchNorm without running stats uses batch statistics
        scale = torch.rsqrt(layer.running_var + layer.eps)
        if layer.weight is not None:
            scale = layer.weight * scale
        scale = keep(scale).reshape(1, -1, *([1] * (x_in.ndim - 2)))

        def bn_op(v: torch.Tensor, inplace: bool) -> torch.Tensor:
            return v.mul_(scale) if inplace else v * scale

        return bn_op
    if isinstance(layer, (nn.Flatten, nn.Unflatten)):
        return lambda v, inplace: v.reshape(v.shape[0], *out_shape)
    if isinstance(layer, (nn.Identity, nn.Dropout)):
        return lambda v, inplace: v
    if isinstance(layer, nn.ZeroPad2d) and x_in.ndim < 3:
        return None
    # AvgPool1d/2d, AdaptiveAvgPool2d, ZeroPad2d: linear and bias-free, applied per sample.
    return lambda v, inplace: layer(v)


def _frozen_ops(
    seq: nn.Sequential, x: torch.Tensor, create_graph: bool = False
) -> tuple[list[_FrozenOp] | None, torch.Tensor, int]:
    """Forward pass at ``x`` (batch of 1) recording each layer's frozen linear op.

    Returns ``(ops or None, output, largest per-sample activation numel)``; ``ops`` is None
    when some layer does not keep the leading batch dimension (then the fallback is used).
    """
    ops: list[_FrozenOp] | None = []
    largest = x.numel()
    for layer in seq:
        y = layer(x)
        largest = max(largest, y.numel())
        if ops is not None:
            batched = x.ndim >= 1 and y.ndim >= 1 and x.shape[0] == 1 and y.shape[0] == 1
            op = _frozen_op(layer, x, y, create_graph) if batched else None
            ops = None if op is None else [*ops, op]
        x = y
    return ops, x, largest


def _apply_ops(ops: list[_FrozenOp], v: torch.Tensor, inplace: bool) -> torch.Tensor:
    for op in ops:
        v = op(v, inplace)
    return v


def _jacobian(
    seq: nn.Sequential, x: torch.Tensor, in_shape: tuple[int, ...], create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobian ``(k, m)`` and value ``(k,)`` of the flattened ``seq`` at the flat point ``x``.

    The network is piecewise linear, so its Jacobian at ``x`` is the linear map obtained by
    freezing ReLU masks / max-pool indices and dropping biases; it is applied to a chunked
    identity batch (forward mode, ``m <= k``) or transposed by one batched backward pass
    (reverse mode). With ``create_graph`` both results keep their autograd graph to the
    parameters of ``seq`` (reverse mode then differentiates twice: double backward); without
    it nothing is recorded and the forward mode works in place.
    """
    with _grad_mode(create_graph):
        ops, out, largest = _frozen_ops(seq, x.reshape(1, *in_shape), create_graph)
    if ops is None:
        return _jacobian_functorch(seq, x, in_shape, create_graph)
    value = out.reshape(-1)
    m, k = x.numel(), value.numel()
    chunk = max(1, _CHUNK_ELEMENTS // largest)
    inplace = not create_graph
    if m <= k:  # forward mode: push identity columns through the frozen linear map
        with _grad_mode(create_graph):
            if chunk >= m:  # one batch (the fastest: oneDNN convolutions like big batches)
                eye = torch.eye(m, dtype=x.dtype, device=x.device).reshape(m, *in_shape)
                jac_t = _apply_ops(ops, eye, inplace).reshape(m, k)
            else:
                pieces = []
                for start in range(0, m, chunk):
                    stop = min(m, start + chunk)
                    eye = _identity_chunk(start, stop, m, x).reshape(stop - start, *in_shape)
                    pieces.append(_apply_ops(ops, eye, inplace).reshape(stop - start, k))
                jac_t = torch.cat(pieces, dim=0)
        return jac_t.T.contiguous(), value
    # reverse mode: backpropagate identity rows through the frozen linear map
    pieces = []
    for start in range(0, k, chunk):
        stop = min(k, start + chunk)
        z = torch.zeros(stop - start, *in_shape, dtype=x.dtype, device=x.device)
        z.requires_grad_(True)
        with torch.enable_grad():
            y = _apply_ops(ops, z, inplace=False).reshape(stop - start, k)
            (grad,) = torch.autograd.grad(
                y, z, _identity_chunk(start, stop, k, value), create_graph=create_graph
            )
        pieces.append(grad.reshape(stop - start, m))
    jac = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    return jac, value


def two_stage_linearize(
    model: nn.Sequential, x0: torch.Tensor, relu_index: int = -1, *, create_graph: bool = False
) -> AffineReLUAffine:
    """Two-stage linearization of ``model`` around ``x0`` at its ``relu_index``-th ReLU.

    Args:
        model: ``nn.Sequential`` (nested Sequentials allowed) of supported piecewise-linear
            layers, in eval mode.
        x0: one model input, either without batch dimension (e.g. ``(1, 28, 28)`` for a
            conv net, ``(n,)`` for an MLP) or with a leading batch dimension of size 1
            (``(1, 1, 28, 28)``, ``(1, n)``). Which one is meant is decided by the rank the
            first shape-sensitive layer expects (Conv2d/pool2d/BatchNorm2d: 3, Conv1d: 2,
            Linear/BatchNorm1d: 1); if the model starts with Flatten, a leading dimension of
            size 1 is taken as the batch dimension (the flattened input is the same either way).
        relu_index: index into :func:`relu_layers` (negative counts from the end). The
            default -1 (last ReLU) is the paper's choice: l = 3 for LeNet, l = 7 for AlexNet.
        create_graph: build A, c1, B, c2 differentiably w.r.t. the model's parameters (for
            moment-regularized training: gradients of ``.moments(...)`` reach the weights;
            the reverse-mode Jacobian is then differentiated twice). The default False
            records no graph, as fast as before; ``x0`` is a constant either way.

    Returns:
        ``AffineReLUAffine(A, c1, B, c2)`` with ``A`` (q, n), ``c1`` (q,), ``B`` (d, q),
        ``c2`` (d,) in the model's floating dtype and device; ``n`` = numel of one input,
        ``q`` = numel of the ReLU's input, ``d`` = numel of one output. Its ``forward`` takes
        inputs flattened to ``(batch, n)``, and it reproduces ``model`` exactly at ``x0``.
    """
    leaves = flatten_sequential(model)
    _check_eval(model, leaves)
    pos = _resolve_relu_index(leaves, relu_index)
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    shape = _sample_shape(x0, leaves)
    dtype, device = _model_dtype_device(model, x0)
    # a copy: layers such as ReLU(inplace=True) would otherwise overwrite the caller's x0
    x = x0.detach().to(dtype=dtype, device=device).reshape(-1).clone()
    if not torch.isfinite(x).all():
        raise ValueError("x0 contains NaN or infinite values")
    _check_input_fits(leaves, x0, shape)

    before = nn.Sequential(*[m for _, m in leaves[:pos]])
    after = nn.Sequential(*[m for _, m in leaves[pos + 1 :]])

    # clones: in-place layers (e.g. ReLU(inplace=True)) see copies only
    A, pre = _jacobian(before, x.clone(), shape, create_graph)
    with torch.no_grad():
        pre_shape = tuple(before(x.clone().reshape(1, *shape)).shape[1:])
    with _grad_mode(create_graph):
        c1 = pre - A @ x
        y0 = torch.relu(pre)
    B, out = _jacobian(after, y0.clone(), pre_shape, create_graph)
    with _grad_mode(create_graph):
        c2 = out - B @ y0
    return AffineReLUAffine(A, c1, B, c2)
