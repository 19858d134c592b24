"""`nm bench attacks`: attack solve times on LeNet/MNIST, and Eq. 7 solved with exact derivatives
vs the same solver with SciPy's 2-point finite differences, side by side in one run."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from torchbridge.experiments.common import add_common_args, markdown_table, write_json


def bench_attacks(args: argparse.Namespace) -> dict:
    """Median solve times per attack type, and the exact-vs-FD comparison on Eq. 7."""
    from torchbridge.attacks import (
        AugLagOptions,
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
    t_opt = TargetedOptions(solver=AugLagOptions(maxiter=args.eq7_maxiter))
    s_opt = TargetedOptions(solver=SlsqpOptions(maxiter=args.maxiter, ftol=1e-6))
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
        "targeted (Eq. 7), linearization given, augmented Lagrangian": lambda lin, x: targeted(
            lin, x, 7, options=t_opt
        ),
        f"targeted (Eq. 7), linearization given, SLSQP capped at {args.maxiter}": (
            lambda lin, x: targeted(lin, x, 7, options=s_opt)
        ),
    }
    lins = [two_stage_linearize(model, tx[i]) for i in idxs]
    rows, out = [], {"attacks": {}, "images": idxs}
    for name, fn in tqdm(runs.items(), desc="bench attacks"):
        times, iters, caps, margins = [], [], 0, []
        for lin, i in zip(lins, idxs, strict=True):
            start = time.perf_counter()
            res = fn(lin, tx[i])
            times.append(time.perf_counter() - start)
            iters.append(res.iterations)
            margins.append(res.margin)
            caps += res.hit_iteration_cap
        med = statistics.median(times)
        out["attacks"][name] = {
            "median_s": med,
            "iterations": iters,
            "times": times,
            "caps": caps,
            "margins": margins,
        }
        rows.append([name, med, statistics.median(iters), caps, statistics.median(margins)])
    print(
        markdown_table(
            [
                f"attack on {len(idxs)} LeNet test digits 9, bounds [0, 1]",
                "median solve s",
                "median iters",
                "iteration-cap hits",
                "median margin",
            ],
            rows,
        )
    )
    med9 = out["attacks"]["sparse_smooth (Eq. 9), linearization given"]["median_s"]
    print(f"median Eq. 9 solve (linearization given): {med9:.2f} s", flush=True)

    lin, x = lins[0], tx[idxs[0]]
    out["exact_vs_fd"] = {}
    boxes = {"range": ("range [0, 1] on", (0.0, 1.0)), "paper": ("paper: +-beta box only", None)}
    for key in args.fd_problems:
        label, bounds = boxes[key]
        out["exact_vs_fd"][label] = _exact_vs_fd(lin, x, bounds, args)
    return _finish(args, out)


def _exact_vs_fd(lin, x, bounds, args: argparse.Namespace) -> dict:
    """Eq. 7 (target 7) with exact derivatives vs the SAME augmented-Lagrangian / L-BFGS-B solver
    with SciPy's 2-point finite differences: same problem, start, caps and stopping rule."""
    from torchbridge.attacks import AugLagOptions, TargetedOptions, targeted

    runs = {}
    for name, exact in (("exact (autograd)", True), ("2-point FD (jac=None)", False)):
        cap = args.fd_time_limit if not exact else None
        opt = AugLagOptions(maxiter=args.fd_maxiter, exact=exact, time_limit=cap)
        start = time.perf_counter()
        res = targeted(lin, x, 7, bounds=bounds, options=TargetedOptions(solver=opt))
        runs[name] = (time.perf_counter() - start, res)
    (t_ex, ex), (t_fd, fd) = runs.values()
    rows = [
        [
            name,
            t,
            r.eval_time,
            r.iterations if r.status != -1 else "stopped by time limit",
            r.nfev,
            r.margin,
            r.converged,
            r.message,
        ]
        for name, (t, r) in runs.items()
    ]
    ratio_t = t_fd / t_ex
    ratio_e = fd.eval_time / max(ex.eval_time, 1e-12)
    print(
        markdown_table(
            [
                f"Eq. 7 (9 -> 7), augmented Lagrangian + L-BFGS-B, {ex.range_label}",
                "wall s",
                "in evaluations s",
                "L-BFGS-B iterations",
                "evaluations",
                "margin",
                "converged",
                "stopped because",
            ],
            rows,
        )
    )
    finished = fd.status != -1
    print(
        f"wall-time ratio FD/exact = {ratio_t:.1f}x; time in objective/derivative evaluations "
        f"FD/exact = {ratio_e:.1f}x; evaluations {fd.nfev / max(1, ex.nfev):.1f}x. Both capped "
        f"at {args.fd_maxiter} L-BFGS-B iterations"
        + (
            "."
            if finished
            else f"; FD was STOPPED by its {args.fd_time_limit} s time limit, so the ratio is "
            "a lower bound."
        )
    )
    summary = {
        "range": ex.range_label,
        "wall_ratio": ratio_t,
        "eval_time_ratio": ratio_e,
        "fd_finished": finished,
    }
    for name, (t, r) in (
        ("exact", runs["exact (autograd)"]),
        ("fd", runs["2-point FD (jac=None)"]),
    ):
        summary[name] = {
            "wall_s": t,
            "eval_s": r.eval_time,
            "iterations": r.iterations,
            "nfev": r.nfev,
            "margin": r.margin,
            "converged": r.converged,
            "hit_iteration_cap": r.hit_iteration_cap,
            "message": r.message,
        }
    return summary


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
    p = bench_sub.add_parser(
        "attacks", help="attack solve times; exact vs finite-difference derivatives on Eq. 7"
    )
    add_common_args(p, device=False)
    p.add_argument("--images", type=int, default=3, help="test digits 9 to time (default: 3)")
    p.add_argument(
        "--maxiter",
        type=int,
        default=30,
        help="SLSQP iteration cap of the Eq. 7 reference row (default: 30)",
    )
    p.add_argument(
        "--eq7-maxiter",
        type=int,
        default=300,
        help="L-BFGS-B iteration cap of the default Eq. 7 solver (default: 300)",
    )
    p.add_argument(
        "--fd-maxiter",
        type=int,
        default=30,
        help="L-BFGS-B iteration cap of BOTH runs of the exact-vs-FD comparison (300 lets "
        "both converge; FD then takes minutes; default: 30)",
    )
    p.add_argument(
        "--fd-time-limit",
        type=float,
        default=1800.0,
        help="safety wall-time cap of the FD run, s; a stopped run is flagged in the output "
        "(default: 1800)",
    )
    p.add_argument(
        "--fd-problems",
        nargs="+",
        choices=["range", "paper"],
        default=["range", "paper"],
        help="exact-vs-FD problems: 'range' (bounds [0, 1] and +-beta) and/or 'paper' (+-beta "
        "box only) (default: range paper)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.set_defaults(func=lambda a: (bench_attacks(a), 0)[1])
