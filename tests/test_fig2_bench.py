"""Smoke tests of `nm fig2` and `nm bench kernels` on tiny settings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from nmgen.pointcheck import check_file
from torchbridge.experiments import bench_kernels, fig2


def _parse(module, register: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="bench" if register == "add_bench_parser" else "command")
    getattr(module, register)(sub)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def fig2_result(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("fig2")
    args = _parse(
        fig2,
        "add_parser",
        [
            "fig2",
            "--stride",
            "5",
            "--mc-points",
            "10",
            "--mc-samples",
            "20000",
            "--check-points",
            "3",
            "--out",
            str(out),
            "--no-progress",
            "--threads",
            "1",
        ],
    )
    return args.func(args), out


def test_fig2_files(fig2_result) -> None:
    _res, out = fig2_result
    for ext in ("json", "md", "png"):
        assert (out / f"fig2.{ext}").stat().st_size > 0
    assert json.loads((out / "fig2.json").read_text())["terms"] == [1, 5, 10, 20, 50]
    assert "| ρ |" in (out / "fig2.md").read_text()


def test_fig2_numbers(fig2_result) -> None:
    res, _ = fig2_result
    per_rho = res["vs_exact"]["per_rho"]
    assert len(per_rho) == len(fig2.PAPER_RHOS) + len(fig2.SINGULAR_RHOS)
    for e in per_rho.values():
        err = e["max_abs_error"]
        if abs(e["rho"]) <= 0.5:
            assert err["50"] <= 1e-12, e
        if abs(abs(e["rho"]) - fig2.INV_SQRT2) > 0.1 and e["rho"] != 0:
            assert err["20"] < err["5"] or err["5"] < 1e-13, e
        assert all(0 <= v < 1 for v in err.values()), e
    overall = res["vs_exact"]["overall_paper_grid"]
    assert overall["1"] > overall["50"]
    assert 0 < res["vs_exact"]["worst_paper_grid"]["5"]["abs_error"] == overall["5"]
    rep = check_file(res["oracle_points"]["file"], progress=False)["groups"][0]
    assert rep["kind"] == "relu_cross_moment" and rep["points"] == 3
    assert rep["max_abs_diff"] <= 1e-13
    mc = res["monte_carlo"]["groups"]["paper grid, all ρ"]
    assert mc["points"] == 10
    assert 0 < mc["max_standard_error"] < 0.1
    assert mc["exact_max_abs_error"] < 10 * mc["max_standard_error"]


def test_grid_shape() -> None:
    assert fig2.grid_points(1).shape == (21 * 21 * 10 * 10, 4)
    mu, sigma = fig2.grid_axes()
    assert mu[0] == -2 and mu[-1] == 2 and sigma[0] == 0.2 and sigma[-1] == 2


def test_mc_cross_moments_unbiased() -> None:
    from nmgen.generated import torch_kernels as tk

    params = torch.tensor(
        [[0.5, -0.3, 1.0, 0.7, 0.4], [1.0, 1.0, 0.5, 0.5, -0.6]], dtype=torch.float64
    )
    est, se, _ = fig2.mc_cross_moments(params, 200_000, seed=3, progress=False)
    exact = tk.relu_cross_moment(*params.unbind(1))
    assert bool(((est - exact).abs() < 5 * se).all())


def test_bench_kernels(tmp_path: Path) -> None:
    args = _parse(
        bench_kernels,
        "add_bench_parser",
        [
            "kernels",
            "--sizes",
            "16,32",
            "--repeats",
            "1",
            "--mc-samples",
            "500",
            "--check-entries",
            "3",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--threads",
            "1",
        ],
    )
    res = args.func(args)
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"bench_kernels.{ext}").stat().st_size > 0
    assert [e["p"] for e in res["results"]] == [16, 32]
    groups = {
        g["kind"]: g for g in check_file(res["oracle_points"]["file"], progress=False)["groups"]
    }
    assert groups["relu_covariance"]["points"] == 6 and groups["relu_variance"]["points"] == 6
    assert max(g["max_abs_diff"] for g in groups.values()) <= 1e-13
    for e in res["results"]:
        m = e["methods"]
        assert set(m) == {"exact", "series(5)", "series(20)", "zero_mean", "MC"}
        assert m["exact"]["symmetric"] and m["series(5)"]["symmetric"]
        assert m["exact"]["ratio_to_exact"] == 1.0
        assert m["series(20)"]["max_abs_err_vs_exact"] < 0.05
        assert e["exact_min_eigenvalue"] > -1e-12 * e["exact_trace"]
        assert all(v["seconds"] > 0 for v in m.values())
