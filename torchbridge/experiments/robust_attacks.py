"""`nm robust-attacks`: this package's bounded Gaussian attacks against every robust LeNet.

Every LeNet cached by `nm robust` (``--methods`` × ``--epochs``; the ones not cached are listed
and skipped, never trained) is attacked on the SAME held-out test images: the first
``--images`` MNIST test digits from index ``--start`` on that EVERY loaded model classifies
correctly (indices below 200 are used by the attack figures and `nm pairs`). Two attacks, at
the same settings for every model, both keeping image + μ in [0, 1]:

* Eq. 7, targeted toward the model's own runner-up class at the clean image: min margin over
  |μ| ≤ β and σ² ≤ σ²_max (the paper's procedure: one linearization at the clean image, 20
  warm sign-gradient steps, then SLSQP). The budget is fixed, so this side reports how often
  the model is fooled.
* Eq. 9, sparse-smooth untargeted: min ‖μ‖₁ + TV(μ) subject to the expected margin ≤ −γ, noise
  σ² I (the strategy of `nm fig6`: up to 5 re-linearized rounds, repair on the real network).
  The constraint is fixed, so this side reports how large a perturbation was needed.

Each attack is verified by ``AttackResult.verify``: ``--samples`` noise draws N(μ, σ² I)
added to the image, CLIPPED to [0, 1] and classified by the real network (seed ``--seed``,
the same draws for every model). Fooling rate = fraction of those samples classified as the
target (Eq. 7) or not as the source (Eq. 9). Reported per model: mean fooling rate ± standard
error over images, images fooled on ≥ 50% of the samples, ‖μ‖₂ (input units), ‖μ‖₁ and
max |μ| in grey levels (0..255 scale), sparsity (fraction of |μ| ≤ 1e-3 grey levels), solve
success (fooled in expectation under the linearization and on 256 clipped samples of the real
network, range respected), SLSQP iteration-cap hits, and Eq. 9 solutions repaired on the real
network. The solutions μ and σ² go to ``robust_attacks_mu.pt`` (float64, indexed
[model, image, attack], attacks ``("eq7", "eq9")``) beside the JSON, markdown and plot.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from torchbridge.attacks import (
    DEFAULT_BOUNDS,
    AttackResult,
    SlsqpOptions,
    SparseSmoothOptions,
    TargetedOptions,
    sparse_smooth,
    targeted,
)
from torchbridge.data import mnist
from torchbridge.experiments.attack_figures import run_info
from torchbridge.experiments.common import (
    markdown_table,
    out_dir,
    save_figure,
    write_json,
    write_markdown,
)
from torchbridge.experiments.robust import _ints, add_model_args, build_methods, command_parser
from torchbridge.robust import Method, TrainSettings, cached_robust_lenet

#: An image counts as fooled when at least this fraction of its noisy samples is.
FOOLED_AT = 0.5
ATTACKS = ("eq7", "eq9")


@dataclass(frozen=True)
class AttackSettings:
    """Attack settings shared by every model (input units: pixels in [0, 1]).

    ``beta``: Eq. 7 box |μ| ≤ β; ``sigma2_max``: Eq. 7 bound on σ²; ``targeted_maxiter``:
    Eq. 7 SLSQP cap; ``gamma``: Eq. 9 margin; ``sigma2``: Eq. 9 noise variance;
    ``sparse_maxiter``: Eq. 9 SLSQP cap per round; ``samples``/``seed``: verification draws.
    """

    beta: float = 30 / 255
    sigma2_max: float = 2 / 255**2
    targeted_maxiter: int = 20
    gamma: float = 0.5
    sigma2: float = 1 / 255**2
    sparse_maxiter: int = 100
    samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.beta > 0 and self.sigma2_max > 0 and self.sigma2 >= 0 and self.gamma >= 0):
            raise ValueError(f"invalid attack settings {self}")
        if self.samples < 1 or self.targeted_maxiter < 1 or self.sparse_maxiter < 1:
            raise ValueError(f"samples and iteration caps must be >= 1: {self}")


def load_models(
    specs: list[tuple[Method, TrainSettings]], cache_dir: str | None
) -> tuple[list[tuple[Method, TrainSettings, torch.nn.Module]], list[str]]:
    """Cached models of ``specs`` (never trains) and the labels of those not cached."""
    loaded, missing = [], []
    for method, settings in specs:
        try:
            model, _ = cached_robust_lenet(method, settings, cache_dir)
        except FileNotFoundError:
            missing.append(f"{method.label}, {settings.epochs} epochs")
            continue
        loaded.append((method, settings, model))
    return loaded, missing


@torch.no_grad()
def common_correct_images(
    models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, count: int, start: int
) -> list[int]:
    """The first ``count`` indices ``>= start`` of ``x`` (N, ...) that every model classifies
    as ``y`` (N,)."""
    ok = torch.ones(x.shape[0] - start, dtype=torch.bool)
    for m in models:
        ok &= m.eval()(x[start:]).argmax(1) == y[start:]
    idx = (ok.nonzero().flatten() + start).tolist()[:count]
    if len(idx) < count:
        raise ValueError(
            f"only {len(idx)} test images from index {start} on are classified correctly by "
            f"every model; asked for {count} (lower --images or --start)"
        )
    return idx


def _perturbation(res: AttackResult, v: dict) -> dict:
    mu = res.mu.double()
    return {
        "fooling_rate": v["fooling_rate"],
        "success": res.success,
        "iteration_cap": res.hit_iteration_cap,
        "margin": res.margin,
        "sigma2_255": res.sigma2 * 255**2,
        "l2": float(mu.norm()),
        "l1_grey": float(mu.abs().sum()) * 255,
        "max_grey": float(mu.abs().max()) * 255,
        "sparsity": v["sparsity"],
        "image_mu_min": v["mean_image_min"],
        "image_mu_max": v["mean_image_max"],
        "wall_s": res.wall_time,
    }


def attack_image(
    model: torch.nn.Module, image: torch.Tensor, settings: AttackSettings
) -> tuple[dict, dict[str, AttackResult]]:
    """Eq. 7 toward the runner-up class and Eq. 9 on one image ``(1, 28, 28)`` in [0, 1].

    Returns the row (per attack: :func:`_perturbation` of the verified result) and the two
    :class:`AttackResult` objects keyed ``"eq7"`` and ``"eq9"``.
    """
    with torch.no_grad():
        logits = model.eval()(image[None])[0]
    source, runner_up = (int(k) for k in logits.argsort(descending=True)[:2])
    t_opts = TargetedOptions(
        solver=SlsqpOptions(maxiter=settings.targeted_maxiter, ftol=1e-6), warm_steps=20
    )
    s_opts = SparseSmoothOptions(slsqp=SlsqpOptions(maxiter=settings.sparse_maxiter, ftol=1e-7))
    results = {
        "eq7": targeted(
            model,
            image,
            runner_up,
            beta=settings.beta,
            sigma2_max=settings.sigma2_max,
            bounds=DEFAULT_BOUNDS,
            options=t_opts,
        ),
        "eq9": sparse_smooth(
            model,
            image,
            gamma=settings.gamma,
            sigma2=settings.sigma2,
            bounds=DEFAULT_BOUNDS,
            options=s_opts,
        ),
    }
    row: dict = {"source": source, "target": runner_up}
    for name, res in results.items():
        row[name] = _perturbation(res, res.verify(settings.samples, settings.seed))
    row["eq9"]["restored"] = bool(results["eq9"].extra.get("restored", False))
    return row, results


def _mean_se(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def summarize(rows: list[dict]) -> dict:
    """Per attack: mean ± standard error over images of the fooling rate and the perturbation
    sizes, images fooled at ≥ :data:`FOOLED_AT`, solve successes, iteration-cap hits."""
    out = {}
    for name in ATTACKS:
        per = [r[name] for r in rows]
        s = {"images": len(per)}
        for key in ("fooling_rate", "l2", "l1_grey", "max_grey", "sparsity", "wall_s"):
            s[key], s[f"{key}_se"] = _mean_se([p[key] for p in per])
        s["fooled_images"] = sum(p["fooling_rate"] >= FOOLED_AT for p in per)
        s["success"] = sum(p["success"] for p in per)
        s["iteration_cap"] = sum(p["iteration_cap"] for p in per)
        if name == "eq9":
            s["restored"] = sum(p["restored"] for p in per)
        out[name] = s
    return out


def paired_ratio(rows: list[dict], reference: list[dict], attack: str, key: str) -> dict:
    """Geometric mean over images of ``rows[i][attack][key] / reference[i][attack][key]``
    (the same images, in order) with the standard error of the mean log-ratio: the
    ``[low, high]`` band is ``exp(mean log ± se)``."""
    logs = [math.log(r[attack][key] / q[attack][key]) for r, q in zip(rows, reference, strict=True)]
    mean, se = _mean_se(logs)
    return {"ratio": math.exp(mean), "low": math.exp(mean - se), "high": math.exp(mean + se)}


def model_specs(args: argparse.Namespace) -> list[tuple[Method, TrainSettings]]:
    """Every (method, training settings) of ``--methods`` × ``--epochs`` (`nm robust`'s)."""
    specs = []
    for epochs in args.epochs:
        settings = TrainSettings(
            epochs=epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.train_seed,
            sigma=args.sigma_train,
        )
        specs += [(m, settings) for m in build_methods(args)]
    return specs


def run(args: argparse.Namespace) -> dict:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    settings = AttackSettings(
        beta=args.beta / 255,
        sigma2_max=args.sigma2_max / 255**2,
        targeted_maxiter=args.targeted_maxiter,
        gamma=args.gamma,
        sigma2=args.sigma2 / 255**2,
        sparse_maxiter=args.sparse_maxiter,
        samples=args.samples,
        seed=args.seed,
    )
    start, cpu = time.perf_counter(), time.process_time()
    loaded, missing = load_models(model_specs(args), args.cache_dir)
    for label in missing:
        print(f"not cached, skipped: {label}", flush=True)
    if not loaded:
        raise FileNotFoundError("none of the selected models is cached; run `nm robust` first")
    _, _, test_x, test_y = mnist()
    chosen = common_correct_images(
        [m for _, _, m in loaded], test_x, test_y, args.images, args.start
    )
    bar = tqdm(total=len(loaded) * len(chosen), desc="robust attacks", disable=not args.progress)
    models, mus, sigma2s = [], [], []
    for method, train, model in loaded:
        t = time.perf_counter()
        rows = []
        for idx in chosen:
            row, res = attack_image(model, test_x[idx], settings)
            rows.append({"image": idx, "label": int(test_y[idx]), **row})
            mus.append(torch.stack([res[a].mu.double() for a in ATTACKS]))
            sigma2s.append(torch.tensor([res[a].sigma2 for a in ATTACKS], dtype=torch.float64))
            bar.update(1)
        models.append(
            {
                "method": method.label,
                "kind": method.kind,
                "epochs": train.epochs,
                "summary": summarize(rows),
                "seconds": time.perf_counter() - t,
                "rows": rows,
            }
        )
    bar.close()
    for m in models:  # paired with the first model on the same images
        m["eq9_l1_vs_first"] = paired_ratio(m["rows"], models[0]["rows"], "eq9", "l1_grey")
    results = {
        "images": chosen,
        "image_rule": f"first {args.images} test images from index {args.start} on that every "
        "loaded model classifies correctly",
        "attack_settings": asdict(settings),
        "missing": missing,
        "total_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "run": run_info(args),
        "models": models,
    }
    write_json(args.out, "robust_attacks", results)
    shape = (len(models), len(chosen), len(ATTACKS))
    solutions = {
        "models": [f"{m['method']}, {m['epochs']} epochs" for m in models],
        "images": torch.tensor(chosen),
        "attacks": ATTACKS,
        "mu": torch.stack(mus).reshape(*shape, *test_x.shape[1:]),
        "sigma2": torch.stack(sigma2s).reshape(shape),
    }
    torch.save(solutions, out_dir(args.out) / "robust_attacks_mu.pt")
    text = render_markdown(results)
    write_markdown(args.out, "robust_attacks", text)
    plot(results, args.out)
    print(text)
    return results


def _pm(s: dict, key: str, fmt: str) -> str:
    return f"{s[key]:{fmt}} ± {s[key + '_se']:{fmt}}"


def render_markdown(results: dict) -> str:
    a = results["attack_settings"]
    n = len(results["images"])
    head = (
        f"{n} test images (indices {results['images'][0]}–{results['images'][-1]}: "
        f"{results['image_rule']}); {a['samples']} noisy samples per attack clipped to [0, 1], "
        f"real network, seed {a['seed']}. Eq. 7: runner-up target, β = {a['beta'] * 255:g}/255, "
        f"σ² ≤ {a['sigma2_max'] * 255**2:g}/255², SLSQP cap {a['targeted_maxiter']}. Eq. 9: "
        f"γ = {a['gamma']:g}, σ² = {a['sigma2'] * 255**2:g}/255², SLSQP cap "
        f"{a['sparse_maxiter']} per round. ± = one standard error over images; 'fooled' = "
        f"≥ {FOOLED_AT:.0%} of the samples; grey levels on the 0..255 scale; ‖μ‖₁ ratio: "
        "geometric mean over the same images of the per-image ratio to the first model's, "
        "[ ] = ± one standard error of the mean log-ratio; "
        f"{results['run']['threads']} torch thread(s); whole run "
        f"{results['total_seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU.\n\n"
    )
    headers = [
        "model",
        "epochs",
        "Eq. 7 fooling",
        "Eq. 7 fooled / success / cap",
        "Eq. 9 fooling",
        "Eq. 9 fooled / success / cap / repaired",
        "Eq. 9 ‖μ‖₂",
        "Eq. 9 ‖μ‖₁ (grey)",
        f"Eq. 9 ‖μ‖₁ / {results['models'][0]['method']}'s",
        "Eq. 9 sparsity",
        "s per image",
    ]
    rows = []
    for m in results["models"]:
        s7, s9 = m["summary"]["eq7"], m["summary"]["eq9"]
        rows.append(
            [
                m["method"],
                m["epochs"],
                _pm(s7, "fooling_rate", ".2f"),
                f"{s7['fooled_images']} / {s7['success']} / {s7['iteration_cap']} of {n}",
                _pm(s9, "fooling_rate", ".2f"),
                f"{s9['fooled_images']} / {s9['success']} / {s9['iteration_cap']} / "
                f"{s9['restored']} of {n}",
                _pm(s9, "l2", ".2f"),
                _pm(s9, "l1_grey", ".0f"),
                "{ratio:.2f} [{low:.2f}, {high:.2f}]".format(**m["eq9_l1_vs_first"]),
                _pm(s9, "sparsity", ".3f"),
                f"{m['seconds'] / n:.1f}",
            ]
        )
    tail = ""
    if results["missing"]:
        tail = "\n\nNot cached (skipped): " + "; ".join(results["missing"]) + "."
    return head + markdown_table(headers, rows) + tail


def plot(results: dict, out) -> None:
    """Eq. 7 fooling rate and Eq. 9 ‖μ‖₁ / ‖μ‖₂ per model, error bars = standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{m['method']} ({m['epochs']} ep)" for m in results["models"]]
    pos = list(range(len(labels)))
    panels = [
        ("eq7", "fooling_rate", "Eq. 7 fooling rate (runner-up target)"),
        ("eq9", "l1_grey", "Eq. 9 ‖μ‖₁ needed (grey levels)"),
        ("eq9", "l2", "Eq. 9 ‖μ‖₂ needed (input units)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 0.45 * len(labels) + 2))
    for ax, (attack, key, title) in zip(axes, panels, strict=True):
        vals = [m["summary"][attack][key] for m in results["models"]]
        errs = [m["summary"][attack][f"{key}_se"] for m in results["models"]]
        ax.barh(pos, vals, xerr=[0 if math.isnan(e) else e for e in errs], capsize=3)
        ax.set_title(title, fontsize=9)
        ax.set_yticks(pos, labels if ax is axes[0] else [""] * len(pos), fontsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"{len(results['images'])} held-out test images, "
        f"{results['attack_settings']['samples']} clipped samples each; "
        "error bars: standard error over images",
        fontsize=9,
    )
    save_figure(fig, out, "robust_attacks")


def add_parser(sub) -> None:
    """Register ``nm robust-attacks``."""
    p = command_parser(
        sub,
        "robust-attacks",
        "Gaussian attacks (Eq. 7, Eq. 9) against every LeNet cached by `nm robust`",
        __doc__,
    )
    p.set_defaults(bounds=list(DEFAULT_BOUNDS), func=lambda a: (run(a), 0)[1])
    add_model_args(p)
    p.add_argument(
        "--epochs",
        type=_ints,
        default=[3, 6],
        help="training epochs of the cached models, comma-separated; uncached combinations "
        "are skipped (default: 3,6)",
    )
    p.add_argument(
        "--train-seed", type=int, default=0, help="training seed of the models (default: 0)"
    )
    p.add_argument(
        "--images", type=int, default=10, help="test images attacked per model (default: 10)"
    )
    p.add_argument(
        "--start", type=int, default=200, help="first test index considered (default: 200)"
    )
    p.add_argument(
        "--beta", type=float, default=30.0, help="Eq. 7 box |μ| ≤ β, 0..255 scale (default: 30)"
    )
    p.add_argument(
        "--sigma2-max",
        type=float,
        default=2.0,
        help="Eq. 7 bound on the noise variance σ², 0..255 scale (default: 2)",
    )
    p.add_argument(
        "--targeted-maxiter", type=int, default=20, help="Eq. 7 SLSQP iteration cap (default: 20)"
    )
    p.add_argument("--gamma", type=float, default=0.5, help="Eq. 9 margin γ (default: 0.5)")
    p.add_argument(
        "--sigma2",
        type=float,
        default=1.0,
        help="Eq. 9 noise variance σ², 0..255 scale (default: 1)",
    )
    p.add_argument(
        "--sparse-maxiter",
        type=int,
        default=100,
        help="Eq. 9 SLSQP iteration cap per round (default: 100)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=1000,
        help="clipped noisy samples per attack for the fooling rate (default: 1000)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tqdm progress bar (default: on)",
    )
