"""`nm fig2`: truncation error of Lemma 4's series (paper, Section 4.1 / Fig. 2).

The paper's grid: μ1, μ2 ∈ [−2, 2] and σ1, σ2 ∈ [0.2, 2] with spacing 0.2, ρ ∈ {−0.7, −0.5,
…, 0.7} ∪ {0, 0.999} (21·21·10·10·10 = 441,000 points). For every point the series of Eq. 3
truncated to 1, 5, 10, 20 and 50 terms (``relu_cross_moment_series``) is compared with

(a) the exact closed form ``relu_cross_moment`` (float64) on the whole grid; its values at a
    seeded random subsample of ``--check-points`` points are written to
    ``<out>/fig2_oracle_points.json`` for ``nmgen check-points`` (the mpmath oracle from the
    definition; torchbridge never imports mpmath);
(b) Monte Carlo with ``--mc-samples`` samples (10^6, as in the paper) on a seeded random
    subsample of ``--mc-points`` points, stratified over ρ. One set of standard normal pairs
    (Z1, Z2) is drawn once and reused for every point (x1 = μ1 + σ1 Z1,
    x2 = μ2 + σ2(ρ Z1 + √(1−ρ²) Z2)); the standard error of each estimate is reported, so the
    Monte Carlo floor is visible: the error of the *exact* value against Monte Carlo is that
    floor.

Extra rows: the grid's μ/σ values at ρ = ±1/√2 and ±(1/√2 ± 0.01), where the series of
Eq. 3 diverges (the disjunction of Eq. 1). Outputs ``<out>/fig2.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

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

TERMS = (1, 5, 10, 20, 50)
INV_SQRT2 = 1.0 / math.sqrt(2.0)
#: ρ of the paper's grid: −0.7, −0.5, …, 0.7 plus 0 and 0.999 (sorted).
PAPER_RHOS = (-0.7, -0.5, -0.3, -0.1, 0.0, 0.1, 0.3, 0.5, 0.7, 0.999)
#: ρ at and next to the disjunction ±1/√2 of Eq. 1.
SINGULAR_RHOS = (
    -INV_SQRT2 - 0.01,
    -INV_SQRT2,
    -INV_SQRT2 + 0.01,
    INV_SQRT2 - 0.01,
    INV_SQRT2,
    INV_SQRT2 + 0.01,
)
_SING_LABELS = ("−1/√2−0.01", "−1/√2", "−1/√2+0.01", "1/√2−0.01", "1/√2", "1/√2+0.01")
#: log-plot floor for errors that are exactly 0.
_FLOOR = 1e-18


def rho_label(rho: float) -> str:
    """Printable name of a ρ of the grid (±1/√2 rows by name)."""
    for r, lab in zip(SINGULAR_RHOS, _SING_LABELS, strict=True):
        if rho == r:
            return lab
    return f"{rho:g}"


def grid_axes(stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ values, σ values) of the paper's grid, every ``stride``-th value (float64)."""
    mu = torch.tensor([(k - 10) / 5 for k in range(21)], dtype=torch.float64)[::stride]
    sigma = torch.tensor([k / 5 for k in range(1, 11)], dtype=torch.float64)[::stride]
    return mu.contiguous(), sigma.contiguous()


def grid_points(stride: int = 1) -> torch.Tensor:
    """All (μ1, μ2, σ1, σ2) combinations of the grid as an ``(n, 4)`` float64 tensor."""
    mu, sigma = grid_axes(stride)
    m1, m2, s1, s2 = torch.meshgrid(mu, mu, sigma, sigma, indexing="ij")
    return torch.stack([m1.reshape(-1), m2.reshape(-1), s1.reshape(-1), s2.reshape(-1)], 1)


def series_errors(
    pts: torch.Tensor, rho: float, terms: tuple[int, ...] = TERMS, chunk: int = 1 << 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact values ``(n,)``, series values ``(len(terms), n)``) at the points for one ρ."""
    n = pts.shape[0]
    exact = torch.empty(n, dtype=torch.float64)
    series = torch.empty(len(terms), n, dtype=torch.float64)
    for a in range(0, n, chunk):
        m1, m2, s1, s2 = pts[a : a + chunk].unbind(1)
        r = torch.full_like(m1, rho)
        exact[a : a + chunk] = tk.relu_cross_moment(m1, m2, s1, s2, r)
        for t_i, t in enumerate(terms):
            series[t_i, a : a + chunk] = tk.relu_cross_moment_series(m1, m2, s1, s2, r, t)
    return exact, series


def mc_cross_moments(
    params: torch.Tensor,
    samples: int,
    seed: int,
    sample_chunk: int = 1 << 18,
    point_batch: int = 16,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Monte Carlo E[relu(x1) relu(x2)], its standard error, and normal-sample statistics.

    ``params`` is ``(n, 5)``.

    Columns (μ1, μ2, σ1, σ2, ρ). One set of ``samples`` standard normal pairs is drawn with
    ``seed`` and shared by all points (reparameterization); statistics are accumulated in
    float64 in chunks of ``sample_chunk`` samples × ``point_batch`` points. Sharing the
    normals makes the points' Monte Carlo errors correlated; the returned dict gives the
    sample mean and std of Z1, Z2 (in units of their own standard errors) to show the draw.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(samples, generator=gen, dtype=torch.float64)
    z2 = torch.randn(samples, generator=gen, dtype=torch.float64)
    n = params.shape[0]
    est = torch.empty(n, dtype=torch.float64)
    se = torch.empty(n, dtype=torch.float64)
    for a in tqdm(range(0, n, point_batch), desc="fig2 Monte Carlo", disable=not progress):
        p = params[a : a + point_batch]
        m1, m2, s1, s2, r = (c[:, None] for c in p.unbind(1))
        c = torch.sqrt((1 - r) * (1 + r))
        tot = torch.zeros(p.shape[0], dtype=torch.float64)
        tot2 = torch.zeros(p.shape[0], dtype=torch.float64)
        for b in range(0, samples, sample_chunk):
            u1, u2 = z1[None, b : b + sample_chunk], z2[None, b : b + sample_chunk]
            x1 = (s1 * u1).add_(m1).clamp_(min=0.0)
            x2 = (r * u1).add_(c * u2).mul_(s2).add_(m2).clamp_(min=0.0)
            prod = x1.mul_(x2)
            tot += prod.sum(1)
            tot2 += prod.square_().sum(1)
        mean = tot / samples
        var = (tot2 / samples - mean.square()).clamp(min=0.0) * (samples / (samples - 1))
        est[a : a + point_batch] = mean
        se[a : a + point_batch] = torch.sqrt(var / samples)
    root = math.sqrt(samples)
    info = {f"z{k}_mean_in_se": float(z.mean() * root) for k, z in ((1, z1), (2, z2))}
    info.update(
        {
            f"z{k}_std_minus_1_in_se": float((z.std() - 1) * math.sqrt(2) * root)
            for k, z in ((1, z1), (2, z2))
        }
    )
    return est, se, info


def _sample_params(
    pts: torch.Tensor, rhos: tuple[float, ...], per_rho: int, gen: torch.Generator
) -> torch.Tensor:
    """``per_rho`` random grid points (without replacement) for each ρ: ``(n, 5)``."""
    rows = []
    for rho in rhos:
        idx = torch.randperm(pts.shape[0], generator=gen)[: min(per_rho, pts.shape[0])]
        sel = pts[idx]
        rows.append(torch.cat([sel, torch.full((sel.shape[0], 1), rho, dtype=torch.float64)], 1))
    return torch.cat(rows)


def _point(vec: torch.Tensor) -> dict:
    return dict(zip(("mu1", "mu2", "sigma1", "sigma2", "rho"), map(float, vec), strict=True))


def write_oracle_points(params: torch.Tensor, path: Path, source: str) -> dict:
    """Evaluate the exact kernel at ``params`` ``(n, 5)`` (μ1, μ2, σ1, σ2, ρ) and write the
    points file that ``nmgen check-points`` compares with the mpmath oracle
    (``relu_cross_moment_ref``, from the definition)."""
    vals = tk.relu_cross_moment(*params.unbind(1))
    write_points(path, {"relu_cross_moment": torch.cat([params, vals[:, None]], 1)}, source)
    return {"points": int(params.shape[0]), "file": str(path), "check": check_hint(path)}


def run_fig2(args: argparse.Namespace) -> dict:
    """Compute the Fig. 2 errors, write JSON/markdown/PNG and return the JSON object."""
    from tqdm.auto import tqdm

    from torchbridge.experiments.tightness import command_line

    if args.quick:
        args.stride = max(args.stride, 4)
        args.mc_points = min(args.mc_points, 20)
        args.mc_samples = min(args.mc_samples, 20_000)
        args.check_points = min(args.check_points, 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    t_start = time.perf_counter()
    cmd = command_line(args)
    pts = grid_points(args.stride)
    all_rhos = PAPER_RHOS + SINGULAR_RHOS

    # (a) against the exact kernel, on the whole (strided) grid
    per_rho: dict[str, dict] = {}
    worst: dict[int, dict] = {}
    t0 = time.perf_counter()
    bar = tqdm(all_rhos, desc="fig2 grid (per ρ)", disable=not progress)
    for rho in bar:
        exact, series = series_errors(pts, rho, TERMS, args.chunk)
        err = (series - exact).abs()
        if not bool(torch.isfinite(err).all()):
            raise RuntimeError(f"non-finite series value at ρ = {rho}")
        mx, arg = err.max(1)
        entry = {
            "rho": rho,
            "label": rho_label(rho),
            "points": int(pts.shape[0]),
            "paper_grid": rho in PAPER_RHOS,
            "max_abs_error": {},
            "worst": {},
        }
        for t_i, t in enumerate(TERMS):
            i = int(arg[t_i])
            w = {
                **_point(torch.cat([pts[i], torch.tensor([rho], dtype=torch.float64)])),
                "series": float(series[t_i, i]),
                "exact": float(exact[i]),
                "abs_error": float(mx[t_i]),
            }
            entry["max_abs_error"][str(t)] = float(mx[t_i])
            entry["worst"][str(t)] = w
            if rho in PAPER_RHOS and (t not in worst or w["abs_error"] > worst[t]["abs_error"]):
                worst[t] = w
        per_rho[entry["label"]] = entry
    t_grid = time.perf_counter() - t0
    n_paper = int(pts.shape[0]) * len(PAPER_RHOS)

    def group_max(pred) -> dict[str, float]:
        rows = [e for e in per_rho.values() if pred(e)]
        return {str(t): max(e["max_abs_error"][str(t)] for e in rows) for t in TERMS}

    overall = group_max(lambda e: e["paper_grid"])
    away = group_max(lambda e: e["paper_grid"] and abs(abs(e["rho"]) - INV_SQRT2) > 0.1)
    near = group_max(lambda e: not e["paper_grid"])

    # exact kernel vs mpmath on a random subsample of the evaluated points
    gen = torch.Generator().manual_seed(args.seed)
    chk = torch.empty(0, 5, dtype=torch.float64)
    if args.check_points > 0:
        everything = torch.cat(
            [
                torch.cat([pts, torch.full((pts.shape[0], 1), r, dtype=torch.float64)], 1)
                for r in all_rhos
            ]
        )
        idx = torch.randperm(everything.shape[0], generator=gen)[: args.check_points]
        chk = everything[idx]
    check = write_oracle_points(chk, out_dir(args.out) / "fig2_oracle_points.json", cmd)

    # (b) against Monte Carlo on a stratified subsample
    per = max(1, math.ceil(args.mc_points / len(PAPER_RHOS))) if args.mc_points > 0 else 0
    mc: dict = {"samples": args.mc_samples, "points_per_rho": per, "groups": {}}
    t_mc = 0.0
    if per:
        params = _sample_params(pts, all_rhos, per, gen)
        t0 = time.perf_counter()
        est, se, zinfo = mc_cross_moments(params, args.mc_samples, args.seed + 1, progress=progress)
        mc["normal_sample"] = zinfo
        t_mc = time.perf_counter() - t0
        cols = params.unbind(1)
        exact_v = tk.relu_cross_moment(*cols)
        ser = torch.stack([tk.relu_cross_moment_series(*cols, t) for t in TERMS])
        rho_col = params[:, 4]
        groups = {
            "paper grid, all ρ": torch.isin(rho_col, torch.tensor(PAPER_RHOS, dtype=torch.float64)),
            "|ρ| ≤ 0.5": rho_col.abs() <= 0.5 + 1e-12,
            "ρ = ±0.7": (rho_col.abs() - 0.7).abs() < 1e-12,
            "ρ = 0.999": rho_col == 0.999,
            "|ρ| ≈ 1/√2 (±0.01)": torch.isin(
                rho_col, torch.tensor(SINGULAR_RHOS, dtype=torch.float64)
            ),
        }
        for name, m in groups.items():
            if not bool(m.any()):
                continue
            e_exact = (exact_v[m] - est[m]).abs()
            z = e_exact / se[m].clamp(min=1e-300)
            mc["groups"][name] = {
                "points": int(m.sum()),
                "series_max_abs_error": {
                    str(t): float((ser[t_i, m] - est[m]).abs().max()) for t_i, t in enumerate(TERMS)
                },
                "exact_max_abs_error": float(e_exact.max()),
                "max_standard_error": float(se[m].max()),
                "median_standard_error": float(se[m].median()),
                "exact_within_3se_fraction": float((z <= 3).double().mean()),
            }
        mc["exact_max_abs_error_over_se"] = float(
            ((exact_v - est).abs() / se.clamp(min=1e-300)).max()
        )

    # tables
    hdr = ["ρ"] + [f"{t} terms" for t in TERMS]
    rows = [
        [e["label"]] + [e["max_abs_error"][str(t)] for t in TERMS]
        for e in per_rho.values()
        if e["paper_grid"]
    ]
    rows.append(["**all (paper grid)**"] + [overall[str(t)] for t in TERMS])
    rows.append(["all, \\|ρ\\| ≤ 0.5 or 0.999"] + [away[str(t)] for t in TERMS])
    rows += [
        [e["label"]] + [e["max_abs_error"][str(t)] for t in TERMS]
        for e in per_rho.values()
        if not e["paper_grid"]
    ]
    rows.append(["all \\|ρ\\| ≈ 1/√2 rows"] + [near[str(t)] for t in TERMS])
    wrows = [
        [
            t,
            w["abs_error"],
            w["mu1"],
            w["mu2"],
            w["sigma1"],
            w["sigma2"],
            rho_label(w["rho"]),
            w["series"],
            w["exact"],
        ]
        for t, w in sorted(worst.items())
    ]
    md = [
        "# Fig. 2: truncation error of Lemma 4's series (Eq. 1 / Eq. 3)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Grid: μ1, μ2 ∈ {{−2, −1.8, …, 2}}, σ1, σ2 ∈ {{0.2, 0.4, …, 2}} (stride {args.stride}: "
        f"{pts.shape[0]} (μ, σ) combinations per ρ; {n_paper} points on the paper's grid), "
        f"float64, torch threads {torch.get_num_threads()}; grid evaluation "
        f"{t_grid:.1f} s for all {len(all_rhos)} ρ × {len(TERMS)} term counts.",
        "",
        "## (a) Max abs error of the truncated series vs the exact closed form",
        "",
        markdown_table(hdr, rows),
        "",
        f"The exact kernel is checked against the mpmath oracle (from the definition) on "
        f"{check['points']} random grid points written to `{check['file']}`: run "
        f"`{check['check']}`.",
        "",
        "Worst point per number of terms (paper grid):",
        "",
        markdown_table(
            ["terms", "max abs err", "μ1", "μ2", "σ1", "σ2", "ρ", "series", "exact"], wrows
        ),
    ]
    if mc["groups"]:
        mhdr = (
            ["points", "n"]
            + [f"{t} terms" for t in TERMS]
            + ["exact", "max SE", "median SE", "exact within 3 SE"]
        )
        mrows = [
            [name.replace("|", "\\|"), g["points"]]
            + [g["series_max_abs_error"][str(t)] for t in TERMS]
            + [
                g["exact_max_abs_error"],
                g["max_standard_error"],
                g["median_standard_error"],
                f"{100 * g['exact_within_3se_fraction']:.0f}%",
            ]
            for name, g in mc["groups"].items()
        ]
        md += [
            "",
            f"## (b) Max abs error vs Monte Carlo ({args.mc_samples} samples, the paper's metric)",
            "",
            f"{per} random grid points per ρ (seeded), one set of normal pairs shared by all "
            f"points; {t_mc:.1f} s. The 'exact' column is the error of the exact value against "
            "Monte Carlo: the Monte Carlo floor, below which series errors are not resolved. "
            "Because the points share the normals, their errors are correlated and the 3-SE "
            "fraction is one correlated draw (sample mean of Z1, Z2: "
            f"{zinfo['z1_mean_in_se']:+.2f}, {zinfo['z2_mean_in_se']:+.2f} SE; sample std − 1: "
            f"{zinfo['z1_std_minus_1_in_se']:+.2f}, {zinfo['z2_std_minus_1_in_se']:+.2f} SE).",
            "",
            markdown_table(mhdr, mrows),
        ]
    md += [
        "",
        "Paper (Monte Carlo based): 20 terms → ≈ 10^−2.5 ≈ 3e-3 overall; 5 terms → ≈ 1e-4 "
        "away from ρ = ±1/√2.",
    ]
    text = "\n".join(md)
    result = {
        "command": cmd,
        "stride": args.stride,
        "terms": list(TERMS),
        "mu_values": grid_axes(args.stride)[0].tolist(),
        "sigma_values": grid_axes(args.stride)[1].tolist(),
        "points_per_rho": int(pts.shape[0]),
        "paper_grid_points": n_paper,
        "vs_exact": {
            "per_rho": per_rho,
            "overall_paper_grid": overall,
            "away_from_singularity": away,
            "near_singularity": near,
            "worst_paper_grid": {str(t): w for t, w in worst.items()},
        },
        "oracle_points": check,
        "monte_carlo": mc,
        "seconds": {
            "grid": t_grid,
            "monte_carlo": t_mc,
            "total": time.perf_counter() - t_start,
        },
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(args.out, "fig2", result)
    write_markdown(args.out, "fig2", text)
    _plot(result, args)
    print(text)
    print(f"\nwrote {args.out}/fig2.json, fig2.md, fig2.png")
    return result


def _plot(result: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def fl(v: float) -> float:
        return max(v, _FLOOR)

    ncols = 2 if result["monte_carlo"]["groups"] else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.2 * ncols, 4.6), squeeze=False)
    ax = axes[0, 0]
    cmap = plt.get_cmap("viridis")
    per_rho = result["vs_exact"]["per_rho"]
    paper = [e for e in per_rho.values() if e["paper_grid"]]
    for k, e in enumerate(paper):
        ax.plot(
            TERMS,
            [fl(e["max_abs_error"][str(t)]) for t in TERMS],
            "o-",
            color=cmap(k / max(1, len(paper) - 1)),
            label=f"ρ = {e['label']}",
        )
    for e in per_rho.values():
        if not e["paper_grid"]:
            ax.plot(
                TERMS,
                [fl(e["max_abs_error"][str(t)]) for t in TERMS],
                "x--",
                color="tab:red",
                alpha=0.6,
                lw=1,
            )
    ax.plot([], [], "x--", color="tab:red", label="ρ = ±1/√2, ±(1/√2 ± 0.01)")
    ax.set_yscale("log")
    ax.set_xlabel("number of terms")
    ax.set_ylabel("max abs error")
    ax.set_title("(a) truncated series vs exact closed form")
    ax.set_xticks(TERMS)
    ax.legend(fontsize=7, ncol=2)
    if ncols == 2:
        ax = axes[0, 1]
        mc = result["monte_carlo"]
        colors = iter(["tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:red"])
        for name, g in mc["groups"].items():
            c = next(colors)
            ax.plot(
                TERMS,
                [fl(g["series_max_abs_error"][str(t)]) for t in TERMS],
                "o-",
                color=c,
                label=f"{name} (n={g['points']})",
            )
            ax.axhline(fl(g["exact_max_abs_error"]), color=c, ls=":", lw=1)
        ax.plot([], [], "k:", lw=1, label="exact value vs MC (MC floor)")
        ax.set_yscale("log")
        ax.set_xlabel("number of terms")
        ax.set_ylabel("max abs error")
        ax.set_title(f"(b) vs Monte Carlo ({mc['samples']:.0e} samples)")
        ax.set_xticks(TERMS)
        ax.legend(fontsize=7)
    fig.suptitle("Approximating Eq. (1): max abs error vs number of terms")
    save_figure(fig, args.out, "fig2")


def add_parser(subparsers) -> None:
    """Register `nm fig2`."""
    p = subparsers.add_parser(
        "fig2",
        help="Fig. 2: max abs error of Lemma 4's truncated series vs number of terms",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p, device=False)
    p.add_argument(
        "--stride",
        type=int,
        default=1,
        help="use every STRIDE-th μ and σ value of the grid (default 1: the full "
        "441,000-point grid; all ρ values are always kept)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="coarse smoke run: stride ≥ 4, ≤ 20 MC points with ≤ 20,000 samples, "
        "≤ 5 oracle check points",
    )
    p.add_argument(
        "--check-points",
        type=int,
        default=30,
        help="random grid points at which the exact kernel is checked against the "
        "mpmath oracle by `nmgen check-points <out>/fig2_oracle_points.json` (default 30)",
    )
    p.add_argument(
        "--mc-points",
        type=int,
        default=200,
        help="Monte Carlo points on the paper's grid, stratified over its 10 ρ values "
        "(the same number per ρ is added for the ±1/√2 rows; 0 disables; default 200)",
    )
    p.add_argument(
        "--mc-samples",
        type=int,
        default=1_000_000,
        help="Monte Carlo samples per point (default 10^6, as in the paper)",
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=1 << 16,
        help="points per kernel call (memory bound; default 65536)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads (default 0: leave torch's default)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run_fig2)
