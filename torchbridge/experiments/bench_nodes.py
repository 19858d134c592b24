"""`nm bench nodes`: what one Gauss–Legendre node of the compiled direct route costs, and of what.

The compiled bulk of ``relu_moments(..., compiled=True)`` evaluates most pairs by one fixed
rule (``nmruntime.pair_direct.DIRECT_ONE_PASS``: 14 nodes in float64, 15 in float32):

    J = ρ²/(4π) Σ_i w_i (1 − y_i) e^{G(t_i)} / √(1 − t_i²),  t_i = ρ y_i,
    G(t) = (A(1 + t) + B(1 − t))/(1 − t²),  A = −(h − k)²/4, B = −(h + k)²/4,

with one exp, one square root and one reciprocal (q = 1/(1 − t²)) per node. ``nm bench
floor`` costs each exp and each square root as one ``torch.exp`` element: 2 units per node.
This command measures, side by side in one run, on ``--pairs`` random pairs (h, k ~ N(0, 1),
|ρ| < 0.7) and ``--nodes`` nodes, each loop unrolled and compiled (``torch.compile``,
``fullgraph=True``):

* **runtime rule**: the runtime's own node loop and rounding test
  (``nmruntime.pair_direct.direct_group_values``), as the compiled one pass runs it, without
  the pass's gathers and writes;
* **J**: the node loop alone (the same formula);
* **J without √**, **J without 1/x** (q = 1 − t² instead), **J, exp only** (neither),
  **J, arithmetic only** (no exp, √ or 1/x): what each part of a node costs;
* **torch.exp**: per element, the unit of ``nm bench floor``'s floor, measured as it
  measures it (``exp_seconds_per_element``: 2²⁰ elements into a buffer, back to back, after
  the repeats above).

Each row: the median time per call over ``--repeats`` interleaved repeats (CPU time of the
process), per node (÷ pairs·nodes) and in units of ``torch.exp``'s time per element. The
rows share one run, so their ratios carry over; absolute times depend on the machine and
its load.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from nmgen.generated.gauss_legendre import RULES
from tqdm.auto import tqdm

from nmruntime.pair_direct import DIRECT_ONE_PASS, _direct_rule, direct_group_values
from nmruntime.pair_ops import renamed
from torchbridge.experiments.bench_floor import exp_seconds_per_element
from torchbridge.experiments.common import (
    add_common_args,
    markdown_table,
    write_json,
    write_markdown,
)

#: the node loop's variants: (row name, keep the square root, keep the reciprocal, keep exp)
VARIANTS = (
    ("J", True, True, True),
    ("J without √", False, True, True),
    ("J without 1/x", True, False, True),
    ("J, exp only", False, False, True),
    ("J, arithmetic only", False, False, False),
)


def node_loop(n: int, sqrt: bool, recip: bool, exp: bool) -> Callable:
    """fn(h, k, ρ) -> J by the n-point rule, unrolled, with the parts not kept left out
    (``VARIANTS``). All kept, it is the runtime's loop (``nmruntime.pair_direct.
    _direct_unrolled``) written out again so that its parts can be left out; ``measure``
    reports how far the two differ (tests/test_bench_nodes.py: not at all)."""
    # (y_i, w_i (1 − y_i)) as the runtime maps the rule to [0, 1] (one source of truth)
    y, wy = (tuple(float(v) for v in t) for t in _direct_rule(n, np.zeros(0)))

    def j_rule(h, k, r):
        a = -0.25 * (h - k) ** 2
        b = -0.25 * (h + k) ** 2
        acc = 0.0 * h
        for yi, wi in zip(y, wy, strict=True):
            t = r * yi
            u, v = 1.0 + t, 1.0 - t
            q = torch.reciprocal(u * v) if recip else u * v
            g = (u * a + v * b) * q
            f = torch.exp(g) if exp else g
            acc = acc + wi * (f * (torch.sqrt(q) if sqrt else q))
        return (r * r) * acc * (0.25 / math.pi)

    # a code object per variant and size: dynamo keys its cache (8 recompiles) on it
    return renamed(j_rule, f"j_{n}_{int(sqrt)}{int(recip)}{int(exp)}")


def _problem(pairs: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(pairs, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(pairs, generator=gen, dtype=torch.float64).to(dtype)
    r = (1.4 * torch.rand(pairs, generator=gen, dtype=torch.float64) - 0.7).to(dtype)
    return h, k, r


def measure(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """The rows of one dtype (see the module docstring) and J's largest relative difference
    from the runtime rule's (base 0: C = J)."""
    f64 = dtype == torch.float64
    n = args.nodes or DIRECT_ONE_PASS[f64][1]
    h, k, r = _problem(args.pairs, dtype, args.seed)
    zero = torch.zeros_like(h)
    rt = direct_group_values(n, 2.0**-52 if f64 else 2.0**-23)
    calls: dict[str, Callable[[], object]] = {}

    def rule(h, k, r, base):  # the flag as int32, as the one pass stores it
        c, ok = rt(h, k, r, base)
        return c, ok.to(torch.int32)

    rt_c = torch.compile(renamed(rule, f"rule_{n}"), fullgraph=True, dynamic=False)
    calls["runtime rule"] = lambda: rt_c(h, k, r, zero)
    for name, *keep in VARIANTS:
        fn = torch.compile(node_loop(n, *keep), fullgraph=True, dynamic=False)
        calls[name] = lambda fn=fn: fn(h, k, r)
    with torch.no_grad():
        j_rt, _ = calls["runtime rule"]()
        j = calls["J"]()
        diff = float(((j - j_rt).abs() / j_rt.abs().clamp_min(1e-300)).max())
        for call in tqdm(calls.values(), desc="compile", disable=args.no_progress):
            call()  # compiles
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in tqdm(range(max(1, args.repeats)), desc="repeats", disable=args.no_progress):
            for name, call in calls.items():
                t = time.process_time()
                call()
                times[name].append(time.process_time() - t)
    exp_ns = exp_seconds_per_element(dtype, args.repeats) * 1e9  # the floor's unit, as there
    med = {name: statistics.median(v) for name, v in times.items()}
    rows = []
    for name, sec in med.items():
        ns = sec / (args.pairs * n) * 1e9
        rows.append({"row": name, "ms": sec * 1e3, "ns_per_node": ns, "exp_units": ns / exp_ns})
    rows.append({"row": "torch.exp", "ms": None, "ns_per_node": exp_ns, "exp_units": 1.0})
    return {"dtype": str(dtype).removeprefix("torch."), "nodes": n, "rows": rows, "j_rel": diff}


def run_nodes(args: argparse.Namespace) -> dict:
    if args.pairs < 1:
        raise ValueError(f"--pairs must be >= 1, got {args.pairs}")
    if args.nodes and args.nodes not in RULES:
        raise ValueError(f"--nodes: no {args.nodes}-point rule (0 or one of {sorted(RULES)})")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in (torch.float32, torch.float64) for d in dtypes):
        raise ValueError(f"--dtypes: float32 and/or float64, got {args.dtypes!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = [measure(args, d) for d in dtypes]
    finally:
        torch.set_num_threads(old)
    text = [
        f"One Gauss–Legendre node of the compiled direct route: {args.pairs} pairs, "
        f"{args.threads} thread(s), medians of {args.repeats} interleaved repeats "
        "(CPU time). Unit: torch.exp's time per element (the floor costs a node 2 units: "
        "its exp and its square root)."
    ]
    for res in results:
        body = [
            [x["row"], "—" if x["ms"] is None else x["ms"], x["ns_per_node"], x["exp_units"]]
            for x in res["rows"]
        ]
        head = ["row", "ms per call", "ns per node (torch.exp: per element)", "torch.exp units"]
        text += [
            "",
            f"**{res['dtype']}, {res['nodes']} nodes** (J vs the runtime rule's J: "
            f"max relative difference {res['j_rel']:.2e})",
            "",
            markdown_table(head, body),
        ]
    kept = {k: (str(v) if k == "out" else v) for k, v in vars(args).items() if k != "func"}
    out = {"args": kept, "results": results}
    write_json(args.out, "bench_nodes", out)
    path = write_markdown(args.out, "bench_nodes", "\n".join(text))
    print("\n".join(text))
    print(f"\nWritten: {path}")
    return out


def add_bench_parser(bench_subparsers) -> None:
    """Register `nm bench nodes`."""
    p = bench_subparsers.add_parser(
        "nodes",
        help="the compiled direct route's cost per Gauss–Legendre node, and of its parts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p, device=False)
    p.add_argument(
        "--pairs", type=int, default=1 << 19, help="pairs per call (default 2^19 = 524288)"
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="rule size (default 0: the compiled one pass's, 16 in float64 and 15 in float32)",
    )
    p.add_argument(
        "--dtypes", default="float64,float32", help="comma-separated dtypes (default both)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch thread count (default 1)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats, median (default 15)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run_nodes)
