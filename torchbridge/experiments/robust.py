"""`nm robust`: LeNet trained to be robust to Gaussian noise, by augmentation or the moments.

Every method trains LeNet from the same initialization (``torch.manual_seed(--seed)``) on the
4000 MNIST training digits with the same epochs, batch size, Adam learning rate and training
noise σ (``--sigma-train``); checkpoints are cached as ``lenet_mnist_robust_*.pt`` (never
``lenet_mnist.pt``). Methods (:mod:`torchbridge.robust`):

* ``plain``: cross-entropy on clean images.
* ``augment``: the clean images plus k noisy copies each (``--copies``), clipped to [0, 1].
* ``mean``: CE(f(x)) + λ CE(E[f(x + n)]) (ref. [9], Alfadly et al. 2019), E from Theorem 1
  on the linearization at the first ReLU, every image of every batch, noise N(0, σ² I).
* ``mean-clip``: the same with the input modelled as clip(x + n, 0, 1) through its exact
  per-pixel mean and variance (what the evaluation feeds the network).
* ``probit``: CE(f(x)) + λ L_probit (variance-aware; exact output covariance of the
  linearization at the last ReLU, clip-matched input), on ``--probit-images`` images of each
  batch (linearization, covariance and backward: ~4 s per image, `nm bench regularizer`).

Robustness: accuracy on the 1000 test digits under Gaussian noise σ ∈ ``--sigmas``, noisy
images clipped to [0, 1], ``--eval-samples`` noise draws per image and σ (the same draws for
every model), and the trapezoidal area under accuracy(σ). Wall time per training epoch is
measured while training (a cached model reports the times recorded when it was trained).
"""

from __future__ import annotations

import argparse
import time

import torch

from torchbridge.data import mnist
from torchbridge.experiments.common import (
    add_common_args,
    markdown_table,
    save_figure,
    write_json,
    write_markdown,
)
from torchbridge.robust import (
    Method,
    TrainSettings,
    noisy_accuracy,
    robustness_area,
    trained_robust_lenet,
)

METHOD_NAMES = ("plain", "mean", "mean-clip", "augment", "probit")
DEFAULT_SIGMAS = tuple(round(0.05 * k, 2) for k in range(11))


def build_methods(args: argparse.Namespace) -> list[Method]:
    """The methods selected by ``--methods`` with their settings, in table order."""
    out: list[Method] = []
    for name in args.methods:
        if name == "plain":
            out.append(Method("plain"))
        elif name == "augment":
            out += [Method("augment", copies=k) for k in args.copies]
        elif name == "mean":
            out.append(Method("moment_mean", lam=args.lam))
        elif name == "mean-clip":
            out.append(Method("moment_mean", lam=args.lam, clipped=True))
        elif name == "probit":
            out.append(
                Method(
                    "moment_probit",
                    lam=args.lam,
                    reg_images=args.probit_images,
                    relu_index=-1,
                    clipped=True,
                )
            )
    return out


def copies_to_match(rows: list[dict], area: float) -> str:
    """Smallest augmentation (by copies) whose area reaches ``area``, as text."""
    aug = sorted((r for r in rows if r["kind"] == "augment"), key=lambda r: r["copies"])
    below = [r["copies"] for r in aug if r["area"] < area]
    above = [r["copies"] for r in aug if r["area"] >= area]
    if not aug:
        return "n/a"
    if not above:
        return f"> {aug[-1]['copies']} (none of the augmentations reaches it)"
    if not below or min(above) < min(below):
        return f"≤ {min(above)}"
    return f"between {max(c for c in below if c < min(above))} and {min(above)}"


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        sigma=args.sigma_train,
    )
    _, _, test_x, test_y = mnist()
    sigmas = list(args.sigmas)
    rows = []
    start = time.perf_counter()
    for method in build_methods(args):
        model, result = trained_robust_lenet(
            method, settings, args.cache_dir, retrain=args.retrain, progress=args.progress
        )
        t = time.perf_counter()
        acc, se = noisy_accuracy(
            model, test_x, test_y, sigmas, samples=args.eval_samples, seed=args.seed
        )
        row = {
            "method": method.label,
            "kind": method.kind,
            "copies": method.copies,
            "clean_accuracy": acc[sigmas.index(0.0)] if 0.0 in sigmas else None,
            "accuracy": acc,
            "standard_error": se,
            "area": robustness_area(sigmas, acc),
            "seconds_per_epoch": result.seconds_per_epoch,
            "epoch_seconds": result.epoch_seconds,
            "steps_per_epoch": result.steps_per_epoch,
            "final_loss": result.final_loss,
            "from_cache": result.from_cache,
            "eval_seconds": time.perf_counter() - t,
        }
        rows.append(row)
        print(
            f"{method.label}: area {row['area']:.4f}, clean {row['clean_accuracy']}, "
            f"{row['seconds_per_epoch']:.1f} s/epoch{' (cached)' if result.from_cache else ''}",
            flush=True,
        )
    plain = next((r for r in rows if r["kind"] == "plain"), None)
    for r in rows:
        r["time_vs_plain"] = r["seconds_per_epoch"] / plain["seconds_per_epoch"] if plain else None
        r["copies_to_match"] = (
            copies_to_match(rows, r["area"]) if r["kind"].startswith("moment") else ""
        )
    results = {
        "train_settings": {
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "seed": settings.seed,
            "sigma_train": settings.sigma,
            "lam": args.lam,
            "probit_images": args.probit_images,
        },
        "sigmas": sigmas,
        "eval_samples": args.eval_samples,
        "threads": torch.get_num_threads(),
        "total_seconds": time.perf_counter() - start,
        "rows": rows,
    }
    write_json(args.out, "robust", results)
    write_markdown(args.out, "robust", render_markdown(results))
    plot(results, args.out)
    print(render_markdown(results))
    return results


def render_markdown(results: dict) -> str:
    s = results["train_settings"]
    head = (
        f"LeNet, 4000 MNIST training digits, {s['epochs']} epochs, batch {s['batch_size']}, "
        f"Adam {s['lr']:g}, seed {s['seed']}, training noise σ = {s['sigma_train']:g}, "
        f"λ = {s['lam']:g}; accuracy on the 1000 test digits under noise clipped to [0, 1], "
        f"{results['eval_samples']} draws per image and σ; area = ∫ accuracy dσ over "
        f"[{results['sigmas'][0]:g}, {results['sigmas'][-1]:g}]; {results['threads']} torch "
        f"thread(s); whole run {results['total_seconds']:.0f} s.\n\n"
    )
    picks = [0.1, 0.25, 0.3, 0.5]
    shown = [p for p in picks if p in results["sigmas"]]
    headers = [
        "method",
        "clean acc",
        *[f"acc σ={p:g}" for p in shown],
        "area",
        "s/epoch",
        "× plain",
        "augmentation copies to match",
    ]
    rows = []
    for r in results["rows"]:
        idx = [results["sigmas"].index(p) for p in shown]
        rows.append(
            [
                r["method"],
                f"{r['clean_accuracy']:.3f}" if r["clean_accuracy"] is not None else "",
                *[f"{r['accuracy'][i]:.3f} ± {r['standard_error'][i]:.3f}" for i in idx],
                f"{r['area']:.4f}",
                f"{r['seconds_per_epoch']:.1f}" + (" (cached)" if r["from_cache"] else ""),
                f"{r['time_vs_plain']:.1f}" if r["time_vs_plain"] is not None else "",
                r["copies_to_match"],
            ]
        )
    return head + markdown_table(headers, rows)


def plot(results: dict, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results["rows"]:
        ax1.plot(results["sigmas"], r["accuracy"], marker="o", ms=3, label=r["method"])
        ax2.scatter(r["seconds_per_epoch"], r["area"])
        ax2.annotate(r["method"], (r["seconds_per_epoch"], r["area"]), fontsize=7)
    ax1.set_xlabel("input noise σ (images in [0, 1], clipped)")
    ax1.set_ylabel("test accuracy")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.set_xscale("log")
    ax2.set_xlabel("training wall time per epoch (s)")
    ax2.set_ylabel("robustness area")
    ax2.grid(alpha=0.3)
    save_figure(fig, out, "robust")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in METHOD_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {METHOD_NAMES}")
    return names


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags that say which LeNets are meant (`nm robust` trains them, `nm robust-attacks`
    loads them): --methods, --copies, --batch-size, --lr, --sigma-train, --lam,
    --probit-images, --cache-dir."""
    p.add_argument(
        "--methods",
        type=_names,
        default=list(METHOD_NAMES),
        help=f"comma-separated subset of {','.join(METHOD_NAMES)} (default: all)",
    )
    p.add_argument(
        "--copies",
        type=_ints,
        default=[1, 3, 10, 21],
        help="noisy copies per image for augmentation, comma-separated (default: 1,3,10,21)",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="training: clean images per batch (default: 64)"
    )
    p.add_argument(
        "--lr", type=float, default=1e-3, help="training: Adam learning rate (default: 1e-3)"
    )
    p.add_argument(
        "--sigma-train",
        type=float,
        default=0.25,
        help="training noise std, pixel units of [0, 1] images (default: 0.25)",
    )
    p.add_argument("--lam", type=float, default=1.0, help="regularizer weight λ (default: 1)")
    p.add_argument(
        "--probit-images",
        type=int,
        default=1,
        help="images per batch the probit regularizer is evaluated on (default: 1)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="checkpoint folder (default: $NM_CACHE_DIR or the user cache dir)",
    )


def command_parser(sub, name: str, help_: str, doc: str) -> argparse.ArgumentParser:
    """Subcommand ``name`` of the robust-training commands: ``--help`` shows ``help_`` in the
    command list and ``doc`` minus its title line as the description; --out and --seed."""
    p = sub.add_parser(
        name,
        help=help_,
        description=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p, device=False)
    return p


def add_parser(sub) -> None:
    """Register ``nm robust``."""
    p = command_parser(
        sub,
        "robust",
        "train LeNet robust to Gaussian noise (augmentation vs moment regularizer)",
        __doc__,
    )
    add_model_args(p)
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    p.add_argument(
        "--sigmas",
        type=_floats,
        default=list(DEFAULT_SIGMAS),
        help="evaluation noise stds, comma-separated (default: 0,0.05,...,0.5)",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=3,
        help="noise draws per test image and σ > 0 (default: 3; σ = 0 needs one)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default: 1; 0: leave)"
    )
    p.add_argument(
        "--retrain", action="store_true", help="train even if a cached checkpoint exists"
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tqdm progress bars (default: on)",
    )
    p.set_defaults(func=run)
