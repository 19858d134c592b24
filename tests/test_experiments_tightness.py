"""Smoke tests of the tightness experiments and `nm bench moments` on a tiny stand-in network."""

from __future__ import annotations

import argparse
import json
import shlex

import numpy as np
import pytest
import torch
from standins import tiny_mnist, tiny_net

from torchbridge.experiments import bench_moments, tightness
from torchbridge.experiments.common import relative_difference
from torchbridge.montecarlo import monte_carlo_moments
from torchbridge.network import AffineReLUAffine

HAVE_EXACT = "exact" in tightness.available_methods(["exact"])[0]


@pytest.fixture
def stand_ins(monkeypatch):
    net = tiny_net()
    for mod in (tightness, bench_moments):
        monkeypatch.setattr(mod, "trained_lenet", lambda *a, **k: net)
        monkeypatch.setattr(mod, "mnist", tiny_mnist)
    return net


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nm")
    sub = p.add_subparsers(dest="command", required=True)
    tightness.add_parser(sub)
    bench = sub.add_parser("bench")
    bench_moments.add_bench_parser(bench.add_subparsers(dest="bench", required=True))
    return p.parse_args(argv)


def run(argv: list[str]) -> dict:
    args = parse(argv)
    return args.func(args)


def test_random_spd_cov():
    c = tightness.random_spd_cov(50, 0.1, seed=3)
    assert torch.equal(c, tightness.random_spd_cov(50, 0.1, seed=3))
    assert torch.allclose(c, c.T)
    assert float(c.trace()) == pytest.approx(0.01 * 50, rel=1e-12)
    ev = torch.linalg.eigvalsh(c)
    assert float(ev.min()) > 0 and float(ev.max() / ev.min()) <= 10 + 1e-9


def _random_net(n=6, p=8, d=3, seed=0) -> AffineReLUAffine:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return AffineReLUAffine(r(p, n), r(p), r(d, p), r(d))


@pytest.mark.skipif(not HAVE_EXACT, reason="relu_cross_moment not generated yet")
def test_exact_variance_matches_monte_carlo():
    net = _random_net()
    mean = torch.randn(6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cov = tightness.random_spd_cov(6, 0.7, seed=2)
    mu, var = net.moments(mean, cov, method="exact")
    mc_mu, mc_var = monte_carlo_moments(net, mean, cov, samples=200_000, seed=1, batch_size=50_000)
    assert float(relative_difference(var, mc_var).max()) < 0.03
    assert float(relative_difference(mu, mc_mu).max()) < 0.03
    _, old = net.moments(mean, cov, method="zero_mean")
    # the paper's old variance ignores the mean: clearly worse here
    assert float(relative_difference(old, mc_var).mean()) > float(
        relative_difference(var, mc_var).mean()
    )


def test_zero_mean_equals_exact_when_assumptions_hold():
    net = _random_net(seed=1)
    net.c1.zero_()
    cov = tightness.random_spd_cov(6, 0.5, seed=4)
    zero = torch.zeros(6, dtype=torch.float64)
    _, old = net.moments(zero, cov, method="zero_mean")
    _, thm2 = net.theorem2_moments(cov)
    assert torch.allclose(old, thm2, rtol=1e-10, atol=1e-12)
    if HAVE_EXACT:
        _, exact = net.moments(zero, cov, method="exact")
        assert torch.allclose(old, exact, rtol=1e-10, atol=1e-12)


def test_table1_outputs(stand_ins, tmp_path):
    out = run(
        ["table1", "--images", "2", "--sigmas", "0.01,0.1", "--points", "4", "--out", str(tmp_path)]
    )
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"table1.{ext}").is_file()
    res = json.loads((tmp_path / "table1.json").read_text())["results"]
    assert set(res) == {"0", "1"} and res["0"]["q"] == 128 and res["1"]["q"] == 12
    for r in res.values():
        assert 0 <= r["0.01"]["l2"][0] < r["0.1"]["l2"][0] + 1e-6  # error grows with noise
    assert out["points"] == 4


def test_table2_and_table3(stand_ins, tmp_path):
    out = run(
        [
            "table2",
            "--images",
            "2",
            "--sigmas",
            "0.05,0.1",
            "--samples",
            "2000",
            "--out",
            str(tmp_path),
        ]
    )
    assert "command" in out and out["command"].startswith("nm table2")
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"table2.{ext}").is_file()
    s = out["summary"]["0.05"]
    for k, st in s.items():
        assert 0 <= st["mean"] <= 2 and st["se"] >= 0 and st["spread"] >= 0, k
        assert st["images"] == 2, k
    assert s["mc_mean"]["mean"] < 0.2  # two MC runs agree
    if HAVE_EXACT:
        assert s["exact"]["mean"] < 0.3
    md = (tmp_path / "table2.md").read_text()
    assert "Thm 2 with the mean ignored" in md and "standard error" in md and "≈0.19" in md
    # table3 from the stored records and from scratch
    out3 = run(["table3", "--reuse", str(tmp_path / "table2.json"), "--out", str(tmp_path)])
    assert set(out3["variances"]) == {"0.05", "0.1"}
    assert (tmp_path / "table3.png").is_file()
    run(
        [
            "table3",
            "--images",
            "1",
            "--sigmas",
            "0.1",
            "--samples",
            "500",
            "--methods",
            "zero_mean",
            "--out",
            str(tmp_path / "t3"),
        ]
    )
    assert (tmp_path / "t3" / "table3.md").is_file()


def test_command_line_round_trip(stand_ins, tmp_path):
    args = parse(["table2", "--images", "3", "--sigmas", "0.01,0.1", "--out", str(tmp_path)])
    again = parse(shlex.split(tightness.command_line(args))[1:])
    assert vars(again) == vars(args)


def test_table4_outputs(stand_ins, tmp_path):
    out = run(
        [
            "table4",
            "--images",
            "3",
            "--pool",
            "20",
            "--ks",
            "2,5,20",
            "--farthest",
            "2",
            "--sigmas",
            "0.1",
            "--samples",
            "500",
            "--methods",
            "zero_mean,exact",
            "--out",
            str(tmp_path),
        ]
    )
    assert out["ks"] == ["2", "2*", "5", "20"]
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"table4.{ext}").is_file()
    s = out["summary"]["0.1"]
    # k = pool: every image is its own centre, so the mean error is the MC noise only
    assert s["20"]["mean"]["mean"] <= s["2"]["mean"]["mean"] + 1e-12


def test_kmeans_points_farthest():
    data = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])
    _, labels, far = tightness.kmeans_points(data, 2, seed=0)
    assert labels[0] == labels[1] == labels[2] != labels[3]
    assert far[labels[0]] == 2 and far[labels[3]] in (3, 4)


def test_layers_and_bench(stand_ins, tmp_path):
    out = run(["layers", "--images", "1", "--samples", "500", "--out", str(tmp_path)])
    assert set(out["results"]) == {"0", "1"}
    assert all(v["cost"] for v in out["results"].values())
    assert (tmp_path / "layers.png").is_file()
    b = run(
        [
            "bench",
            "moments",
            "--images",
            "1",
            "--repeats",
            "1",
            "--samples",
            "500",
            "--out",
            str(tmp_path),
        ]
    )
    assert b["median"]["ratio_reused"] > 0 and (tmp_path / "bench_moments.json").is_file()
    assert b["median"]["max_rel_diff_vs_float64"] < 1e-3


def _rec(image: int, mean: list[float], mc_mean: list[float]) -> dict:
    return {
        "image": image,
        "sigma": 0.1,
        "mean": np.array(mean),
        "mc_mean": np.array(mc_mean),
        "var": {},
        "mc_var": np.ones(2),
    }


def test_summarize_mean_standard_error_and_spread_by_hand():
    """E_r per (image, output) = 0, 1 | 1, 1 | 0, 0 (E_r(3, 1) = 2·2/4 = 1, E_r(1, 1) = 0):
    image means 0.5, 1, 0 -> mean 0.5, SE = std([0.5, 1, 0], ddof=1)/√3 = 0.5/√3, spread =
    population std of the six values = 0.5."""
    recs = [
        _rec(0, [1.0, 3.0], [1.0, 1.0]),
        _rec(1, [3.0, 1.5], [1.0, 0.5]),
        _rec(2, [2.0, 5.0], [2.0, 5.0]),
    ]
    st = tightness.summarize(recs)["mean"]
    assert st.images == 3
    assert st.mean == pytest.approx(0.5, rel=1e-15)
    assert st.se == pytest.approx(0.5 / 3**0.5, rel=1e-15)
    assert st.spread == pytest.approx(0.5, rel=1e-15)
    one = tightness.summarize(recs[:1])["mean"]
    assert one.se == 0.0 and one.mean == 0.5


def test_table2_records_resume_without_recomputing(stand_ins, tmp_path, monkeypatch):
    argv = ["table2", "--images", "2", "--sigmas", "0.1", "--samples", "300"]
    argv += ["--records", str(tmp_path / "r.jsonl"), "--out", str(tmp_path)]
    first = run(argv)
    calls = []
    monkeypatch.setattr(tightness, "mc_moments", lambda *a, **k: calls.append(a))
    again = run(argv)
    assert calls == [] and again["summary"] == first["summary"]
    other = [a if a != "300" else "301" for a in argv]  # other settings, same file
    with pytest.raises(SystemExit, match="settings"):
        run(other)


def test_table4_reuses_table2_monte_carlo_identically(stand_ins, tmp_path):
    """mc_seed is keyed by (image, σ value): Table 4 computing its own Monte Carlo and Table 4
    reusing Table 2's records give the same numbers."""
    rec = tmp_path / "t2.jsonl"
    run(
        [
            "table2",
            "--images",
            "2",
            "--sigmas",
            "0.05,0.1",
            "--samples",
            "300",
            "--records",
            str(rec),
            "--mc-noise-images",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    common = [
        "table4",
        "--images",
        "2",
        "--pool",
        "10",
        "--ks",
        "2,10",
        "--farthest",
        "2",
        "--sigmas",
        "0.1",
        "--samples",
        "300",
    ]
    own = run([*common, "--out", str(tmp_path / "own")])
    reused = run([*common, "--mc-records", str(rec), "--out", str(tmp_path / "reused")])
    assert own["summary"] == reused["summary"]
    assert "reused from" in (tmp_path / "reused" / "table4.md").read_text()
    with pytest.raises(SystemExit, match="samples=300"):
        run([*common[:-1], "400", "--mc-records", str(rec), "--out", str(tmp_path)])
