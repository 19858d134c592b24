"""`nmgen check-points`: the oracle column of torchbridge's experiments, out of process."""

from __future__ import annotations

import json
import math

import mpmath as mp
import pytest
import torch

from nmgen import cli, pointcheck
from torchbridge.experiments.oracle_points import write_points


def _closed_variance(mu: float, s: float) -> float:
    """Var relu(x), x ~ N(mu, s²), from the textbook closed form at 50 digits (independent of
    the quadrature oracle and of the kernels)."""
    with mp.workdps(50):
        h = mp.mpf(mu) / s
        m = s * (h * mp.ncdf(h) + mp.npdf(h))
        m2 = s**2 * ((h * h + 1) * mp.ncdf(h) + h * mp.npdf(h))
        return float(m2 - m * m)


def test_exact_values_pass_and_a_perturbed_one_is_caught(tmp_path):
    rows = [(0.3, 1.2), (-1.0, 0.5), (2.0, 3.0)]
    good = torch.tensor([[m, s, _closed_variance(m, s)] for m, s in rows], dtype=torch.float64)
    path = write_points(tmp_path / "p.json", {"relu_variance": good}, "test")
    g = pointcheck.check_file(path, progress=False)["groups"][0]
    assert g["points"] == 3 and g["max_rel_diff"] < 1e-14
    bad = good.clone()
    bad[1, 2] *= 1 + 1e-9
    path = write_points(tmp_path / "q.json", {"relu_variance": bad}, "test")
    g = pointcheck.check_file(path, progress=False)["groups"][0]
    assert 0.9e-9 < g["max_rel_diff"] < 1.1e-9
    assert g["worst"]["args"] == [-1.0, 0.5]


def test_pair_kinds_against_independent_values(tmp_path):
    # ρ = 0: the cross moment factorises and the covariance is 0 (definitions, no kernel)
    m = [float(mp.mpf(0.4) * mp.ncdf(0.4) + mp.npdf(0.4)), float(mp.ncdf(-1) * -1 + mp.npdf(-1))]
    rows = torch.tensor([[0.4, -1.0, 1.0, 1.0, 0.0, m[0] * m[1]]], dtype=torch.float64)
    cov = torch.tensor([[0.4, -1.0, 1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    path = write_points(
        tmp_path / "p.json", {"relu_cross_moment": rows, "relu_covariance": cov}, "test"
    )
    rep = pointcheck.check_file(path, progress=False)
    cross, covg = rep["groups"]
    assert cross["max_rel_diff"] < 1e-14 and covg["max_abs_diff"] == 0
    assert "relu_cross_moment: 1 points" in pointcheck.format_report(rep)


def test_cli_bars_and_json(tmp_path, capsys):
    good = torch.tensor([[0.3, 1.2, _closed_variance(0.3, 1.2)]], dtype=torch.float64)
    path = write_points(tmp_path / "p.json", {"relu_variance": good}, "nm test")
    out = tmp_path / "r.json"
    assert cli.main(["check-points", str(path), "--max-rel", "1e-13", "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["groups"][0]["points"] == 1
    bad = good.clone()
    bad[0, 2] += 1e-6
    path = write_points(tmp_path / "q.json", {"relu_variance": bad}, "nm test")
    assert cli.main(["check-points", str(path), "--max-abs", "1e-9"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        write_points(tmp_path / "p.json", {"relu_mean": torch.zeros(1, 3)}, "x")
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        write_points(tmp_path / "p.json", {"relu_variance": torch.zeros(2, 4)}, "x")
    (tmp_path / "bad.json").write_text(
        json.dumps({"groups": [{"kind": "relu_variance", "points": [[1.0, 2.0]]}]})
    )
    with pytest.raises(ValueError, match="need 2 arguments and a value"):
        pointcheck.check_file(tmp_path / "bad.json", progress=False)
    (tmp_path / "worse.json").write_text("[]")
    with pytest.raises(ValueError, match="'groups' list"):
        pointcheck.check_file(tmp_path / "worse.json", progress=False)
    assert math.isnan(pointcheck.check_group("relu_variance", [], progress=False)["max_abs_diff"])
