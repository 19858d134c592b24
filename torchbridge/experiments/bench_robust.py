"""`nm bench regularizer`: cost of the moment regularizers against a plain training step.

On the cached LeNet (float32), one batch of ``--batch-size`` training digits, σ = ``--sigma``;
each timing is the median of ``--repeats`` runs after one untimed warm-up, all in one process:

* plain step: CE forward + backward on the batch;
* mean regularizer, first ReLU, batched (``moment_mean``, Gaussian and clip-matched input):
  loss forward + backward on the whole batch;
* per image, last ReLU (the paper's l = 3): ``two_stage_linearize`` with ``create_graph=False``
  (inference) and ``True``, and ``True`` + exact output covariance + backward (what
  ``moment_probit`` pays per regularized image).
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional

from torchbridge.data import mnist
from torchbridge.experiments.common import (
    markdown_table,
    median_time,
    write_json,
    write_markdown,
)
from torchbridge.experiments.robust import command_parser
from torchbridge.linearize import two_stage_linearize
from torchbridge.models import trained_lenet
from torchbridge.robust import Method, linearized_output_moments, robust_loss


def run_bench(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = trained_lenet(progress=False)
    train_x, train_y, _, _ = mnist()
    x, y = train_x[: args.batch_size], train_y[: args.batch_size]
    params = list(model.parameters())
    sigma = args.sigma

    def step(method: Method) -> None:
        model.train()
        loss = robust_loss(model, x, y, method, sigma)
        torch.autograd.grad(loss, params)
        model.eval()

    def plain() -> None:
        torch.autograd.grad(functional.cross_entropy(model(x), y), params)

    def probit_image() -> None:
        mean, cov = linearized_output_moments(model, x[:1], sigma, relu_index=-1, clipped=True)
        torch.autograd.grad(mean.sum() + cov.sum(), params)

    cases = [
        ("plain CE step", len(x), plain),
        ("moment_mean step, first ReLU, batched", len(x), lambda: step(Method("moment_mean"))),
        (
            "moment_mean step, first ReLU, batched, clip-matched",
            len(x),
            lambda: step(Method("moment_mean", clipped=True)),
        ),
        (
            "two_stage_linearize, last ReLU, create_graph=False",
            1,
            lambda: two_stage_linearize(model.eval(), x[0], -1),
        ),
        (
            "two_stage_linearize, last ReLU, create_graph=True",
            1,
            lambda: two_stage_linearize(model.eval(), x[0], -1, create_graph=True),
        ),
        ("+ exact output covariance + backward (probit, per image)", 1, probit_image),
    ]
    rows = []
    for name, images, fn in cases:
        t = median_time(fn, repeats=args.repeats)
        rows.append({"case": name, "images": images, "seconds": t, "per_image": t / images})
    base = rows[0]["per_image"]
    for r in rows:
        r["per_image_vs_plain"] = r["per_image"] / base
    res = {
        "batch_size": len(x),
        "sigma": sigma,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    table = markdown_table(
        ["case", "images", "median s", "s per image", "per image / plain step's"],
        [
            [
                r["case"],
                r["images"],
                f"{r['seconds']:.4f}",
                f"{r['per_image']:.4f}",
                f"{r['per_image_vs_plain']:.1f}",
            ]
            for r in rows
        ],
    )
    text = (
        f"LeNet float32, batch {len(x)}, σ = {sigma:g}, median of {args.repeats}, "
        f"{torch.get_num_threads()} torch thread(s).\n\n{table}"
    )
    write_json(args.out, "bench_regularizer", res)
    write_markdown(args.out, "bench_regularizer", text)
    print(text)
    return res


def add_bench_parser(bench_subparsers) -> None:
    """Register `nm bench regularizer`."""
    p = command_parser(
        bench_subparsers,
        "regularizer",
        "cost of the moment regularizers vs a plain training step (LeNet)",
        __doc__,
    )
    p.add_argument("--batch-size", type=int, default=64, help="training digits (default 64)")
    p.add_argument("--sigma", type=float, default=0.25, help="noise std (default 0.25)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median; default 5)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0: leave)"
    )
    p.set_defaults(func=run_bench)
