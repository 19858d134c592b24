"""`nm bench kernels`: the p×p ReLU covariance by every method, timed side by side.

For each p of ``--sizes`` a seeded random problem: mean μ ~ N(0, 1)^p and covariance
Σ = W Wᵀ/r + ``--diag``·I with W ~ N(0, 1)^{p×r}, r = ``--rank`` (default 4: correlations
spread over (−1, 1), many beyond ±1/√2 where Lemma 4's two branches meet; ``--rank 0`` means
r = p, whose correlations are all O(1/√p)). Methods (float64 on CPU):

* ``relu_moments(..., method="exact")``: the closed form (the reference of the others);
* ``series(5)``, ``series(20)``: Lemma 4's series truncated (the paper's method);
* ``zero_mean``: Theorem 2 (ignores the mean: the paper's "old" variance);
* Monte Carlo: ``monte_carlo_moments(relu, μ, Σ, samples=--mc-samples, full=True)``.

Timings are medians of ``--repeats`` runs after one untimed warm-up (a single timed run, no
warm-up, at p ≥ 4096 or when a run is estimated above ``--slow-seconds``); ``relu_moments``
is called with ``check_psd=False`` and the PSD check (Cholesky in ``_validate``) is timed on
its own. Errors: max abs difference from the exact covariance; the exact one's values at
``--check-entries`` random entries (and a few diagonal ones) are written to
``<out>/bench_kernels_oracle_points.json`` for ``nmgen check-points`` (the cancellation-free
mpmath covariance and variance from the definitions; torchbridge never imports mpmath). Also
reported:
exact symmetry of every output, and min eigenvalue / trace of the exact covariance.
``--profile`` breaks the exact method's time at p = 1024 (or the largest size ≤ 1024) down.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from nmgen.generated import torch_kernels as tk

from torchbridge.experiments.common import (
    add_common_args,
    markdown_table,
    out_dir,
    save_figure,
    write_json,
    write_markdown,
)
from torchbridge.experiments.oracle_points import check_hint, write_points
from torchbridge.moments import _pair_blocks_nd, _safe_sqrt, _validate, relu_moments
from torchbridge.montecarlo import monte_carlo_moments

#: (label, relu_moments method, terms)
ANALYTIC = (
    ("exact", "exact", 0),
    ("series(5)", "series", 5),
    ("series(20)", "series", 20),
    ("zero_mean", "zero_mean", 0),
)


def random_problem(
    p: int, seed: int, rank: int = 4, diag: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (mean (p,), SPD cov (p, p)) in float64: μ ~ N(0,1), Σ = W Wᵀ/r + diag·I."""
    r = p if rank <= 0 else rank
    gen = torch.Generator().manual_seed(seed * 1_000_003 + p)
    mean = torch.randn(p, generator=gen, dtype=torch.float64)
    w = torch.randn(p, r, generator=gen, dtype=torch.float64)
    cov = w @ w.T / r
    cov = 0.5 * (cov + cov.T) + diag * torch.eye(p, dtype=torch.float64)
    return mean, cov


def timed(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, list[float], object]:
    """(median seconds, all times, last output) of ``fn()``."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def oracle_entries(
    mean: torch.Tensor, cov: torch.Tensor, c_exact: torch.Tensor, entries: int, seed: int
) -> dict[str, torch.Tensor]:
    """Rows for ``nmgen check-points``: ``entries`` random off-diagonal entries of ``c_exact``
    (kind ``relu_covariance``: μ_i, μ_j, σ_i, σ_j, ρ_ij, C_ij) and up to 5 diagonal ones
    (``relu_variance``: μ_i, σ_i, C_ii), float64."""
    p = mean.shape[0]
    if entries <= 0 or p < 2:
        return {}
    gen = torch.Generator().manual_seed(seed + 7)
    i = torch.randint(0, p, (entries,), generator=gen)
    j = torch.randint(0, p - 1, (entries,), generator=gen)
    j = j + (j >= i).long()  # j != i
    m, c, v = mean.double(), cov.double(), c_exact.double()
    sig = _safe_sqrt(c.diagonal())
    rho = (c[i, j] / (sig[i] * sig[j])).clamp(-1.0, 1.0)
    d = torch.randint(0, p, (min(5, entries),), generator=gen)
    return {
        "relu_covariance": torch.stack([m[i], m[j], sig[i], sig[j], rho, v[i, j]], 1),
        "relu_variance": torch.stack([m[d], sig[d], v[d, d]], 1),
    }


def profile_exact(mean: torch.Tensor, cov: torch.Tensor, repeats: int = 3) -> dict:
    """Stage timings (median seconds) of ``relu_moments(method="exact")``, re-enacted.

    Follows ``torchbridge.moments`` step by step: validation, upper-triangle index pairs,
    gathers (σ_i, σ_j, Σ_ij, μ_i, μ_j, ρ), the elementwise exact kernel (and within it the
    bivariate normal CDF alone, on the same arguments: ``relu_cross_covariance``, as
    ``relu_moments`` calls it since issue #10), the ReLU mean/variance, and the two
    scatters into the p×p output. Also a ``torch.profiler`` table of the full call.
    """
    p = mean.shape[0]
    st: dict[str, list[float]] = {}

    def tick(name: str, t0: float) -> float:
        t1 = time.perf_counter()
        st.setdefault(name, []).append(t1 - t0)
        return t1

    for _ in range(repeats):
        t = time.perf_counter()
        _validate(mean, cov, False)
        t = tick("validate (no PSD)", t)
        blocks = [(i, j) for i, j, _ in _pair_blocks_nd(p, 1 << 20, mean.device)]
        t = tick("index pairs (_pair_blocks_nd)", t)
        sigma = _safe_sqrt(cov.diagonal())
        _, var = tk.relu_mean_variance(mean, sigma)
        t = tick("relu_mean_variance", t)
        args = []
        for i, j in blocks:
            s1, s2 = sigma[i], sigma[j]
            den = s1 * s2
            pos = den > 0
            rho = torch.where(pos, cov[i, j] / torch.where(pos, den, 1.0), 0.0).clamp(-1, 1)
            args.append((mean[i], mean[j], s1, s2, rho, i, j))
        t = tick("gathers + ρ", t)
        vals = [tk.relu_cross_covariance(*a[:5], validate=False) for a in args]
        t = tick("relu_cross_covariance (total)", t)
        for m1, m2, s1, s2, rho, _, _ in args:
            tk.bivariate_normal_cdf(m1 / s1, m2 / s2, rho)
        t = tick("  of which: bivariate_normal_cdf alone", t)
        offs = [torch.where(a[5] == a[6], var[a[5]], v) for a, v in zip(args, vals, strict=True)]
        t = tick("diag where", t)
        out = mean.new_zeros(p * p)
        for (_, _, _, _, _, i, j), c in zip(args, offs, strict=True):
            out[i * p + j] = c
            out[j * p + i] = c
        tick("scatter into p×p (2 index_put)", t)
    med = {k: statistics.median(v) for k, v in st.items()}
    t_full = timed(lambda: relu_moments(mean, cov, "exact", check_psd=False), repeats, 1)[0]
    prof_table = ""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            relu_moments(mean, cov, "exact", check_psd=False)
        prof_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    except Exception as exc:  # the profiler is optional
        prof_table = f"(torch.profiler unavailable: {exc})"
    pairs = p * (p + 1) // 2
    return {
        "p": p,
        "pairs": pairs,
        "relu_moments_seconds": t_full,
        "stages_seconds": med,
        "ns_per_pair_exact_kernel": 1e9 * med["relu_cross_covariance (total)"] / pairs,
        "profiler_table": prof_table,
    }


def run_bench(args: argparse.Namespace) -> dict:
    """Run the benchmark, write ``bench_kernels.{json,md,png}`` and return the JSON object."""
    from tqdm.auto import tqdm

    from torchbridge.experiments.tightness import command_line

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    results, rows, prev_rate = [], [], {}
    oracle: dict[str, list[torch.Tensor]] = {}
    for p in sizes:
        mean, cov = random_problem(p, args.seed, args.rank, args.diag)
        sig = cov.diagonal().sqrt()
        rho = (cov / torch.outer(sig, sig))[torch.triu_indices(p, p, 1).unbind(0)]
        entry: dict = {
            "p": p,
            "pairs": p * (p + 1) // 2,
            "methods": {},
            "rho_stats": {
                "max_abs": float(rho.abs().max()),
                "frac_above_1_over_sqrt2": float((rho.abs() > 1 / math.sqrt(2)).double().mean()),
            },
        }
        outs = {}
        bar = tqdm(
            [*ANALYTIC, ("MC", "mc", 0)], desc=f"bench kernels p={p}", disable=args.no_progress
        )
        for label, method, terms in bar:
            if method == "mc":

                def fn(mean=mean, cov=cov):
                    return monte_carlo_moments(
                        torch.relu,
                        mean,
                        cov,
                        samples=args.mc_samples,
                        seed=args.seed,
                        batch_size=args.mc_batch,
                        full=True,
                    )
            else:

                def fn(mean=mean, cov=cov, method=method, terms=terms):
                    return relu_moments(mean, cov, method, terms or 5, check_psd=False)

            est = prev_rate.get(label, 0.0) * entry["pairs"]
            reps = args.repeats if p < 4096 and est < args.slow_seconds else 1
            warm = 1 if reps > 1 else 0
            t, times, out = timed(fn, reps, warm)
            prev_rate[label] = t / entry["pairs"]
            outs[label] = out[1]
            entry["methods"][label] = {
                "seconds": t,
                "times": times,
                "repeats": reps,
                "symmetric": bool(torch.equal(out[1], out[1].T)),
            }
        c_ex = outs["exact"]
        t_ex = entry["methods"]["exact"]["seconds"]
        for label, m in entry["methods"].items():
            m["ratio_to_exact"] = m["seconds"] / t_ex
            m["max_abs_err_vs_exact"] = float((outs[label] - c_ex).abs().max())
        for kind, r in oracle_entries(mean, cov, c_ex, args.check_entries, args.seed).items():
            oracle.setdefault(kind, []).append(r)
        # PSD check on its own, and the spectrum of the exact output
        t_val = timed(lambda mean=mean, cov=cov: _validate(mean, cov, True), 1, 1)[0]
        t_val0 = timed(lambda mean=mean, cov=cov: _validate(mean, cov, False), 3, 1)[0]
        entry["psd_check_seconds"] = t_val
        entry["validate_without_psd_seconds"] = t_val0
        entry["exact_trace"] = float(c_ex.trace())
        if p <= args.eig_max:
            entry["exact_min_eigenvalue"] = float(torch.linalg.eigvalsh(c_ex).min())
        else:
            tol = 1e-12 * entry["exact_trace"]
            _, info = torch.linalg.cholesky_ex(c_ex + tol * torch.eye(p, dtype=c_ex.dtype))
            entry["exact_min_eigenvalue"] = None
            entry["exact_cholesky_with_1e-12_trace_shift_ok"] = int(info) == 0
        for label, m in entry["methods"].items():
            err = m["max_abs_err_vs_exact"]
            rows.append(
                [
                    p,
                    label,
                    m["seconds"],
                    m["ratio_to_exact"],
                    err if label != "exact" else "(reference)",
                    "yes" if m["symmetric"] else "no",
                    m["repeats"],
                ]
            )
        results.append(entry)
        del outs

    profile = None
    prof_p = max([s for s in sizes if s <= 1024], default=None)
    slow = any(e["p"] == 1024 and e["methods"]["exact"]["seconds"] > 0.2 for e in results)
    if (args.profile or slow) and prof_p is not None:
        mean, cov = random_problem(prof_p, args.seed, args.rank, args.diag)
        profile = profile_exact(mean, cov)

    cmd = command_line(args)
    points = write_points(
        out_dir(args.out) / "bench_kernels_oracle_points.json",
        {kind: torch.cat(r) for kind, r in oracle.items()},
        cmd,
    )
    headers = [
        "p",
        "method",
        "time (s)",
        "time / exact",
        "max abs err vs exact",
        "exactly symmetric",
        "repeats",
    ]
    extra_rows = []
    for e in results:
        lam = e["exact_min_eigenvalue"]
        extra_rows.append(
            [
                e["p"],
                f"{lam:.3g}"
                if lam is not None
                else (
                    "Cholesky ok" if e.get("exact_cholesky_with_1e-12_trace_shift_ok") else "failed"
                ),
                e["exact_trace"],
                e["psd_check_seconds"],
                e["validate_without_psd_seconds"],
                e["rho_stats"]["max_abs"],
                e["rho_stats"]["frac_above_1_over_sqrt2"],
            ]
        )
    rank = "p" if args.rank <= 0 else str(args.rank)
    md = [
        "# Benchmark: p×p ReLU covariance by method (float64, CPU)",
        "",
        f"Command: `{cmd}`",
        "",
        f"μ ~ N(0, 1), Σ = W Wᵀ/r + {args.diag:g}·I, W ~ N(0,1)^(p×r), r = {rank}; "
        f"torch threads {torch.get_num_threads()}; relu_moments(check_psd=False) timed "
        f"(median of {args.repeats} after one warm-up; single run at p ≥ 4096); Monte Carlo: "
        f"{args.mc_samples} samples, empirical covariance (Cholesky included).",
        "",
        markdown_table(headers, rows),
        "",
        f"The exact float64 values at {args.check_entries} random off-diagonal and up to 5 "
        f"diagonal entries per p are written to `{points}` for the mpmath oracle: run "
        f"`{check_hint(points)}`.",
        "",
        "Exact output and input checks:",
        "",
        markdown_table(
            [
                "p",
                "min eig of exact C",
                "trace C",
                "PSD check of Σ (s)",
                "validation w/o PSD (s)",
                "max \\|ρ\\|",
                "frac \\|ρ\\| > 1/√2",
            ],
            extra_rows,
        ),
    ]
    bar_ok = [e for e in results if e["p"] == 1024]
    if bar_ok:
        t = bar_ok[0]["methods"]["exact"]["seconds"]
        md += [
            "",
            f"Bar: exact at p = 1024 ≤ 0.2 s (goal 0.1 s): **{t:.3f} s** "
            f"({'met' if t <= 0.2 else 'NOT met'}; the paper's 5-term code: 0.18 s).",
        ]
    if profile is not None:
        rows_p = [
            [k, v, f"{100 * v / profile['relu_moments_seconds']:.0f}%"]
            for k, v in profile["stages_seconds"].items()
        ]
        md += [
            "",
            f"## Profile of the exact method at p = {profile['p']} "
            f"({profile['pairs']} pairs; relu_moments {profile['relu_moments_seconds']:.3f} s;"
            f" exact kernel {profile['ns_per_pair_exact_kernel']:.0f} ns/pair)",
            "",
            markdown_table(["stage", "seconds", "of relu_moments"], rows_p),
            "",
            "```",
            profile["profiler_table"].rstrip(),
            "```",
        ]
    text = "\n".join(md)
    out = {
        "command": cmd,
        "oracle_points": {"file": str(points), "check": check_hint(points)},
        "sizes": sizes,
        "rank": args.rank,
        "diag": args.diag,
        "mc_samples": args.mc_samples,
        "threads": torch.get_num_threads(),
        "results": results,
        "profile": profile,
        "torch": torch.__version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(args.out, "bench_kernels", out)
    write_markdown(args.out, "bench_kernels", text)
    _plot(results, args)
    print(text)
    print(f"\nwrote {args.out}/bench_kernels.json, bench_kernels.md, bench_kernels.png")
    return out


def _plot(results: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ps = [e["p"] for e in results]
    for label in [a[0] for a in ANALYTIC] + ["MC"]:
        ax.plot(ps, [e["methods"][label]["seconds"] for e in results], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("p")
    ax.set_ylabel("seconds (median)")
    ax.set_title("p×p ReLU covariance, float64 CPU")
    ax.legend(fontsize=8)
    save_figure(fig, args.out, "bench_kernels")


def add_bench_parser(bench_subparsers) -> None:
    """Register `nm bench kernels`."""
    p = bench_subparsers.add_parser(
        "kernels",
        help="p×p ReLU covariance: exact / series(5) / series(20) / zero_mean / Monte Carlo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p, device=False)
    p.add_argument(
        "--sizes", default="256,1024,4096", help="comma-separated p values (default 256,1024,4096)"
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="timed repeats below p = 4096 (median; default 5)"
    )
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=20.0,
        help="a method whose run is estimated (from the previous size) above this "
        "is timed once, without warm-up (default 20)",
    )
    p.add_argument(
        "--rank",
        type=int,
        default=4,
        help="rank r of W in Σ = W Wᵀ/r + diag·I (default 4: median |ρ| ≈ 0.37, ~13%% "
        "of |ρ| > 1/√2; 0 means r = p, all |ρ| = O(1/√p))",
    )
    p.add_argument("--diag", type=float, default=0.05, help="diagonal added to Σ (default 0.05)")
    p.add_argument(
        "--mc-samples", type=int, default=10_000, help="Monte Carlo samples (default 10^4)"
    )
    p.add_argument("--mc-batch", type=int, default=2500, help="Monte Carlo batch size")
    p.add_argument(
        "--check-entries",
        type=int,
        default=50,
        help="random off-diagonal entries of the exact covariance (plus 5 diagonal ones) "
        "written for `nmgen check-points` (default 50)",
    )
    p.add_argument(
        "--eig-max",
        type=int,
        default=2048,
        help="largest p whose exact covariance gets a full eigvalsh (default 2048; "
        "above it a Cholesky with a 1e-12·trace shift is tried instead)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="break the exact method's time down at p = 1024 (or the largest size "
        "≤ 1024); automatic when exact at p = 1024 is slower than 0.2 s",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads (default 0: leave torch's default)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run_bench)
