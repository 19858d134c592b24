"""Tightness of the network moments on LeNet (paper, Section 4.2, Tables 1-4) and per layer.

Subcommands (each writes ``<out>/<name>.json``, ``<out>/<name>.md`` and ``<out>/<name>.png``):

* ``nm table1``: ℓ2 distance between LeNet and its two-stage linearization, for every ReLU
  index l. For a test image M and a noise level σ the network is linearized at the noisy point
  x0 = M + σ ε0; it is then compared with LeNet at ``--points`` other noisy inputs
  x_k = M + σ ε_k (ε ~ N(0, I), seeded). Reported: mean ± std over images and points of
  ‖R(x_k) − g(x_k)‖₂ (logits) and of the relative ‖R(x_k) − g(x_k)‖₂ / ‖R(x_k)‖₂.
* ``nm table2``: input x ~ N(M, Σ), M a test image, Σ a random SPD matrix with
  trace(Σ) = σ²·784 (:func:`random_spd_cov`); linearize at M around the last ReLU (l = 3 of
  the paper, ``relu_index=-1``). E_r(x, y) = 2|x − y|/(|x| + |y|) of the analytic mean
  (Theorem 1), the old variance (Theorem 2, method ``zero_mean``), the new variance (Lemma 4
  truncated to 5 terms, method ``series``) and our exact variance (method ``exact``), each
  against Monte Carlo with ``--samples`` forward passes of the real LeNet; mean ± std over all
  images and the 10 outputs. The MC self-noise is E_r between two MC runs with other seeds.
* ``nm table3``: histograms of the LeNet output variances (MC, Theorem 2, exact; one panel per σ).
* ``nm table4``: linearization points from k-means (``sklearn.cluster.KMeans``, seeded) fitted
  on all test images; each evaluated image uses the linearization at its nearest (own) cluster
  centre; baseline ``k*``: the member farthest from its centre is the linearization point.
* ``nm layers``: the Table 2 metrics at every ReLU index plus the cost of the analytic moments
  (linearization included) against Monte Carlo.

The analytic moments are computed in float64 from the float32 linearization; the Monte Carlo
forward passes are float32.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from torchbridge.data import mnist
from torchbridge.experiments.common import (
    add_common_args,
    markdown_table,
    relative_difference,
    save_figure,
    write_json,
    write_markdown,
)
from torchbridge.experiments.records import RecordStore
from torchbridge.linearize import relu_layers, two_stage_linearize
from torchbridge.models import trained_lenet
from torchbridge.montecarlo import monte_carlo_moments
from torchbridge.network import AffineReLUAffine

SIGMAS = (0.001, 0.01, 0.05, 0.1)
METHODS = ("zero_mean", "series", "exact")
#: Kernel each method needs in ``nmgen.generated.torch_kernels``.
KERNELS = {
    "zero_mean": "relu_cross_moment_zero_mean",
    "series": "relu_cross_moment_series",
    "exact": "relu_cross_moment",
}
#: Column titles of the metrics (keys of :func:`summarize`).
TITLES = {
    "mean": "E_r mean (Thm 1)",
    "zero_mean": "E_r var: Thm 2 with the mean ignored (paper's old)",
    "series": "E_r var: Lemma 4, 5 terms (paper's new)",
    "exact": "E_r var: exact (ours)",
    "mc_mean": "MC self-noise, mean",
    "mc_var": "MC self-noise, var",
}
#: The paper's Table 2 as far as its text states it (the table body is not in the text):
#: "at σ = 0.05 ... E[E_error] ≈ 0.11 ... E[var_error] ≈ 0.19 ... [new] ≈ 0.07", averaged
#: over the 10,000 MNIST test images.
PAPER_TABLE2 = {0.05: {"mean": "≈0.11", "zero_mean": "≈0.19", "series": "≈0.07"}}
#: The paper's Table 4 (mean ± std, as printed; k-means on the 10,000 MNIST test images),
#: keyed by σ and k as a fraction of the clustered images ("*": farthest-member baseline).
PAPER_TABLE4 = {
    0.001: {
        "2.5%": ("0.524 ± 0.594", "0.282 ± 0.207", "0.205 ± 0.170"),
        "2.5%*": ("0.846 ± 0.688", "0.293 ± 0.220", "0.303 ± 0.238"),
        "5%": ("0.474 ± 0.572", "0.269 ± 0.195", "0.194 ± 0.157"),
        "5%*": ("0.766 ± 0.684", "0.277 ± 0.206", "0.276 ± 0.221"),
        "10%": ("0.414 ± 0.541", "0.260 ± 0.191", "0.185 ± 0.152"),
        "25%": ("0.315 ± 0.481", "0.241 ± 0.175", "0.165 ± 0.134"),
        "50%": ("0.194 ± 0.387", "0.224 ± 0.163", "0.140 ± 0.115"),
        "100%": ("0.003 ± 0.027", "0.200 ± 0.142", "0.100 ± 0.078"),
    },
    0.01: {
        "2.5%": ("0.525 ± 0.596", "0.291 ± 0.209", "0.210 ± 0.172"),
        "2.5%*": ("0.859 ± 0.694", "0.284 ± 0.210", "0.287 ± 0.232"),
        "5%": ("0.470 ± 0.569", "0.275 ± 0.202", "0.192 ± 0.163"),
        "5%*": ("0.763 ± 0.678", "0.275 ± 0.203", "0.259 ± 0.217"),
        "10%": ("0.411 ± 0.537", "0.263 ± 0.190", "0.174 ± 0.145"),
        "25%": ("0.313 ± 0.478", "0.243 ± 0.176", "0.143 ± 0.125"),
        "50%": ("0.198 ± 0.388", "0.227 ± 0.163", "0.101 ± 0.101"),
        "100%": ("0.023 ± 0.103", "0.203 ± 0.143", "0.025 ± 0.020"),
    },
    0.05: {
        "2.5%": ("0.516 ± 0.596", "0.263 ± 0.193", "0.193 ± 0.159"),
        "2.5%*": ("0.848 ± 0.689", "0.285 ± 0.214", "0.299 ± 0.238"),
        "5%": ("0.464 ± 0.572", "0.251 ± 0.184", "0.177 ± 0.149"),
        "5%*": ("0.761 ± 0.678", "0.268 ± 0.202", "0.270 ± 0.220"),
        "10%": ("0.405 ± 0.538", "0.242 ± 0.181", "0.163 ± 0.142"),
        "25%": ("0.312 ± 0.475", "0.226 ± 0.166", "0.138 ± 0.120"),
        "50%": ("0.216 ± 0.388", "0.211 ± 0.155", "0.110 ± 0.098"),
        "100%": ("0.109 ± 0.235", "0.192 ± 0.139", "0.070 ± 0.049"),
    },
    0.1: {
        "2.5%": ("0.507 ± 0.591", "0.240 ± 0.183", "0.192 ± 0.162"),
        "2.5%*": ("0.823 ± 0.688", "0.298 ± 0.220", "0.332 ± 0.250"),
        "5%": ("0.463 ± 0.567", "0.234 ± 0.175", "0.185 ± 0.153"),
        "5%*": ("0.751 ± 0.671", "0.290 ± 0.219", "0.315 ± 0.239"),
        "10%": ("0.412 ± 0.535", "0.226 ± 0.169", "0.177 ± 0.147"),
        "25%": ("0.337 ± 0.477", "0.218 ± 0.163", "0.165 ± 0.132"),
        "50%": ("0.268 ± 0.406", "0.208 ± 0.156", "0.158 ± 0.116"),
        "100%": ("0.205 ± 0.313", "0.196 ± 0.146", "0.153 ± 0.082"),
    },
}
#: Above this hidden width ``--dtype auto`` computes the analytic moments in float32.
PSD_CHECK_MAX = 4096
DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64}


def available_methods(requested: Sequence[str] = METHODS) -> tuple[list[str], list[str]]:
    """Split ``requested`` into (methods whose kernel is generated, methods skipped)."""
    from nmgen.generated import torch_kernels

    ok = [m for m in requested if hasattr(torch_kernels, KERNELS[m])]
    return ok, [m for m in requested if m not in ok]


def random_spd_cov(
    n: int, sigma: float, seed: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Random SPD (n, n) matrix with trace σ²·n: Σ = Q diag(λ) Qᵀ.

    Q is Haar-orthogonal (QR of an N(0, 1) matrix, column signs fixed by diag(R)) and
    λ_i ~ U(0.1, 1) rescaled to sum σ²·n (condition number ≤ 10), all drawn from a
    ``torch.Generator`` seeded with ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    lam = 0.1 + 0.9 * torch.rand(n, generator=gen, dtype=torch.float64)
    lam = lam * (sigma**2 * n / lam.sum())
    cov = (q * lam) @ q.T
    return ((cov + cov.T) / 2).to(dtype)


def as_dtype(g: AffineReLUAffine, dtype: torch.dtype | None = torch.float64) -> AffineReLUAffine:
    """A copy of ``g`` in ``dtype``; None: float64 if q <= PSD_CHECK_MAX else float32."""
    if dtype is None:
        dtype = torch.float64 if g.hidden_features <= PSD_CHECK_MAX else torch.float32
    return AffineReLUAffine(g.A.to(dtype), g.c1.to(dtype), g.B.to(dtype), g.c2.to(dtype))


def analytic_moments(
    g: AffineReLUAffine,
    mean: torch.Tensor,
    cov: torch.Tensor | float,
    methods: Sequence[str],
    terms: int = 5,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """Theorem 1 mean and the variance of every method in ``g``'s dtype, with timings (s).

    ``mean`` is flattened to (n,) and, like ``cov`` (a full (n, n) matrix or a number), cast to
    ``g``'s dtype; the input Σ is checked (symmetric, PSD) as ``g.moments`` does.
    """
    mean = torch.as_tensor(mean).reshape(-1).to(g.A)
    cov = torch.as_tensor(cov).to(g.A)
    kind = "iso" if cov.ndim == 0 else "full"
    out_mean, var, secs = None, {}, {}
    for m in methods:
        t = time.perf_counter()
        mu, v = g.moments(mean, cov, method=m, terms=terms, cov_kind=kind)
        secs[m] = time.perf_counter() - t
        out_mean = mu if out_mean is None else out_mean
        var[m] = v.cpu().numpy()
    assert out_mean is not None, "no method given"
    return out_mean.cpu().numpy(), var, secs


def mc_moments(
    model: nn.Module, x: torch.Tensor, cov: torch.Tensor | float, samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo mean and variance of ``model`` (float32 forward passes) at N(x, cov)."""
    mu, var = monte_carlo_moments(model, x, cov, samples=samples, seed=seed, batch_size=1000)
    return mu.double().cpu().numpy(), var.double().cpu().numpy()


def er(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """E_r of the paper, elementwise (numpy wrapper of ``relative_difference``)."""
    return relative_difference(torch.as_tensor(x), torch.as_tensor(y)).numpy()


def record_errors(rec: dict) -> dict[str, np.ndarray]:
    """E_r arrays (d,) of one (image, σ) record holding analytic and MC moments."""
    errs = {"mean": er(rec["mean"], rec["mc_mean"])}
    for m, v in rec["var"].items():
        errs[m] = er(v, rec["mc_var"])
    if "mc2_mean" in rec:
        errs["mc_mean"] = er(rec["mc2_mean"], rec["mc_mean"])
        errs["mc_var"] = er(rec["mc2_var"], rec["mc_var"])
    return errs


class ErStats(NamedTuple):
    """E_r of one metric over a set of (image, σ) records.

    ``mean``: mean over images of each image's E_r averaged over its d outputs; ``se``: the
    standard error of that mean over images (sample std with ddof = 1 over √images; 0 for
    one image); ``spread``: std of E_r over all (image, output) pairs (the per-output spread,
    what the paper's "±" reports); ``images``: how many images the metric has.
    """

    mean: float
    se: float
    spread: float
    images: int


def summarize(records: Sequence[dict]) -> dict[str, ErStats]:
    """:class:`ErStats` per metric over ``records`` (one record per image)."""
    errs = [record_errors(r) for r in records]
    out = {}
    for k in (k for k in TITLES if any(k in e for e in errs)):
        per_image = [e[k] for e in errs if k in e]
        means = np.array([float(np.mean(v)) for v in per_image])
        se = float(np.std(means, ddof=1) / np.sqrt(len(means))) if len(means) > 1 else 0.0
        spread = float(np.std(np.concatenate(per_image)))
        out[k] = ErStats(float(np.mean(means)), se, spread, len(means))
    return out


def pm(v: tuple[float, float]) -> str:
    """'a ± b' with 3 decimals (first two entries of ``v``: mean ± SE for :class:`ErStats`);
    a b below 0.0005 gets one significant digit instead of rounding to 0.000."""
    b = f"{v[1]:.1g}" if 0 < abs(v[1]) < 5e-4 else f"{v[1]:.3f}"
    return f"{v[0]:.3f} ± {b}"


def seed_for(seed: int, image: int, sigma_index: int = 0) -> int:
    """Deterministic, distinct seed per (run seed, image index, σ index)."""
    return seed * 1_000_003 + 7919 * image + 131 * sigma_index


#: Offset of the seed of the second Monte Carlo run (the MC self-noise).
MC_NOISE_OFFSET = 500_009


def mc_seed(seed: int, image: int, sigma: float) -> int:
    """Seed of the Monte Carlo run of test image ``image`` at noise level ``sigma``.

    Keyed by the σ value (in units of 1e-6), not its position in ``--sigmas``, so Table 2 and
    Table 4 run the same Monte Carlo for the same (image, σ) and Table 4 can reuse Table 2's.
    """
    return seed_for(seed, image, round(sigma * 1_000_000)) + 1


def _tolist(rec: dict) -> dict:
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out[k] = _tolist(v)
        elif isinstance(v, np.ndarray):
            out[k] = v.tolist()
        else:
            out[k] = v
    return out


def _setup(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(args.seed)
    model = trained_lenet().to(args.device).eval()
    _, _, test_x, test_y = mnist()
    return model, test_x.to(args.device), test_y


def _methods(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    methods, skipped = available_methods(args.methods)
    for m in skipped:
        print(f"note: method {m!r} skipped: kernel {KERNELS[m]} is not generated yet")
    if not methods:
        raise SystemExit("no moment method available")
    return methods, skipped


def tightness_records(
    model: nn.Module,
    images: torch.Tensor,
    sigmas: Sequence[float],
    methods: Sequence[str],
    *,
    samples: int = 10_000,
    seed: int = 0,
    relu_index: int = -1,
    mc_noise: bool | int = True,
    terms: int = 5,
    dtype: torch.dtype | None = torch.float64,
    desc: str = "tightness",
    store: RecordStore | None = None,
) -> list[dict]:
    """One record per (image, σ): analytic (linearized at the image) and MC moments.

    Σ = :func:`random_spd_cov` (seed per image; the same pattern scaled for every σ).
    Each record has keys image, sigma, mean, var{method}, mc_mean, mc_var (and mc2_* for the
    self-noise: every image when ``mc_noise`` is True, the first ``mc_noise`` images when it is
    an int), and timings ``t_lin``, ``t_moments{method}``, ``t_mc``.
    The analytic moments are computed in ``dtype`` (see :func:`as_dtype`). With a ``store``
    each record is saved as soon as it is computed, and records already in it (keyed by
    image and σ) are reused, not recomputed.
    """
    from tqdm.auto import tqdm

    n = images[0].numel()
    records = []
    bar = tqdm(total=len(images) * len(sigmas), desc=desc)
    for i, x in enumerate(images):
        done = {s: store.get(i, s) for s in sigmas} if store is not None else {}
        if all(done.get(s) is not None for s in sigmas):
            records += [done[s] for s in sigmas]
            bar.update(len(sigmas))
            continue
        t = time.perf_counter()
        g = as_dtype(two_stage_linearize(model, x, relu_index), dtype)
        t_lin = time.perf_counter() - t
        base = random_spd_cov(n, 1.0, seed_for(seed, i))
        for sigma in sigmas:
            if done.get(sigma) is not None:
                records.append(done[sigma])
                bar.update(1)
                continue
            cov = base * sigma**2
            mean, var, secs = analytic_moments(g, x, cov.to(x.device), methods, terms)
            seed_i = mc_seed(seed, i, sigma)
            t = time.perf_counter()
            mc_mean, mc_var = mc_moments(model, x, cov.to(x.device), samples, seed_i)
            rec = {
                "image": i,
                "sigma": sigma,
                "mean": mean,
                "var": var,
                "mc_mean": mc_mean,
                "mc_var": mc_var,
                "t_lin": t_lin,
                "t_moments": secs,
                "t_mc": time.perf_counter() - t,
            }
            if mc_noise is True or (mc_noise is not False and i < mc_noise):
                rec["mc2_mean"], rec["mc2_var"] = mc_moments(
                    model, x, cov.to(x.device), samples, seed_i + MC_NOISE_OFFSET
                )
            if store is not None:
                store.add(rec)
            records.append(rec)
            bar.update(1)
    bar.close()
    return records


def tightness_rows(
    records: Sequence[dict], sigmas: Sequence[float], keys: Sequence[str]
) -> tuple[list[list], dict[str, dict]]:
    """Markdown rows (σ, images, metric mean ± SE ...) and a JSON summary per σ."""
    rows, summary = [], {}
    for sigma in sigmas:
        s = summarize([r for r in records if r["sigma"] == sigma])
        summary[str(sigma)] = {k: v._asdict() for k, v in s.items()}
        n = max((v.images for v in s.values()), default=0)
        rows.append([f"{sigma:g}", n] + [pm(s[k]) if k in s else "n/a" for k in keys])
    return rows, summary


def spread_rows(
    summary: dict[str, dict], keys: Sequence[str], lead: Sequence[str] = ()
) -> list[list]:
    """Rows of the per-output spread (std over image × output pairs) of a summary per σ."""
    return [
        [*lead, sig] + [f"{s[k]['spread']:.3f}" if k in s else "n/a" for k in keys]
        for sig, s in summary.items()
    ]


ER_NOTE = (
    "E_r(x, y) = 2|x − y|/(|x| + |y|) against Monte Carlo of the real LeNet. Each cell: mean "
    "over images of the image's E_r averaged over the 10 outputs ± its standard error over "
    "images (std with ddof 1 / √images); the per-output spread (std of E_r over all "
    "image × output pairs, what the paper's ± reports) is in the second table. \"Thm 2 with "
    'the mean ignored" is the paper\'s "old" variance: Theorem 2 evaluated as if the input '
    "mean and c1 were 0, i.e. the variance of relu(z − E z), not of relu(z). MC self-noise: E_r "
    "between two Monte Carlo runs with different seeds (the noise floor of every E_r column; "
    "two noisy runs, so about √2 × the noise of one)."
)


def _er_figure(summary: dict[str, dict], keys: Sequence[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sig = list(summary)
    width = 0.8 / max(1, len(keys))
    for j, k in enumerate(keys):
        vals = [summary[s].get(k, {"mean": np.nan, "se": 0.0}) for s in sig]
        ax.bar(
            np.arange(len(sig)) + j * width,
            [v["mean"] for v in vals],
            width,
            yerr=[v["se"] for v in vals],
            capsize=2,
            label=TITLES[k],
        )
    ax.set_xticks(np.arange(len(sig)) + 0.4 - width / 2, [f"σ={s}" for s in sig])
    ax.set_ylabel("E_r (bars: mean over images ± SE)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def command_line(args: argparse.Namespace) -> str:
    """The `nm` command line that reproduces ``args`` (every option spelled out)."""
    bench = getattr(args, "bench", None)
    parts = ["nm"] + (["bench", bench] if bench else [getattr(args, "command", "?")])
    for key, val in sorted(vars(args).items()):
        if key in ("command", "bench", "func") or val is None or val is False:
            continue
        flag = "--" + key.replace("_", "-")
        if val is True:
            parts.append(flag)
        elif isinstance(val, (list, tuple)):
            parts += [flag, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in val)]
        else:
            parts += [flag, str(val)]
    return " ".join(parts)


_command = command_line


# --------------------------------------------------------------------------- table 1
def run_table1(args: argparse.Namespace) -> dict:
    """ℓ2 gap between LeNet and its two-stage linearization for every ReLU index (Table 1)."""
    from tqdm.auto import tqdm

    model, test_x, _ = _setup(args)
    relus = list(range(len(relu_layers(model)))) if args.relus is None else args.relus
    images = test_x[: args.images]
    gen = torch.Generator().manual_seed(args.seed)
    res: dict[int, dict[float, dict[str, list[float]]]] = {
        r: {s: {"l2": [], "rel": []} for s in args.sigmas} for r in relus
    }
    q = {}
    bar = tqdm(total=len(images) * len(args.sigmas) * len(relus), desc="table1")
    for x in images:
        for sigma in args.sigmas:
            eps = torch.randn(args.points + 1, *x.shape, generator=gen).to(x)
            x0, xs = x + sigma * eps[0], x + sigma * eps[1:]
            with torch.no_grad():
                ref = model(xs)
            for r in relus:
                g = two_stage_linearize(model, x0, r)
                q[r] = g.hidden_features
                with torch.no_grad():
                    diff = (ref - g(xs.reshape(len(xs), -1))).norm(dim=1)
                res[r][sigma]["l2"] += diff.tolist()
                res[r][sigma]["rel"] += (diff / ref.norm(dim=1)).tolist()
                bar.update(1)
    bar.close()
    headers = ["l (paper)", "relu_index", "q"] + [f"σ={s:g}" for s in args.sigmas]
    rows, rel_rows, summary = [], [], {}
    for r in relus:
        stats = {
            s: {k: (float(np.mean(v)), float(np.std(v))) for k, v in res[r][s].items()}
            for s in args.sigmas
        }
        summary[str(r)] = {"q": q[r], **{str(s): stats[s] for s in args.sigmas}}
        rows.append([r + 1, r, q[r]] + [pm(stats[s]["l2"]) for s in args.sigmas])
        rel_rows.append([r + 1, r, q[r]] + [pm(stats[s]["rel"]) for s in args.sigmas])
    md = (
        f"# Table 1: two-stage linearization error of LeNet\n\nCommand: `{_command(args)}`\n\n"
        f"Linearized at x0 = M + σ ε0 for {len(images)} test images M; compared at "
        f"{args.points} other inputs x_k = M + σ ε_k. ‖R(x_k) − g(x_k)‖₂ of the 10 logits, "
        "mean ± std over images and points:\n\n"
        + markdown_table(headers, rows)
        + "\n\nRelative ‖R(x_k) − g(x_k)‖₂ / ‖R(x_k)‖₂:\n\n"
        + markdown_table(headers, rel_rows)
    )
    out = {
        "command": _command(args),
        "images": len(images),
        "points": args.points,
        "sigmas": list(args.sigmas),
        "results": summary,
    }
    _finish(args, "table1", out, md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in relus:
        ax.errorbar(
            args.sigmas,
            [summary[str(r)][str(s)]["l2"][0] for s in args.sigmas],
            yerr=[summary[str(r)][str(s)]["l2"][1] for s in args.sigmas],
            marker="o",
            capsize=3,
            label=f"l = {r + 1} (q = {q[r]})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("input noise σ")
    ax.set_ylabel("‖LeNet − linearized‖₂")
    ax.set_title("Table 1: linearization error per ReLU layer")
    ax.legend()
    save_figure(fig, args.out, "table1")
    return out


# --------------------------------------------------------------------------- table 2
def _settings(args: argparse.Namespace, methods: Sequence[str]) -> dict:
    """What a Table 2 / Table 4 record depends on besides (image, σ): checked on reuse."""
    return {
        "samples": args.samples,
        "seed": args.seed,
        "relu_index": args.relu_index,
        "methods": list(methods),
        "terms": 5,
        "analytic_dtype": "float64",
    }


def run_table2(args: argparse.Namespace) -> dict:
    """Tightness of mean / old / new / exact variance on LeNet at l = 3 (Table 2)."""
    model, test_x, _ = _setup(args)
    methods, skipped = _methods(args)
    images = test_x[: args.images]
    recs = tightness_records(
        model,
        images,
        args.sigmas,
        methods,
        samples=args.samples,
        seed=args.seed,
        relu_index=args.relu_index,
        mc_noise=True if args.mc_noise_images is None else args.mc_noise_images,
        desc="table2",
        store=RecordStore(args.records, _settings(args, methods), ("image", "sigma")),
    )
    keys = ["mean"] + [m for m in METHODS if m in methods] + ["mc_mean", "mc_var"]
    rows, summary = tightness_rows(recs, args.sigmas, keys)
    headers, table = ["σ", "images"], []
    for row, sigma in zip(rows, args.sigmas, strict=True):
        paper = PAPER_TABLE2.get(sigma, {})
        cells = row[:2]
        for k, cell in zip(keys, row[2:], strict=True):
            cells.append(cell)
            if k in ("mean", "zero_mean", "series"):
                cells.append(paper.get(k, "n/a"))
        table.append(cells)
    for k in keys:
        headers.append(TITLES[k])
        if k in ("mean", "zero_mean", "series"):
            headers.append("paper")
    n_noise = sum(1 for r in recs if "mc2_var" in r and r["sigma"] == args.sigmas[0])
    md = (
        f"# Table 2: tightness on LeNet (relu_index {args.relu_index})\n\n"
        f"Command: `{_command(args)}`\n\n{len(images)} test images, Σ random SPD with trace "
        f"σ²·784, Monte Carlo {args.samples} samples; MC self-noise on the first {n_noise} "
        f'images. {ER_NOTE} "paper": the values the paper\'s text states (10,000 test '
        "images; the table body itself is not in the text).\n\n"
        + markdown_table(headers, table)
        + "\n\nPer-output spread (std of E_r over all image × output pairs):\n\n"
        + markdown_table(["σ"] + [TITLES[k] for k in keys], spread_rows(summary, keys))
        + (f"\n\nSkipped methods (kernel missing): {', '.join(skipped)}" if skipped else "")
    )
    out = {
        "command": _command(args),
        "images": len(images),
        "samples": args.samples,
        "relu_index": args.relu_index,
        "methods": methods,
        "skipped": skipped,
        "summary": summary,
        "records": [_tolist(r) for r in recs],
    }
    _finish(args, "table2", out, md)
    save_figure(_er_figure(summary, keys, "Table 2: E_r vs Monte Carlo"), args.out, "table2")
    return out


# --------------------------------------------------------------------------- table 3
def run_table3(args: argparse.Namespace) -> dict:
    """Histograms of LeNet output variances: MC vs Theorem 2 vs exact (Table 3)."""
    import json

    if args.reuse is not None:
        data = json.loads(Path(args.reuse).read_text())
        recs = [
            {
                **r,
                "mean": np.array(r["mean"]),
                "mc_mean": np.array(r["mc_mean"]),
                "mc_var": np.array(r["mc_var"]),
                "var": {k: np.array(v) for k, v in r["var"].items()},
            }
            for r in data["records"]
        ]
        sigmas = sorted({r["sigma"] for r in recs})
        methods = [m for m in METHODS if m in recs[0]["var"]]
        n_images = data["images"]
    else:
        model, test_x, _ = _setup(args)
        methods, _ = _methods(args)
        sigmas = args.sigmas
        n_images = args.images
        recs = tightness_records(
            model,
            test_x[: args.images],
            sigmas,
            methods,
            samples=args.samples,
            seed=args.seed,
            mc_noise=False,
            desc="table3",
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sigmas), figsize=(4 * len(sigmas), 3.5), squeeze=False)
    summary = {}
    for ax, sigma in zip(axes[0], sigmas, strict=True):
        rs = [r for r in recs if r["sigma"] == sigma]
        mc = np.concatenate([r["mc_var"] for r in rs])
        series = {"Monte Carlo": mc}
        s = summarize(rs)
        for m, label in (
            ("zero_mean", "Thm 2 (old)"),
            ("series", "Lemma 4, 5 terms"),
            ("exact", "exact (ours)"),
        ):
            if m in methods:
                series[f"{label}, E_r={s[m][0]:.3f}"] = np.concatenate([r["var"][m] for r in rs])
        logs = {k: np.log10(np.maximum(v, 1e-30)) for k, v in series.items()}
        lo = min(v.min() for v in logs.values())
        hi = max(v.max() for v in logs.values())
        bins = np.linspace(lo, hi + 1e-9, 30)
        for k, v in logs.items():
            ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=k)
        ax.set_title(f"σ = {sigma:g}")
        ax.set_xlabel("log10 output variance")
        ax.legend(fontsize=6)
        summary[str(sigma)] = {k: v._asdict() for k, v in s.items()}
    axes[0][0].set_ylabel("count (images × outputs)")
    save_figure(fig, args.out, "table3")
    keys = ["mean"] + [m for m in METHODS if m in methods]
    rows, _ = tightness_rows(recs, sigmas, keys)
    md = (
        f"# Table 3: LeNet output-variance histograms\n\nCommand: `{_command(args)}`\n\n"
        f"{n_images} images; histograms in table3.png. E_r (legend values; mean over images "
        "± standard error):\n\n" + markdown_table(["σ", "images"] + [TITLES[k] for k in keys], rows)
    )
    out = {
        "command": _command(args),
        "images": n_images,
        "summary": summary,
        "variances": {
            str(s): {
                "mc": np.concatenate([r["mc_var"] for r in recs if r["sigma"] == s]).tolist(),
                **{
                    m: np.concatenate([r["var"][m] for r in recs if r["sigma"] == s]).tolist()
                    for m in methods
                },
            }
            for s in sigmas
        },
    }
    _finish(args, "table3", out, md)
    return out


# --------------------------------------------------------------------------- table 4
def kmeans_points(data: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres (k, n), labels (N,), farthest member index per cluster (k,)) of k-means."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(data)
    centres, labels = km.cluster_centers_, km.labels_
    far = np.zeros(k, dtype=np.int64)
    dist = np.linalg.norm(data - centres[labels], axis=1)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        far[c] = members[np.argmax(dist[members])] if members.size else -1
    return centres, labels, far


def _mc_from_records(path: Path | None, samples: int, seed: int) -> dict[tuple, tuple]:
    """(image, σ) -> (mc_mean, mc_var) from a Table 2 ``--records`` file with the same Monte
    Carlo settings (samples, seed; :func:`mc_seed` makes the runs identical); {} for None."""
    if path is None:
        return {}
    settings, recs = RecordStore.read(path)
    if settings.get("samples") != samples or settings.get("seed") != seed:
        raise SystemExit(
            f"{path} has Monte Carlo samples={settings.get('samples')}, seed="
            f"{settings.get('seed')}; this run needs samples={samples}, seed={seed}"
        )
    return {(r["image"], r["sigma"]): (r["mc_mean"], r["mc_var"]) for r in recs}


def _paper_k(k: int, pool: int, farthest: bool) -> str:
    """k as a fraction of the clustered images, the key of :data:`PAPER_TABLE4`."""
    return f"{100 * k / pool:g}%" + ("*" if farthest else "")


def run_table4(args: argparse.Namespace) -> dict:
    """Tightness with linearization at k-means centres and at the farthest member (Table 4)."""
    from tqdm.auto import tqdm

    model, test_x, _ = _setup(args)
    methods, skipped = _methods(args)
    pool = test_x[: args.pool]
    flat = pool.reshape(len(pool), -1).double().cpu().numpy()
    n_eval = min(args.images, len(pool))
    shape = pool.shape[1:]
    configs: list[tuple[str, int, np.ndarray]] = []  # (label, k, lin point per eval image)
    for k in tqdm(args.ks, desc="k-means"):
        k = min(k, len(pool))
        centres, labels, far = kmeans_points(flat, k, args.seed)
        configs.append((str(k), k, centres[labels[:n_eval]]))
        if k in args.farthest:
            configs.append((f"{k}*", k, flat[far[labels[:n_eval]]]))
    n = flat.shape[1]
    settings = {**_settings(args, methods), "pool": len(pool), "ks": [c[0] for c in configs]}
    store = RecordStore(args.records, settings, ("config", "image", "sigma"))
    reused = _mc_from_records(args.mc_records, args.samples, args.seed)
    n_reused = 0
    # image-major: a run cut by a timeout has every configuration for the images it did
    bar = tqdm(total=len(configs) * n_eval, desc="table4")
    for i in range(n_eval):
        base = random_spd_cov(n, 1.0, seed_for(args.seed, i))
        mc: dict[float, tuple] = {}
        for label, _, points in configs:
            todo = [s for s in args.sigmas if store.get(label, i, s) is None]
            if not todo:
                bar.update(1)
                continue
            x0 = torch.as_tensor(points[i], dtype=pool.dtype, device=pool.device).reshape(shape)
            g = as_dtype(two_stage_linearize(model, x0, args.relu_index))
            for sigma in todo:
                cov = (base * sigma**2).to(pool.device)
                if sigma not in mc:  # Monte Carlo of the real LeNet: once per (image, σ)
                    if (i, sigma) in reused:
                        mc[sigma] = reused[i, sigma]
                        n_reused += 1
                    else:
                        seed_i = mc_seed(args.seed, i, sigma)
                        mc[sigma] = mc_moments(model, pool[i], cov, args.samples, seed_i)
                mean, var, _ = analytic_moments(g, pool[i], cov, methods)
                rec = {"config": label, "image": i, "sigma": sigma, "mean": mean, "var": var}
                store.add({**rec, "mc_mean": mc[sigma][0], "mc_var": mc[sigma][1]})
            bar.update(1)
    bar.close()
    keys = ["mean"] + [m for m in METHODS if m in methods]
    # the paper's columns: mean, old, new (its 5-term series); without "series" run, its "new"
    # goes beside our exact variance (Table 2: the two agree to ~1e-3 relative on LeNet)
    new_key = "series" if "series" in keys else "exact"
    paper_keys = ("mean", "zero_mean", new_key)
    headers = ["σ", "k", "k / pool", "images"]
    for key in keys:
        label = "paper (new)" if key == new_key == "exact" else "paper"
        headers += [TITLES[key]] + ([label] if key in paper_keys else [])
    rows, spread, summary = [], [], {}
    for sigma in args.sigmas:
        summary[str(sigma)] = {}
        for label, k, _ in configs:
            recs = [store.get(label, i, sigma) for i in range(n_eval)]
            st = summarize(recs)
            summary[str(sigma)][label] = {key: v._asdict() for key, v in st.items()}
            frac = _paper_k(k, len(pool), label.endswith("*"))
            paper = PAPER_TABLE4.get(sigma, {}).get(frac)
            row = [f"{sigma:g}", label, frac, st["mean"].images]
            for key in keys:
                row.append(pm(st[key]))
                if key in paper_keys:
                    row.append(paper[paper_keys.index(key)] if paper else "n/a")
            rows.append(row)
            spread.append([f"{sigma:g}", label] + [f"{st[key].spread:.3f}" for key in keys])
    md = (
        f"# Table 4: tightness vs number of linearization points k\n\n"
        f"Command: `{_command(args)}`\n\nk-means (n_init=1, seed {args.seed}) on {len(pool)} "
        f"test images; evaluated on the first {n_eval}; each uses the linearization at its "
        "cluster centre; `k*` = farthest member of the cluster as linearization point "
        f"(baseline). Monte Carlo {args.samples} samples"
        + (f" ({n_reused} (image, σ) runs reused from {args.mc_records})" if n_reused else "")
        + f'. {ER_NOTE.split(" MC self-noise")[0]} "paper": the paper\'s Table 4 at the same '
        "k / pool (it clusters the 10,000 MNIST test images; its ± is the spread, comparable "
        "with the second table, not a standard error).\n\n"
        + markdown_table(headers, rows)
        + "\n\nPer-output spread (std of E_r over all image × output pairs):\n\n"
        + markdown_table(["σ", "k"] + [TITLES[key] for key in keys], spread)
        + (f"\n\nSkipped methods (kernel missing): {', '.join(skipped)}" if skipped else "")
    )
    out = {
        "command": _command(args),
        "pool": len(pool),
        "images": n_eval,
        "samples": args.samples,
        "ks": [c[0] for c in configs],
        "methods": methods,
        "summary": summary,
    }
    _finish(args, "table4", out, md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    plain = [c[0] for c in configs if not c[0].endswith("*")]
    for ax, key in zip(axes[0], keys, strict=True):
        for sigma in args.sigmas:
            ax.plot(
                [int(c) for c in plain],
                [summary[str(sigma)][c][key]["mean"] for c in plain],
                marker="o",
                label=f"σ={sigma:g}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("k (linearization points)")
        ax.set_title(TITLES[key], fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, args.out, "table4")
    return out


# --------------------------------------------------------------------------- layers
def run_layers(args: argparse.Namespace) -> dict:
    """Table 2 metrics and analytic-vs-MC cost at every ReLU index of LeNet."""
    model, test_x, _ = _setup(args)
    methods, skipped = _methods(args)
    relus = list(range(len(relu_layers(model)))) if args.relus is None else args.relus
    images = test_x[: args.images]
    keys = ["mean"] + [m for m in METHODS if m in methods]
    rows, cost_rows, summary = [], [], {}
    for r in relus:
        recs = tightness_records(
            model,
            images,
            args.sigmas,
            methods,
            samples=args.samples,
            seed=args.seed,
            relu_index=r,
            mc_noise=False,
            dtype=DTYPES[args.dtype],
            desc=f"layers relu {r}",
        )
        g = two_stage_linearize(model, images[0], r)
        t_lin = float(np.median([x["t_lin"] for x in recs]))
        t_mc = float(np.median([x["t_mc"] for x in recs]))
        cost = {}
        for m in methods:
            t_m = float(np.median([x["t_moments"][m] for x in recs]))
            cost[m] = {
                "t_moments": t_m,
                "t_analytic": t_lin + t_m,
                "ratio_mc_over_analytic": t_mc / (t_lin + t_m),
            }
            cost_rows.append(
                [r + 1, r, g.hidden_features, m, t_lin, t_m, t_mc, t_mc / (t_lin + t_m)]
            )
        part, s = tightness_rows(recs, args.sigmas, keys)
        rows += [[r + 1, r, g.hidden_features, *row] for row in part]
        summary[str(r)] = {
            "q": g.hidden_features,
            "errors": s,
            "t_lin": t_lin,
            "t_mc": t_mc,
            "cost": cost,
        }
    md = (
        f"# Tightness and cost at every ReLU layer of LeNet\n\nCommand: `{_command(args)}`\n\n"
        f"{len(images)} test images, Σ random SPD (trace σ²·784), Monte Carlo {args.samples} "
        "samples.\n\n"
        + markdown_table(
            ["l (paper)", "relu_index", "q", "σ", "images"] + [TITLES[k] for k in keys], rows
        )
        + "\n\nCost per image and σ (median seconds; analytic = linearization + moments in "
        f"{args.dtype} (auto: float64 for q <= {PSD_CHECK_MAX}, else float32)):\n\n"
        + markdown_table(
            [
                "l (paper)",
                "relu_index",
                "q",
                "method",
                "linearize s",
                "moments s",
                "MC s",
                "MC / analytic",
            ],
            cost_rows,
        )
        + (f"\n\nSkipped methods (kernel missing): {', '.join(skipped)}" if skipped else "")
    )
    out = {
        "command": _command(args),
        "images": len(images),
        "samples": args.samples,
        "methods": methods,
        "results": summary,
    }
    _finish(args, "layers", out, md)
    fig = _er_figure(
        {f"l={int(r) + 1}": v["errors"][str(args.sigmas[0])] for r, v in summary.items()},
        keys,
        f"E_r per linearization layer (σ={args.sigmas[0]:g})",
    )
    save_figure(fig, args.out, "layers")
    return out


def _finish(args: argparse.Namespace, name: str, obj: dict, md: str) -> None:
    p = write_json(args.out, name, obj)
    write_markdown(args.out, name, md)
    print(md)
    print(f"\nwrote {p} and {Path(args.out) / (name + '.md')}")


# --------------------------------------------------------------------------- CLI
def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _methods_arg(s: str) -> list[str]:
    ms = [v for v in s.split(",") if v]
    bad = [m for m in ms if m not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {METHODS}")
    return ms


def add_parser(subparsers) -> None:
    """Register table1, table2, table3, table4 and layers."""

    def common(p: argparse.ArgumentParser, images: int, sigmas: Sequence[float]) -> None:
        add_common_args(p)
        p.add_argument(
            "--images", type=int, default=images, help=f"test images (default {images}; paper: all)"
        )
        p.add_argument(
            "--sigmas",
            type=_floats,
            default=list(sigmas),
            help="comma-separated noise standard deviations σ, in pixel units (images in [0, 1])",
        )

    def moment_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--samples",
            type=int,
            default=10_000,
            help="Monte Carlo samples (default 10000, as the paper)",
        )
        p.add_argument(
            "--methods",
            type=_methods_arg,
            default=list(METHODS),
            help="comma-separated variance methods (zero_mean,series,exact)",
        )

    p = subparsers.add_parser("table1", help="Table 1: linearization error per ReLU layer")
    common(p, 8, SIGMAS)
    p.add_argument("--points", type=int, default=20, help="noisy inputs compared per image")
    p.add_argument("--relus", type=_ints, default=None, help="ReLU indices (default all)")
    p.set_defaults(func=run_table1)

    p = subparsers.add_parser("table2", help="Table 2: tightness of mean and variances")
    common(p, 4, SIGMAS)
    moment_args(p)
    p.add_argument("--relu-index", type=int, default=-1, help="linearization ReLU (default -1)")
    p.add_argument(
        "--mc-noise-images",
        type=int,
        default=None,
        help="run the second Monte Carlo (other seed, for the MC self-noise columns) on the "
        "first N images only (default: every image; it doubles the Monte Carlo time)",
    )
    p.add_argument(
        "--records",
        type=Path,
        default=None,
        help="JSON-lines checkpoint (default: none): every (image, σ) record is appended as "
        "soon as it is computed, records already there are reused; a run cut by a timeout "
        "resumes, and the table of what finished is re-rendered by rerunning with --images "
        "set to the images done",
    )
    p.set_defaults(func=run_table2)

    p = subparsers.add_parser("table3", help="Table 3: output-variance histograms")
    common(p, 6, SIGMAS)
    moment_args(p)
    p.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="build the histograms from a table2.json instead of recomputing (default: recompute)",
    )
    p.set_defaults(func=run_table3)

    p = subparsers.add_parser("table4", help="Table 4: k-means linearization points")
    common(p, 4, (0.05, 0.1))
    moment_args(p)
    p.add_argument("--pool", type=int, default=1000, help="test images clustered (default 1000)")
    p.add_argument(
        "--ks", type=_ints, default=[25, 50, 100, 250, 1000], help="numbers of clusters k"
    )
    p.add_argument(
        "--farthest",
        type=_ints,
        default=[25, 50],
        help="k values that also get the farthest-member baseline",
    )
    p.add_argument("--relu-index", type=int, default=-1, help="linearization ReLU (default -1)")
    p.add_argument(
        "--records",
        type=Path,
        default=None,
        help="JSON-lines checkpoint of the (k, image, σ) records (default: none); records "
        "already there are reused",
    )
    p.add_argument(
        "--mc-records",
        type=Path,
        default=None,
        help="a `nm table2 --records` file with the same --samples and --seed: its Monte Carlo "
        "runs (the same seeds) are reused instead of recomputed (default: none)",
    )
    p.set_defaults(func=run_table4)

    p = subparsers.add_parser("layers", help="Table 2 metrics and cost at every ReLU layer")
    common(p, 1, (0.05,))
    moment_args(p)
    p.add_argument("--relus", type=_ints, default=None, help="ReLU indices (default all: 0, 1, 2)")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="auto",
        help="analytic dtype (auto: float64 for q <= 4096, else float32)",
    )
    p.set_defaults(func=run_layers)
