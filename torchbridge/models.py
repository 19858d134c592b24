"""Piecewise-linear models of the paper (LeNet for MNIST, AlexNet-style for 48x48 FER2013).

The trained LeNet is cached as a ``state_dict`` plus a JSON file with its test accuracy in
``$NM_CACHE_DIR`` or else ``platformdirs.user_cache_dir("network-moments")``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "LENET_EPOCHS",
    "accuracy",
    "alexnet48",
    "cache_dir",
    "lenet",
    "lenet_test_accuracy",
    "train",
    "train_fer2013",
    "trained_lenet",
]

#: Epochs used by :func:`trained_lenet` (4000 digits, batch 64, Adam 1e-3).
LENET_EPOCHS = 3
_LENET_STEM = "lenet_mnist"


def lenet() -> nn.Sequential:
    """Untrained LeNet for (N, 1, 28, 28) input -> (N, 10) logits (conv-ReLU-pool twice, fc)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(7 * 7 * 64, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def alexnet48(num_classes: int = 7) -> nn.Sequential:
    """AlexNet-style PL network for (N, 1, 48, 48) grayscale input -> (N, num_classes).

    5 conv layers (ReLU after each, 2x2 max-pools after conv 1, 2 and 5) and 3 fc layers
    (ReLU after the first two, Dropout in between); 7 ReLUs in total. ~1.5 M parameters.
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 24x24
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 12x12
        nn.Conv2d(64, 96, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(96, 96, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(96, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 6x6
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(64 * 6 * 6, 512),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def train(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    epochs: int = LENET_EPOCHS,
    seed: int = 0,
    progress: bool = True,
    *,
    batch_size: int = 64,
    lr: float = 1e-3,
) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy; returns it in eval mode.

    ``train_x`` (N, ...) float, ``train_y`` (N,) int64. Minibatch order (and dropout) is
    seeded with ``seed``, so runs are reproducible on the same machine / thread count.
    """
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(
            f"train_x has {train_x.shape[0]} samples but train_y has {train_y.shape[0]}"
        )
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    n = train_x.shape[0]
    steps = (n + batch_size - 1) // batch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        bar = tqdm(total=epochs * steps, desc="training", disable=not progress, leave=False)
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for i in range(steps):
                idx = order[i * batch_size : (i + 1) * batch_size]
                opt.zero_grad()
                loss = loss_fn(model(train_x[idx]), train_y[idx])
                loss.backward()
                opt.step()
                total += loss.item() * idx.numel()
                bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / n:.4f}")
        bar.close()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of ``x`` (N, ...) classified as ``y`` (N,) by ``model`` (evaluated in eval mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        pred = model(x[start : start + batch_size]).argmax(dim=1)
        correct += int((pred == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Cache folder: ``path`` if given, else ``$NM_CACHE_DIR``, else the platformdirs cache."""
    if path is None:
        path = os.environ.get("NM_CACHE_DIR")
    if path is None:
        import platformdirs

        path = platformdirs.user_cache_dir("network-moments")
    return Path(path)


def _lenet_files(cache: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    d = cache_dir(cache)
    return d / f"{_LENET_STEM}.pt", d / f"{_LENET_STEM}.json"


def trained_lenet(
    cache_dir: str | os.PathLike[str] | None = None,
    retrain: bool = False,
    progress: bool = True,
    *,
    epochs: int = LENET_EPOCHS,
    seed: int = 0,
    train_samples: int | None = None,
) -> nn.Sequential:
    """LeNet trained on the 4000 MNIST training digits of :func:`torchbridge.data.mnist`.

    Trains on first use (about a minute on 2 CPU cores) and caches ``lenet_mnist.pt``
    (state_dict) and ``lenet_mnist.json`` (test accuracy on the 1000 test digits, training
    time, settings) in the cache folder (argument, ``$NM_CACHE_DIR`` or platformdirs). A cache
    made with different settings (``epochs``, ``seed``, ``train_samples``: the first that many
    training digits, for quick tests) is retrained. Returns the float32 model in eval mode.
    """
    weights, meta_path = _lenet_files(cache_dir)
    settings = {"epochs": epochs, "seed": seed, "train_samples": train_samples}
    model = lenet()
    if not retrain and weights.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            return model.eval()
    from torchbridge.data import mnist

    train_x, train_y, test_x, test_y = mnist()
    if train_samples is not None:
        train_x, train_y = train_x[:train_samples], train_y[:train_samples]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = lenet()
    start = time.perf_counter()
    train(model, train_x, train_y, epochs=epochs, seed=seed, progress=progress)
    seconds = time.perf_counter() - start
    acc = accuracy(model, test_x, test_y)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, weights)
    meta = {
        "test_accuracy": acc,
        "train_seconds": seconds,
        "settings": settings,
        "torch": torch.__version__,
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return model.eval()


def lenet_test_accuracy(cache_dir: str | os.PathLike[str] | None = None) -> float:
    """Test accuracy (1000 MNIST test digits) of the cached LeNet; trains it if not cached."""
    _, meta_path = _lenet_files(cache_dir)
    if not meta_path.is_file():
        trained_lenet(cache_dir=cache_dir, progress=False)
    return float(json.loads(meta_path.read_text())["test_accuracy"])


def train_fer2013(
    csv_path: str | os.PathLike[str],
    epochs: int = 10,
    seed: int = 0,
    progress: bool = True,
    *,
    train_usage: str = "Training",
    test_usage: str | None = "PublicTest",
    out_path: str | os.PathLike[str] | None = None,
) -> tuple[nn.Sequential, float | None]:
    """Train :func:`alexnet48` on a FER2013 CSV.

    Uses rows with ``Usage == train_usage`` for training and ``test_usage`` (None: skip) for
    the reported accuracy. Saves the state_dict to ``out_path`` if given. Returns
    ``(model in eval mode, test accuracy or None)``.
    """
    from torchbridge.data import fer2013

    train_x, train_y = fer2013(csv_path, usage=train_usage)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = alexnet48()
    train(model, train_x, train_y, epochs=epochs, seed=seed, progress=progress)
    acc = None
    if test_usage is not None:
        test_x, test_y = fer2013(csv_path, usage=test_usage)
        acc = accuracy(model, test_x, test_y)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out_path)
    return model, acc
