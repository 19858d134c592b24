"""`nm bench nodes` at a small size: the rows it prints, and that its J is the runtime's."""

from __future__ import annotations

import argparse
import json

import pytest

from torchbridge.experiments.bench_nodes import VARIANTS, node_loop, run_nodes


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(pairs=4096, nodes=6, dtypes="float64", threads=1, repeats=1, seed=0)
    base.update(out=tmp_path, no_progress=True, bench="nodes")
    base.update(kw)
    return argparse.Namespace(**base)


def test_bench_nodes_runs_small(tmp_path):
    out = run_nodes(_args(tmp_path))
    (res,) = out["results"]
    names = [row["row"] for row in res["rows"]]
    assert names == ["runtime rule", *(v[0] for v in VARIANTS), "torch.exp"]
    assert res["nodes"] == 6
    # the bench's node loop is the runtime's formula: the same J (base 0, so C = J)
    assert res["j_rel"] <= 4 * 2.0**-52
    assert all(row["ns_per_node"] > 0 for row in res["rows"])
    saved = json.loads((tmp_path / "bench_nodes.json").read_text())
    assert saved["results"][0]["rows"][0]["row"] == "runtime rule"
    assert "| J, exp only |" in (tmp_path / "bench_nodes.md").read_text()


def test_node_loop_matches_a_fine_rule():
    """J by 16 nodes against J by 80 nodes (an independent size) on a few (h, k, ρ):
    the ablation rows start from a correct J."""
    import torch

    h = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    k = torch.tensor([-0.5, -0.7, 1.1], dtype=torch.float64)
    r = torch.tensor([0.6, -0.4, 0.2], dtype=torch.float64)
    j16 = node_loop(16, True, True, True)(h, k, r)
    j80 = node_loop(80, True, True, True)(h, k, r)
    assert torch.allclose(j16, j80, rtol=1e-14, atol=0)
    # leaving the square root out changes J: the variants measure different work
    assert not torch.allclose(node_loop(16, False, True, True)(h, k, r), j16, rtol=1e-6)


@pytest.mark.parametrize(
    ("kw", "flag"),
    [({"pairs": 0}, "--pairs"), ({"nodes": 7}, "--nodes"), ({"dtypes": "float16"}, "--dtypes")],
)
def test_bench_nodes_names_the_bad_option(tmp_path, kw, flag):
    with pytest.raises(ValueError, match=flag):
        run_nodes(_args(tmp_path, **kw))
