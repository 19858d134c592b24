"""Smoke tests of `nm demo` with a tiny stand-in network."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

from standins import tiny_mnist, tiny_net
from torch import nn

from torchbridge.experiments import demo


def _net() -> nn.Sequential:
    return tiny_net(hidden=10, outputs=4)


def _mnist():
    return tiny_mnist(n=12, classes=4, seed=0)


def _failing_python(tmp_path) -> Path:
    script = tmp_path / "python"
    script.write_text(
        "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'sympy'\" >&2\nexit 1\n"
    )
    script.chmod(0o755)
    return script


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
    # `nmgen verify` cannot run (as when sympy/mpmath are not installed): the interpreter
    # given to the subprocess fails on import
    monkeypatch.setattr(demo.sys, "executable", str(_failing_python(tmp_path)))
    monkeypatch.setitem(sys.modules, "torchbridge.experiments.attack_figures", None)
    report = _run(monkeypatch, tmp_path, ["--images", "1", "--samples", "500"])
    assert "skipped" in report["verify"] and "No module named" in report["verify"]["skipped"]
    assert "skipped" in report["attacks"]
    assert (tmp_path / "demo.md").is_file()


def test_demo_verify_step_reads_the_subprocess_rows(monkeypatch, tmp_path):
    # a stand-in interpreter that plays `nmgen verify --quick --json F --markdown G`
    script = tmp_path / "python"
    script.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do case "$1" in\n'
        '  --json) echo \'[{"passed": true}, {"passed": false}]\' > "$2"; shift;;\n'
        "  --markdown) echo '| kernel | PASS |' > \"$2\"; shift;;\n"
        "esac; shift; done\nexit 1\n"
    )
    script.chmod(0o755)
    monkeypatch.setattr(demo.sys, "executable", str(script))
    monkeypatch.setitem(sys.modules, "torchbridge.experiments.attack_figures", None)
    report = _run(monkeypatch, tmp_path, ["--images", "1", "--samples", "500"])
    assert report["verify"]["rows"] == 2 and report["verify"]["passed"] == 1
    assert "1/2 rows pass" in (tmp_path / "demo.md").read_text()
