"""`nm fig3 | fig4 | fig6 | fig7 | fig8 | table5`: Gaussian adversarial attacks (Section 4.3).

Every command writes ``<out>/<name>.json`` (rows, seed, threads, torch/scipy versions, the
pixel range), ``<name>.md`` and a PNG image grid with columns original | |mu| | mu+ | mu- |
noisy sample, as in the paper's figures. Attacks keep image + mu in the valid range (--bounds,
default 0 1) and fooling rates are measured on noisy samples clipped to it; --unconstrained
gives the paper's problem and says so in every output. Paper values on the 0..255 scale are
converted to [0, 1] pixel units.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from torchbridge.attacks import (
    DEFAULT_BOUNDS,
    UNCONSTRAINED_LABEL,
    AttackResult,
    AugLagOptions,
    PixelSupportOptions,
    RelinearizeOptions,
    SlsqpOptions,
    SparseSmoothOptions,
    TargetedOptions,
    pixel_support,
    sparse_smooth,
    targeted,
)
from torchbridge.experiments.common import (
    add_common_args,
    markdown_table,
    save_figure,
    write_json,
    write_markdown,
)


def lenet_data() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached trained LeNet, MNIST test images (1000, 1, 28, 28), labels and its predictions."""
    from torchbridge.data import mnist
    from torchbridge.models import trained_lenet

    model = trained_lenet(progress=False)
    _, _, test_x, test_y = mnist()
    with torch.no_grad():
        pred = model(test_x).argmax(1)
    return model, test_x, test_y, pred


def _pick(
    test_y: torch.Tensor, pred: torch.Tensor, cls: int, count: int, skip: int = 0
) -> list[int]:
    """Indices of correctly classified test images of class ``cls``."""
    idx = ((test_y == cls) & (pred == cls)).nonzero().flatten().tolist()
    return idx[skip : skip + count]


def add_attack_args(p: argparse.ArgumentParser) -> None:
    """--bounds/--unconstrained and --threads, shared by every attack command."""
    p.add_argument(
        "--bounds",
        type=float,
        nargs=2,
        default=list(DEFAULT_BOUNDS),
        metavar=("LO", "HI"),
        help="valid input range of the model; lo <= image + mu <= hi at every pixel and "
        "noisy samples are clipped to it (default: 0 1, pixel units)",
    )
    p.add_argument(
        "--unconstrained",
        action="store_true",
        help="the paper's problem without the pixel range (images may be invalid; samples "
        "are not clipped); every output says so",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads for verification (default: 1)"
    )
    p.add_argument(
        "--eq7-solver",
        choices=["auglag", "slsqp"],
        default="auglag",
        help="Eq. 7 solver (fig3, pairs): augmented Lagrangian with L-BFGS-B inner solves, or "
        "SciPy's SLSQP capped at --maxiter (default: auglag)",
    )
    p.add_argument(
        "--eq7-maxiter",
        type=int,
        default=300,
        help="augmented Lagrangian: L-BFGS-B iteration cap per Eq. 7 solve, summed over its "
        "multiplier rounds (default: 300)",
    )


def bounds_of(args: argparse.Namespace) -> tuple[float, float] | None:
    """The ``bounds`` argument of the solvers from --bounds / --unconstrained."""
    return None if getattr(args, "unconstrained", False) else tuple(args.bounds)


def range_note(args: argparse.Namespace) -> str:
    b = bounds_of(args)
    if b is None:
        return f"Pixel range: {UNCONSTRAINED_LABEL}; fooling rates on UNCLIPPED samples."
    return (
        f"Pixel range [{b[0]:g}, {b[1]:g}] enforced (lo <= image + mu <= hi); fooling rates "
        "on noisy samples clipped to it."
    )


def run_info(args: argparse.Namespace) -> dict:
    """Seed, threads, versions and settings recorded in every attack JSON."""
    import platform

    import scipy

    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not callable(v)
    }
    return {
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
        "bounds": bounds_of(args),
        "range": range_note(args),
        "settings": settings,
    }


def set_threads(args: argparse.Namespace) -> None:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)


def attack_grid(
    results: list[AttackResult], out: Path, name: str, seed: int = 0, samples: int = 1000
) -> Path:
    """PNG grid, one row per attack: original | |mu| | mu+ | mu- | noisy sample.

    |mu|, mu+ and mu- share one colour scale with a colour bar in grey levels (0-255 scale);
    the noisy sample is clipped to the bounds and drawn with vmin = lo, vmax = hi, as the
    network sees it. Row title: source -> predicted class of that sample, and the fooling rate
    on ``samples`` clipped samples (``seed``); iteration-cap hits are marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(results))
    fig, axes = plt.subplots(rows, 5, figsize=(9.0, 1.9 * rows), squeeze=False)
    vmax = max([float(r.mu.abs().max()) * 255 for r in results] + [1e-9])
    mappable = None
    for r, res in enumerate(results):
        img = res.image.reshape(res.image.shape[-2:]).numpy()
        mu = res.mu.reshape(res.image.shape[-2:]).double().numpy() * 255
        sample = res.samples(1, seed)[0]
        pred = int(res.predict(sample[None])[0])
        rate = res.verify(samples, seed)["fooling_rate"]
        lo, hi = res.bounds if res.bounds is not None else (None, None)
        tgt = "" if res.target is None else f" (target {res.target})"
        cap = ", iteration cap hit" if res.hit_iteration_cap else ""
        clip = "clipped" if res.bounds is not None else "UNCLIPPED"
        panels = [
            (img, f"original ({res.source})", "gray", (lo, hi)),
            (abs(mu), "|mu| (grey levels)", "magma", (0, vmax)),
            (mu.clip(min=0), "mu+", "magma", (0, vmax)),
            ((-mu).clip(min=0), "mu-", "magma", (0, vmax)),
            (sample.reshape(img.shape).numpy(), f"{res.source} -> {pred}{tgt}", "gray", (lo, hi)),
        ]
        for c, (data, title, cmap, (a, b)) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(data, cmap=cmap, vmin=a, vmax=b)
            if c == 1:
                mappable = im
            ax.set_title(title, fontsize=7)
            ax.axis("off")
        axes[r, 4].text(
            1.05,
            0.5,
            f"fooled {rate:.0%} of\n{samples} {clip}\nsamples{cap}",
            transform=axes[r, 4].transAxes,
            fontsize=7,
            va="center",
        )
    if mappable is not None:
        fig.colorbar(
            mappable, ax=axes[:, 1:4].ravel().tolist(), shrink=0.8, label="grey levels (0-255)"
        )
    return save_figure(fig, out, name)


def _row(res: AttackResult, v: dict, **extra) -> dict:
    return {
        **extra,
        "source": res.source,
        "target": res.target,
        "success": res.success,
        "converged": res.converged,
        "iteration_cap": res.hit_iteration_cap,
        "margin": res.margin,
        "sigma2_255": res.sigma2 * 255**2,
        "iterations": res.iterations,
        "wall_s": res.wall_time,
        **{k: v[k] for k in ("fooling_rate", "sparsity", "tv", "mean_prediction")},
        "img_mu_min": v["mean_image_min"],
        "img_mu_max": v["mean_image_max"],
        "clipped_px": v["clipped_pixels_mean"],
    }


def _finish(
    out: Path, name: str, title: str, rows: list[dict], note: str, args: argparse.Namespace
) -> None:
    note = f"{note} {range_note(args)}"
    write_json(out, name, {"rows": rows, "note": note, "run": run_info(args)})
    headers = list(rows[0].keys()) if rows else ["(no rows)"]
    md = f"# {title}\n\n{note}\n\n" + markdown_table(headers, [list(r.values()) for r in rows])
    write_markdown(out, name, md)
    print(md)


def targeted_options(args: argparse.Namespace, rounds: int) -> TargetedOptions:
    """Eq. 7 options of the CLI: 20 warm steps, ``rounds`` re-linearizations, the solver of
    --eq7-solver (--eq7-maxiter for auglag, --maxiter for SLSQP)."""
    radius = args.trust_radius / 255 if rounds and args.trust_radius > 0 else None
    if getattr(args, "eq7_solver", "auglag") == "slsqp":
        solver = SlsqpOptions(maxiter=args.maxiter, ftol=1e-6)
    else:
        solver = AugLagOptions(maxiter=getattr(args, "eq7_maxiter", 300))
    return TargetedOptions(
        solver=solver,
        warm_steps=20,
        relinearize=RelinearizeOptions(rounds=rounds, trust_radius=radius),
    )


def sparse_options(args: argparse.Namespace) -> SparseSmoothOptions:
    """Eqs. 9/10 options of the CLI (--maxiter, --rounds, --max-support, --restore-steps)."""
    return SparseSmoothOptions(
        rounds=args.rounds,
        max_support=args.max_support,
        restore_steps=args.restore_steps,
        slsqp=SlsqpOptions(maxiter=args.maxiter, ftol=1e-7),
    )


def fig3(args: argparse.Namespace) -> dict:
    """Digit 9 pushed to targets {2, 3, 4, 7, 8}, beta = 30/255 (Eq. 7)."""
    set_threads(args)
    torch.manual_seed(args.seed)
    model, tx, ty, pred = lenet_data()
    idx = _pick(ty, pred, 9, 1, args.index)[0]
    results, rows = [], []
    for tgt in tqdm(args.targets, desc="fig3 targeted"):
        res = targeted(
            model,
            tx[idx],
            tgt,
            beta=args.beta / 255,
            bounds=bounds_of(args),
            options=targeted_options(args, args.relinearize),
        )
        v10, v1000 = res.verify(10, args.seed), res.verify(1000, args.seed)
        results.append(res)
        rows.append(
            _row(
                res,
                v1000,
                image=idx,
                fooling_rate_10=v10["fooling_rate"],
                paper_criterion_90pct=v1000["fooling_rate"] >= 0.9,
            )
        )
    attack_grid(results, args.out, "fig3", args.seed)
    note = (
        f"Eq. 7, beta = {args.beta}/255, sigma^2 <= 2/255^2; fooling rate = fraction of 1000 "
        "noisy samples the real LeNet classifies as the target (paper criterion: >= 90%). "
        + (
            "Paper procedure: one linearization at the clean image."
            if args.relinearize == 0
            else f"EXTENSION of the paper: up to {args.relinearize} re-linearizations at "
            f"M + mu (trust radius {args.trust_radius}/255 per pixel) while the real "
            "network's expected margin is >= -0.25."
        )
    )
    solver = getattr(args, "eq7_solver", "auglag")
    note += (
        f" Solver: augmented Lagrangian + L-BFGS-B (cap {args.eq7_maxiter} iterations)."
        if solver == "auglag"
        else f" Solver: SLSQP (cap {args.maxiter} iterations)."
    )
    _finish(args.out, "fig3", "Fig. 3: targeted Gaussian attacks", rows, note, args)
    return {"rows": rows}


def fig4(args: argparse.Namespace) -> dict:
    """Non-targeted alpha-pixel-support attacks (Eq. 8), alpha = 4%, beta = 550/255."""
    set_threads(args)
    model, tx, ty, pred = lenet_data()
    idx = _pick(ty, pred, 9, 1, args.index)[0]
    results, rows = [], []
    opts = PixelSupportOptions(slsqp=SlsqpOptions(maxiter=args.maxiter, ftol=1e-7))
    for s in tqdm(range(args.supports), desc="fig4 pixel support"):
        res = pixel_support(
            model,
            tx[idx],
            alpha=args.alpha,
            beta=args.beta / 255,
            seed=args.seed + s,
            bounds=bounds_of(args),
            options=opts,
        )
        v = res.verify(1000, args.seed)
        results.append(res)
        rows.append(_row(res, v, image=idx, support_seed=args.seed + s))
    attack_grid(results, args.out, "fig4", args.seed)
    note = (
        f"Eq. 8, alpha = {args.alpha}, beta = {args.beta}/255, random fixed support per row. "
        + (
            "With the pixel range on, each support pixel can only move within [-M, 1 - M] "
            "(|mu| <= 1 < beta): the bounded problem, not the paper's +-550 grey levels."
            if bounds_of(args) is not None and args.beta / 255 > 1
            else ""
        )
    )
    _finish(args.out, "fig4", "Fig. 4: alpha-pixel-support attacks", rows, note, args)
    return {"rows": rows}


def fig6(args: argparse.Namespace) -> dict:
    """Sparse-smooth non-targeted attacks (Eq. 9), one image per class in ``--classes``."""
    set_threads(args)
    model, tx, ty, pred = lenet_data()
    results, rows = [], []
    for c in tqdm(args.classes, desc="fig6 sparse-smooth"):
        idx = _pick(ty, pred, c, 1, args.index)[0]
        res = sparse_smooth(
            model, tx[idx], gamma=args.gamma, bounds=bounds_of(args), options=sparse_options(args)
        )
        v = res.verify(1000, args.seed)
        results.append(res)
        rows.append(
            _row(
                res,
                v,
                image=idx,
                chosen_round=res.extra["chosen_round"],
                restored=res.extra["restored"],
            )
        )
    attack_grid(results, args.out, "fig6", args.seed)
    note = (
        f"Eq. 9, gamma = {args.gamma}, Sigma = (1/255)^2 I; fooling = not the source class, "
        f"1000 samples; at most {args.max_support:.0%} of the pixels non-zero."
    )
    _finish(args.out, "fig6", "Fig. 6: sparse-smooth non-targeted attacks", rows, note, args)
    return {"rows": rows}


def fig7(args: argparse.Namespace) -> dict:
    """Sparse-smooth targeted attacks (Eq. 10): digit 4 -> 5, 8, 9."""
    set_threads(args)
    model, tx, ty, pred = lenet_data()
    idx = _pick(ty, pred, 4, 1, args.index)[0]
    results, rows = [], []
    for tgt in tqdm(args.targets, desc="fig7 sparse-smooth targeted"):
        res = sparse_smooth(
            model,
            tx[idx],
            gamma=args.gamma,
            target=tgt,
            bounds=bounds_of(args),
            options=sparse_options(args),
        )
        v = res.verify(1000, args.seed)
        results.append(res)
        rows.append(
            _row(
                res,
                v,
                image=idx,
                chosen_round=res.extra["chosen_round"],
                restored=res.extra["restored"],
            )
        )
    attack_grid(results, args.out, "fig7", args.seed)
    note = f"Eq. 9 with constraint (10), gamma = {args.gamma}, Sigma = (1/255)^2 I, 1000 samples."
    _finish(args.out, "fig7", "Fig. 7: sparse-smooth targeted attacks", rows, note, args)
    return {"rows": rows}


def table5(args: argparse.Namespace) -> dict:
    """Confusion matrix of targeted sparse-smooth fooling rates, source -> target."""
    set_threads(args)
    if args.data is not None:
        from torchbridge.data import FER2013_CLASSES, fer2013
        from torchbridge.models import alexnet48, train_fer2013

        if args.checkpoint is not None:
            model = alexnet48()
            model.load_state_dict(
                torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            )
            model.eval()
        else:
            model, _ = train_fer2013(args.data, out_path=Path(args.out) / "alexnet48_fer2013.pt")
        tx, ty = fer2013(args.data, usage=None)
        names = list(FER2013_CLASSES)
        dataset = "FER2013 / AlexNet variant"
    else:
        model, tx, ty, _ = lenet_data()
        names = [str(c) for c in range(10)]
        dataset = "MNIST / LeNet (no FER2013 CSV given; the paper's Table 5 is on FER2013)"
    with torch.no_grad():
        pred = torch.cat([model(tx[s : s + 500]).argmax(1) for s in range(0, len(tx), 500)])
    k = len(names)
    rate = torch.full((k, k), float("nan"))
    spars = torch.full((k, k), float("nan"))
    caps = restored = 0
    pairs = [(s, t) for s in range(k) for t in range(k) if s != t]
    for s, t in tqdm(pairs, desc="table5"):
        vals, sp = [], []
        for idx in _pick(ty, pred, s, args.images):
            res = sparse_smooth(
                model,
                tx[idx],
                gamma=args.gamma,
                target=t,
                bounds=bounds_of(args),
                options=sparse_options(args),
            )
            v = res.verify(args.samples, args.seed)
            vals.append(v["fooling_rate"])
            sp.append(v["sparsity"])
            caps += res.hit_iteration_cap
            restored += res.extra["restored"]
        if vals:
            rate[s, t] = sum(vals) / len(vals)
            spars[s, t] = sum(sp) / len(sp)
    rows = [[names[s]] + [float(rate[s, t]) for t in range(k)] for s in range(k)]
    off = rate[~torch.isnan(rate)]
    summary = {
        "mean_fooling": float(off.mean()) if off.numel() else float("nan"),
        "mean_sparsity": float(spars[~torch.isnan(spars)].mean()) if off.numel() else float("nan"),
        "iteration_cap_hits": int(caps),
        "restored_on_real_network": int(restored),
    }
    write_json(
        args.out,
        "table5",
        {
            "dataset": dataset,
            "classes": names,
            "fooling_rate": rate.tolist(),
            "sparsity": spars.tolist(),
            "images_per_class": args.images,
            "summary": summary,
            "run": run_info(args),
        },
    )
    md = (
        f"# Table 5 on {dataset}: targeted sparse-smooth fooling rate (row: source, column: "
        f"target)\n\n{args.images} image(s) per source class, {args.samples} samples each, "
        f"gamma = {args.gamma}. {range_note(args)} Mean fooling {summary['mean_fooling']:.3f}, "
        f"mean sparsity {summary['mean_sparsity']:.3f}, iteration-cap hits "
        f"{summary['iteration_cap_hits']}, solutions repaired on the real network "
        f"(restore_on_support) {summary['restored_on_real_network']}.\n\n"
        + markdown_table(["source \\ target", *names], rows)
    )
    write_markdown(args.out, "table5", md)
    print(md)
    return {"fooling_rate": rate.tolist(), "summary": summary}


def fig8(args: argparse.Namespace) -> dict:
    """Fooling rate and sparsity vs the achieved separation, targeted sparse-smooth attacks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    set_threads(args)
    model, tx, ty, pred = lenet_data()
    idxs = _pick(ty, pred, args.source, args.images)
    rows = []
    for g in tqdm(args.gammas, desc="fig8 gamma"):
        fr, sp, sep, caps, restored = [], [], [], 0, 0
        for idx in idxs:
            res = sparse_smooth(
                model,
                tx[idx],
                gamma=g,
                target=args.target,
                bounds=bounds_of(args),
                options=sparse_options(args),
            )
            v = res.verify(args.samples, args.seed)
            fr.append(v["fooling_rate"])
            sp.append(v["sparsity"])
            sep.append(-res.margin)
            caps += res.hit_iteration_cap
            restored += res.extra["restored"]
        t = torch.tensor
        rows.append(
            {
                "gamma": g,
                "separation": float(t(sep).mean()),
                "separation_std": float(t(sep).std()) if len(sep) > 1 else 0.0,
                "fooling_rate": float(t(fr).mean()),
                "fooling_std": float(t(fr).std()) if len(fr) > 1 else 0.0,
                "sparsity": float(t(sp).mean()),
                "sparsity_std": float(t(sp).std()) if len(sp) > 1 else 0.0,
                "images": len(idxs),
                "iteration_cap_hits": caps,
                "restored": restored,
            }
        )
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [r["separation"] for r in rows]
    ax.errorbar(
        xs,
        [r["fooling_rate"] for r in rows],
        yerr=[r["fooling_std"] for r in rows],
        xerr=[r["separation_std"] for r in rows],
        fmt="o-",
        capsize=3,
        label="fooling rate",
    )
    ax.errorbar(
        xs,
        [r["sparsity"] for r in rows],
        yerr=[r["sparsity_std"] for r in rows],
        fmt="s--",
        capsize=3,
        label="sparsity",
    )
    for r in rows:
        ax.annotate(f"gamma={r['gamma']:g}", (r["separation"], r["fooling_rate"]), fontsize=6)
    ax.set_xlabel("achieved expected separation E_j - max_{k!=j} E_k (linearized)")
    ax.set_ylabel("rate (mean +- std over images)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(
        f"{args.source} -> {args.target}, {len(idxs)} images, {args.samples} "
        f"{'clipped' if bounds_of(args) is not None else 'UNCLIPPED'} samples",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    save_figure(fig, args.out, "fig8")
    note = f"source {args.source} -> target {args.target}, {len(idxs)} images."
    _finish(args.out, "fig8", "Fig. 8: fooling rate and sparsity vs separation", rows, note, args)
    return {"rows": rows}


def demo_attacks(out_dir: Path | str) -> dict:
    """One targeted (Eq. 7) and one sparse-smooth (Eq. 9) attack on a LeNet test image, in [0, 1]."""
    model, tx, ty, pred = lenet_data()
    idx = _pick(ty, pred, 9, 1)[0]
    t = targeted(model, tx[idx], 4, options=TargetedOptions(warm_steps=20))
    s = sparse_smooth(model, tx[idx], gamma=0.5)
    attack_grid([t, s], Path(out_dir), "demo_attacks")
    report = {}
    for name, res in (("targeted", t), ("sparse_smooth", s)):
        v = res.verify(1000)
        report[name] = {
            "target": res.target,
            "margin": res.margin,
            "fooling_rate_clipped": v["fooling_rate"],
            "image_plus_mu_range": f"[{v['mean_image_min']:.3f}, {v['mean_image_max']:.3f}]",
            "sparsity": v["sparsity"],
            "wall_s": res.wall_time,
        }
    return report


def add_parser(sub) -> None:
    """Register fig3, fig4, fig6, fig7, fig8 and table5."""

    def common(
        name: str, fn, help_: str, maxiter: int, what: str = "SLSQP iteration cap"
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        add_common_args(p, device=False)
        add_attack_args(p)
        p.add_argument("--maxiter", type=int, default=maxiter, help=f"{what} (default: {maxiter})")
        p.set_defaults(func=lambda a: (fn(a), 0)[1])  # the CLI wants an int exit code
        return p

    def sparse_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--rounds",
            type=int,
            default=5,
            help="solves per attack: the first at the clean image's linearization, the others "
            "re-linearized at image + mu while the real network misses the constraint "
            "(default: 5)",
        )
        p.add_argument(
            "--restore-steps",
            type=int,
            default=40,
            help="projected-gradient steps on the real network, on the solve's support, that "
            "repair a round missing the constraint (0 = moments-only solves; default: 40)",
        )
        p.add_argument(
            "--max-support",
            type=float,
            default=0.2,
            help="largest fraction of non-zero pixels of mu (default: 0.2)",
        )

    p = common(
        "fig3",
        fig3,
        "targeted Gaussian attacks on a digit 9 (Eq. 7)",
        20,
        "SLSQP iteration cap, used with --eq7-solver slsqp",
    )
    p.add_argument(
        "--targets", type=int, nargs="+", default=[2, 3, 4, 7, 8], help="(default: 2 3 4 7 8)"
    )
    p.add_argument("--beta", type=float, default=30.0, help="box, 0..255 scale (default: 30)")
    p.add_argument("--index", type=int, default=0, help="which correctly classified 9 (default: 0)")
    p.add_argument(
        "--relinearize",
        type=int,
        default=0,
        help="re-linearization rounds at M + mu (extension; 0 = the paper's procedure; default: 0)",
    )
    p.add_argument(
        "--trust-radius",
        type=float,
        default=10.0,
        help="per-pixel step limit of each re-linearized solve, 0..255 scale (0 = none; default: 10)",
    )
    p = common("fig4", fig4, "alpha-pixel-support attacks (Eq. 8)", 200)
    p.add_argument("--alpha", type=float, default=0.04, help="support fraction (default: 0.04)")
    p.add_argument("--beta", type=float, default=550.0, help="box, 0..255 scale (default: 550)")
    p.add_argument("--supports", type=int, default=4, help="random supports (rows; default: 4)")
    p.add_argument("--index", type=int, default=0, help="which correctly classified 9 (default: 0)")
    p = common("fig6", fig6, "sparse-smooth non-targeted attacks (Eq. 9)", 100)
    sparse_flags(p)
    p.add_argument(
        "--classes", type=int, nargs="+", default=[0, 3, 5, 7, 8], help="(default: 0 3 5 7 8)"
    )
    p.add_argument("--gamma", type=float, default=0.5, help="margin (paper: 0; default: 0.5)")
    p.add_argument("--index", type=int, default=0, help="which image of each class (default: 0)")
    p = common("fig7", fig7, "sparse-smooth targeted attacks 4 -> 5, 8, 9 (Eq. 10)", 100)
    sparse_flags(p)
    p.add_argument("--targets", type=int, nargs="+", default=[5, 8, 9], help="(default: 5 8 9)")
    p.add_argument("--gamma", type=float, default=0.0, help="margin (default: 0)")
    p.add_argument("--index", type=int, default=0, help="which correctly classified 4 (default: 0)")
    p = common(
        "table5",
        table5,
        "source -> target fooling-rate matrix (Eqs. 9 + 10); MNIST/LeNet unless --data gives "
        "a FER2013 CSV",
        100,
    )
    sparse_flags(p)
    p.add_argument(
        "--images", type=int, default=1, help="images per source class (default: 1; paper: 10)"
    )
    p.add_argument("--samples", type=int, default=1000, help="verification samples (default: 1000)")
    p.add_argument("--gamma", type=float, default=0.0, help="margin (default: 0)")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="FER2013 CSV: use the AlexNet variant (default: none, MNIST/LeNet)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="alexnet48 state_dict for --data (default: none, train it on the CSV and save it in --out)",
    )
    p = common("fig8", fig8, "fooling rate and sparsity vs separation (Eqs. 9 + 10)", 100)
    sparse_flags(p)
    p.add_argument("--images", type=int, default=30, help="source images (default: 30)")
    p.add_argument("--samples", type=int, default=1000, help="verification samples (default: 1000)")
    p.add_argument("--source", type=int, default=5, help="source class (default: 5)")
    p.add_argument("--target", type=int, default=4, help="target class (default: 4)")
    p.add_argument(
        "--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0], help="(default: 0 0.5 1 2)"
    )
