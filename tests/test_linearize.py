"""Tests for torchbridge.linearize (two-stage linearization, paper Section 3.3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional

from torchbridge.linearize import (
    flatten_sequential,
    relu_layers,
    split_at_relu,
    two_stage_linearize,
)
from torchbridge.network import AffineReLUAffine


def _conv_net() -> nn.Sequential:
    """Small float64 conv net with every supported layer kind, 4 ReLUs, input (1, 12, 12)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 6x6
        nn.Sequential(
            nn.Conv2d(4, 6, 3, padding=1),
            nn.Dropout(0.3),
            nn.ReLU(),
            nn.AvgPool2d(2),  # 3x3
        ),
        nn.Identity(),
        nn.Flatten(),
        nn.Linear(6 * 9, 20),
        nn.BatchNorm1d(20),
        nn.ReLU(inplace=True),
        nn.Sequential(nn.Linear(20, 15), nn.ReLU()),
        nn.Linear(15, 5),
    ).double()
    # Non-trivial running statistics so BatchNorm (eval) is a genuine affine map.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def test_recovers_affine_relu_affine_exactly() -> None:
    torch.manual_seed(1)
    n, p, d = 7, 11, 4
    A, c1 = torch.randn(p, n, dtype=torch.float64), torch.randn(p, dtype=torch.float64)
    B, c2 = torch.randn(d, p, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    lin1, lin2 = nn.Linear(n, p).double(), nn.Linear(p, d).double()
    with torch.no_grad():
        lin1.weight.copy_(A)
        lin1.bias.copy_(c1)
        lin2.weight.copy_(B)
        lin2.bias.copy_(c2)
    model = nn.Sequential(lin1, nn.ReLU(), lin2).eval()
    for x0 in (torch.randn(n, dtype=torch.float64), torch.randn(1, n, dtype=torch.float64)):
        g = two_stage_linearize(model, x0)
        assert isinstance(g, AffineReLUAffine)
        for got, want in ((g.A, A), (g.c1, c1), (g.B, B), (g.c2, c2)):
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("relu_index", [0, 1, 2, 3, -1, -4])
def test_conv_net_exact_at_x0_and_jacobians(relu_index: int) -> None:
    net = _conv_net()
    x0 = torch.rand(1, 12, 12, dtype=torch.float64)
    g = two_stage_linearize(net, x0, relu_index)
    assert g.A.dtype == torch.float64
    n = x0.numel()
    assert g.in_features == n and g.out_features == 5
    out = g(x0.reshape(1, n))
    torch.testing.assert_close(out, net(x0[None]), rtol=0, atol=1e-10)
    # Batched x0 gives the same result.
    g_b = two_stage_linearize(net, x0[None], relu_index)
    torch.testing.assert_close(g_b.A, g.A, rtol=0, atol=0)
    # Jacobians agree with autograd on the two sub-networks.
    before, after = split_at_relu(net, relu_index)
    pre = before(x0[None])
    jac_a = torch.autograd.functional.jacobian(
        lambda v: before(v.reshape(1, 1, 12, 12)).reshape(-1), x0.reshape(-1)
    )
    torch.testing.assert_close(g.A, jac_a, rtol=0, atol=1e-12)
    y0 = torch.relu(pre).detach()
    jac_b = torch.autograd.functional.jacobian(
        lambda v: after(v.reshape(y0.shape)).reshape(-1), y0.reshape(-1)
    )
    torch.testing.assert_close(g.B, jac_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(g.c1, pre.reshape(-1) - g.A @ x0.reshape(-1), rtol=0, atol=1e-12)


def test_forward_and_reverse_modes_both_used() -> None:
    # relu 0: A maps 144 -> 576 (forward mode), B maps 576 -> 5 (reverse mode);
    # a net widening after the ReLU exercises reverse mode for A and forward mode for B.
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(30, 3), nn.ReLU(), nn.Linear(3, 40)).double().eval()
    x0 = torch.randn(30, dtype=torch.float64)
    g = two_stage_linearize(net, x0)
    torch.testing.assert_close(g.A, net[0].weight, rtol=0, atol=1e-14)
    torch.testing.assert_close(g.B, net[2].weight, rtol=0, atol=1e-14)


def test_relu_first_and_last() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.ReLU(), nn.Linear(4, 3), nn.ReLU()).double().eval()
    x0 = torch.randn(4, dtype=torch.float64)
    g0 = two_stage_linearize(net, x0, 0)
    torch.testing.assert_close(g0.A, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(g0(x0[None]), net(x0[None]), rtol=0, atol=1e-12)
    g1 = two_stage_linearize(net, x0, 1)
    torch.testing.assert_close(g1.B, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(g1(x0[None]), net(x0[None]), rtol=0, atol=1e-12)


def test_float32_model_gives_float32() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3)).eval()
    x0 = torch.rand(1, 6, 6, dtype=torch.float64)  # cast to the model's dtype
    g = two_stage_linearize(net, x0)
    assert g.A.dtype == torch.float32 and g.B.dtype == torch.float32
    torch.testing.assert_close(g(x0.float().reshape(1, -1)), net(x0.float()[None]))


def test_relu_layers_and_split() -> None:
    net = _conv_net()
    paths = [p for p, _ in relu_layers(net)]
    assert paths == ["2", "4.2", "9", "10.1"]
    before, after = split_at_relu(net, 1)
    assert len(before) + len(after) + 1 == len(flatten_sequential(net))


def test_error_training_mode() -> None:
    net = _conv_net().train()
    with pytest.raises(ValueError, match=r"eval mode.*BatchNorm2d.*'1'"):
        two_stage_linearize(net, torch.rand(1, 12, 12, dtype=torch.float64))
    net = _conv_net()
    net[4][1].train()  # only the nested Dropout
    with pytest.raises(ValueError, match=r"Dropout.*'4\.1'"):
        two_stage_linearize(net, torch.rand(1, 12, 12, dtype=torch.float64))


def test_error_non_piecewise_linear_layer() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Sigmoid(), nn.Linear(4, 2)))
    with pytest.raises(TypeError, match=r"Sigmoid.*'2\.0'"):
        two_stage_linearize(net.eval(), torch.randn(3))
    for layer in (nn.Tanh(), nn.Softmax(dim=1), nn.GELU()):
        with pytest.raises(TypeError, match=type(layer).__name__):
            two_stage_linearize(
                nn.Sequential(nn.Linear(3, 3), nn.ReLU(), layer).eval(), torch.randn(3)
            )


class _FunctionalReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.relu(x)


def test_error_custom_module_and_non_sequential() -> None:
    net = nn.Sequential(nn.Linear(3, 4), _FunctionalReLU(), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(TypeError, match=r"_FunctionalReLU.*'1'"):
        two_stage_linearize(net, torch.randn(3))
    with pytest.raises(TypeError, match=r"nn\.Sequential.*Linear"):
        two_stage_linearize(nn.Linear(3, 2).eval(), torch.randn(3))
    with pytest.raises(TypeError, match="LSTM"):
        two_stage_linearize(nn.Sequential(nn.LSTM(3, 3), nn.ReLU()).eval(), torch.randn(3))


def test_error_bad_relu_index() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    for idx in (1, -2, 5):
        with pytest.raises(ValueError, match=r"relu_index .* out of range.*1 ReLU"):
            two_stage_linearize(net, torch.randn(3), idx)
    with pytest.raises(ValueError, match=r"no nn\.ReLU"):
        two_stage_linearize(nn.Sequential(nn.Linear(3, 2)).eval(), torch.randn(3))


def test_error_bad_x0_shape() -> None:
    net = _conv_net()
    with pytest.raises(ValueError, match="batch dimension"):
        two_stage_linearize(net, torch.rand(2, 1, 12, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="expects a per-sample tensor"):
        two_stage_linearize(net, torch.rand(12, 12, dtype=torch.float64))


@pytest.mark.parametrize("chunk_elements", [1, 2**9, 2**25])
def test_chunked_and_fallback_paths_match_autograd(
    monkeypatch: pytest.MonkeyPatch, chunk_elements: int
) -> None:
    import torchbridge.linearize as lin

    monkeypatch.setattr(lin, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(5)
    nets = [
        _conv_net(),  # frozen-mask path (forward and reverse mode)
        nn.Sequential(  # 1-d layers, ceil-mode pooling, overlapping max-pool windows
            nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"),
            nn.ReLU(),
            nn.MaxPool1d(3, stride=2, ceil_mode=True),
            nn.AvgPool1d(2),
            nn.Flatten(),
            nn.ReLU(),
            nn.Linear(9, 4),
        ).double(),
        nn.Sequential(  # unbatched Conv2d input (4, 4) after the ReLU: functorch fallback
            nn.Linear(5, 16),
            nn.ReLU(),
            nn.Unflatten(1, (4, 4)),
            nn.Conv2d(1, 2, 3),
            nn.Flatten(0),
            nn.Linear(8, 3),
        ).double(),
    ]
    shapes = [(1, 12, 12), (2, 13), (5,)]
    for net, shape in zip(nets, shapes, strict=True):
        net.eval()
        x0 = torch.rand(*shape, dtype=torch.float64) - 0.3
        for relu_index in range(len(relu_layers(net))):
            g = two_stage_linearize(net, x0, relu_index)
            before, after = split_at_relu(net, relu_index)
            jac_a = torch.autograd.functional.jacobian(
                lambda v, b=before, s=shape: b(v.reshape(1, *s)).reshape(-1), x0.reshape(-1)
            )
            torch.testing.assert_close(g.A, jac_a, rtol=0, atol=1e-12)
            pre = before(x0[None]).detach()
            y0 = torch.relu(pre)
            jac_b = torch.autograd.functional.jacobian(
                lambda v, a=after, s=y0.shape: a(v.reshape(s)).reshape(-1), y0.reshape(-1)
            )
            torch.testing.assert_close(g.B, jac_b, rtol=0, atol=1e-12)
            want = net(x0[None]).reshape(1, -1)
            torch.testing.assert_close(g(x0.reshape(1, -1)), want, rtol=0, atol=1e-10)


def test_x0_is_not_mutated_by_in_place_layers() -> None:
    """ReLU(inplace=True) first: x0 keeps its values and the result equals the out-of-place
    network's (both ReLUs of the cut in place too)."""
    torch.manual_seed(3)
    layers = [nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 2)]
    inplace = nn.Sequential(
        nn.ReLU(inplace=True), layers[0], nn.ReLU(inplace=True), layers[1], nn.ReLU(), layers[2]
    ).double()
    plain = nn.Sequential(nn.ReLU(), layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2]).double()
    x0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    kept = x0.clone()
    for relu_index in (-1, 1):
        g = two_stage_linearize(inplace.eval(), x0, relu_index)
        assert torch.equal(x0, kept)
        ref = two_stage_linearize(plain.eval(), x0, relu_index)
        for name in ("A", "c1", "B", "c2"):
            assert torch.equal(getattr(g, name), getattr(ref, name)), name
        with torch.no_grad():
            assert torch.allclose(g(x0[None]), plain(x0[None]), rtol=1e-13, atol=1e-13)


def test_error_wrong_size_x0_names_x0_and_expected_size() -> None:
    net = nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2)).double().eval()
    with pytest.raises(ValueError, match=r"x0 has shape \(10,\).*x0 must have 12 elements"):
        two_stage_linearize(net, torch.zeros(10, dtype=torch.float64))
    flat = nn.Sequential(nn.Flatten(0), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    with pytest.raises(ValueError, match=r"x0 has shape \(2, 5\).*x0 must have 12 elements"):
        two_stage_linearize(flat.double(), torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x0 has shape \(1, 10, 10\).*'7'.*expects 54 input"):
        two_stage_linearize(_conv_net(), torch.zeros(1, 10, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x0 has shape \(2, 12, 12\).*expects 1 input channels"):
        two_stage_linearize(_conv_net(), torch.zeros(2, 12, 12, dtype=torch.float64))


def test_error_batchnorm_with_batch_statistics() -> None:
    """track_running_stats=False normalizes with each batch's statistics even in eval mode:
    not piecewise linear in the input, so it is refused (naming the layer and its path)."""
    for bn, x0 in ((nn.BatchNorm1d(4, track_running_stats=False), torch.randn(3)),):
        net = nn.Sequential(nn.Linear(3, 4), bn, nn.ReLU(), nn.Linear(4, 2)).eval()
        with pytest.raises(TypeError, match=r"BatchNorm1d.*'1'.*track_running_stats=False"):
            two_stage_linearize(net, x0)
    bn2 = nn.BatchNorm2d(2, track_running_stats=False)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), bn2, nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).eval()
    with pytest.raises(TypeError, match=r"BatchNorm2d.*'1'.*not piecewise linear"):
        two_stage_linearize(net, torch.randn(1, 4, 4))
