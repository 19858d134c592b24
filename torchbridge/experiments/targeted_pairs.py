"""`nm pairs`: targeted Gaussian attacks (Eq. 7) on held-out (image, target) pairs.

The pairs are fixed before anything is solved: the correctly classified MNIST test images
from position ``--start`` of the test split on (default 100, past the images the other figures
use), each with one target class (``--target-rule``: the real network's runner-up class, or
``(label + 1) mod 10``). Each pair is attacked with the paper's procedure (one linearization
at the clean image) and, unless ``--relinearize 0``, with the re-linearizing extension of
:func:`torchbridge.attacks.targeted`; each solution is verified with 1000 samples of the real
LeNet (fooled = >= 90% of the samples classified as the target, the paper's criterion). A
projected-gradient attack on the real, noise-free network in the same box
(:func:`torchbridge.attacks.pgd_targeted`) tells pairs the box cannot flip at all.
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from torchbridge.attacks import pgd_targeted, targeted
from torchbridge.experiments.attack_figures import (
    add_attack_args,
    attack_grid,
    bounds_of,
    lenet_data,
    range_note,
    run_info,
    set_threads,
    targeted_options,
)
from torchbridge.experiments.common import (
    add_common_args,
    markdown_table,
    write_json,
    write_markdown,
)

#: The paper's success criterion for one (image, target) pair.
FOOLING_CRITERION = 0.9


def held_out_pairs(
    model: torch.nn.Module,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    count: int,
    start: int = 100,
    rule: str = "runner-up",
) -> list[tuple[int, int]]:
    """``count`` pairs ``(test index, target)``: correctly classified test images with index
    ``>= start``, in order; target = runner-up logit of the real network or ``(y + 1) % 10``."""
    if rule not in ("runner-up", "next"):
        raise ValueError(f"rule must be 'runner-up' or 'next', got {rule!r}")
    with torch.no_grad():
        out = model(test_x[start:])
    pairs = []
    for k in range(out.shape[0]):
        y = int(test_y[start + k])
        if int(out[k].argmax()) != y:
            continue
        t = int(out[k].argsort(descending=True)[1]) if rule == "runner-up" else (y + 1) % 10
        pairs.append((start + k, t))
        if len(pairs) == count:
            break
    return pairs


def pairs(args: argparse.Namespace) -> dict:
    """Run Eq. 7 (paper procedure and re-linearized) and PGD on the held-out pairs."""
    set_threads(args)
    model, tx, ty, _ = lenet_data()
    beta = args.beta / 255
    chosen = held_out_pairs(model, tx, ty, args.pairs, args.start, args.target_rule)
    methods = {"paper": 0} | ({"relinearized": args.relinearize} if args.relinearize else {})
    rows, grid = [], []
    for idx, tgt in tqdm(chosen, desc="Eq. 7 pairs"):
        row: dict = {"image": idx, "label": int(ty[idx]), "target": tgt}
        for name, rounds in methods.items():
            res = targeted(
                model,
                tx[idx],
                tgt,
                beta=beta,
                bounds=bounds_of(args),
                options=targeted_options(args, rounds),
            )
            v = res.verify(args.samples, args.seed)
            row[f"{name}_margin"] = res.margin
            row[f"{name}_fooling"] = v["fooling_rate"]
            row[f"{name}_cap"] = res.hit_iteration_cap
            row[f"{name}_wall_s"] = res.wall_time
            if name == list(methods)[-1]:
                grid.append(res)
        if args.pgd:
            _, m = pgd_targeted(model, tx[idx], tgt, beta, bounds=bounds_of(args), seed=args.seed)
            row["pgd_real_margin"] = m
        rows.append(row)
    summary = {
        name: sum(r[f"{name}_fooling"] >= FOOLING_CRITERION for r in rows) for name in methods
    }
    if args.pgd:
        summary["pgd_feasible"] = sum(r["pgd_real_margin"] < 0 for r in rows)
        for name in methods:
            summary[f"{name}_of_pgd_feasible"] = sum(
                r[f"{name}_fooling"] >= FOOLING_CRITERION for r in rows if r["pgd_real_margin"] < 0
            )
    attack_grid(grid, args.out, "pairs")
    write_json(
        args.out,
        "pairs",
        {"rows": rows, "summary": summary, "pairs": len(rows), "run": run_info(args)},
    )
    lines = [
        f"- {k}: **{v} of {summary['pgd_feasible'] if k.endswith('_of_pgd_feasible') else len(rows)}**"
        " pairs"
        for k, v in summary.items()
    ]
    md = (
        f"# Eq. 7 on held-out pairs (beta = {args.beta}/255, target rule {args.target_rule})\n\n"
        f"Fooled = >= {FOOLING_CRITERION:.0%} of {args.samples} noisy samples of the real LeNet "
        f"classified as the target. {range_note(args)} `paper`: one linearization at the "
        "clean image; "
        f"`relinearized`: up to {args.relinearize} re-linearizations at M + mu (trust radius "
        f"{args.trust_radius}/255); `pgd_feasible`: PGD on the real noise-free network reaches "
        "a negative margin in the same box and pixel range; `X_of_pgd_feasible`: pairs fooled "
        "by method X among those.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + markdown_table(list(rows[0]), [list(r.values()) for r in rows])
    )
    write_markdown(args.out, "pairs", md)
    print(md)
    return {"rows": rows, "summary": summary}


def add_parser(sub) -> None:
    """Register ``nm pairs``."""
    p = sub.add_parser(
        "pairs",
        help="targeted attacks (Eq. 7) on held-out (image, target) pairs, with a PGD reference",
        description=__doc__.split("\n\n", 1)[1],
    )
    add_common_args(p, device=False)
    add_attack_args(p)
    p.add_argument("--pairs", type=int, default=10, help="number of pairs (default: 10)")
    p.add_argument("--start", type=int, default=100, help="first test index (default: 100)")
    p.add_argument(
        "--target-rule",
        choices=["runner-up", "next"],
        default="runner-up",
        help="target class (default: runner-up)",
    )
    p.add_argument(
        "--beta", type=float, default=30.0, help="±β box, grey levels 0..255 (default: 30)"
    )
    p.add_argument(
        "--maxiter",
        type=int,
        default=20,
        help="SLSQP iteration cap per solve, used with --eq7-solver slsqp (default: 20)",
    )
    p.add_argument(
        "--relinearize",
        type=int,
        default=10,
        help="re-linearization rounds of the extension (0: paper procedure only; default: 10)",
    )
    p.add_argument(
        "--trust-radius",
        type=float,
        default=10.0,
        help="trust radius per round, grey levels 0..255 (default: 10)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=1000,
        help="clipped noisy samples per verification (default: 1000)",
    )
    p.add_argument(
        "--pgd",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="PGD on the real network in the same box as a feasibility reference",
    )
    p.set_defaults(func=lambda a: (pairs(a), 0)[1])
