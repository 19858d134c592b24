"""`nm bench nodes` at a small size: the rows it prints, and that its J is the runtime's."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from torchbridge.experiments.bench_nodes import VARIANTS, node_loop, run_nodes


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(pairs=4096, nodes=6, dtypes="float64", threads=1, repeats=1, seed=0)
    base.update(out=tmp_path, no_progress=True, bench="nodes")
    base.update(kw)
    return argparse.Namespace(**base)


def _runs_small(tmp_path, variants) -> None:
    out = run_nodes(_args(tmp_path))
    (res,) = out["results"]
    names = [row["row"] for row in res["rows"]]
    assert names == ["runtime rule", *(v[0] for v in variants), "torch.exp"]
    assert res["nodes"] == 6
    # the bench's node loop is the runtime's formula: the same J (base 0, so C = J)
    assert res["j_rel"] <= 4 * 2.0**-52
    assert all(row["ns_per_node"] > 0 for row in res["rows"])
    saved = json.loads((tmp_path / "bench_nodes.json").read_text())
    assert saved["results"][0]["rows"][0]["row"] == "runtime rule"
    assert f"| {variants[-1][0]} |" in (tmp_path / "bench_nodes.md").read_text()


def test_bench_nodes_runs_small(tmp_path, monkeypatch):
    """Its rows, and the bench's J equal to the runtime rule's, with one of the variants
    (``VARIANTS``: each row a compile of its own, about 5 s here; all of them in the slow
    test below)."""
    from torchbridge.experiments import bench_nodes

    monkeypatch.setattr(bench_nodes, "VARIANTS", VARIANTS[:1])
    _runs_small(tmp_path, VARIANTS[:1])


@pytest.mark.slow
def test_bench_nodes_runs_small_every_variant(tmp_path):
    _runs_small(tmp_path, VARIANTS)


def test_node_loop_matches_the_definition():
    """J by the bench's 16-node loop against scipy's adaptive quadrature of the definition,
    J = ∫_0^ρ (ρ − t) φ2(h, k; t) dt with φ2 the bivariate normal density written out (an
    independent computation): the ablation rows start from a correct J."""
    import torch
    from scipy.integrate import quad

    def integrand(t, h, k, r):
        return (
            (r - t)
            * math.exp(-(h * h - 2 * t * h * k + k * k) / (2 * (1 - t * t)))
            / (2 * math.pi * math.sqrt(1 - t * t))
        )

    pts = [(0.3, -0.5, 0.6), (-1.2, -0.7, -0.4), (2.0, 1.1, 0.2), (-3.0, 2.5, 0.65)]
    h, k, r = (torch.tensor(v, dtype=torch.float64) for v in zip(*pts, strict=True))
    j16 = node_loop(16, True, True, True)(h, k, r)
    for (hi, ki, ri), got in zip(pts, j16.tolist(), strict=True):
        want, _ = quad(integrand, 0.0, ri, args=(hi, ki, ri), epsabs=0, epsrel=2e-14)
        assert got == pytest.approx(want, rel=1e-13, abs=0)
    # leaving the square root out changes J: the variants measure different work
    assert not torch.allclose(node_loop(16, False, True, True)(h, k, r), j16, rtol=1e-6)


@pytest.mark.parametrize(
    ("kw", "flag"),
    [({"pairs": 0}, "--pairs"), ({"nodes": 7}, "--nodes"), ({"dtypes": "float16"}, "--dtypes")],
)
def test_bench_nodes_names_the_bad_option(tmp_path, kw, flag):
    with pytest.raises(ValueError, match=flag):
        run_nodes(_args(tmp_path, **kw))
