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


def pixel_class_net(classes: int = 10, side: int = 8) -> nn.Sequential:
    """(1, side, side) -> ``classes`` logits; logit c follows pixel c (row-major) through a ReLU.

    Flatten, Linear(side², classes) = selection of the first ``classes`` pixels plus small
    random weights, ReLU, Linear(classes, classes) = identity plus small random weights: an
    image whose pixel c is the brightest of the first ``classes`` is classified as c, and a
    perturbation that brightens pixel t pushes it to class t.
    """
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(side * side, classes), nn.ReLU(), nn.Linear(classes, classes)
    )
    with torch.no_grad():
        net[1].weight.uniform_(-0.02, 0.02)
        net[1].weight[:, :classes] += torch.eye(classes)
        net[1].bias.fill_(0.05)
        net[3].weight.uniform_(-0.02, 0.02)
        net[3].weight += torch.eye(classes)
        net[3].bias.zero_()
    return net.eval()


def pixel_class_data(per_class: int = 2, classes: int = 10, side: int = 8, seed: int = 0):
    """(test_x, test_y): ``per_class`` images of each class c, pixel c = 0.5, others in [0, 0.4]."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(per_class)
    x = torch.rand(len(y), 1, side, side, generator=gen) * 0.4
    x.view(len(y), -1)[torch.arange(len(y)), y] = 0.5
    return x, y
