"""Tiny stand-ins for LeNet and MNIST shared by the experiment smoke tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_net(hidden: int = 12, outputs: int = 3) -> nn.Sequential:
    """Conv net for (1, 8, 8) input with 2 ReLUs (q = 128 and ``hidden``)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32, hidden),
        nn.ReLU(),
        nn.Linear(hidden, outputs),
    )
    with torch.no_grad():  # positive biases: no layer is dead on [0, 1] inputs
        net[0].bias.fill_(0.2)
        net[4].bias.uniform_(-0.2, 0.3)
    return net.eval()


def tiny_mnist(n: int = 40, classes: int = 3, seed: int = 1):
    """(train_x, train_y, test_x, test_y) of random 8×8 images, split in halves."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    h = n // 2
    return x[:h], y[:h], x[h:], y[h:]
