"""Smoke tests of `nm demo` with a tiny stand-in network."""

from __future__ import annotations

import argparse
import json
import sys
import types

from standins import tiny_mnist, tiny_net
from torch import nn

from torchbridge.experiments import demo


def _net() -> nn.Sequential:
    return tiny_net(hidden=10, outputs=4)


def _mnist():
    return tiny_mnist(n=12, classes=4, seed=0)


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
