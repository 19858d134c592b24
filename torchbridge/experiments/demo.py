"""`nm demo`: a few-minute tour of the package.

1. Quick verification of the generated kernels against mpmath: ``nmgen verify --quick``, run
   as its own process (torchbridge never imports sympy or mpmath).
2. Load (or train and cache) LeNet on MNIST and print its test accuracy.
3. For a few test images at σ = 0.05 (random SPD Σ with trace σ²·784), the analytic output
   mean and variance of LeNet (two-stage linearization at the last ReLU; exact variance, the
   paper's 5-term Lemma 4 series and Theorem 2) against Monte Carlo with 10^4 samples, timed.
3b. Layer-wise propagation through every layer (``torchbridge.output_moments``) on the first
   ``--propagate-images`` of those images, next to the linearization and Monte Carlo numbers.
4. The Gaussian adversarial attack figures, if ``torchbridge.experiments.attack_figures``
   provides ``demo_attacks(out_dir)``.

Writes ``<out>/demo.json`` and ``<out>/demo.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from torchbridge.data import mnist
from torchbridge.experiments.common import (
    DEFAULT_OUT,
    markdown_table,
    out_dir,
    write_json,
    write_markdown,
)
from torchbridge.experiments.tightness import (
    METHODS,
    analytic_moments,
    as_dtype,
    available_methods,
    command_line,
    er,
    random_spd_cov,
    seed_for,
)
from torchbridge.linearize import two_stage_linearize
from torchbridge.models import accuracy, trained_lenet
from torchbridge.montecarlo import monte_carlo_moments

LABELS = {"exact": "exact (ours)", "series": "Lemma 4, 5 terms", "zero_mean": "Thm 2 (old)"}


def _verify(out: Path, report: dict, md: list[str]) -> None:
    """Step 1: ``nmgen verify --quick`` in its own process (torchbridge never imports mpmath)."""
    print("== 1. kernel verification (quick): nmgen verify --quick ==", flush=True)
    rows_file = out / "demo_verify.json"
    table_file = out / "demo_verify.md"
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "nmgen", "verify", "--quick", "--json", str(rows_file)]
    proc = subprocess.run([*cmd, "--markdown", str(table_file)], stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 and not rows_file.is_file():
        # nmgen's own dependencies (sympy, mpmath) are optional for users of the library
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        msg = f"skipped: `nmgen verify --quick` could not run ({last})"
        print(msg)
        report["verify"] = {"skipped": msg}
        md.append(f"## Kernel verification\n\n{msg}")
        return
    rows = json.loads(rows_file.read_text())
    passed = sum(bool(r["passed"]) for r in rows)
    report["verify"] = {"rows": len(rows), "passed": passed, "seconds": time.perf_counter() - t}
    table = table_file.read_text() if table_file.is_file() else ""
    md.append(f"## Kernel verification (quick)\n\n{passed}/{len(rows)} rows pass.\n\n{table}")


def _moments_demo(args: argparse.Namespace, model, test_x, report: dict, md: list[str]) -> None:
    print(f"== 3. LeNet output moments at σ = {args.sigma:g} vs Monte Carlo ==", flush=True)
    methods, skipped = available_methods(METHODS)
    for m in skipped:
        print(f"note: method {m!r} skipped (kernel not generated)")
    images = []
    section = [f"## LeNet output moments, σ = {args.sigma:g} (random SPD Σ, l = last ReLU)"]
    if skipped:
        section.append(f"Skipped methods (kernel not generated): {', '.join(skipped)}")
    for i in range(args.images):
        x = test_x[i]
        cov = random_spd_cov(x.numel(), args.sigma, seed_for(args.seed, i))
        t = time.perf_counter()
        g = as_dtype(two_stage_linearize(model, x, -1))
        t_lin = time.perf_counter() - t
        mean, var, secs = analytic_moments(g, x, cov, methods)
        t = time.perf_counter()
        mc_mean, mc_var = monte_carlo_moments(
            model, x, cov, samples=args.samples, seed=seed_for(args.seed, i) + 1
        )
        t_mc = time.perf_counter() - t
        mc_mean, mc_var = mc_mean.double().numpy(), mc_var.double().numpy()
        headers = ["class", "MC mean", "Thm 1 mean", "MC var"] + [LABELS[m] for m in methods]
        rows = [
            [c, float(mc_mean[c]), float(mean[c]), float(mc_var[c])]
            + [float(var[m][c]) for m in methods]
            for c in range(len(mean))
        ]
        errs = {"mean": float(er(mean, mc_mean).mean())}
        errs.update({m: float(er(var[m], mc_var).mean()) for m in methods})
        times = {"linearize": t_lin, **{f"moments_{m}": s for m, s in secs.items()}, "mc": t_mc}
        text = (
            f"### Test image {i}\n\n"
            + markdown_table(headers, rows)
            + "\n\nMean E_r vs MC: "
            + ", ".join(f"{k} {v:.3f}" for k, v in errs.items())
            + "\n\nSeconds: "
            + ", ".join(f"{k} {v:.2f}" for k, v in times.items())
            + (
                f"; MC / (linearize + exact moments) = {t_mc / (t_lin + secs['exact']):.1f}x"
                if "exact" in secs
                else ""
            )
        )
        print(text, flush=True)
        section.append(text)
        images.append(
            {
                "image": i,
                "errors": errs,
                "seconds": times,
                "mean": mean.tolist(),
                "mc_mean": mc_mean.tolist(),
                "mc_var": mc_var.tolist(),
                "var": {m: v.tolist() for m, v in var.items()},
            }
        )
    report["moments"] = {
        "sigma": args.sigma,
        "samples": args.samples,
        "methods": methods,
        "skipped": skipped,
        "images": images,
        "mean_errors": {
            k: float(np.mean([im["errors"][k] for im in images])) for k in images[0]["errors"]
        }
        if images
        else {},
    }
    md.append("\n\n".join(section))


def _propagation_demo(args: argparse.Namespace, model, test_x, report: dict, md: list[str]) -> None:
    """Layer-wise propagation (``torchbridge.output_moments``) on the images of step 3, with the
    same input covariance, next to that step's linearization and Monte Carlo numbers."""
    from torchbridge import output_moments

    print("== 3b. LeNet: layer-wise propagation through every layer ==", flush=True)
    rows, images = [], []
    for rec in report.get("moments", {}).get("images", [])[: args.propagate_images]:
        i = rec["image"]
        cov = random_spd_cov(test_x[i].numel(), args.sigma, seed_for(args.seed, i))
        t = time.perf_counter()
        out = output_moments(model, test_x[i : i + 1].double(), cov)
        secs = time.perf_counter() - t
        m, v = out.mean[0].numpy(), out.var[0].numpy()
        mc_m, mc_v = np.array(rec["mc_mean"]), np.array(rec["mc_var"])
        lin_v = np.array(rec["var"].get("exact", next(iter(rec["var"].values()))))
        res = {
            "image": i,
            "seconds": secs,
            "er_mean": float(er(m, mc_m).mean()),
            "er_var": float(er(v, mc_v).mean()),
            "lin_er_mean": float(er(np.array(rec["mean"]), mc_m).mean()),
            "lin_er_var": float(er(lin_v, mc_v).mean()),
        }
        images.append(res)
        rows.append([i, res["er_mean"], res["lin_er_mean"], res["er_var"], res["lin_er_var"], secs])
    headers = [
        "image",
        "mean E_r, propagation",
        "mean E_r, linearization",
        "var E_r, propagation",
        "var E_r, linearization",
        "propagation s",
    ]
    text = markdown_table(headers, rows) + (
        f"\n\nE_r vs Monte Carlo ({args.samples} samples, its own noise included); propagation "
        "pushes the mean and covariance through every layer with the exact ReLU kernels "
        "(full covariance in the fc stages, diagonal-plus-low-rank in the conv stages)."
    )
    print(text, flush=True)
    report["propagation"] = {"images": images}
    md.append("## LeNet: layer-wise propagation vs linearization (same Σ)\n\n" + text)


def _attacks(out, report: dict, md: list[str]) -> None:
    print("== 4. Gaussian adversarial attacks ==", flush=True)
    try:
        from torchbridge.experiments.attack_figures import demo_attacks
    except ImportError:
        msg = "skipped: torchbridge.experiments.attack_figures.demo_attacks is not available"
        print(msg)
        report["attacks"] = {"skipped": msg}
        md.append(f"## Attacks\n\n{msg}")
        return
    result = demo_attacks(out)
    report["attacks"] = result if isinstance(result, dict) else {"done": True}
    rows = []
    for name, r in (result or {}).items():
        if isinstance(r, dict):
            cells = ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
            )
            rows.append(
                f"- {name}: {cells} (fooling rate of the real LeNet on 1000 noisy samples "
                "clipped to [0, 1])"
            )
    text = "\n".join(rows) or "done"
    print(text)
    md.append(f"## Attacks\n\n{text}\n\nFigure: demo_attacks.png")


def run_demo(args: argparse.Namespace) -> dict:
    """Run the tour; returns the JSON report."""
    out = out_dir(args.out)
    report: dict = {"command": command_line(args)}
    md = [f"# Network Moments demo\n\nCommand: `{report['command']}`"]
    if args.skip_verify:
        report["verify"] = {"skipped": "--skip-verify"}
    else:
        _verify(out, report, md)
    print("== 2. LeNet on MNIST ==", flush=True)
    t = time.perf_counter()
    model = trained_lenet().eval()
    _, _, test_x, test_y = mnist()
    acc = accuracy(model, test_x, test_y)
    report["lenet"] = {
        "test_accuracy": acc,
        "test_images": len(test_x),
        "load_or_train_seconds": time.perf_counter() - t,
    }
    print(f"LeNet test accuracy: {acc:.4f} on {len(test_x)} MNIST test digits")
    md.append(f"## LeNet\n\nTest accuracy {acc:.4f} on {len(test_x)} MNIST test digits.")
    _moments_demo(args, model, test_x, report, md)
    if args.propagate_images > 0:
        _propagation_demo(args, model, test_x, report, md)
    if not args.skip_attacks:
        _attacks(out, report, md)
    write_json(out, "demo", report)
    write_markdown(out, "demo", "\n\n".join(md))
    print(f"\nwrote {out / 'demo.json'} and {out / 'demo.md'}")
    return report


def add_parser(subparsers) -> None:
    """Register `nm demo`."""
    p = subparsers.add_parser("demo", help="a few-minute tour: verify, LeNet, moments vs MC")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: results/)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--images", type=int, default=3, help="test images (default 3)")
    p.add_argument("--sigma", type=float, default=0.05, help="input noise σ (default 0.05)")
    p.add_argument("--samples", type=int, default=10_000, help="Monte Carlo samples")
    p.add_argument(
        "--propagate-images",
        type=int,
        default=1,
        help="images of step 3 also run through layer-wise propagation (default 1; 0 skips)",
    )
    p.add_argument("--skip-verify", action="store_true", help="skip the kernel verification")
    p.add_argument("--skip-attacks", action="store_true", help="skip the attack figures")
    p.set_defaults(func=run_demo)
