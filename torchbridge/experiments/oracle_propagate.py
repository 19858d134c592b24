"""Oracle experiment: which layer's re-fitted moments limit layer-wise propagation on LeNet.

At one layer of the (max-pool/ReLU commuted) graph, the propagated Gaussian of that tensor is
replaced by moments estimated by an *independent* Monte Carlo run (its own seed), and the
propagation goes on from there; the output variance is then compared (E_r, the bench's
measure) with a reference Monte Carlo run (seed + image, as ``nm diagnose-propagate``).
Oracles, each at one node ``N``:

* ``N:cov``  — MC mean and full covariance of N (all correlations from MC);
* ``N:marg`` — MC mean and variances, propagated correlations;
* ``N:corr`` — propagated mean and variances, MC correlations;
* ``_5:gaussmax`` / ``_5:gaussmc`` (max-pool2 only) — the mean and variance of each pool2
  window's exact maximum (sampled, ``gaussian_window_max``) of the propagated / of Monte
  Carlo's Gaussian of its conv2 elements, propagated correlations.

Each run also prints max-pool2's variance error (propagated, exact max of the propagated
window Gaussian, independent MC) and conv2's window moments vs the independent MC.

If ``N:cov`` brings the output to the Monte Carlo noise, everything after N is accurate and
the error enters before N; ``marg`` vs ``corr`` says whether it is the marginals or the
correlations between units. The replaced tensor enters the factor form as F = its Cholesky
factor (units of zero variance left out), D = 0: the later layers see exactly that Gaussian.

Run: ``python -m torchbridge.experiments.oracle_propagate --help``.
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
from torchbridge.experiments.diagnose_propagate import (
    _agg,
    add_target_args,
    monte_carlo_layers,
    pool_nodes,
)
from torchbridge.propagate import PropagateOptions, propagate_one, trace
from torchbridge.propagate.lowering import commute_relu_max_pool


class _CovRecorder(fx.Interpreter):
    """Runs the graph on batches; accumulates Σy and Σyyᵀ (float64) of the chosen nodes."""

    def __init__(
        self, gm: fx.GraphModule, names: set[str], windows: dict[str, torch.Tensor]
    ) -> None:
        super().__init__(gm)
        self.names = names
        self.windows = windows  # {node: rows (K, q_out)}: only each window's K × K moments
        self.s1: dict[str, torch.Tensor] = {}
        self.s2: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.windows:
            y = out.reshape(out.shape[0], -1).double()[:, self.windows[n.name]]  # (b, K, q)
            self.s1[n.name] = self.s1.get(n.name, 0) + y.sum(0)
            self.s2[n.name] = self.s2.get(n.name, 0) + torch.einsum("bkq,blq->qkl", y, y)
        elif n.name in self.names:
            y = out.reshape(out.shape[0], -1).double()
            self.s1[n.name] = self.s1.get(n.name, 0) + y.sum(0)
            self.s2[n.name] = self.s2.get(n.name, 0) + y.T @ y
        return out


def monte_carlo_covariances(
    gm32: fx.GraphModule,
    x: torch.Tensor,
    sigma: float,
    samples: int,
    seed: int,
    names: set[str],
    windows: dict[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{node: (mean (q,), covariance (q, q))} of the nodes ``names``, and {node: (mean (q, K),
    covariance (q, K, K))} of each window of the nodes in ``windows`` ({node: rows (K, q)}),
    from ``samples`` float32 forward passes of N(x, σ²I); ``x`` (1, *input_shape)."""
    gen = torch.Generator().manual_seed(seed)
    rec = _CovRecorder(gm32, names, windows)
    n, done = x[0].numel(), 0
    while done < samples:
        b = min(1000, samples - done)
        eps = torch.randn(b, n, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            rec.run((x.reshape(1, -1) + sigma * eps).reshape(b, *x.shape[1:]).float())
        done += b
    out = {}
    for k in names:
        m = rec.s1[k] / done
        out[k] = (m, (rec.s2[k] - done * torch.outer(m, m)) / (done - 1))
    for k in windows:
        m = (rec.s1[k] / done).T  # (q, K)
        out[k] = (m, (rec.s2[k] - done * m[:, :, None] * m[:, None, :]) / (done - 1))
    return out


def _replace(state, nid: int, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Tensor ``nid`` of a factor state becomes N(mean, cov): F = Cholesky factor, D = 0."""
    pos = torch.nonzero(cov.diagonal() > 1e-14 * cov.diagonal().max()).flatten()
    sub = cov[pos][:, pos]
    L, info = torch.linalg.cholesky_ex(sub)
    if int(info) != 0:
        lam, V = torch.linalg.eigh(sub)
        L = V * lam.clamp_min(0).sqrt()
    F = cov.new_zeros(cov.shape[0], L.shape[1])
    F[pos] = L
    width = max(F.shape[1], *(f.shape[1] for f in state.factor.values()))
    for w, f in state.factor.items():
        state.factor[w] = torch.nn.functional.pad(f, (0, width - f.shape[1]))
    # the other live tensors (the input of N, freed right after) keep their own columns
    state.factor[nid] = torch.nn.functional.pad(F, (0, width - F.shape[1]))
    state.resid[nid] = cov.new_zeros(cov.shape[0])
    state.mean[nid] = mean.clone()
    state.pairs.pop(nid, None)


def _oracle_moments(
    pm: torch.Tensor, pc: torch.Tensor, mc: tuple, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, cov) of the oracle ``kind`` (module doc) from the propagated (``pm``, ``pc``)
    and Monte Carlo's ``mc`` = (mean, cov)."""
    if kind == "gaussmax":  # mc = (mean, var) of the window maxima: propagated correlations
        m, v = mc
        sp = pc.diagonal().clamp_min(0).sqrt()
        cp = pc / torch.outer(sp, sp).clamp_min(1e-300)
        return m, cp * torch.outer(v.clamp_min(0).sqrt(), v.clamp_min(0).sqrt())
    m, c = mc
    if kind == "cov":
        return m, c
    sp = pc.diagonal().clamp_min(0).sqrt()
    sm = c.diagonal().clamp_min(0).sqrt()
    cp = pc / torch.outer(sp, sp).clamp_min(1e-300)
    cm = c / torch.outer(sm, sm).clamp_min(1e-300)
    if kind == "marg":
        return m, cp * torch.outer(sm, sm)
    if kind == "corr":
        return pm, cm * torch.outer(sp, sp)
    raise ValueError(f"oracle kind must be cov | marg | corr; got {kind!r}")


def gaussian_window_max(
    mu: torch.Tensor, S: torch.Tensor, samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (q,) of max_k z_k for z ~ N(mu (q, K), S (q, K, K)) per window, by
    sampling that Gaussian (``samples`` draws, float64): the moments an exact window max
    would give on the propagated input, free of the tree's per-level re-fit."""
    gen = torch.Generator().manual_seed(seed)
    lam, V = torch.linalg.eigh(S)
    L = V * lam.clamp_min(0).sqrt()[:, None, :]
    s1 = mu.new_zeros(mu.shape[0])
    s2 = mu.new_zeros(mu.shape[0])
    done = 0
    while done < samples:
        b = min(2000, samples - done)
        e = torch.randn(b, *mu.shape, generator=gen, dtype=mu.dtype)
        z = mu + torch.einsum("qkl,bql->bqk", L, e)
        mx = z.amax(2)
        s1 += mx.sum(0)
        s2 += mx.square().sum(0)
        done += b
    m = s1 / done
    return m, (s2 / done - m.square()) * done / (done - 1)


def propagate_with_oracle(
    gm: fx.GraphModule,
    x: torch.Tensor,
    var: float,
    node: str,
    kind: str,
    mc: tuple | None,
    opts: PropagateOptions,
) -> tuple[torch.Tensor, dict]:
    """Output variance (d,) of the propagation (``opts``) with node ``node``'s Gaussian replaced
    (``kind`` cov | marg | corr, module doc; ``mc`` = its (mean, cov) from Monte Carlo; None:
    no replacement); also {node: propagated (mean, cov)} of ``node``."""
    seen = {}

    def hook(n, handle, lw):
        if n.name != node:
            return
        st = lw.state
        if st.kind != "factor":
            raise RuntimeError(f"oracle node {node} is not in factor form")
        st.materialize(handle.nid)
        pm, pc = st.moments(handle.nid)
        seen[node] = (pm.clone(), pc.clone())
        mod = lw.gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(mod, torch.nn.MaxPool2d):  # the propagated windows of its input
            from torchbridge.propagate.pooling import max_pool_windows

            src = [k for k in st.mean if k != handle.nid][-1]
            shape = (1, *st.shape[src][1:])
            rows = max_pool_windows(shape, mod.kernel_size, mod.stride, mod.padding, 1)
            F, D = st.factor[src], st.resid[src]
            Fw = F[rows].transpose(0, 1)
            S = Fw @ Fw.transpose(1, 2) + torch.diag_embed(D[rows].T)
            seen["windows"] = (st.mean[src][rows].T.clone(), S)
        if mc is not None:
            _replace(st, handle.nid, *_oracle_moments(pm, pc, mc, kind))

    with torch.no_grad():
        res = propagate_one(
            gm, x, torch.tensor(var, dtype=x.dtype), "scalar", opts, after_node=hook
        )
    return res.var, seen


def lenet_tail(model: torch.nn.Sequential, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Output variance (10,) of LeNet's layers after max-pool2 (ReLU2, fc1, ReLU, fc2) from
    the Gaussian N(mean, cov) of max-pool2's pre-activation output (3136,), with the exact
    ReLU kernels and the Gaussian re-fit: what the default propagation does there."""
    from torchbridge.moments import relu_moments

    fc1, fc2 = model[7], model[9]
    m, c = relu_moments(mean, cov, "exact", check_psd=False)
    W = fc1.weight.double()
    m, c = W @ m + fc1.bias.double(), W @ c @ W.T
    m, c = relu_moments(m, (c + c.T) / 2, "exact", check_psd=False)
    W = fc2.weight.double()
    return (W @ c @ W.T).diagonal()


def run(args: argparse.Namespace) -> dict:
    from torchbridge.experiments.bench_propagate import load_model

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    opts = PropagateOptions(window_relu=args.window_relu)
    model = load_model(args.model)
    gm = commute_relu_max_pool(trace(model))
    gm32 = commute_relu_max_pool(trace(load_model(args.model).float()))
    pools = set(pool_nodes(gm))
    _, _, test_x, _ = mnist()
    oracles = [tuple(o.split(":")) for o in args.oracles]
    tail_node = "_5"  # LeNet's max-pool2: the rest is evaluated by ``lenet_tail``
    from torchbridge.propagate.pooling import max_pool_windows

    windows = {"_3": max_pool_windows((1, 64, 14, 14), 2, 2, 0, 1)}  # conv2's pool2 windows
    report: dict = {"args": {k: v for k, v in vars(args).items() if not callable(v)}, "rows": []}
    for i in args.images:
        for sigma in args.sigmas:
            x = test_x[i : i + 1].double()
            ref = monte_carlo_layers(gm32, x, sigma, args.samples, args.seed + i, pools)
            out = [n for n in ref if n in {m.name for m in gm.graph.nodes}][-1]
            noise = ref[out]["noise_er_var"]
            t = time.perf_counter()
            names = {n for n, k in oracles if not k.startswith("gauss")} | {tail_node}
            mcs = monte_carlo_covariances(
                gm32, x, sigma, args.oracle_samples, args.oracle_seed + i, names, windows
            )
            print(f"image {i} σ {sigma}: oracle MC {time.perf_counter() - t:.0f} s", flush=True)

            def record(
                name: str,
                v: torch.Tensor,
                secs: float,
                i=i,
                sigma=sigma,
                want=ref[out]["var"],
                noise=noise,
            ) -> None:
                row = {
                    "image": i,
                    "sigma": sigma,
                    "oracle": name,
                    "er_var_out": float(relative_difference(v, want).mean()),
                    "mc_noise_er_var_out": noise,
                    "seconds": secs,
                }
                report["rows"].append(row)
                print(json.dumps(row), flush=True)

            t = time.perf_counter()
            v0, seen = propagate_with_oracle(gm, x, sigma**2, tail_node, "cov", None, opts)
            record("none", v0, time.perf_counter() - t)
            pm, pc = seen[tail_node]
            gm_mean, gm_var = gaussian_window_max(*seen["windows"], args.oracle_samples * 5, 7)
            print(
                "pool2 var err (Σ|x−y|/Σ|y| vs reference MC): propagated "
                f"{_agg(pc.diagonal(), ref[tail_node]['var']):.4f}, exact max of the "
                f"propagated Gaussian {_agg(gm_var, ref[tail_node]['var']):.4f}, oracle MC "
                f"{_agg(mcs[tail_node][1].diagonal(), ref[tail_node]['var']):.4f}; mean err "
                f"{_agg(pm, ref[tail_node]['mean']):.4f} / {_agg(gm_mean, ref[tail_node]['mean']):.4f}",
                flush=True,
            )
            mcs["gaussmax"] = (gm_mean, gm_var)
            (wm, wS), (pwm, pwS) = mcs["_3"], seen["windows"]
            off = ~torch.eye(4, dtype=torch.bool).expand_as(wS)
            mc_mean, mc_var = gaussian_window_max(wm, wS, args.oracle_samples * 5, 8)
            mcs["gaussmc"] = (mc_mean, mc_var)
            print(
                f"conv2 windows vs oracle MC: mean err {_agg(pwm, wm):.4f}, var err "
                f"{_agg(pwS.diagonal(dim1=1, dim2=2), wS.diagonal(dim1=1, dim2=2)):.4f}, "
                f"off-diagonal cov err {_agg(pwS[off], wS[off]):.4f}; pool2 var err of the exact "
                f"max of MC's window Gaussian {_agg(mc_var, ref[tail_node]['var']):.4f}",
                flush=True,
            )
            vt = lenet_tail(model, pm, pc)
            print(
                f"tail check: max rel diff {float(((vt - v0).abs() / v0.abs()).max().detach()):.2e}",
                flush=True,
            )
            for name, kind in oracles:
                t = time.perf_counter()
                if kind in ("gaussmax", "gaussmc"):
                    v = lenet_tail(model, *_oracle_moments(pm, pc, mcs[kind], "gaussmax"))
                elif name == tail_node:
                    v = lenet_tail(model, *_oracle_moments(pm, pc, mcs[name], kind))
                else:
                    v, _ = propagate_with_oracle(gm, x, sigma**2, name, kind, mcs[name], opts)
                record(f"{name}:{kind}", v, time.perf_counter() - t)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tag = "_".join(str(i) for i in args.images)
    (Path(args.out) / f"oracle_propagate_{args.model}_{tag}.json").write_text(
        json.dumps(report, indent=1)
    )
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_target_args(p, [0.1])
    p.add_argument(
        "--oracles",
        type=lambda s: s.split(","),
        default=["_5:cov", "_5:marg", "_5:corr"],
        help="comma-separated node:kind, kind cov | marg | corr | gaussmax | gaussmc (default _5:cov,_5:marg,_5:corr;"
        " on LeNet _5 is max-pool2's output, _1_1 ReLU1's)",
    )
    p.add_argument(
        "--samples", type=int, default=20_000, help="reference Monte Carlo samples (default 20000)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="reference Monte Carlo seed (+ image; default 0)"
    )
    p.add_argument(
        "--oracle-samples",
        type=int,
        default=20_000,
        help="Monte Carlo samples of the oracle's moments (default 20000)",
    )
    p.add_argument(
        "--oracle-seed",
        type=int,
        default=1000,
        help="oracle Monte Carlo seed (+ image; default 1000)",
    )
    p.add_argument(
        "--window-relu",
        default="qmc",
        help="PropagateOptions.window_relu of the propagation: qmc | tree (default qmc; the "
        "diagnosis of issue #11 ran with tree, the form before)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="results", help="output folder (default results)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
