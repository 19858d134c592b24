"""Tests for torchbridge.models (LeNet, AlexNet-48, training and the LeNet cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchbridge import data, models
from torchbridge.data import digits
from torchbridge.linearize import relu_layers, two_stage_linearize
from torchbridge.models import (
    accuracy,
    alexnet48,
    lenet,
    lenet_test_accuracy,
    train,
    trained_lenet,
)


def test_lenet_shape_and_structure() -> None:
    net = lenet().eval()
    out = net(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert len(relu_layers(net)) == 3


def test_alexnet48_shape_and_linearizable() -> None:
    net = alexnet48().eval()
    x = torch.rand(2, 1, 48, 48)
    assert net(x).shape == (2, 7)
    assert alexnet48(num_classes=3).eval()(x).shape == (2, 3)
    assert len(relu_layers(net)) == 7
    g = two_stage_linearize(net, x[0], relu_index=6)  # the paper's l = 7 (last ReLU)
    torch.testing.assert_close(g(x[:1].reshape(1, -1)), net(x[:1]), rtol=1e-4, atol=1e-5)


def test_train_and_accuracy_on_digits_deterministic() -> None:
    x, y = digits()
    x, y = x[:300], y[:300]

    def fit() -> torch.nn.Module:
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )
        return train(net, x, y, epochs=8, seed=0, progress=False, batch_size=100, lr=1e-2)

    a, b = fit(), fit()
    assert not a.training
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert accuracy(a, x, y) > 0.9
    with pytest.raises(ValueError, match="samples"):
        train(a, x, y[:10], epochs=1, progress=False)


def test_trained_lenet_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny budget: 64 training digits, 1 epoch, accuracy on 100 test digits only.
    full_mnist = data.mnist

    def small_mnist() -> tuple[torch.Tensor, ...]:
        tx, ty, vx, vy = full_mnist()
        return tx, ty, vx[:100], vy[:100]

    monkeypatch.setattr(data, "mnist", small_mnist)
    budget = {"epochs": 1, "train_samples": 64}
    net = trained_lenet(cache_dir=tmp_path, progress=False, **budget)
    assert not net.training
    meta = json.loads((tmp_path / "lenet_mnist.json").read_text())
    assert (tmp_path / "lenet_mnist.pt").is_file()
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    assert lenet_test_accuracy(tmp_path) == meta["test_accuracy"]

    # Second call loads from the cache (training would fail here); via the env variable.
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("should have loaded the cache")

    monkeypatch.setattr(models, "train", no_training)
    monkeypatch.setenv("NM_CACHE_DIR", str(tmp_path))
    again = trained_lenet(progress=False, **budget)
    for pa, pb in zip(net.parameters(), again.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # retrain=True or different settings ignore the cache.
    with pytest.raises(AssertionError, match="cache"):
        trained_lenet(progress=False, retrain=True, **budget)
    with pytest.raises(AssertionError, match="cache"):
        trained_lenet(progress=False, epochs=2, train_samples=64)


@pytest.mark.slow
def test_trained_lenet_accuracy() -> None:
    trained_lenet(progress=False)
    assert lenet_test_accuracy() >= 0.95
