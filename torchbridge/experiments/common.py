"""Shared helpers for experiments: output folder, JSON/markdown writers, figures, timing."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

DEFAULT_OUT = Path("results")


def add_common_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    """--out, --seed and (optionally) --device flags shared by every experiment."""
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: results/)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    if device:
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def out_dir(path: Path | str | None) -> Path:
    d = Path(path) if path is not None else DEFAULT_OUT
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_json(out: Path, name: str, obj) -> Path:
    p = out_dir(out) / f"{name}.json"
    p.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return p


def write_markdown(out: Path, name: str, text: str) -> Path:
    p = out_dir(out) / f"{name}.md"
    p.write_text(text.rstrip() + "\n")
    return p


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats printed with 3 significant digits (4 for < 1e-2)."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) >= 1e-2 or v == 0 else f"{v:.2e}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def save_figure(fig, out: Path, name: str) -> Path:
    p = out_dir(out) / f"{name}.png"
    fig.savefig(p, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return p


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def relative_difference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E_r(x, y) = 2|x − y|/(|x| + |y|) (paper, Section 4.2); 0 where both are 0."""
    den = x.abs() + y.abs()
    return torch.where(den > 0, 2 * (x - y).abs() / torch.where(den > 0, den, 1.0), 0.0)
