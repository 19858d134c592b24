"""Per-layer diagnosis of layer-wise propagation against Monte Carlo (issue #11, LeNet).

For one model, test images and noise levels σ (input N(M, σ²I)), every variant of
propagation records the mean and variance of every random tensor of the (max-pool/ReLU
commuted) fx graph; one Monte Carlo run per (image, σ) — the same noise for every variant —
gives the reference of each tensor (float32 forward passes, float64 sums). Per layer the
table gives the aggregate relative error Σ|x − y| / Σ|y| of the mean and of the variance
(robust to the many units of tiny variance), at the output also E_r (the bench's measure),
and Monte Carlo's own noise (the same errors between its two independent halves, / 2).

Variants: ``linearize`` (two-stage linearization, output only), ``lowrank-tree``
(diagonal-plus-low-rank everywhere, max-pooling as a tree of separate pairwise maxima: the
form before issue #11's diagnosis), ``lowrank`` (the same with each max-pooling window's
covariance held in full), ``auto`` (the default), ``auto-treerelu`` (the default with
``window_relu="tree"``: relu(max-pool) from the re-fitted tree, the form before the numerical
window moments), ``auto-stein`` / ``auto-winfull`` / ``auto-qmcpairs`` / ``auto-all`` (the
default with ``window_gain="stein"`` / ``window_full=True`` / Stein gains and
``window_pairs=True`` / all three), ``auto-pool2`` (the default with window pairs also at a
max-pooling whose input factor is dense, as LeNet's max-pool2: ``LocalResidual.pool_units`` =
``--pool-units``, ``pool_rho`` = ``--pool-rho``; with the default values, the default since
session 19), ``auto-nopool2`` (the default without them: the default before), ``auto-tree`` (the default before:
pairwise tree, reading-order pairs), ``full``
(full covariance as soon as the live tensors have at most ``--full-units`` units), ``diagonal``
(ADF), and ``+pool-oracle`` versions in which the output of every max-pooling layer (the
re-fitted maximum) is replaced by Monte Carlo's moments of that layer: its mean, variance
and cross-covariance with the input noise (factor form), or its mean and variance with the
propagated correlations kept (full form). The difference between a variant and its oracle
is the cost of the max-pool re-fit; between ``lowrank`` and ``full``, the cost of dropping
the ReLU residual correlations.

Run: ``python -m torchbridge.experiments.diagnose_propagate --help``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import fx

from torchbridge.data import mnist
from torchbridge.experiments.common import relative_difference
from torchbridge.propagate import PropagateOptions, propagate_one, trace
from torchbridge.propagate.lowering import commute_relu_max_pool
from torchbridge.propagate.pooling import max_pool_windows
from torchbridge.propagate.residual import LocalResidual

VARIANTS = (
    "linearize",
    "lowrank-tree",
    "lowrank",
    "auto",
    "auto-treerelu",
    "auto-stein",
    "auto-winfull",
    "auto-stein-winfull",
    "auto-qmcpairs",
    "auto-all",
    "auto-drop",
    "auto-pool2",
    "auto-nopool2",
    "lowrank-drop",
    "auto-tree",
    "full",
    "diagonal",
    "lowrank+pool-oracle",
    "auto+pool-oracle",
    "full+pool-oracle",
)


class _Recorder(fx.Interpreter):
    """Runs the graph on a batch and accumulates per-node sums (float64) of y, y², y εᵀ."""

    def __init__(self, gm: fx.GraphModule, cross: set[str]) -> None:
        super().__init__(gm)
        self.cross = cross
        self.eps: torch.Tensor | None = None
        self.sums: dict[str, list[torch.Tensor]] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.op in ("placeholder", "output") or not torch.is_tensor(out):
            return out
        y = out.reshape(out.shape[0], -1).double()
        acc = self.sums.setdefault(n.name, [0, 0, 0])
        acc[0] = acc[0] + y.sum(0)
        acc[1] = acc[1] + y.square().sum(0)
        if n.name in self.cross:  # a max-pool: count how often each input element wins
            m = self.module.get_submodule(n.target)
            z = self.env[n.args[0]]
            _, idx = torch.nn.functional.max_pool2d(
                z, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True
            )
            hw = z.shape[2] * z.shape[3]
            chan = torch.arange(z.shape[1])[None, :, None, None] * hw
            wins = torch.zeros(z[0].numel(), dtype=torch.float64)
            wins.index_add_(
                0, (idx + chan).reshape(-1), torch.ones(idx.numel(), dtype=torch.float64)
            )
            acc[2] = acc[2] + wins
        return out


def monte_carlo_layers(
    gm32: fx.GraphModule, x: torch.Tensor, sigma: float, samples: int, seed: int, cross: set[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Per node: MC mean, variance (q,), the half-vs-half noise of mean and variance, and for
    the max-pool nodes in ``cross`` (nn.MaxPool2d) the probability that each input element
    is its window's maximum. ``x``: (1, *input_shape) float64."""
    gen = torch.Generator().manual_seed(seed)
    n = x[0].numel()
    halves = []
    chunk = 2000
    for _h in range(2):
        rec = _Recorder(gm32, cross)
        done = 0
        eps_sum = torch.zeros(n, dtype=torch.float64)
        while done < samples // 2:
            b = min(chunk, samples // 2 - done)
            eps = torch.randn(b, n, generator=gen, dtype=torch.float64)
            rec.eps = eps
            with torch.no_grad():
                rec.run((x.reshape(1, -1) + sigma * eps).reshape(b, *x.shape[1:]).float())
            eps_sum += eps.sum(0)
            done += b
        halves.append((rec.sums, eps_sum, done))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in halves[0][0]:
        stats = []
        for sums, _, cnt in halves:
            m = sums[name][0] / cnt
            stats.append((m, (sums[name][1] / cnt - m.square()) * cnt / (cnt - 1)))
        N = sum(h[2] for h in halves)
        s0 = halves[0][0][name][0] + halves[1][0][name][0]
        s1 = halves[0][0][name][1] + halves[1][0][name][1]
        m = s0 / N
        rec_ = {
            "mean": m,
            "var": (s1 / N - m.square()) * N / (N - 1),
            "noise_mean": _agg(stats[0][0], stats[1][0]) / 2,
            "noise_var": _agg(stats[0][1], stats[1][1]) / 2,
            "noise_er_var": float(relative_difference(stats[0][1], stats[1][1]).mean()) / 2,
        }
        if name in cross:  # P(input element k is the window's maximum)
            rec_["wins"] = (halves[0][0][name][2] + halves[1][0][name][2]) / N
        out[name] = rec_
    return out


def _cached_monte_carlo(
    args: argparse.Namespace,
    gm32: fx.GraphModule,
    x: torch.Tensor,
    i: int,
    sigma: float,
    cross: set[str],
) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """``monte_carlo_layers`` for test image ``i`` at ``sigma`` (seed ``args.seed`` + i), read
    from / written to ``args.mc_cache`` when given (the run is deterministic in model, image,
    σ, samples and seed, which name the file); returns (stats, seconds of the original run)."""
    path = None
    if args.mc_cache:
        name = f"mc_{args.model}_img{i}_s{sigma:g}_n{args.samples}_seed{args.seed + i}.pt"
        path = Path(args.mc_cache) / name
        if path.exists():
            saved = torch.load(path)
            return saved["mc"], saved["seconds"]
    t = time.perf_counter()
    mc = monte_carlo_layers(gm32, x, sigma, args.samples, args.seed + i, cross)
    secs = time.perf_counter() - t
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"mc": mc, "seconds": secs}, path)
    return mc, secs


def _agg(x: torch.Tensor, y: torch.Tensor) -> float:
    """Σ|x − y| / Σ|y|."""
    return float((x - y).abs().sum() / y.abs().sum().clamp_min(1e-300))


def _inject(state, nid: int, src: int, windows: torch.Tensor, mc: dict) -> None:
    """Replace max-pool output ``nid``'s moments in ``state`` by Monte Carlo's (module doc).

    Factor form: by Stein's lemma Cov(max_k z_k, ε) = Σ_k P(z_k wins) Cov(z_k, ε) exactly, so
    the factor is built from the pool input's (exact, Gaussian) factor and MC's win
    probabilities (far less noisy than an MC estimate of the cross-covariance itself).
    """
    m, v = mc["mean"], mc["var"]
    if state.kind == "factor":
        Fz, p = state.factor[src], mc["wins"]
        F = sum(p[w][:, None] * Fz[w] for w in windows)
        state.mean[nid] = m.clone()
        state.factor[nid] = F.clone()
        state.resid[nid] = (v - F.square().sum(1)).clamp_min(0)
        return
    old = state.cov[(nid, nid)].diagonal().clamp_min(1e-300)
    s = (v.clamp_min(0) / old).sqrt()
    state.mean[nid] = m.clone()
    for key in list(state.cov):
        if key == (nid, nid):
            state.cov[key] = s[:, None] * state.cov[key] * s[None, :]
        elif key[1] == nid:
            state.cov[key] = state.cov[key] * s[None, :]
        elif key[0] == nid:
            state.cov[key] = s[:, None] * state.cov[key]


def propagate_layers(
    gm: fx.GraphModule,
    x: torch.Tensor,
    var: float,
    opts: PropagateOptions,
    oracle: dict[str, dict[str, torch.Tensor]] | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per node: propagated (mean (q,), variance (q,)); with ``oracle`` {node: MC stats},
    those nodes' moments are replaced by Monte Carlo's before the walk goes on."""
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = {}

    def hook(node, handle, lw):
        st = lw.state
        if oracle is not None and node.name in oracle:
            src = handles[node.args[0].name]
            m = gm.get_submodule(node.target)
            shape = (1, *src.ref.shape[1:])
            win = max_pool_windows(shape, m.kernel_size, m.stride, m.padding, m.dilation)
            _inject(st, handle.nid, src.nid, win, oracle[node.name])
        handles[node.name] = handle
        m = st.mean[handle.nid]
        v = st.cov[(handle.nid, handle.nid)].diagonal() if st.kind == "full" else None
        if v is None:
            v = st.variance(handle.nid)
        got[node.name] = (m.clone(), v.clone())

    propagate_one(gm, x, torch.tensor(var, dtype=x.dtype), "scalar", opts, after_node=hook)
    return got


def pool_nodes(gm: fx.GraphModule) -> list[str]:
    from torchbridge.propagate.lowering import _is_max_pool

    return [n.name for n in gm.graph.nodes if n.op != "placeholder" and _is_max_pool(n, gm)]


def run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from torchbridge.experiments.bench_propagate import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    gm = commute_relu_max_pool(trace(model))
    gm32 = commute_relu_max_pool(trace(load_model(args.model).float()))
    pools = pool_nodes(gm)
    _, _, test_x, _ = mnist()
    report: dict = {"args": {k: v for k, v in vars(args).items() if not callable(v)}, "results": []}
    jobs = [(i, s) for i in args.images for s in args.sigmas]
    for i, sigma in tqdm(jobs, desc="diagnose"):
        x = test_x[i : i + 1].double()
        mc, mc_secs = _cached_monte_carlo(args, gm32, x, i, sigma, set(pools))
        layers = [n for n in mc if n in _layer_names(gm)]
        entry = {"image": i, "sigma": sigma, "mc_seconds": mc_secs, "layers": layers}
        entry["mc_noise"] = {n: (mc[n]["noise_mean"], mc[n]["noise_var"]) for n in layers}
        entry["mc_noise_er_var_out"] = mc[layers[-1]]["noise_er_var"]
        for variant in args.variants:
            base, _, orc = variant.partition("+")
            if base == "linearize":  # output only: two-stage linearization at the last ReLU
                from torchbridge.experiments.bench_propagate import _run_method

                t = time.perf_counter()
                lm, lv, _, _ = _run_method("linearize", model, x, sigma**2, 4096)
                entry[variant] = {
                    "layers": {},
                    "er_var_out": float(relative_difference(lv, mc[layers[-1]]["var"]).mean()),
                    "er_mean_out": float(relative_difference(lm, mc[layers[-1]]["mean"]).mean()),
                    "seconds": time.perf_counter() - t,
                }
                continue
            opts = {
                "lowrank-tree": PropagateOptions(
                    covariance="lowrank", pool_window=False, residual="drop"
                ),
                "lowrank": PropagateOptions(covariance="lowrank"),
                "lowrank-drop": PropagateOptions(covariance="lowrank", residual="drop"),
                "auto": PropagateOptions(),
                "auto-treerelu": PropagateOptions(window_relu="tree"),
                "auto-stein": PropagateOptions(window_gain="stein"),
                "auto-winfull": PropagateOptions(window_full=True),
                "auto-stein-winfull": PropagateOptions(window_gain="stein", window_full=True),
                "auto-qmcpairs": PropagateOptions(window_gain="stein", window_pairs=True),
                "auto-all": PropagateOptions(
                    window_gain="stein", window_pairs=True, window_full=True
                ),
                "auto-drop": PropagateOptions(residual="drop"),
                "auto-pool2": PropagateOptions(
                    local=LocalResidual(pool_units=args.pool_units, pool_rho=args.pool_rho)
                ),
                "auto-nopool2": PropagateOptions(local=LocalResidual(pool_units=0)),
                "auto-tree": PropagateOptions(
                    pool_window=False, pool_pairing="fixed", residual="drop"
                ),
                "full": PropagateOptions(max_full=args.full_units, relu_method=args.full_relu),
                "diagonal": PropagateOptions(covariance="diagonal", residual="drop"),
            }[base]
            oracle = {p: mc[p] for p in pools} if orc else None
            t = time.perf_counter()
            with torch.no_grad():
                got = propagate_layers(gm, x, sigma**2, opts, oracle)
            secs = time.perf_counter() - t
            rows = {}
            for n in layers:
                pm, pv = got[n]
                rows[n] = (_agg(pm, mc[n]["mean"]), _agg(pv, mc[n]["var"]))
            out = layers[-1]
            entry[variant] = {
                "layers": rows,
                "er_var_out": float(relative_difference(got[out][1], mc[out]["var"]).mean()),
                "er_mean_out": float(relative_difference(got[out][0], mc[out]["mean"]).mean()),
                "seconds": secs,
            }
        report["results"].append(entry)
        print(_table(entry, gm), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tag = "_".join(str(i) for i in args.images)
    path = Path(args.out) / f"diagnose_propagate_{args.model}_{tag}.json"
    path.write_text(json.dumps(report, indent=1))
    return report


def _layer_names(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op in ("call_module", "call_function")]


def _label(gm: fx.GraphModule, name: str) -> str:
    node = next(n for n in gm.graph.nodes if n.name == name)
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__.replace("2d", "")
    return name


def _table(entry: dict, gm: fx.GraphModule) -> str:
    layers = entry["layers"]
    head = " | ".join(_label(gm, n) for n in layers)
    lines = [
        f"### image {entry['image']}, σ = {entry['sigma']:g}: per-layer Σ|x−y|/Σ|y| of "
        "mean / variance vs MC",
        "",
        f"| variant | {head} | out var E_r | out mean E_r | s |",
        "|---" * (len(layers) + 4) + "|",
    ]
    for v in VARIANTS:
        if v not in entry:
            continue
        e = entry[v]
        cells = " | ".join(
            f"{e['layers'][n][0]:.2g} / {e['layers'][n][1]:.2g}" if n in e["layers"] else ""
            for n in layers
        )
        lines.append(
            f"| {v} | {cells} | {e['er_var_out']:.3g} | {e['er_mean_out']:.3g} | "
            f"{e['seconds']:.1f} |"
        )
    noise = " | ".join(f"{a:.1g} / {b:.1g}" for a, b in entry["mc_noise"].values())
    lines.append(
        f"| MC noise | {noise} | {entry['mc_noise_er_var_out']:.3g} | | {entry['mc_seconds']:.0f} |"
    )
    return "\n".join(lines)


def add_parser(sub) -> None:
    """Register ``nm diagnose-propagate``."""
    p = sub.add_parser(
        "diagnose-propagate",
        help="per-layer propagated moments vs Monte Carlo, per approximation variant",
        description=__doc__.split("\n\n")[0],
    )
    _add_args(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _add_args(p)
    return run(p.parse_args(argv))


def add_target_args(p: argparse.ArgumentParser, sigmas: list[float]) -> None:
    """--model, --images and --sigmas (default ``sigmas``): what a propagation diagnosis runs on."""
    p.add_argument("--model", default="lenet", help="mlp | lenet | rescnn (default lenet)")
    p.add_argument(
        "--images",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[0, 1],
        help="comma-separated test image indices (default 0,1)",
    )
    p.add_argument(
        "--sigmas",
        type=lambda s: [float(v) for v in s.split(",")],
        default=sigmas,
        help=f"input noise levels σ, pixel units (default {','.join(map(str, sigmas))})",
    )


def _add_args(p: argparse.ArgumentParser) -> None:
    add_target_args(p, [0.1, 0.3])
    p.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=[v for v in VARIANTS if v != "full"],
        help=f"comma-separated among {','.join(VARIANTS)} (default: all but full)",
    )
    p.add_argument(
        "--samples", type=int, default=100_000, help="Monte Carlo samples (default 100000)"
    )
    p.add_argument("--seed", type=int, default=0, help="Monte Carlo seed (+ image index)")
    p.add_argument(
        "--full-units",
        type=int,
        default=12544,
        help="variant full: max_full, live units held in full covariance (default 12544)",
    )
    p.add_argument(
        "--full-relu",
        default="exact",
        help="variant full: ReLU covariance, exact | approx (default exact)",
    )
    p.add_argument(
        "--pool-units",
        type=int,
        default=4096,
        help="variant auto-pool2: LocalResidual.pool_units, largest max-pool output (units) "
        "given window pairs with a dense input factor (default 4096)",
    )
    p.add_argument(
        "--pool-rho",
        type=float,
        default=0.1,
        help="variant auto-pool2: LocalResidual.pool_rho, |correlation| above which a pair "
        "of such windows is kept (default 0.1)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="results", help="output folder (default results)")
    p.add_argument(
        "--mc-cache",
        default=None,
        help="folder where each (image, σ) Monte Carlo reference is saved and re-read "
        "(file named by model, image, σ, samples and seed; default: none, always rerun)",
    )


if __name__ == "__main__":
    main()
