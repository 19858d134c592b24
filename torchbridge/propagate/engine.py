"""Layer-wise moment propagation through a traced piecewise-linear model (one input at a time).

``propagate_one`` lowers the model's fx graph (``lowering.Lowerer``) onto a Gaussian state
(``state.FullState`` / ``state.FactorState``) chosen by ``PropagateOptions.covariance``:

* ``"auto"`` (default): the full covariance wherever the live tensors are small enough
  (at most ``max_full`` units); before that, the diagonal-plus-low-rank factor form, converted
  to the full covariance as soon as every remaining tensor fits. For an MLP or a small CNN
  everything is full; for LeNet the convolution stages (q = 25088 / 12544) run in factor
  form and the fully connected stages in full covariance.
* ``"full"``: full covariance everywhere (memory (Σ live q)², e.g. 5 GB for one LeNet conv
  layer in float64 — only for small models).
* ``"lowrank"``: factor form everywhere (F: q × n input noise directions, D: q).
* ``"diagonal"``: variances only (assumed density filtering, Gast & Roth 2018): the baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from torchbridge.propagate.lowering import RELU_FUNCTIONS, RELU_METHODS, RELU_MODULES, Lowerer
from torchbridge.propagate.residual import LocalResidual
from torchbridge.propagate.state import FactorState, FullState

COVARIANCES = ("auto", "full", "lowrank", "diagonal")
RELU_METHODS_ALL = ("exact", "series", "zero_mean", "approx")
POOL_PAIRINGS = ("adaptive", "fixed")
RESIDUALS = ("local", "drop")
WINDOW_RELUS = ("qmc", "tree")
WINDOW_GAINS = ("tree", "stein")


@dataclass(frozen=True)
class PropagateOptions:
    """Options of layer-wise propagation.

    Attributes:
        covariance: "auto" | "full" | "lowrank" | "diagonal" (module docstring).
        max_full: largest number of live units held with a full covariance in "auto" mode
            (default 4096: a 4096 × 4096 float64 block is 128 MiB).
        relu_method: ReLU covariance in full-covariance stages: "exact" (default; our closed
            form), "series" (the paper's Lemma 4, 5 terms), "zero_mean" (Theorem 2) or
            "approx" (benchmark-only 2-term expansion in ρ, ``propagate.approx``).
        pool_pairing: "adaptive" (default) | "fixed": order of the pairwise maxima of a
            4-element max-pooling window (2×2). "adaptive" pairs, per window, the two pairs
            whose maxima are closest to linear (``Lowerer._most_linear_pairing``), so that the
            second level's Gaussian re-fit is of nearly Gaussian units; "fixed" pairs the
            window's elements in reading order (rows first).
        pool_window: in the diagonal-plus-low-rank form, evaluate each max-pooling window
            with its own covariance in full (default True; ``FactorState.max_pool``); False:
            the tree of pairwise maxima as separate primitives, whose within-window residual
            covariances are dropped like any other (the earlier behaviour, for comparison).
        residual: in the diagonal-plus-low-rank form, "local" keeps the covariances of the
            ReLU / max-pool residuals between correlated units (exact kernels on local pairs,
            turned into new noise directions: ``propagate.residual``); "drop" keeps only
            their variances (the earlier behaviour).
        local: thresholds of the "local" residual (``residual.LocalResidual``).
        window_relu: in the diagonal-plus-low-rank form, the moments of a ReLU of a
            max-pooling output (relu(max-pool(z)), e.g. LeNet's ReLU1): "qmc" (default) the
            mean and variance of max(0, window elements) integrated numerically over the
            window's exact Gaussian (``propagate.window_max``; correlations as propagated);
            "tree" those of the tree of pairwise maxima and the ReLU, each re-fitted.
        window_gain: with ``window_relu="qmc"`` in the factor form, the cross-covariance of
            relu(max-pool) with the noise directions: "stein" (default) Σ_i g_i Cov(z_i, ·)
            with the numerical gains g_i = P(z_i is the window's maximum and > 0) (Stein's
            lemma: exact for the window's Gaussian); "tree" the re-fitted tree's, rescaled
            to the numerical variance (always with ``differentiable``: the numerical gains
            carry no gradient).
        window_full: with ``window_relu="qmc"``, also a ReLU of a max-pooling output that
            runs in full covariance (e.g. LeNet's ReLU2 in "auto") gets the numerical window
            moments (correlations as propagated); default True.
        window_pairs: with ``window_relu="qmc"`` in the factor form, the local residual
            pairs of relu(max-pool) take Cov(max(0, z_a), max(0, z_b)) integrated
            numerically over the two windows' joint Gaussian (``window_max``) instead of
            the re-fitted trees' (default True; ≈ 10⁶ pairs on LeNet, about 35 s per image);
            with ``window_full``, also the window pairs of a dense-input max-pooling
            (``LocalResidual.pool_units``) whose ReLU runs in full covariance (LeNet's ReLU2).
        differentiable: keep the autograd graph, so the moments can be differentiated with
            respect to the model's parameters and the input (moment-regularized training);
            memory grows with every intermediate covariance kept for the backward pass.
            Gradients reach the model's own parameters only when its dtype is the input's.
            The factor form then drops the local residual covariances (``residual="drop"``:
            their pairs go through SciPy sparse matrices, outside autograd).
    """

    covariance: str = "auto"
    max_full: int = 4096
    relu_method: str = "exact"
    pool_pairing: str = "adaptive"
    pool_window: bool = True
    residual: str = "local"
    local: LocalResidual = field(default_factory=LocalResidual)
    window_relu: str = "qmc"
    window_gain: str = "stein"
    window_full: bool = True
    window_pairs: bool = True
    differentiable: bool = False

    def __post_init__(self) -> None:
        if self.covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}; got {self.covariance!r}")
        if self.relu_method not in RELU_METHODS_ALL:
            raise ValueError(
                f"relu_method must be one of {RELU_METHODS_ALL}; got {self.relu_method!r}"
            )
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}; got {self.residual!r}")
        if self.window_relu not in WINDOW_RELUS:
            raise ValueError(f"window_relu must be one of {WINDOW_RELUS}; got {self.window_relu!r}")
        if self.window_gain not in WINDOW_GAINS:
            raise ValueError(f"window_gain must be one of {WINDOW_GAINS}; got {self.window_gain!r}")
        for name in ("window_full", "window_pairs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool; got {type(getattr(self, name)).__name__}")
        if not isinstance(self.local, LocalResidual):
            raise TypeError(f"local must be a LocalResidual; got {type(self.local).__name__}")
        if self.pool_pairing not in POOL_PAIRINGS:
            raise ValueError(
                f"pool_pairing must be one of {POOL_PAIRINGS}; got {self.pool_pairing!r}"
            )
        if isinstance(self.max_full, bool) or not isinstance(self.max_full, int):
            raise TypeError(f"max_full must be an int; got {type(self.max_full).__name__}")
        if self.max_full < 1:
            raise ValueError(f"max_full must be >= 1; got {self.max_full}")


def relu_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The ReLU nodes of a traced model in graph order (modules, functions and methods)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), RELU_MODULES):
            out.append(node)
        elif node.op == "call_function" and node.target in RELU_FUNCTIONS:
            out.append(node)
        elif node.op == "call_method" and node.target in RELU_METHODS:
            out.append(node)
    return out


def resolve_relu(gm: fx.GraphModule, relu: int | str) -> fx.Node:
    """The ReLU node named by ``relu``: an index into :func:`relu_nodes` (negative from the
    end), a module path (e.g. ``"block.relu"``, when called once) or an fx node name."""
    nodes = relu_nodes(gm)
    if not nodes:
        raise ValueError("the model has no ReLU to linearize around")
    if isinstance(relu, bool) or not isinstance(relu, (int, str)):
        raise TypeError(f"relu_index must be an int or a str; got {type(relu).__name__}")
    if isinstance(relu, int):
        if not -len(nodes) <= relu < len(nodes):
            raise ValueError(
                f"relu_index {relu} out of range: the model has {len(nodes)} ReLU(s) "
                f"({', '.join(n.name for n in nodes)})"
            )
        return nodes[relu]
    named = [n for n in nodes if n.name == relu]
    by_module = [n for n in nodes if n.op == "call_module" and n.target == relu]
    if named:
        return named[0]
    if len(by_module) == 1:
        return by_module[0]
    if len(by_module) > 1:
        raise ValueError(
            f"ReLU module {relu!r} is called {len(by_module)} times; name the call by its graph "
            f"node ({', '.join(n.name for n in by_module)})"
        )
    raise ValueError(
        f"no ReLU named {relu!r}; ReLUs: "
        + ", ".join(f"{n.name} ({n.target})" if n.op == "call_module" else n.name for n in nodes)
    )


def _factor(cov: torch.Tensor, n: int, kind: str) -> torch.Tensor:
    """F (n, n) with F Fᵀ = cov, for a scalar, diagonal (n,) or full (n, n) ``cov``."""
    if kind == "scalar":
        return cov.clamp_min(0).sqrt() * torch.eye(n, dtype=cov.dtype, device=cov.device)
    if kind == "diag":
        return torch.diag(cov.clamp_min(0).sqrt())
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return L
    evals, evecs = torch.linalg.eigh(cov)
    return evecs * evals.clamp_min(0).sqrt()


def _full(cov: torch.Tensor, n: int, kind: str) -> torch.Tensor:
    if kind == "scalar":
        return cov * torch.eye(n, dtype=cov.dtype, device=cov.device)
    if kind == "diag":
        return torch.diag(cov)
    return cov


def _diag(cov: torch.Tensor, n: int, kind: str) -> torch.Tensor:
    if kind == "scalar":
        return cov.expand(n).clone()
    if kind == "diag":
        return cov
    return cov.diagonal().clone()


@dataclass
class PropagationResult:
    """Output mean (d,), output covariance (d, d) or None, output variance (d,), the peak
    number of covariance elements held and the representation at the output."""

    mean: torch.Tensor
    var: torch.Tensor
    cov: torch.Tensor | None
    peak_elements: int
    representation: str


def propagate_one(
    gm: fx.GraphModule,
    mean: torch.Tensor,
    cov: torch.Tensor,
    cov_kind: str,
    options: PropagateOptions,
    exact_relu: Callable[[fx.Node], bool] = lambda node: True,
    full: bool = False,
    after_node: Callable | None = None,
) -> PropagationResult:
    """Propagate N(mean, cov) through ``gm``; ``mean`` has the model's input shape with batch
    dimension 1; ``cov`` is a 0-d tensor (isotropic), (n,) (diagonal) or (n, n) (full), as
    named by ``cov_kind`` ("scalar" | "diag" | "full"); ``after_node``: the diagnostic hook of
    ``lowering.Lowerer``."""
    n = mean.numel()
    pre = Lowerer(gm, None, exact_relu=exact_relu, pool_window=options.pool_window)
    pre.run(mean, lambda s, nid: None)
    sizes = pre.sizes
    suffix = sizes[:]
    for k in range(len(suffix) - 2, -1, -1):
        suffix[k] = max(suffix[k], suffix[k + 1])
    peak = [0]

    if options.covariance == "full" or (
        options.covariance == "auto" and max(sizes) <= options.max_full
    ):
        state: FullState | FactorState = FullState()

        def add(s, nid):
            s.add_input(nid, mean, _full(cov, n, cov_kind))

        switch = None
    else:
        # the local pairs are found and summed through SciPy (no autograd): not when
        # differentiating
        local = (
            options.local if options.residual == "local" and not options.differentiable else None
        )
        state = FactorState(
            diagonal=options.covariance == "diagonal",
            local=local,
            window_relu=options.window_relu,
            # the numerical gains are indicator averages (no gradient): the tree's when
            # differentiating
            window_gain="tree" if options.differentiable else options.window_gain,
            window_full=options.window_full,
            window_pairs=options.window_pairs,
        )
        if options.covariance == "diagonal" and cov_kind != "full":

            def add(s, nid):
                s.add_input(nid, mean, mean.new_zeros(n, 0), _diag(cov, n, cov_kind))

        else:  # the input covariance is exact up to the first ReLU, also for ADF

            def add(s, nid):
                s.add_input(nid, mean, _factor(cov, n, cov_kind), mean.new_zeros(n))

        switch = options.covariance == "auto"

    def before(k: int, s):
        peak[0] = max(peak[0], s.numel())
        if switch and s.kind == "factor":
            live = sum(m.numel() for m in s.mean.values())
            if suffix[k] <= options.max_full and live <= options.max_full:
                return s.to_full()
        return s

    lw = Lowerer(
        gm,
        state,
        relu_method=options.relu_method,
        exact_relu=exact_relu,
        before_primitive=before,
        after_node=after_node,
        pool_pairing=options.pool_pairing,
        pool_window=options.pool_window,
    )
    out = lw.run(mean, add)
    final = lw.state
    peak[0] = max(peak[0], final.numel())
    if final.kind == "full":
        m, c = final.moments(out.nid)
        var = c.diagonal().clone()
    else:
        m = final.mean[out.nid]
        var = final.variance(out.nid)
        c = final.moments(out.nid)[1] if full else None
    return PropagationResult(m, var, c if full else None, peak[0], final.kind)


def model_dtype(model: nn.Module) -> torch.dtype | None:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None
