"""`nm bench attacks`: attack solve times on LeNet/MNIST and exact-gradient vs FD SLSQP (Eq. 7)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from torchbridge.experiments.common import add_common_args, markdown_table, write_json


def bench_attacks(args: argparse.Namespace) -> dict:
    """Median solve times per attack type, and the exact-vs-FD SLSQP comparison on Eq. 7."""
    from torchbridge.attacks import pixel_support, sparse_smooth, targeted
    from torchbridge.data import mnist
    from torchbridge.linearize import two_stage_linearize
    from torchbridge.models import trained_lenet

    model = trained_lenet(progress=False)
    _, _, tx, ty = mnist()
    with torch.no_grad():
        pred = model(tx).argmax(1)
    idxs = ((ty == 9) & (pred == 9)).nonzero().flatten().tolist()[: args.images]
    runs = {
        "targeted (Eq. 7)": lambda lin, x: targeted(lin, x, 7, maxiter=args.maxiter),
        "pixel_support (Eq. 8)": lambda lin, x: pixel_support(lin, x, competitor="lse"),
        "sparse_smooth (Eq. 9)": lambda lin, x: sparse_smooth(lin, x, maxiter=args.maxiter),
        "sparse_smooth targeted (Eq. 10)": lambda lin, x: sparse_smooth(
            lin, x, target=4, maxiter=args.maxiter
        ),
    }
    lins = [two_stage_linearize(model, tx[i]) for i in idxs]
    rows, out = [], {"attacks": {}, "images": idxs}
    for name, fn in tqdm(runs.items(), desc="bench attacks"):
        times, iters = [], []
        for lin, i in zip(lins, idxs, strict=True):
            res = fn(lin, tx[i])
            times.append(res.wall_time)
            iters.append(res.iterations)
        med = statistics.median(times)
        out["attacks"][name] = {"median_s": med, "iterations": iters, "times": times}
        rows.append([name, med, statistics.median(iters)])
    print(markdown_table(["attack (linearization given)", "median solve s", "median iters"], rows))

    lin, x = lins[0], tx[idxs[0]]
    start = time.perf_counter()
    ex = targeted(lin, x, 7, maxiter=args.fd_maxiter)
    t_ex = time.perf_counter() - start
    start = time.perf_counter()
    fd = targeted(lin, x, 7, maxiter=args.fd_maxiter, exact=False, time_limit=args.fd_time_limit)
    t_fd = time.perf_counter() - start
    cmp_rows = [
        ["exact (autograd)", t_ex, ex.iterations, ex.nfev, ex.margin, ex.message],
        ["2-point FD (jac=None)", t_fd, fd.iterations, fd.nfev, fd.margin, fd.message],
    ]
    ratio_t = t_fd / t_ex
    ratio_f = fd.nfev / max(1, ex.nfev)
    per_it_ex = t_ex / max(1, ex.iterations)
    per_it_fd = t_fd / max(1, fd.iterations) if fd.iterations > 0 else float("nan")
    note = (
        f"Both runs capped at maxiter={args.fd_maxiter}; FD also capped at "
        f"{args.fd_time_limit} s wall (iterations = -1 when the time limit stopped it). "
        f"nfev counts point evaluations (FD: every difference quotient)."
    )
    print(
        markdown_table(
            ["SLSQP on Eq. 7", "wall s", "iterations", "evaluations", "margin", "message"], cmp_rows
        )
    )
    print(
        f"wall-time ratio FD/exact = {ratio_t:.1f}x, evaluation ratio = {ratio_f:.1f}x, "
        f"per-iteration ratio = {per_it_fd / per_it_ex:.1f}x\n{note}"
    )
    out["exact_vs_fd"] = {
        "exact": {
            "wall_s": t_ex,
            "iterations": ex.iterations,
            "nfev": ex.nfev,
            "margin": ex.margin,
        },
        "fd": {
            "wall_s": t_fd,
            "iterations": fd.iterations,
            "nfev": fd.nfev,
            "margin": fd.margin,
            "message": fd.message,
        },
        "wall_ratio": ratio_t,
        "nfev_ratio": ratio_f,
        "per_iteration_ratio": per_it_fd / per_it_ex,
        "note": note,
    }
    write_json(args.out, "bench_attacks", out)
    return out


def add_bench_parser(bench_sub) -> None:
    """Register `nm bench attacks`."""
    p = bench_sub.add_parser("attacks", help="attack solve times; exact vs FD SLSQP on Eq. 7")
    add_common_args(p, device=False)
    p.add_argument("--images", type=int, default=3, help="test digits 9 to time")
    p.add_argument("--maxiter", type=int, default=30, help="SLSQP iteration cap per attack")
    p.add_argument("--fd-maxiter", type=int, default=10, help="iteration cap, exact vs FD")
    p.add_argument("--fd-time-limit", type=float, default=120.0, help="FD wall-time cap (s)")
    p.set_defaults(func=lambda a: (bench_attacks(a), 0)[1])
