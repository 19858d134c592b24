"""Two more MNIST models for layer-wise propagation: an MLP and a small residual CNN.

Both are trained once on the 4000 offline MNIST training digits (``torchbridge.data.mnist``)
with :func:`torchbridge.models.train` and cached next to LeNet (``models.cache_dir``) under
their own file names, ``mlp_mnist.pt`` / ``rescnn_mnist.pt`` (+ ``.json`` with the test
accuracy and settings).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from torchbridge.models import accuracy, cache_dir, train

__all__ = ["ResidualCNN", "mlp", "residual_cnn", "trained_mlp", "trained_residual_cnn"]


def mlp(hidden: int = 256) -> nn.Sequential:
    """784-``hidden``-``hidden``-10 ReLU MLP for (N, 1, 28, 28) input."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


class ResidualCNN(nn.Module):
    """(N, 1, 28, 28) -> (N, 10): a strided conv stem, one residual block with BatchNorm,
    average pooling and a linear head. A plain ``nn.Module`` with functional ReLUs and a skip
    addition (not an ``nn.Sequential``); every ReLU acts on 14·14·``channels`` units."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Conv2d(1, c, 3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(c * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        r = F.relu(self.bn1(self.conv1(h)))
        h = F.relu(h + self.conv2(r))
        return self.fc(torch.flatten(self.pool(h), 1))


def residual_cnn(channels: int = 8) -> ResidualCNN:
    return ResidualCNN(channels)


def _trained(
    stem: str, build: Callable[[], nn.Module], cache: str | os.PathLike[str] | None, seed: int
) -> nn.Module:
    d = cache_dir(cache)
    weights, meta_path = d / f"{stem}.pt", d / f"{stem}.json"
    settings = {"epochs": 3, "seed": seed}
    if weights.is_file() and meta_path.is_file():
        if json.loads(meta_path.read_text()).get("settings") == settings:
            model = build()
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return model.eval()
    from torchbridge.data import mnist

    train_x, train_y, test_x, test_y = mnist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    start = time.perf_counter()
    train(model, train_x, train_y, epochs=settings["epochs"], seed=seed, progress=False)
    meta = {
        "test_accuracy": accuracy(model, test_x, test_y),
        "train_seconds": time.perf_counter() - start,
        "settings": settings,
        "torch": torch.__version__,
    }
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, weights)
    meta_path.write_text(json.dumps(meta, indent=2))
    return model.eval()


def trained_mlp(cache: str | os.PathLike[str] | None = None, seed: int = 0) -> nn.Sequential:
    """:func:`mlp` trained 3 epochs (Adam 1e-3, batch 64) on the MNIST subset; cached."""
    return _trained("mlp_mnist", mlp, cache, seed)


def trained_residual_cnn(cache: str | os.PathLike[str] | None = None, seed: int = 0) -> ResidualCNN:
    """:class:`ResidualCNN` trained 3 epochs (Adam 1e-3, batch 64) on the MNIST subset; cached."""
    return _trained("rescnn_mnist", residual_cnn, cache, seed)


def test_accuracy(stem: str, cache: str | os.PathLike[str] | None = None) -> float | None:
    """Cached test accuracy of ``mlp_mnist`` / ``rescnn_mnist`` (None if not trained yet)."""
    p = cache_dir(cache) / f"{stem}.json"
    return float(json.loads(p.read_text())["test_accuracy"]) if p.is_file() else None
