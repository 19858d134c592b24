"""`nm bench propagate`: layer-wise propagation vs two-stage linearization vs diagonal ADF,
against Monte Carlo, on an MLP, LeNet and a residual CNN (all trained on the MNIST subset).

Per model, noise level σ and held-out test image M (input N(M, σ²I), pixels in [0, 1]):

* ``propagate``: ``output_moments(..., method="propagate")`` (exact ReLU kernels, full
  covariance where the live tensors have at most ``--max-full`` units, diagonal-plus-low-rank
  before that: LeNet's convolution stages);
* ``propagate (fixed pool pairing)`` (``--methods``, not by default): the max-pooling pairs
  in reading order instead of the adaptive pairing (``PropagateOptions.pool_pairing``);
* ``propagate (approx. ReLU cov)``: the same with the benchmark-only approximate ReLU
  covariance (``torchbridge.propagate.approx``, a DVI-style cheap closed form);
* ``propagate (low-rank)``: the diagonal-plus-low-rank form in every layer (the
  bounded-memory option alone, O(q·n) memory);
* ``linearize``: two-stage linearization at the last ReLU (the paper's method);
* ``ADF (diagonal)``: variances only (Gast & Roth 2018);
* Monte Carlo with ``--samples`` samples (float32 forward passes), run as two independent halves: their pooled
  estimate is the reference, and E_r(half 1, half 2)/2 estimates MC's own noise (the E_r of
  an N-sample estimate against the truth; the halves differ by twice that).

E_r = 2|x − y|/(|x| + |y|), averaged over the 10 outputs and the images. Time per image: wall
time of one call (float64, ``--threads`` threads). Memory: the largest number of covariance
elements the method holds at once (propagation: ``OutputMoments.peak_elements``; linearization:
A (q × n) + B (d × q)) × 8 bytes, next to what one full covariance of the largest layer would
take.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import numpy as np
import torch

from torchbridge.data import mnist
from torchbridge.experiments.common import (
    add_common_args,
    markdown_table,
    relative_difference,
    write_json,
    write_markdown,
)
from torchbridge.experiments.tightness import command_line
from torchbridge.linearize import two_stage_linearize
from torchbridge.montecarlo import monte_carlo_moments
from torchbridge.output import output_moments
from torchbridge.propagate import PropagateOptions, trace
from torchbridge.propagate.lowering import Lowerer, commute_relu_max_pool

METHODS = (
    "propagate",
    "propagate-fixedpool",
    "propagate-approx",
    "propagate-lowrank",
    "linearize",
    "adf",
)
DEFAULT_METHODS = ("propagate", "propagate-approx", "propagate-lowrank", "linearize", "adf")
LABELS = {
    "propagate": "layer-wise propagation (exact kernels)",
    "propagate-fixedpool": "layer-wise, max-pool pairs in reading order",
    "propagate-approx": "layer-wise, approx. ReLU cov (DVI-style)",
    "propagate-lowrank": "layer-wise, diagonal-plus-low-rank everywhere",
    "linearize": "two-stage linearization (paper)",
    "adf": "layer-wise, diagonal only (ADF)",
    "mc": "Monte Carlo (time for all samples)",
}


def load_model(name: str) -> torch.nn.Module:
    """The cached trained model ``name`` ("mlp" | "lenet" | "rescnn"), float64, eval mode."""
    from torchbridge.extra_models import trained_mlp, trained_residual_cnn
    from torchbridge.models import trained_lenet

    loaders = {"mlp": trained_mlp, "lenet": trained_lenet, "rescnn": trained_residual_cnn}
    if name not in loaders:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(loaders)}")
    return loaders[name]().double().eval()


def _largest_layer(model: torch.nn.Module, x: torch.Tensor) -> int:
    lw = Lowerer(commute_relu_max_pool(trace(model)), None)
    lw.run(x, lambda s, nid: None)
    return max(lw.sizes)


def _run_method(method: str, model, x, var: float, max_full: int):
    t = time.perf_counter()
    if method == "linearize" and not isinstance(model, torch.nn.Sequential):
        out = output_moments(model, x, var, method="linearize", options=PropagateOptions())
        return out.mean[0], out.var[0], time.perf_counter() - t, out.peak_elements
    if method == "linearize":
        g = two_stage_linearize(model, x[0], -1)
        m, v = g.moments(x[0].reshape(-1), var)
        secs = time.perf_counter() - t
        return m, v, secs, g.A.numel() + g.B.numel()
    opts = {
        "propagate": PropagateOptions(max_full=max_full),
        "propagate-fixedpool": PropagateOptions(max_full=max_full, pool_pairing="fixed"),
        "propagate-approx": PropagateOptions(max_full=max_full, relu_method="approx"),
        "propagate-lowrank": PropagateOptions(covariance="lowrank"),
        "adf": PropagateOptions(covariance="diagonal"),
    }[method]
    out = output_moments(model, x, var, options=opts)
    return out.mean[0], out.var[0], time.perf_counter() - t, out.peak_elements


def _monte_carlo(model, x, var: float, samples: int, seed: int):
    """Two independent halves: pooled (mean, var) and the MC self-noise E_r estimates.
    ``model`` runs in float32 (statistics accumulate in float64)."""
    half = samples // 2
    t = time.perf_counter()
    x32 = x[0].float()
    m1, v1 = monte_carlo_moments(model, x32, var, samples=half, seed=seed)
    m2, v2 = monte_carlo_moments(model, x32, var, samples=half, seed=seed + 1)
    secs = time.perf_counter() - t
    m1, v1, m2, v2 = (t_.double() for t_ in (m1, v1, m2, v2))
    m = (m1 + m2) / 2
    v = ((half - 1) * (v1 + v2) + half / 2 * (m1 - m2) ** 2) / (2 * half - 1)
    noise_m = float(relative_difference(m1, m2).mean()) / 2
    noise_v = float(relative_difference(v1, v2).mean()) / 2
    return m, v, secs, noise_m, noise_v


def run_bench(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    _, _, test_x, _ = mnist()
    images = test_x[args.first_image : args.first_image + args.images].double()
    report: dict = {"command": command_line(args), "models": {}}
    md = [
        "# Layer-wise propagation vs two-stage linearization vs ADF (E_r vs Monte Carlo)",
        f"Command: `{report['command']}`",
    ]
    total = len(args.models) * len(args.sigmas) * len(images)
    bar = tqdm(total=total, desc="bench propagate", leave=False)
    for name in args.models:
        model = load_model(name)
        model32 = copy.deepcopy(model).float()
        largest = _largest_layer(model, images[:1])
        rec: dict = {"largest_layer": largest, "sigmas": {}}
        for si, sigma in enumerate(args.sigmas):
            var = sigma**2
            cell = {
                m: {"er_mean": [], "er_var": [], "seconds": [], "elements": []}
                for m in args.methods
            }
            cell["mc"] = {"noise_mean": [], "noise_var": [], "seconds": []}
            for i, x in enumerate(images):
                x = x[None]
                mc_m, mc_v, mc_s, nm_, nv_ = _monte_carlo(
                    model32, x, var, args.samples, args.seed + 1000 * si + 2 * i
                )
                cell["mc"]["noise_mean"].append(nm_)
                cell["mc"]["noise_var"].append(nv_)
                cell["mc"]["seconds"].append(mc_s)
                for meth in args.methods:
                    m, v, secs, elems = _run_method(meth, model, x, var, args.max_full)
                    c = cell[meth]
                    c["er_mean"].append(float(relative_difference(m, mc_m).mean()))
                    c["er_var"].append(float(relative_difference(v, mc_v).mean()))
                    c["seconds"].append(secs)
                    c["elements"].append(elems)
                bar.update(1)
            rec["sigmas"][f"{sigma:g}"] = cell
        report["models"][name] = rec
        md.append(_model_table(name, rec, args))
    bar.close()
    report["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    md.append(f"Process peak RSS: {report['max_rss_mib']:.0f} MiB.")
    write_json(args.out, "bench_propagate", report)
    write_markdown(args.out, "bench_propagate", "\n\n".join(md))
    print("\n\n".join(md))
    return report


def _model_table(name: str, rec: dict, args: argparse.Namespace) -> str:
    sig = list(rec["sigmas"])
    headers = (
        ["method"]
        + [f"var E_r σ={s}" for s in sig]
        + [f"mean E_r σ={s}" for s in sig]
        + ["s / image", "peak cov. MiB"]
    )
    rows = []
    for meth in args.methods:
        cells = [rec["sigmas"][s][meth] for s in sig]
        rows.append(
            [LABELS[meth]]
            + [float(np.mean(c["er_var"])) for c in cells]
            + [float(np.mean(c["er_mean"])) for c in cells]
            + [
                float(np.mean([t for c in cells for t in c["seconds"]])),
                float(max(e for c in cells for e in c["elements"]) * 8 / 2**20),
            ]
        )
    mc = [rec["sigmas"][s]["mc"] for s in sig]
    rows.append(
        [f"MC {args.samples:g}: its own noise"]
        + [float(np.mean(c["noise_var"])) for c in mc]
        + [float(np.mean(c["noise_mean"])) for c in mc]
        + [float(np.mean([t for c in mc for t in c["seconds"]])), 0.0]
    )
    q = rec["largest_layer"]
    return (
        f"## {name} ({args.images} test images from #{args.first_image}, input N(M, σ²I))\n\n"
        + markdown_table(headers, rows)
        + f"\n\nLargest layer: q = {q}; one full q×q float64 covariance would take "
        f"{q * q * 8 / 2**20:.0f} MiB (computed, not run)."
    )


def _methods(s: str) -> list[str]:
    out = [v for v in s.split(",") if v]
    bad = [v for v in out if v not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {METHODS}")
    return out


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def add_bench_parser(bench_subparsers) -> None:
    """Register `nm bench propagate`."""
    p = bench_subparsers.add_parser(
        "propagate",
        help="layer-wise propagation vs linearization vs ADF, E_r vs Monte Carlo, timed",
        description=__doc__.split("\n\n")[0],
    )
    add_common_args(p, device=False)
    p.add_argument(
        "--models",
        type=lambda s: [v for v in s.split(",") if v],
        default=["mlp", "lenet", "rescnn"],
        help="comma-separated models among mlp, lenet, rescnn (default: all three)",
    )
    p.add_argument(
        "--methods",
        type=_methods,
        default=list(DEFAULT_METHODS),
        help=f"comma-separated rows among {','.join(METHODS)} "
        f"(default {','.join(DEFAULT_METHODS)}); Monte Carlo always runs",
    )
    p.add_argument(
        "--sigmas",
        type=_floats,
        default=[0.01, 0.05, 0.1, 0.3],
        help="input noise levels σ (pixel units, input N(M, σ²I); default 0.01,0.05,0.1,0.3)",
    )
    p.add_argument("--images", type=int, default=2, help="held-out test images (default 2)")
    p.add_argument(
        "--first-image", type=int, default=0, help="index of the first test image (default 0)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=100_000,
        help="Monte Carlo samples per image and σ, run as two halves (default 100000)",
    )
    p.add_argument(
        "--max-full",
        type=int,
        default=PropagateOptions().max_full,
        help="largest live size (units) held with a full covariance (default 4096)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.set_defaults(func=run_bench)
