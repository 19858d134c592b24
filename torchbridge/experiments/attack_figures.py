"""`nm fig3 | fig4 | fig6 | fig7 | fig8 | table5`: Gaussian adversarial attacks (Section 4.3).

Every command writes ``<out>/<name>.json``, ``<name>.md`` and a PNG image grid with columns
original | |mu| | mu+ | mu- | noisy sample (title: predicted class), as in the paper's figures.
Paper values on the 0..255 scale are converted to [0, 1] pixel units.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from torchbridge.attacks import AttackResult, pixel_support, sparse_smooth, targeted
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


def attack_grid(results: list[AttackResult], out: Path, name: str, seed: int = 0) -> Path:
    """PNG grid: one row per attack, columns original, |mu|, mu+, mu-, noisy sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(results))
    fig, axes = plt.subplots(rows, 5, figsize=(7.5, 1.6 * rows), squeeze=False)
    for r, res in enumerate(results):
        img = res.image.reshape(res.image.shape[-2:]).numpy()
        mu = res.mu.reshape(res.image.shape[-2:]).double().numpy()
        sample = res.samples(1, seed)[0]
        pred = int(res.predict(sample[None])[0])
        sample = sample.reshape(img.shape).numpy()
        panels = [
            (img, f"original ({res.source})", "gray"),
            (abs(mu), "|mu|", "magma"),
            (mu.clip(min=0), "mu+", "Reds"),
            ((-mu).clip(min=0), "mu-", "Blues"),
            (sample, f"noisy -> {pred}", "gray"),
        ]
        for c, (data, title, cmap) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(data, cmap=cmap)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out, name)


def _row(res: AttackResult, v: dict, **extra) -> dict:
    return {
        **extra,
        "source": res.source,
        "target": res.target,
        "status": res.status,
        "success": res.success,
        "margin": res.margin,
        "sigma2_255": res.sigma2 * 255**2,
        "iterations": res.iterations,
        "wall_s": res.wall_time,
        **{k: v[k] for k in ("fooling_rate", "sparsity", "tv", "mean_prediction")},
    }


def _finish(out: Path, name: str, title: str, rows: list[dict], note: str = "") -> None:
    write_json(out, name, {"rows": rows, "note": note})
    headers = list(rows[0].keys()) if rows else ["(no rows)"]
    md = f"# {title}\n\n{note}\n\n" + markdown_table(headers, [list(r.values()) for r in rows])
    write_markdown(out, name, md)
    print(md)


def fig3(args: argparse.Namespace) -> dict:
    """Digit 9 pushed to targets {2, 3, 4, 7, 8}, beta = 30/255 (Eq. 7)."""
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
            maxiter=args.maxiter,
            warm_steps=20,
            relinearize=args.relinearize,
            trust_radius=args.trust_radius / 255 if args.trust_radius > 0 else None,
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
    attack_grid(results, args.out, "fig3")
    note = (
        f"Eq. 7, beta = {args.beta}/255, sigma^2 <= 2/255^2; fooling rate = fraction of noisy "
        "samples the real LeNet classifies as the target (paper criterion: >= 90%). "
        + (
            "Paper procedure: one linearization at the clean image."
            if args.relinearize == 0
            else f"EXTENSION of the paper: up to {args.relinearize} re-linearizations at "
            f"M + mu (trust radius {args.trust_radius}/255 per pixel) while the real "
            "network's expected margin is >= 0."
        )
    )
    _finish(args.out, "fig3", "Fig. 3: targeted Gaussian attacks", rows, note)
    return {"rows": rows}


def fig4(args: argparse.Namespace) -> dict:
    """Non-targeted alpha-pixel-support attacks (Eq. 8), alpha = 4%, beta = 550/255."""
    model, tx, ty, pred = lenet_data()
    idx = _pick(ty, pred, 9, 1, args.index)[0]
    results, rows = [], []
    for s in tqdm(range(args.supports), desc="fig4 pixel support"):
        res = pixel_support(
            model, tx[idx], alpha=args.alpha, beta=args.beta / 255, seed=args.seed + s
        )
        v = res.verify(1000, args.seed)
        results.append(res)
        rows.append(_row(res, v, image=idx, support_seed=args.seed + s))
    attack_grid(results, args.out, "fig4")
    note = f"Eq. 8, alpha = {args.alpha}, beta = {args.beta}/255, random fixed support per row."
    _finish(args.out, "fig4", "Fig. 4: alpha-pixel-support attacks", rows, note)
    return {"rows": rows}


def fig6(args: argparse.Namespace) -> dict:
    """Sparse-smooth non-targeted attacks (Eq. 9), one image per class in ``--classes``."""
    model, tx, ty, pred = lenet_data()
    results, rows = [], []
    for c in tqdm(args.classes, desc="fig6 sparse-smooth"):
        idx = _pick(ty, pred, c, 1, args.index)[0]
        res = sparse_smooth(
            model, tx[idx], gamma=args.gamma, maxiter=args.maxiter, refine=args.refine
        )
        v = res.verify(1000, args.seed)
        results.append(res)
        rows.append(_row(res, v, image=idx))
    attack_grid(results, args.out, "fig6")
    note = f"Eq. 9, gamma = {args.gamma}, Sigma = (1/255)^2 I; fooling = not the source class."
    _finish(args.out, "fig6", "Fig. 6: sparse-smooth non-targeted attacks", rows, note)
    return {"rows": rows}


def fig7(args: argparse.Namespace) -> dict:
    """Sparse-smooth targeted attacks (Eq. 10): digit 4 -> 5, 8, 9."""
    model, tx, ty, pred = lenet_data()
    idx = _pick(ty, pred, 4, 1, args.index)[0]
    results, rows = [], []
    for tgt in tqdm(args.targets, desc="fig7 sparse-smooth targeted"):
        res = sparse_smooth(
            model, tx[idx], gamma=args.gamma, target=tgt, maxiter=args.maxiter, refine=args.refine
        )
        v = res.verify(1000, args.seed)
        results.append(res)
        rows.append(_row(res, v, image=idx))
    attack_grid(results, args.out, "fig7")
    note = f"Eq. 9 with constraint (10), gamma = {args.gamma}, Sigma = (1/255)^2 I."
    _finish(args.out, "fig7", "Fig. 7: sparse-smooth targeted attacks", rows, note)
    return {"rows": rows}


def table5(args: argparse.Namespace) -> dict:
    """Confusion matrix of targeted sparse-smooth fooling rates, source -> target."""
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
    else:
        model, tx, ty, _ = lenet_data()
        names = [str(c) for c in range(10)]
    with torch.no_grad():
        pred = torch.cat([model(tx[s : s + 500]).argmax(1) for s in range(0, len(tx), 500)])
    k = len(names)
    rate = torch.full((k, k), float("nan"))
    pairs = [(s, t) for s in range(k) for t in range(k) if s != t]
    for s, t in tqdm(pairs, desc="table5"):
        vals = []
        for idx in _pick(ty, pred, s, args.images):
            res = sparse_smooth(
                model, tx[idx], gamma=args.gamma, target=t, maxiter=args.maxiter, refine=args.refine
            )
            vals.append(res.verify(args.samples, args.seed)["fooling_rate"])
        if vals:
            rate[s, t] = sum(vals) / len(vals)
    rows = [[names[s]] + [float(rate[s, t]) for t in range(k)] for s in range(k)]
    write_json(
        args.out,
        "table5",
        {"classes": names, "fooling_rate": rate.tolist(), "images_per_class": args.images},
    )
    md = (
        "# Table 5: targeted sparse-smooth fooling rate (row: source, column: target)\n\n"
        + markdown_table(["source \\ target", *names], rows)
    )
    write_markdown(args.out, "table5", md)
    print(md)
    return {"fooling_rate": rate.tolist()}


def fig8(args: argparse.Namespace) -> dict:
    """Fooling rate and sparsity vs gamma for targeted sparse-smooth attacks (source -> target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, tx, ty, pred = lenet_data()
    idxs = _pick(ty, pred, args.source, args.images)
    rows = []
    for g in tqdm(args.gammas, desc="fig8 gamma"):
        fr, sp = [], []
        for idx in idxs:
            res = sparse_smooth(
                model,
                tx[idx],
                gamma=g,
                target=args.target,
                maxiter=args.maxiter,
                refine=args.refine,
            )
            v = res.verify(args.samples, args.seed)
            fr.append(v["fooling_rate"])
            sp.append(v["sparsity"])
        rows.append(
            {
                "gamma": g,
                "fooling_rate": sum(fr) / len(fr),
                "sparsity": sum(sp) / len(sp),
                "images": len(idxs),
            }
        )
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot([r["gamma"] for r in rows], [r["fooling_rate"] for r in rows], "o-", label="fooling")
    ax.plot([r["gamma"] for r in rows], [r["sparsity"] for r in rows], "s--", label="sparsity")
    ax.set_xlabel("gamma")
    ax.legend()
    save_figure(fig, args.out, "fig8")
    note = f"source {args.source} -> target {args.target}, {len(idxs)} images."
    _finish(args.out, "fig8", "Fig. 8: fooling rate and sparsity vs gamma", rows, note)
    return {"rows": rows}


def demo_attacks(out_dir: Path | str) -> dict:
    """One targeted (Eq. 7) and one sparse-smooth (Eq. 9) attack on a LeNet test image."""
    model, tx, ty, pred = lenet_data()
    idx = _pick(ty, pred, 9, 1)[0]
    t = targeted(model, tx[idx], 7, maxiter=10, warm_steps=20)
    s = sparse_smooth(model, tx[idx], gamma=0.5, maxiter=30, refine=True, refine_rounds=1)
    attack_grid([t, s], Path(out_dir), "demo_attacks")
    vt, vs = t.verify(1000), s.verify(1000)
    return {
        "targeted": {
            "target": 7,
            "margin": t.margin,
            "fooling_rate": vt["fooling_rate"],
            "wall_s": t.wall_time,
        },
        "sparse_smooth": {
            "margin": s.margin,
            "fooling_rate": vs["fooling_rate"],
            "sparsity": vs["sparsity"],
            "wall_s": s.wall_time,
        },
    }


def add_parser(sub) -> None:
    """Register fig3, fig4, fig6, fig7, fig8 and table5."""

    def common(name: str, fn, help_: str, maxiter: int) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        add_common_args(p, device=False)
        p.add_argument("--maxiter", type=int, default=maxiter, help="SLSQP iteration cap")
        p.set_defaults(func=lambda a: (fn(a), 0)[1])  # the CLI wants an int exit code
        return p

    def refine_flag(p: argparse.ArgumentParser, default: bool = True) -> None:
        p.add_argument(
            "--refine",
            action=argparse.BooleanOptionalAction,
            default=default,
            help="support refinement after the smoothed solve: keep the largest |mu| pixels "
            "(<= 20%%), re-solve on that support, keep the sparsest solution that fools the "
            f"real network (default: {'on' if default else 'off'}; about 2-4x the solve time)",
        )

    p = common("fig3", fig3, "targeted Gaussian attacks on a digit 9 (Eq. 7)", 20)
    p.add_argument("--targets", type=int, nargs="+", default=[2, 3, 4, 7, 8])
    p.add_argument("--beta", type=float, default=30.0, help="on the 0..255 scale")
    p.add_argument("--index", type=int, default=0, help="which correctly classified 9")
    p.add_argument(
        "--relinearize",
        type=int,
        default=0,
        help="re-linearization rounds at M + mu (extension; 0 = the paper's procedure)",
    )
    p.add_argument(
        "--trust-radius",
        type=float,
        default=10.0,
        help="per-pixel step limit of each re-linearized solve, 0..255 scale (0 = none)",
    )
    p = common("fig4", fig4, "alpha-pixel-support attacks (Eq. 8)", 200)
    p.add_argument("--alpha", type=float, default=0.04)
    p.add_argument("--beta", type=float, default=550.0, help="on the 0..255 scale")
    p.add_argument("--supports", type=int, default=4, help="random supports (rows)")
    p.add_argument("--index", type=int, default=0)
    p = common("fig6", fig6, "sparse-smooth non-targeted attacks (Eq. 9)", 60)
    refine_flag(p)
    p.add_argument("--classes", type=int, nargs="+", default=[0, 3, 5, 7, 8])
    p.add_argument("--gamma", type=float, default=0.5, help="margin (paper: 0; see Fig. 8)")
    p.add_argument("--index", type=int, default=0)
    p = common("fig7", fig7, "sparse-smooth targeted attacks 4 -> 5, 8, 9 (Eq. 10)", 150)
    refine_flag(p)
    p.add_argument("--targets", type=int, nargs="+", default=[5, 8, 9])
    p.add_argument("--gamma", type=float, default=0.0)
    p.add_argument("--index", type=int, default=0)
    p = common("table5", table5, "source -> target fooling-rate matrix (Eqs. 9 + 10)", 100)
    refine_flag(p, default=False)
    p.add_argument("--images", type=int, default=1, help="images per source class")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--gamma", type=float, default=0.0)
    p.add_argument("--data", type=Path, default=None, help="FER2013 CSV: use the AlexNet variant")
    p.add_argument("--checkpoint", type=Path, default=None, help="alexnet48 state_dict")
    p = common("fig8", fig8, "fooling rate and sparsity vs gamma (Eqs. 9 + 10)", 100)
    refine_flag(p)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--source", type=int, default=5)
    p.add_argument("--target", type=int, default=4)
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
