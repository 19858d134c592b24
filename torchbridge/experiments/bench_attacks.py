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
    from torchbridge.attacks import (
        PixelSupportOptions,
        SlsqpOptions,
        TargetedOptions,
        pixel_support,
        sparse_smooth,
        targeted,
    )
    from torchbridge.data import mnist
    from torchbridge.linearize import two_stage_linearize
    from torchbridge.models import trained_lenet

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    model = trained_lenet(progress=False)
    _, _, tx, ty = mnist()
    with torch.no_grad():
        pred = model(tx).argmax(1)
    idxs = ((ty == 9) & (pred == 9)).nonzero().flatten().tolist()[: args.images]
    t_opt = TargetedOptions(slsqp=SlsqpOptions(maxiter=args.maxiter, ftol=1e-6))
    # Eq. 9 first: its median is the timing target. "linearization given" times the
    # solver alone (one round, no real network); "real network" the whole strategy on the
    # nn.Sequential (linearization, rounds, checks and restoration included).
    runs = {
        "sparse_smooth (Eq. 9), linearization given": lambda lin, x: sparse_smooth(
            lin, x, gamma=0.5
        ),
        "sparse_smooth (Eq. 9), real network": lambda lin, x: sparse_smooth(model, x, gamma=0.5),
        "sparse_smooth targeted (Eq. 10), linearization given": lambda lin, x: sparse_smooth(
            lin, x, target=4
        ),
        "pixel_support (Eq. 8), linearization given": lambda lin, x: pixel_support(
            lin, x, options=PixelSupportOptions(competitor="lse")
        ),
        "targeted (Eq. 7), linearization given": lambda lin, x: targeted(lin, x, 7, options=t_opt),
    }
    lins = [two_stage_linearize(model, tx[i]) for i in idxs]
    rows, out = [], {"attacks": {}, "images": idxs}
    for name, fn in tqdm(runs.items(), desc="bench attacks"):
        times, iters, caps = [], [], 0
        for lin, i in zip(lins, idxs, strict=True):
            start = time.perf_counter()
            res = fn(lin, tx[i])
            times.append(time.perf_counter() - start)
            iters.append(res.iterations)
            caps += res.hit_iteration_cap
        med = statistics.median(times)
        out["attacks"][name] = {"median_s": med, "iterations": iters, "times": times, "caps": caps}
        rows.append([name, med, statistics.median(iters), caps])
    print(
        markdown_table(
            [
                f"attack on {len(idxs)} LeNet test digits 9, bounds [0, 1]",
                "median solve s",
                "median iters",
                "iteration-cap hits",
            ],
            rows,
        )
    )
    med9 = out["attacks"]["sparse_smooth (Eq. 9), linearization given"]["median_s"]
    print(f"median Eq. 9 solve (linearization given): {med9:.2f} s", flush=True)

    lin, x = lins[0], tx[idxs[0]]
    out["exact_vs_fd"] = {}
    for label, bounds in (("range [0, 1] on", (0.0, 1.0)), ("paper: +-beta box only", None)):
        out["exact_vs_fd"][label] = _exact_vs_fd(lin, x, bounds, args)
    return _finish(args, out)


def _exact_vs_fd(lin, x, bounds, args: argparse.Namespace) -> dict:
    """Eq. 7 with exact derivatives vs SciPy's finite differences, same iteration cap."""
    from torchbridge.attacks import SlsqpOptions, TargetedOptions, targeted

    start = time.perf_counter()
    ex_opt = TargetedOptions(slsqp=SlsqpOptions(args.fd_maxiter, 1e-6))
    ex = targeted(lin, x, 7, bounds=bounds, options=ex_opt)
    t_ex = time.perf_counter() - start
    start = time.perf_counter()
    fd_opt = SlsqpOptions(args.fd_maxiter, 1e-6, exact=False, time_limit=args.fd_time_limit)
    fd = targeted(lin, x, 7, bounds=bounds, options=TargetedOptions(slsqp=fd_opt))
    t_fd = time.perf_counter() - start
    cmp_rows = [
        ["exact (autograd)", t_ex, ex.eval_time, ex.iterations, ex.nfev, ex.margin, ex.message],
        [
            "2-point FD (jac=None)",
            t_fd,
            fd.eval_time,
            fd.iterations,
            fd.nfev,
            fd.margin,
            fd.message,
        ],
    ]
    ratio_t = t_fd / t_ex
    ratio_e = fd.eval_time / max(ex.eval_time, 1e-12)
    print(
        markdown_table(
            [
                f"SLSQP on Eq. 7, {ex.range_label}",
                "wall s",
                "in evaluations s",
                "iterations",
                "evaluations",
                "margin",
                "message",
            ],
            cmp_rows,
        )
    )
    print(
        f"wall-time ratio FD/exact = {ratio_t:.1f}x; time in objective/derivative evaluations "
        f"FD/exact = {ratio_e:.1f}x; evaluations {fd.nfev / max(1, ex.nfev):.1f}x. Both capped "
        f"at maxiter={args.fd_maxiter}, FD also at {args.fd_time_limit} s (iterations = -1 "
        "when the time limit stopped it)."
    )
    return {
        "range": ex.range_label,
        "exact": {
            "wall_s": t_ex,
            "eval_s": ex.eval_time,
            "iterations": ex.iterations,
            "nfev": ex.nfev,
            "margin": ex.margin,
        },
        "fd": {
            "wall_s": t_fd,
            "eval_s": fd.eval_time,
            "iterations": fd.iterations,
            "nfev": fd.nfev,
            "margin": fd.margin,
            "message": fd.message,
        },
        "wall_ratio": ratio_t,
        "eval_time_ratio": ratio_e,
    }


def _finish(args: argparse.Namespace, out: dict) -> dict:
    import scipy

    out["run"] = {
        "seed": args.seed,
        "threads": args.threads,
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "note": "every solve pins torch and BLAS to 1 thread (torchbridge.attacks.strategies)",
    }
    write_json(args.out, "bench_attacks", out)
    return out


def add_bench_parser(bench_sub) -> None:
    """Register `nm bench attacks`."""
    p = bench_sub.add_parser("attacks", help="attack solve times; exact vs FD SLSQP on Eq. 7")
    add_common_args(p, device=False)
    p.add_argument("--images", type=int, default=3, help="test digits 9 to time (default: 3)")
    p.add_argument(
        "--maxiter", type=int, default=30, help="SLSQP iteration cap of Eq. 7 (default: 30)"
    )
    p.add_argument(
        "--fd-maxiter", type=int, default=10, help="iteration cap, exact vs FD (default: 10)"
    )
    p.add_argument(
        "--fd-time-limit", type=float, default=120.0, help="FD wall-time cap, s (default: 120)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.set_defaults(func=lambda a: (bench_attacks(a), 0)[1])
