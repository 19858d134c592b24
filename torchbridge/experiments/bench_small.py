"""`nm bench small`: the exact ReLU covariance's fixed costs at small p, against DVI.

At p = 1024 the exact covariance's time is its pairs' (``nm bench floor``); below p ≈ 512
it is mostly fixed per-call costs: validation, the per-variable moments, and each route's or
compiled pass's calls, whatever the number of pairs. Layer-wise propagation calls
``relu_moments`` once per ReLU layer, often on a few dozen to a few hundred units, so these
costs are what a user of ``torchbridge.output_moments`` pays.

For each p of ``--sizes`` the ``nm bench kernels`` problem (μ ~ N(0, 1)^p,
Σ = W Wᵀ/r + 0.05 I, r = 4; ``random_problem``) is timed, all calls interleaved inside each
repeat (``bench_floor.repeat_order``), medians of ``--repeats`` after one warm-up:

* **exact, default call**: ``relu_moments(mean, cov)`` (the PSD check on, as users call it);
* **exact, check_psd=False**: the same without the Cholesky PSD check;
* with ``--compiled``: **exact, compiled bulk** (``compiled=True``, ``check_psd=False``;
  its first call per process and dtype compiles, untimed);
* **DVI**: ``torchbridge.propagate.approx.dvi_relu_moments`` (Wu et al. 2019's approximate
  closed form, eager).

Time: CPU time of the process at 1 thread (``--threads 1``, the default), wall time at more.
Each row also gives the ratio to DVI's time in the same repeats, and the largest absolute
difference of its covariance from the default call's (the exact variants agree to a few
eps; DVI's is its approximation error). A figure plots time against p for each row.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from torchbridge.experiments.bench_floor import repeat_order
from torchbridge.experiments.bench_kernels import random_problem
from torchbridge.experiments.common import (
    add_common_args,
    markdown_table,
    save_figure,
    write_json,
    write_markdown,
)
from torchbridge.moments import relu_moments
from torchbridge.propagate.approx import dvi_relu_moments

#: Row labels, in the order they are printed
DEFAULT_CALL = "exact, default call"
NO_PSD = "exact, check_psd=False"
COMPILED = "exact, compiled bulk"
DVI = "DVI (Wu et al. 2019)"


def _calls(mean: torch.Tensor, cov: torch.Tensor, compiled: bool) -> dict[str, Callable]:
    calls = {
        DEFAULT_CALL: lambda: relu_moments(mean, cov)[1],
        NO_PSD: lambda: relu_moments(mean, cov, check_psd=False)[1],
    }
    if compiled:
        calls[COMPILED] = lambda: relu_moments(mean, cov, check_psd=False, compiled=True)[1]
    calls[DVI] = lambda: dvi_relu_moments(mean, cov)[1]
    return calls


def measure(p: int, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    """Median seconds of each row at size p (see the module docstring), its ratio to DVI's,
    and its covariance's largest absolute difference from the default call's."""
    mean, cov = (v.to(dtype) for v in random_problem(p, args.seed))
    calls = _calls(mean, cov, args.compiled)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    with torch.no_grad():
        outs = {name: call() for name, call in calls.items()}  # warm-up (compiles)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for r in range(max(1, args.repeats)):
            for name in repeat_order(list(calls), r):
                t = clock()
                calls[name]()
                times[name].append(clock() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    ref = outs[DEFAULT_CALL]
    rows = [
        {
            "row": name,
            "seconds": sec,
            "ratio_to_dvi": sec / med[DVI],
            "max_abs_diff": float((outs[name] - ref).abs().max()),
            "times": times[name],
        }
        for name, sec in med.items()
    ]
    return {"p": p, "dtype": str(dtype).removeprefix("torch."), "rows": rows}


def _figure(results: list[dict], args: argparse.Namespace):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    dtypes = list(dict.fromkeys(res["dtype"] for res in results))  # in --dtypes' order
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4), squeeze=False)
    for ax, dname in zip(axes[0], dtypes, strict=True):
        mine = [res for res in results if res["dtype"] == dname]
        ps = [res["p"] for res in mine]
        for name in [row["row"] for row in mine[0]["rows"]]:
            ms = [next(x for x in res["rows"] if x["row"] == name)["seconds"] * 1e3 for res in mine]
            ax.loglog(ps, ms, "o-", label=name)
        ax.set_xticks(ps, [str(p) for p in ps])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("p (variables)")
        ax.set_ylabel("ms per call" + (" (CPU time)" if args.threads == 1 else " (wall)"))
        ax.set_title(f"{dname}, {args.threads} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def run_small(args: argparse.Namespace) -> dict:
    """Run the benchmark; write ``bench_small.{json,md,png}``; return the JSON object."""
    sizes = [s.strip() for s in str(args.sizes).split(",") if s.strip()]
    if not sizes or not all(s.isdigit() and int(s) >= 2 for s in sizes):
        raise ValueError(f"--sizes: comma-separated integers >= 2, got {args.sizes!r}")
    dtypes = [d.strip() for d in str(args.dtypes).split(",") if d.strip()]
    if not dtypes or any(d not in ("float64", "float32") for d in dtypes):
        raise ValueError(f"--dtypes: float64 and/or float32, got {args.dtypes!r}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    old = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    jobs = [(int(s), getattr(torch, d)) for d in dtypes for s in sizes]
    try:
        results = [
            measure(p, dt, args)
            for p, dt in tqdm(jobs, desc="bench small", disable=args.no_progress)
        ]
    finally:
        torch.set_num_threads(old)
    clock = "CPU time" if args.threads == 1 else "wall time"
    text = [
        f"The exact ReLU covariance at small p against DVI: {args.threads} thread(s), "
        f"medians of {args.repeats} interleaved repeats ({clock}), `nm bench kernels`' "
        f'problem (seed {args.seed}). "max |Δ|": largest absolute difference of the '
        "covariance from the default call's.",
    ]
    for dname in dtypes:
        body = [
            [
                res["p"],
                row["row"],
                row["seconds"] * 1e3,
                f"{row['ratio_to_dvi']:.2f}×",
                row["max_abs_diff"],
            ]
            for res in results
            if res["dtype"] == dname
            for row in res["rows"]
        ]
        head = ["p", "row", "ms per call", "/ DVI", "max |Δ|"]
        text += ["", f"**{dname}**", "", markdown_table(head, body)]
    kept = {k: (str(v) if k == "out" else v) for k, v in vars(args).items() if k != "func"}
    out = {"args": kept, "results": results}
    write_json(args.out, "bench_small", out)
    path = write_markdown(args.out, "bench_small", "\n".join(text))
    fig_path = save_figure(_figure(results, args), args.out, "bench_small")
    print("\n".join(text))
    print(f"\nWritten: {path}, {fig_path}")
    return out


def add_bench_parser(bench_subparsers) -> None:
    """Register `nm bench small`."""
    p = bench_subparsers.add_parser(
        "small",
        help="the exact ReLU covariance's fixed costs at small p, against DVI",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p, device=False)
    p.add_argument(
        "--sizes",
        default="16,64,128,256,512",
        help="comma-separated p (variables) to time (default 16,64,128,256,512)",
    )
    p.add_argument("--dtypes", default="float64", help="comma-separated dtypes (default float64)")
    p.add_argument("--threads", type=int, default=1, help="torch thread count (default 1)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats, median (default 15)")
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also time relu_moments(..., compiled=True) (its first call compiles: about "
        "40 s per dtype with an empty inductor cache; default off)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run_small)
