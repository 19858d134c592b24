"""Smoke tests of `nm demo` with a tiny stand-in network."""

from __future__ import annotations

import argparse
import json
import sys
import types

import torch
from torch import nn

from torchbridge.experiments import demo


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
        nn.ReLU(),
        nn.Linear(10, 4),
    )
    with torch.no_grad():  # positive biases: no layer is dead on [0, 1] inputs
        net[0].bias.fill_(0.2)
        net[4].bias.uniform_(-0.2, 0.3)
    return net.eval()


def _mnist():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 8, 8, generator=gen)
    y = torch.randint(0, 4, (12,), generator=gen)
    return x[:6], y[:6], x[6:], y[6:]


def _run(monkeypatch, tmp_path, argv: list[str]) -> dict:
    net = _net()
    monkeypatch.setattr(demo, "trained_lenet", lambda *a, **k: net)
    monkeypatch.setattr(demo, "mnist", _mnist)
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    demo.add_parser(sub)
    args = p.parse_args(["demo", "--out", str(tmp_path), *argv])
    return args.func(args)


def test_demo_writes_report(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("torchbridge.experiments.attack_figures")
    fake.demo_attacks = lambda out: calls.append(out) or {"figures": 0}
    monkeypatch.setitem(sys.modules, "torchbridge.experiments.attack_figures", fake)
    report = _run(monkeypatch, tmp_path, ["--skip-verify", "--images", "2", "--samples", "2000"])
    assert calls == [tmp_path]
    assert report["attacks"] == {"figures": 0}
    data = json.loads((tmp_path / "demo.json").read_text())
    assert 0 <= data["lenet"]["test_accuracy"] <= 1
    mom = data["moments"]
    assert len(mom["images"]) == 2 and "zero_mean" in mom["methods"]
    assert 0 <= mom["mean_errors"]["mean"] < 0.5
    assert "LeNet output moments" in (tmp_path / "demo.md").read_text()


def test_demo_without_verify_or_attacks_modules(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nmgen.verify", None)  # import fails: sympy missing
    monkeypatch.setitem(sys.modules, "torchbridge.experiments.attack_figures", None)
    report = _run(monkeypatch, tmp_path, ["--images", "1", "--samples", "500"])
    assert "skipped" in report["verify"]
    assert "skipped" in report["attacks"]
    assert (tmp_path / "demo.md").is_file()
