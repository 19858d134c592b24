"""Gradients of linearized moments w.r.t. the model's parameters (``create_graph=True``).

References are independent of autograd's double backward: ``torch.autograd.gradcheck``
(central finite differences in float64) and finite differences along random directions in
parameter space, each evaluation a fresh linearization of the perturbed model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchbridge.linearize import two_stage_linearize


def _small_conv_net() -> nn.Sequential:
    """float64 conv net for (1, 6, 6) input; ReLU 0: q = 72 > n = 36 (A by forward mode),
    ReLU 1: q = 8 < n (A by reverse mode); B always by reverse mode, BatchNorm included."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(18, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net.eval()


def _moments_fn(net: nn.Sequential, x0: torch.Tensor, relu_index: int, full: bool):
    names = [n for n, _ in net.named_parameters()]

    def fn(*params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _swapped(net, dict(zip(names, params, strict=True))):
            g = two_stage_linearize(net, x0, relu_index, create_graph=True)
        return g.moments(x0.reshape(-1), 0.1**2, full=full)

    return fn


class _swapped:
    """Temporarily replace a module's parameters by given tensors (kept in the graph)."""

    def __init__(self, net: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.net, self.state, self.saved = net, state, {}

    def __enter__(self) -> None:
        for name, t in self.state.items():
            mod_name, _, attr = name.rpartition(".")
            mod = self.net.get_submodule(mod_name)
            self.saved[name] = mod._parameters[attr]
            mod._parameters[attr] = t

    def __exit__(self, *exc) -> None:
        for name, t in self.saved.items():
            mod_name, _, attr = name.rpartition(".")
            self.net.get_submodule(mod_name)._parameters[attr] = t


# at the first ReLU (the larger linearized layer) 54–58 s each on session 35's machine: slow
@pytest.mark.parametrize("relu_index", [pytest.param(0, marks=pytest.mark.slow), -1])
@pytest.mark.parametrize("full", [False, True])
def test_gradcheck_output_moments_wrt_weights(relu_index: int, full: bool) -> None:
    net = _small_conv_net()
    x0 = torch.rand(1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())
    fn = _moments_fn(net, x0, relu_index, full)
    mean, var = fn(*params)
    assert var.requires_grad and mean.requires_grad
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_opt_out_records_no_graph_and_gives_the_same_values() -> None:
    net = _small_conv_net()
    x0 = torch.rand(1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for relu_index in (0, -1):
        fast = two_stage_linearize(net, x0, relu_index)
        graph = two_stage_linearize(net, x0, relu_index, create_graph=True)
        for name in ("A", "c1", "B", "c2"):
            a, b = getattr(fast, name), getattr(graph, name)
            assert not a.requires_grad and b.requires_grad, name
            torch.testing.assert_close(a, b.detach(), rtol=1e-13, atol=1e-13)
        _, var = fast.moments(x0.reshape(-1), 0.01)
        assert not var.requires_grad


def fd_relative_errors(
    net: nn.Sequential, x0: torch.Tensor, relu_index: int, sigma: float, directions: int
) -> list[float]:
    """|FD − autograd| / |FD| of L = w·Var + u·E (random w ≥ 0, u) along random directions in
    parameter space (each parameter tensor's step scaled by its RMS), central differences with
    step 1e-5, float64; every FD evaluation relinearizes the perturbed model from scratch."""
    gen = torch.Generator().manual_seed(11)
    params = list(net.parameters())
    d = net[-1].out_features
    w_var = torch.rand(d, dtype=torch.float64, generator=gen)
    w_mean = torch.randn(d, dtype=torch.float64, generator=gen)

    def loss(create_graph: bool) -> torch.Tensor:
        g = two_stage_linearize(net, x0, relu_index, create_graph=create_graph)
        mean, var = g.moments(x0.reshape(-1), sigma**2)
        return (w_var * var).sum() + (w_mean * mean).sum()

    grads = torch.autograd.grad(loss(True), params)
    errors = []
    for _ in range(directions):
        dirs = [
            torch.randn(p.shape, dtype=p.dtype, generator=gen) * p.detach().pow(2).mean().sqrt()
            for p in params
        ]
        h = 1e-5
        with torch.no_grad():
            for p, v in zip(params, dirs, strict=True):
                p.add_(h * v)
            up = float(loss(False))
            for p, v in zip(params, dirs, strict=True):
                p.sub_(2 * h * v)
            down = float(loss(False))
            for p, v in zip(params, dirs, strict=True):
                p.add_(h * v)
        fd = (up - down) / (2 * h)
        ad = float(sum((g * v).sum() for g, v in zip(grads, dirs, strict=True)))
        errors.append(abs(fd - ad) / abs(fd))
    return errors


@pytest.mark.parametrize("relu_index", [0, -1])
def test_small_net_gradient_matches_finite_differences(relu_index: int) -> None:
    net = _small_conv_net()
    x0 = torch.rand(1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    errors = fd_relative_errors(net, x0, relu_index, sigma=0.1, directions=3)
    assert max(errors) < 1e-6, errors


@pytest.mark.slow
@pytest.mark.parametrize("relu_index", [-1])
def test_lenet_gradient_matches_finite_differences(relu_index: int) -> None:
    """Trained LeNet in float64, test image 0, σ = 0.05, 3 random directions."""
    from torchbridge.data import mnist
    from torchbridge.models import trained_lenet

    net = trained_lenet(progress=False).double()
    x0 = mnist()[2][0].double()
    errors = fd_relative_errors(net, x0, relu_index, sigma=0.05, directions=3)
    print(f"LeNet relu_index={relu_index}: FD vs autograd relative errors {errors}")
    assert max(errors) < 1e-5, errors


def _fallback_net() -> nn.Sequential:
    """B of ReLU 0 needs the torch.func fallback (unbatched Conv2d input after Unflatten)."""
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Linear(5, 16),
        nn.ReLU(),
        nn.Unflatten(1, (4, 4)),
        nn.Conv2d(1, 2, 3),
        nn.Flatten(0),
        nn.Linear(8, 3),
    ).double()


@pytest.mark.parametrize("case", ["fallback", pytest.param("chunked", marks=pytest.mark.slow)])
def test_gradcheck_fallback_and_chunked_paths(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchbridge.linearize as lin

    if case == "fallback":
        net = _fallback_net().eval()
        x0 = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    else:  # identity pushed through in chunks of a few columns (forward mode, ReLU 0)
        monkeypatch.setattr(lin, "_CHUNK_ELEMENTS", 2**8)
        net = _small_conv_net()
        x0 = torch.rand(1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    params = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())
    fn = _moments_fn(net, x0, 0, full=False)
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7, rtol=1e-5)
