"""DVI's approximate ReLU covariance (Wu et al. 2019) and `nm bench floor` at a small size."""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import pytest
import torch

from nmgen.pointcheck import check_file
from torchbridge.experiments.bench_floor import run_floor
from torchbridge.moments import relu_moments
from torchbridge.propagate.approx import dvi_relu_moments


def test_dvi_is_exact_at_zero_mean():
    """At μ = 0 DVI's formula is Lemma 3's covariance, here in its hand-derived form
    σ1σ2[ρ/4 + (ρ asin ρ + √(1 − ρ²) − 1)/(2π)]."""
    cov = torch.tensor([[2.0, 0.9, -0.3], [0.9, 1.0, 0.2], [-0.3, 0.2, 0.5]], dtype=torch.float64)
    s = cov.diagonal().sqrt()
    rho = cov / (s[:, None] * s[None, :])
    want = (s[:, None] * s[None, :]) * (
        rho / 4 + (rho * torch.asin(rho) + torch.sqrt(1 - rho**2) - 1) / (2 * math.pi)
    )
    _, got = dvi_relu_moments(torch.zeros(3, dtype=torch.float64), cov)
    off = ~torch.eye(3, dtype=torch.bool)
    assert torch.allclose(got[off], want[off], rtol=1e-13, atol=0)


def test_dvi_is_an_approximation_of_the_exact_covariance():
    """Off zero mean DVI differs from the exact covariance (here by ≈ 4e-5 of σ1σ2; up to a
    few percent on `nm bench floor`'s problem), and its diagonal is the exact variance."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g, dtype=torch.float64)
    cov = w @ w.T / 4 + 0.05 * torch.eye(16, dtype=torch.float64)
    mean = torch.randn(16, generator=g, dtype=torch.float64)
    m_dvi, c_dvi = dvi_relu_moments(mean, cov)
    m_ex, c_ex = relu_moments(mean, cov)
    assert torch.allclose(m_dvi, m_ex, rtol=1e-14, atol=0)
    assert torch.allclose(c_dvi.diagonal(), c_ex.diagonal(), rtol=1e-14, atol=0)
    scale = cov.diagonal().sqrt()
    err = ((c_dvi - c_ex).abs() / (scale[:, None] * scale[None, :])).max()
    assert 1e-6 < float(err) < 0.1


def test_bench_floor_runs_small(tmp_path):
    args = argparse.Namespace(
        p=24,
        threads="1,2",
        dtypes="float64",
        repeats=1,
        mc_samples=200,
        check_entries=2,
        seed=0,
        out=str(tmp_path),
        no_progress=True,
        bench="floor",
        heap="keep",
    )
    res = run_floor(args)
    assert res["device"] == "cpu"  # the default where no --device is given
    assert res["heap"] == "keep" and res["kept"] is (sys.platform == "linux")
    faults = res["bar_check"]["float64"]["faults"]
    assert set(faults) == {"exact", "DVI"} and all(
        v is not None and v >= 0 for v in faults.values()
    )
    methods = res["runs"][0]["methods"]
    assert "DVI (Wu et al. 2019)" in methods
    assert methods["DVI (Wu et al. 2019)"]["max_rel_err_vs_exact"] > 0
    assert [r["threads"] for r in res["runs"]] == [1, 2]
    check = res["thread_check"]["float64"]  # every call timed at 1 and 2 threads
    assert set(check) == {"exact", "DVI", "torch.exp"}
    exp = check.pop("torch.exp")["seconds_per_element"]  # the floor's unit among the calls
    assert set(exp) == {1, 2} and all(0 < v < 1e-6 for v in exp.values())
    for c in check.values():
        assert set(c["seconds"]) == {1, 2} and all(v > 0 for v in c["seconds"].values())
        assert c["ratio"] == pytest.approx(c["seconds"][2] / c["seconds"][1])
    assert check["DVI"]["ratio_to_dvi"] == {1: 1.0, 2: 1.0}
    md = (tmp_path / "bench_floor.md").read_text()
    assert "float64, exact: 1 thread(s)" in md and "2 vs 1 thread(s)" in md
    # the bars, from the raw times: one row per thread count (no --compiled: eager)
    assert [(b["threads"], b["method"]) for b in res["bars"]] == [(1, "exact"), (2, "exact")]
    for b, run in zip(res["bars"], res["runs"], strict=True):
        ours = statistics.median(run["methods"]["exact"]["times"])
        dvi = statistics.median(run["methods"]["DVI (Wu et al. 2019)"]["times"])
        assert b["ratio_to_dvi"] == pytest.approx(ours / dvi)
        assert b["ratio_to_floor"] == pytest.approx(ours / run["floor_seconds"])
        inter = check["exact"]["seconds"][b["threads"]] / check["DVI"]["seconds"][b["threads"]]
        assert b["ratio_to_dvi_interleaved"] == pytest.approx(inter)
        assert b["dvi_bar_met"] == (ours <= dvi and inter <= 1.0)
        # the floor bar again on the interleaved times: the call over its count of
        # transcendental evaluations times the torch.exp time taken among the calls
        evaluations = run["transcendental_per_pair"] * res["pairs"]
        floor_inter = check["exact"]["seconds"][b["threads"]] / (evaluations * exp[b["threads"]])
        assert b["ratio_to_floor_interleaved"] == pytest.approx(floor_inter)
        assert b["floor_bar_met"] == (ours <= 2.0 * run["floor_seconds"] and floor_inter <= 2.0)
        assert f"{floor_inter:.2f}×" in md
    assert "| time / floor | interleaved | ≤ 1× DVI | ≤ 2× floor |" in md
    assert "float64, torch.exp (the floor's unit): 1 thread(s)" in md
    # each closed form against its own floor: DVI's formula evaluates sqrt, asin and exp on
    # every one of the p² entries, and Φ (erf or erfc) once per variable
    for run in res["runs"]:
        dvi_ops = run["dvi_transcendental_ops"]
        assert dvi_ops["asin"] == 24 * 24 and dvi_ops["exp"] >= 24 * 24
        per_elem = run["exp_ns_per_element"] * 1e-9
        assert run["dvi_floor_seconds"] == pytest.approx(sum(dvi_ops.values()) * per_elem)
    own = {(r["threads"], r["method"]): r for r in res["own_floors"]}
    assert set(own) == {(t, m) for t in (1, 2) for m in ("exact", "DVI (Wu et al. 2019)")}
    for (t, label), r in own.items():
        run = res["runs"][t - 1]
        floor = run["floor_seconds"] if label == "exact" else run["dvi_floor_seconds"]
        want = statistics.median(run["methods"][label]["times"]) / floor
        assert r["ratio_to_own_floor"] == pytest.approx(want)
        assert f"{want:.2f}×" in md
    assert f"{res['bars'][0]['ratio_to_floor']:.2f}×" in md
    groups = check_file(res["oracle_points"]["file"], progress=False)["groups"]
    assert [g["points"] for g in groups] == [2, 2]
    assert max(g["max_abs_diff"] for g in groups) <= 1e-15


@pytest.mark.slow
def test_bench_floor_compiled_rows(tmp_path):
    """`--compiled` adds the compiled exact and DVI rows, with their compile time apart, and
    the compiled exact covariance equals the eager one within the routes' 256-eps bar."""
    args = argparse.Namespace(
        p=40,
        threads="1",
        dtypes="float64",
        repeats=1,
        mc_samples=200,
        check_entries=2,
        seed=3,
        out=str(tmp_path),
        no_progress=True,
        bench="floor",
        compiled=True,
        heap="keep",
    )
    res = run_floor(args)
    methods = res["runs"][0]["methods"]
    for label in ("exact, compiled bulk", "DVI, torch.compile"):
        assert methods[label]["first_call_seconds"] > 0
    # the compiled rows against their own floors: ours against the exact call's count
    own = {r["method"]: r for r in res["own_floors"]}
    run = res["runs"][0]
    assert own["exact, compiled bulk"]["floor_seconds"] == run["floor_seconds"]
    assert own["DVI, torch.compile"]["floor_seconds"] == run["dvi_floor_seconds"]
    assert methods["exact, compiled bulk"]["max_rel_err_vs_exact"] <= 2 * 256 * 2.0**-52
    assert methods["DVI, torch.compile"]["max_rel_err_vs_exact"] == pytest.approx(
        methods["DVI (Wu et al. 2019)"]["max_rel_err_vs_exact"], rel=1e-6
    )
    # the compiled call's own entries against mpmath (the 1e-15 absolute bar)
    groups = check_file(res["compiled_oracle_points"]["file"], progress=False)["groups"]
    assert [g["points"] for g in groups] == [2, 2]
    assert max(g["max_abs_diff"] for g in groups) <= 1e-15


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu0", "not a torch device"),
        ("meta", "must be cpu or cuda"),
        ("cuda:7", "CUDA device"),
    ],
)
def test_bench_floor_rejects_a_device_it_cannot_time(tmp_path, device, message):
    """`--device` must name the CPU or a CUDA device torch sees; the error names the flag
    (checked before anything is timed)."""
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    args = argparse.Namespace(
        p=8, threads="1", dtypes="float64", repeats=1, mc_samples=10, check_entries=0, seed=0,
        out=str(tmp_path), no_progress=True, heap="keep", device=device,
    )  # fmt: skip
    with pytest.raises(ValueError, match="--device") as err:
        run_floor(args)
    assert message in str(err.value)
    assert not (tmp_path / "bench_floor.json").exists()


def test_synced_is_the_call_itself_on_the_cpu():
    from torchbridge.experiments.bench_floor import synced

    def fn(x):
        return x + 1

    assert synced(fn, torch.device("cpu")) is fn


def test_repeat_order_balances_positions_and_predecessors():
    """Over 2n repeats each of n calls takes each position twice, and each call is preceded
    (inside a repeat) by each of the others."""
    from torchbridge.experiments.bench_floor import repeat_order

    items = ["exact", "compiled", "DVI"]
    orders = [repeat_order(items, r) for r in range(6)]
    assert orders[0] == items and orders[1] == items[::-1]
    assert repeat_order(items, 6) == items and repeat_order([], 3) == []
    for pos in range(3):
        assert sorted(o[pos] for o in orders) == sorted(items * 2)
    for x in items:
        before = {o[o.index(x) - 1] for o in orders if o.index(x) > 0}
        assert before == set(items) - {x}


_STAND_IN = """
from erf_exp_integral import erf_exp_integral


def relu_cov_mean(covariance, mean=None, num_terms=0):
    with open(LOG, "a") as f:
        f.write(f"{num_terms} {erf_exp_integral()}\\n")
    return covariance * 0 + num_terms, mean * 2
"""


def test_bench_floor_times_the_authors_series_from_a_checkout(tmp_path):
    """``--authors-series DIR``: the authors' ``relu_cov_mean`` is imported from DIR (with
    its sibling module ``erf_exp_integral``) and timed at 5 and 20 terms beside ours; here
    stand-ins in DIR record each call (the real files are not in this repository). A DIR
    without the files is refused, naming the flag, before anything is timed."""
    code = tmp_path / "authors"
    code.mkdir()
    log = tmp_path / "calls.txt"
    (code / "erf_exp_integral.py").write_text("def erf_exp_integral():\n    return 'sibling'\n")
    (code / "gaussian_relu_moments.py").write_text(f"LOG = {str(log)!r}\n" + _STAND_IN)
    args = argparse.Namespace(
        p=8, threads="1", dtypes="float64", repeats=1, mc_samples=10, check_entries=0, seed=0,
        out=str(tmp_path), no_progress=True, heap="keep", authors_series=str(code),
    )  # fmt: skip
    res = run_floor(args)
    methods = res["runs"][0]["methods"]
    for n in (5, 20):
        # the stand-in's covariance is n everywhere: its error is n minus the exact entries
        assert methods[f"authors' series({n})"]["max_abs_err_vs_exact"] > n - 2
    calls = set(log.read_text().split("\n")) - {""}
    assert calls == {"5 sibling", "20 sibling"}
    assert "authors' series(20)" in (tmp_path / "bench_floor.md").read_text()
    args.authors_series, args.out = str(tmp_path / "none"), str(tmp_path / "out")
    with pytest.raises(ValueError, match="--authors-series"):
        run_floor(args)
    assert not (tmp_path / "out" / "bench_floor.json").exists()
