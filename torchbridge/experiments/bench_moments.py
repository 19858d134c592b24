"""`nm bench moments`: analytic LeNet output moments vs Monte Carlo, timed side by side.

Per test image M, at the last ReLU of LeNet (l = 3 of the paper), input N(M, Σ) with Σ a random
SPD 784×784 matrix of trace σ²·784 (:func:`torchbridge.experiments.tightness.random_spd_cov`):

* analytic, linearization included: ``two_stage_linearize`` + cast to ``--dtype`` + ``.moments``;
* analytic, linearization reused (the Table 4 regime): ``.moments`` only;
* Monte Carlo: ``--samples`` float32 forward passes of LeNet in batches of ``--batch-size``.

Each timing is the median of ``--repeats`` runs after one untimed warm-up. The ratios
MC / analytic are reported per image and as the median over images, with the largest relative
difference of the timed variances from a float64 computation (untimed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from torchbridge.data import mnist
from torchbridge.experiments.common import (
    add_common_args,
    markdown_table,
    median_time,
    save_figure,
    write_json,
    write_markdown,
)
from torchbridge.experiments.tightness import (
    as_dtype,
    available_methods,
    command_line,
    random_spd_cov,
    seed_for,
)
from torchbridge.linearize import two_stage_linearize
from torchbridge.models import trained_lenet
from torchbridge.montecarlo import monte_carlo_moments


def run_bench(args: argparse.Namespace) -> dict:
    """Time analytic moments (with / without linearization) against Monte Carlo."""
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    methods, _ = available_methods([args.method])
    method = args.method
    note = ""
    if not methods:
        method = "zero_mean"
        note = f"method {args.method!r} unavailable (kernel not generated): fell back to zero_mean"
        print("note:", note)
    model = trained_lenet().to(args.device).eval()
    _, _, test_x, _ = mnist()
    images = test_x[: args.images].to(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    check_psd = dtype == torch.float64
    rows, per_image = [], []
    for i in tqdm(range(len(images)), desc="bench moments"):
        x = images[i]
        cov = random_spd_cov(x.numel(), args.sigma, seed_for(args.seed, i)).to(x.device)
        cov_a = cov.to(dtype)
        mean_a = x.reshape(-1).to(dtype)

        def analytic_full(x=x, cov_a=cov_a, mean_a=mean_a) -> None:
            g = as_dtype(two_stage_linearize(model, x, -1), dtype)
            g.moments(mean_a, cov_a, method=method, check_psd=check_psd)

        g = as_dtype(two_stage_linearize(model, x, -1), dtype)

        def analytic_reuse(g=g, cov_a=cov_a, mean_a=mean_a) -> None:
            g.moments(mean_a, cov_a, method=method, check_psd=check_psd)

        def mc(x=x, cov=cov) -> None:
            monte_carlo_moments(
                model, x, cov, samples=args.samples, seed=args.seed, batch_size=args.batch_size
            )

        # accuracy of the timed dtype against float64 (untimed)
        _, v = g.moments(mean_a, cov_a, method=method, check_psd=check_psd)
        g64 = as_dtype(g, torch.float64)
        _, v64 = g64.moments(x.reshape(-1).double(), cov.double(), method=method)
        dev = float(((v.double() - v64).abs() / v64.abs()).max())
        t_full = median_time(analytic_full, repeats=args.repeats, warmup=1)
        t_reuse = median_time(analytic_reuse, repeats=args.repeats, warmup=1)
        t_mc = median_time(mc, repeats=args.repeats, warmup=1 if i == 0 else 0)
        per_image.append(
            {
                "image": i,
                "t_analytic_with_linearization": t_full,
                "t_analytic_reused": t_reuse,
                "t_mc": t_mc,
                "ratio_with_linearization": t_mc / t_full,
                "ratio_reused": t_mc / t_reuse,
                "max_rel_diff_vs_float64": dev,
            }
        )
        rows.append([i, t_full, t_reuse, t_mc, t_mc / t_full, t_mc / t_reuse, dev])
    med = {k: float(np.median([r[k] for r in per_image])) for k in per_image[0] if k != "image"}
    rows.append(
        [
            "median",
            med["t_analytic_with_linearization"],
            med["t_analytic_reused"],
            med["t_mc"],
            med["ratio_with_linearization"],
            med["ratio_reused"],
            med["max_rel_diff_vs_float64"],
        ]
    )
    headers = [
        "image",
        "analytic + linearize (s)",
        "analytic reused (s)",
        f"MC {args.samples} (s)",
        "ratio (target ≥ 3)",
        "ratio reused (target ≥ 20)",
        "max rel. var diff vs float64",
    ]
    cmd = command_line(args)
    md = (
        f"# Benchmark: analytic LeNet moments vs Monte Carlo\n\nCommand: `{cmd}`\n\n"
        f"l = last ReLU (q = 1024), σ = {args.sigma:g}, random SPD Σ, method {method} "
        f"({args.dtype}), MC float32 batch {args.batch_size}, torch threads "
        f"{torch.get_num_threads()}, device {args.device}; median of {args.repeats} repeats."
        + (f"\n\n**Note:** {note}" if note else "")
        + "\n\n"
        + markdown_table(headers, rows)
        + f"\n\nMedian ratio with linearization: {med['ratio_with_linearization']:.1f}x; "
        f"with the linearization reused: {med['ratio_reused']:.1f}x."
    )
    out = {
        "command": cmd,
        "method": method,
        "note": note,
        "dtype": args.dtype,
        "sigma": args.sigma,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "device": str(args.device),
        "repeats": args.repeats,
        "per_image": per_image,
        "median": med,
        "torch": torch.__version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    p = write_json(args.out, "bench_moments", out)
    write_markdown(args.out, "bench_moments", md)
    print(md)
    print(f"\nwrote {p}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = ["analytic reused", "analytic + linearize", f"MC {args.samples}"]
    vals = [med["t_analytic_reused"], med["t_analytic_with_linearization"], med["t_mc"]]
    ax.barh(labels, vals, color=["tab:green", "tab:blue", "tab:red"])
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image (median)")
    ax.set_title(f"LeNet moments, method {method}")
    save_figure(fig, args.out, "bench_moments")
    return out


def add_bench_parser(bench_subparsers) -> None:
    """Register `nm bench moments`."""
    p = bench_subparsers.add_parser(
        "moments", help="analytic LeNet moments (with / without linearization) vs Monte Carlo"
    )
    add_common_args(p)
    p.add_argument("--images", type=int, default=3, help="test images (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median; default 3)")
    p.add_argument("--samples", type=int, default=10_000, help="Monte Carlo samples")
    p.add_argument("--batch-size", type=int, default=1000, help="Monte Carlo batch size")
    p.add_argument("--sigma", type=float, default=0.05, help="input noise level σ")
    p.add_argument(
        "--method",
        choices=["exact", "series", "zero_mean"],
        default="exact",
        help="variance method (default exact; zero_mean if exact is unavailable)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default="float32",
        help="analytic dtype (default float32, like LeNet and the MC passes; "
        "float32 skips the Cholesky PSD check of Σ̄)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads (default 0: leave torch's default)",
    )
    p.set_defaults(func=run_bench)
