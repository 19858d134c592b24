"""`nm bench small` at tiny sizes: its rows, ratios from its own times, and bad options."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

from torchbridge.experiments.bench_small import (
    DEFAULT_CALL,
    DVI,
    NO_PSD,
    run_small,
)


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(sizes="8,24", dtypes="float64", threads=1, repeats=2, seed=0, compiled=False)
    base.update(out=tmp_path, no_progress=True, bench="small")
    base.update(kw)
    return argparse.Namespace(**base)


def test_bench_small_runs_small(tmp_path):
    out = run_small(_args(tmp_path))
    assert [res["p"] for res in out["results"]] == [8, 24]
    for res in out["results"]:
        rows = {row["row"]: row for row in res["rows"]}
        assert list(rows) == [DEFAULT_CALL, NO_PSD, DVI]
        for row in rows.values():  # each ratio is its median over DVI's, from the raw times
            assert len(row["times"]) == 2
            want = statistics.median(row["times"]) / statistics.median(rows[DVI]["times"])
            assert row["ratio_to_dvi"] == pytest.approx(want, rel=1e-12)
        # the PSD check changes nothing in the values; DVI is an approximation (its error shows)
        assert rows[DEFAULT_CALL]["max_abs_diff"] == 0 == rows[NO_PSD]["max_abs_diff"]
        assert rows[DVI]["max_abs_diff"] > 1e-6
    saved = json.loads((tmp_path / "bench_small.json").read_text())
    assert saved["results"][1]["p"] == 24
    assert f"| 24 | {DVI} |" in (tmp_path / "bench_small.md").read_text()
    assert (tmp_path / "bench_small.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"sizes": "8,x"}, "--sizes"),
        ({"sizes": "1"}, "--sizes"),
        ({"dtypes": "float16"}, "--dtypes"),
        ({"threads": 0}, "--threads"),
        ({"repeats": 0}, "--repeats"),
    ],
)
def test_bench_small_names_the_bad_option(tmp_path, kw, flag):
    with pytest.raises(ValueError, match=flag):
        run_small(_args(tmp_path, **kw))
