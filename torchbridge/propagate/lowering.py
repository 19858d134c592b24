"""Walk a ``torch.fx`` graph and lower every piecewise-linear operation to the two primitives
of ``torchbridge.propagate.state``: ``affine`` and elementwise ``relu``.

* Linear layers and functions (Linear, Conv, ConvTranspose, AvgPool, AdaptiveAvgPool,
  BatchNorm in eval mode, Flatten, Dropout in eval mode, reshapes, ``+``, ``-``, scaling,
  ``cat``, indexing, …): one ``affine``; its linear part is the operation with its bias (or
  added constants) set to zero.
* ReLU: one ``relu``. LeakyReLU / PReLU (slope a): a·z + (1 − a)·relu(z). Hardtanh / ReLU6 /
  clamp(lo, hi): lo + relu(z − lo) − relu(z − hi), both ReLUs taken jointly (one ``relu`` of
  the concatenation, so their cross-covariance is the exact bivariate one). abs: 2 relu(z) − z.
* max(a, b) = b + relu(a − b), min(a, b) = a − relu(a − b); max-pooling is a tree of pairwise
  maxima over the window elements (``pooling.max_pool_windows``): primitives of a full
  covariance state, one windowed step of a factor state (``FactorState.max_pool``); a
  4-element window is paired adaptively (``Lowerer._most_linear_pairing``).
  The identities are derived and checked in ``derivations/piecewise_linear.py``.

Any other operation on a random tensor raises :class:`NotPiecewiseLinearError` naming it.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchbridge.propagate.pooling import adaptive_max_pool_windows, max_pool_windows


class NotPiecewiseLinearError(TypeError):
    """An operation of the model is not piecewise linear (or not supported) on random input."""


class UntraceableModelError(TypeError):
    """``torch.fx`` cannot trace the model (data-dependent control flow, TorchScript, …)."""


@dataclass(eq=False)
class Handle:
    """A random tensor of the graph: its id in the Gaussian state and its value at the
    reference point (the input mean), which fixes its shape (batch dimension 1)."""

    nid: int
    ref: torch.Tensor


RELU_MODULES = (nn.ReLU,)
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
RELU_METHODS = {"relu", "relu_"}
MAX_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
MAX_POOL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)`` with a clear error when it cannot be traced."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UntraceableModelError(
            f"{type(model).__name__} is a TorchScript module: torch.fx cannot trace it; pass the "
            "original nn.Module"
        )
    if isinstance(model, fx.GraphModule):
        return model
    if type(model).__module__.startswith("torch.nn") and not isinstance(model, nn.Sequential):
        model = nn.Sequential(model)  # a bare torch layer: trace it as a leaf
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # TraceError, or a Python error raised by a Proxy
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}: {exc}. Layer-wise propagation needs a "
            "forward without data-dependent control flow (if/for on tensor values)"
        ) from exc


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), RELU_MODULES)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in RELU_METHODS


def _is_max_pool(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), MAX_POOL_MODULES)
    return node.op == "call_function" and node.target in MAX_POOL_FUNCTIONS


def commute_relu_max_pool(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite max_pool(relu(z)) as relu(max_pool(z)) (the same function: relu is monotone).

    The maxima are then taken of Gaussian pre-activations, where max(a, b) = b + relu(a − b)
    is exact up to the re-fit, rather than of rectified units that are far from Gaussian.
    Returns a rewritten copy; ``gm`` is not modified.
    """
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    changed = False
    for node in list(gm.graph.nodes):
        if not _is_max_pool(node, gm) or not node.args:
            continue
        relu = node.args[0]
        if not isinstance(relu, fx.Node) or not _is_relu(relu, gm) or len(relu.users) != 1:
            continue
        z = relu.args[0]
        node.replace_input_with(relu, z)
        with gm.graph.inserting_after(node):
            new = gm.graph.create_node(relu.op, relu.target, (node,), dict(relu.kwargs))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        gm.graph.erase_node(relu)
        changed = True
    if changed:
        gm.recompile()
    return gm


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """Human-readable name of a node's operation, e.g. "module 'act' (GELU)"."""
    if node.op == "call_module":
        return f"module '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"method '.{node.target}()'"
    name = getattr(node.target, "__name__", str(node.target))
    mod = getattr(node.target, "__module__", None) or ""
    return f"function '{mod + '.' if mod and mod != '_operator' else ''}{name}'"


def _is_handle(v: object) -> bool:
    return isinstance(v, Handle)


class _Bound:
    """An operation with its arguments; random leaves (Handles) are the call's inputs."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict) -> None:
        self.fn = fn
        self.flat, self.spec = tree_flatten((args, kwargs))
        self.pos = [i for i, v in enumerate(self.flat) if _is_handle(v)]
        self.handles: list[Handle] = [self.flat[i] for i in self.pos]

    def call(self, *tensors: torch.Tensor, flat: list | None = None, fn: Callable | None = None):
        vals = list(self.flat if flat is None else flat)
        for i, t in zip(self.pos, tensors, strict=True):
            vals[i] = t
        args, kwargs = tree_unflatten(vals, self.spec)
        return (fn or self.fn)(*args, **kwargs)

    def caller(self, flat: list | None = None, fn: Callable | None = None) -> Callable:
        return lambda *t: self.call(*t, flat=flat, fn=fn)

    def constants_mapped(self, f: Callable[[object], object]) -> list:
        """The flat arguments with every non-random tensor / float leaf passed through ``f``."""
        return [
            v if _is_handle(v) or not isinstance(v, (torch.Tensor, float)) else f(v)
            for v in self.flat
        ]

    def ref(self) -> object:
        return self.call(*(h.ref for h in self.handles))


class Lowerer:
    """Runs the fx graph on Handles, emitting primitives into a Gaussian ``state``.

    ``exact_relu(node)`` says whether the ReLUs lowered from ``node`` use the exact moments
    (True) or are linearized at the reference point (False: frozen mask, as in two-stage
    linearization). ``before_primitive(k, state)`` may return a replacement state (used to
    switch to the full covariance when the remaining tensors are small); ``after_node(node,
    handle, lowerer)`` is called after each node with a random output (diagnostics: read or
    replace that tensor's moments in ``lowerer.state``); ``sizes`` records the size of every
    primitive's output in order.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        state,
        relu_method: str = "exact",
        exact_relu: Callable[[fx.Node], bool] = lambda node: True,
        before_primitive: Callable | None = None,
        after_node: Callable | None = None,
        pool_pairing: str = "adaptive",
        pool_window: bool = True,
    ) -> None:
        self.gm = gm
        self.pool_pairing = pool_pairing
        self.pool_window = pool_window
        self.after_node = after_node
        self.state = state
        self.relu_method = relu_method
        self.exact_relu = exact_relu
        self.before_primitive = before_primitive
        self.sizes: list[int] = []
        self._next = 0
        self.node: fx.Node | None = None

    # ---- primitives -------------------------------------------------------------------
    def _new_id(self, size: int) -> int:
        if self.before_primitive is not None:
            self.state = self.before_primitive(len(self.sizes), self.state)
        self.sizes.append(size)
        self._next += 1
        return self._next

    def input(self, ref: torch.Tensor, add: Callable[[object, int], None]) -> Handle:
        nid = self._new_id(ref.numel())
        if self.state is not None:
            add(self.state, nid)
        return Handle(nid, ref)

    def affine(
        self,
        inputs: list[Handle],
        fn: Callable,
        lin: Callable | None = None,
        sq: Callable | None = None,
    ) -> Handle:
        """y = fn(*inputs), affine in them, with linear part ``lin`` (default ``fn``) and
        squared map ``sq`` (entries of the linear map squared; None: computed by columns)."""
        ref = fn(*(h.ref for h in inputs))
        nid = self._new_id(ref.numel())
        if self.state is not None:
            self.state.affine(nid, [h.nid for h in inputs], fn, lin or fn, sq)
        return Handle(nid, ref)

    def relu(self, h: Handle) -> Handle:
        if self.node is not None and not self.exact_relu(self.node):
            mask = (h.ref > 0).to(h.ref.dtype)
            frozen = lambda v: v * mask  # noqa: E731
            return self.affine([h], frozen, frozen, frozen)
        ref = torch.relu(h.ref)
        nid = self._new_id(ref.numel())
        if self.state is not None:
            self.state.relu(nid, h.nid, self.relu_method)
        return Handle(nid, ref)

    def free(self, h: Handle) -> None:
        if self.state is not None:
            self.state.free(h.nid)

    # ---- composite piecewise-linear operations ----------------------------------------
    def leaky(self, h: Handle, slope: float | torch.Tensor) -> Handle:
        """a·z + (1 − a)·relu(z) (LeakyReLU, PReLU)."""
        r = self.relu(h)
        a = slope
        y = self.affine(
            [h, r],
            lambda z, v: a * z + (1 - a) * v,
            sq=lambda z, v: a * a * z + (1 - a) * (1 - a) * v,
        )
        self.free(r)
        return y

    def hardtanh(self, h: Handle, lo: float | None, hi: float | None) -> Handle:
        """clamp(z, lo, hi) = lo + relu(z − lo) − relu(z − hi) (either bound may be None)."""
        if lo is None and hi is None:
            return self.affine([h], lambda z: z, lambda z: z, lambda z: z)
        if hi is None:  # lo + relu(z − lo)
            u = self.affine([h], lambda z: z - lo, lambda z: z, lambda z: z)
            r = self.relu(u)
            y = self.affine([r], lambda v: v + lo, lambda v: v, lambda v: v)
        elif lo is None:  # hi − relu(hi − z)
            u = self.affine([h], lambda z: hi - z, lambda z: -z, lambda z: z)
            r = self.relu(u)
            y = self.affine([r], lambda v: hi - v, lambda v: -v, lambda v: v)
        else:  # both ReLUs at once: their cross-covariance is the exact bivariate one
            u = self.affine(
                [h],
                lambda z: torch.cat([z - lo, z - hi]),
                lambda z: torch.cat([z, z]),
                lambda z: torch.cat([z, z]),
            )
            r = self.relu(u)
            y = self.affine(
                [r], lambda v: lo + v[:1] - v[1:], lambda v: v[:1] - v[1:], lambda v: v[:1] + v[1:]
            )
        self.free(u)
        self.free(r)
        return y

    def absolute(self, h: Handle) -> Handle:
        """|z| = 2 relu(z) − z."""
        r = self.relu(h)
        y = self.affine([h, r], lambda z, v: 2 * v - z, sq=lambda z, v: 4 * v + z)
        self.free(r)
        return y

    def maximum(self, a: Handle | torch.Tensor, b: Handle | torch.Tensor, sign: int = 1) -> Handle:
        """max(a, b) = b + relu(a − b) (sign = 1) or min(a, b) = a − relu(a − b) (sign = −1)."""
        hs = [v for v in (a, b) if _is_handle(v)]

        def pick(vals: tuple, zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
            it = iter(vals)
            av = next(it) if _is_handle(a) else (0.0 * a if zero else a)
            bv = next(it) if _is_handle(b) else (0.0 * b if zero else b)
            return av, bv

        def diff(*v):
            av, bv = pick(v, False)
            return av - bv

        def diff_lin(*v):
            av, bv = pick(v, True)
            return av - bv

        def diff_sq(*v):
            av, bv = pick(v, True)
            return av + bv

        d = self.affine(hs, diff, diff_lin, diff_sq)
        r = self.relu(d)
        base = b if sign > 0 else a
        if _is_handle(base):
            y = self.affine(
                [base, r], lambda z, v: z + sign * v, lambda z, v: z + sign * v, lambda z, v: z + v
            )
        else:
            y = self.affine([r], lambda v: base + sign * v, lambda v: sign * v, lambda v: v)
        self.free(d)
        self.free(r)
        return y

    def max_pool(self, h: Handle, windows: torch.Tensor, out_shape: tuple[int, ...]) -> Handle:
        """Max over the rows of ``windows`` (K, q_out) of flat indices into ``h``: a tree of
        pairwise maxima max(a, b) = b + relu(a − b). All pairs of one level share one
        ``relu`` (their cross-covariances are the exact bivariate ones); the Gaussian re-fit
        happens once per level. In a diagonal-plus-low-rank state (``pool_window``) the whole
        tree is one step with each window's covariance in full (``FactorState.max_pool``)."""
        rows = windows.to(h.ref.device)
        frozen = self.node is not None and not self.exact_relu(self.node)
        if not self.pool_window or frozen:  # linearized maxima: the tree freezes each one
            return self._pool_tree(h, rows, out_shape)
        # one step of the walk whatever the representation (``sizes`` must not depend on it)
        ref = torch.amax(h.ref.reshape(-1)[rows], dim=0).reshape(out_shape)
        nid = self._new_id(ref.numel())
        st = self.state
        if st is not None and st.kind == "factor" and not st.diagonal:
            st.max_pool(nid, h.nid, rows, self.relu_method, self.pool_pairing == "adaptive")
            st.shape[nid] = tuple(ref.shape)
            return Handle(nid, ref)
        hook, mark = self.before_primitive, len(self.sizes)
        self.before_primitive = None
        try:
            return self._pool_tree(h, rows, out_shape)
        finally:
            self.before_primitive = hook
            del self.sizes[mark:]

    def _pool_tree(self, h: Handle, rows: torch.Tensor, out_shape: tuple[int, ...]) -> Handle:
        """The pairwise-maximum tree of ``max_pool`` as primitives of the state."""
        level = h
        while rows.shape[0] > 1:
            if rows.shape[0] == 4 and self.pool_pairing == "adaptive" and self.state is not None:
                rows = self._most_linear_pairing(level, rows)
            half = rows.shape[0] // 2
            ia, ib, odd = rows[0 : 2 * half : 2], rows[1 : 2 * half : 2], rows[2 * half :]

            def diff(v, ia=ia, ib=ib):
                flat = v.reshape(-1)
                return (flat[ia] - flat[ib]).reshape(1, -1)

            def diff_sq(v, ia=ia, ib=ib):
                flat = v.reshape(-1)
                return (flat[ia] + flat[ib]).reshape(1, -1)

            def merge(v, r, ib=ib, odd=odd):
                flat = v.reshape(-1)
                return torch.cat([flat[ib].reshape(-1) + r.reshape(-1), flat[odd].reshape(-1)])[
                    None
                ]

            d = self.affine([level], diff, diff, diff_sq)
            r = self.relu(d)
            nxt = self.affine([level, r], merge, merge, merge)  # 0/1 entries
            self.free(d)
            self.free(r)
            if level is not h:
                self.free(level)
            level = nxt
            q = rows.shape[1]
            rows = torch.arange(nxt.ref.numel(), device=rows.device).reshape(-1, q)
        pick = lambda v: v.reshape(-1)[rows[0]].reshape(out_shape)  # noqa: E731
        y = self.affine([level], pick, pick, pick)
        if level is not h:
            self.free(level)
        return y

    def _most_linear_pairing(self, level: Handle, rows: torch.Tensor) -> torch.Tensor:
        """Reorder the 4 rows of ``rows`` (4, q_out) per window so that the first level pairs
        (rows 0-1 and 2-3) are the pairing whose maxima are closest to linear functions of
        the inputs: the smallest total nonlinear variance Var(relu(a − b)) − Φ(α)²θ² (the
        part a Gaussian re-fit of max(a, b) has to invent), so that the second level takes
        the maximum of two nearly Gaussian units."""
        orders = torch.tensor([[0, 1, 2, 3], [0, 2, 1, 3], [0, 3, 1, 2]], device=rows.device)
        score = torch.stack(
            [
                self.state.pair_nonlinearity(level.nid, rows[o[0]], rows[o[1]])
                + self.state.pair_nonlinearity(level.nid, rows[o[2]], rows[o[3]])
                for o in orders
            ]
        )  # (3, q_out)
        best = orders[score.argmin(0)].T  # (4, q_out)
        return torch.gather(rows, 0, best)

    # ---- the graph walk ---------------------------------------------------------------
    def run(self, ref_input: torch.Tensor, add_input: Callable[[object, int], None]) -> Handle:
        """Lower the whole graph; returns the Handle of the output."""
        nodes = list(self.gm.graph.nodes)
        last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(nodes):
            for a in node.all_input_nodes:
                last_use[a] = i
        env: dict[fx.Node, object] = {}
        out = None
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise NotPiecewiseLinearError(
                f"the model's forward takes {len(placeholders)} inputs; exactly one is supported"
            )
        for i, node in enumerate(nodes):
            self.node = node
            if node.op == "placeholder":
                env[node] = self.input(ref_input, add_input)
            elif node.op == "get_attr":
                env[node] = _fetch_attr(self.gm, node.target)
            elif node.op == "output":
                out = fx.node.map_arg(node.args[0], lambda n: env[n])
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                env[node] = self._lower(node, args, kwargs)
                if self.after_node is not None and _is_handle(env[node]):
                    self.after_node(node, env[node], self)
            if node.op == "output":
                break
            for a in node.all_input_nodes:  # free tensors no later node needs
                if last_use.get(a) == i and _is_handle(env.get(a)):
                    if not (_is_handle(env.get(node)) and env[node] is env[a]):
                        self.free(env[a])
        self.node = None
        if not _is_handle(out):
            raise NotPiecewiseLinearError(
                "the model must return one tensor that depends on its input; got "
                f"{type(out).__name__}"
            )
        return out

    def _lower(self, node: fx.Node, args: tuple, kwargs: dict) -> object:
        bound = _Bound(self._target(node), args, kwargs)
        if not bound.handles:  # no random input: an ordinary computation
            return bound.call()
        rule = _RULES.get(self._rule_key(node))
        if rule is None:
            raise NotPiecewiseLinearError(
                f"{describe(node, self.gm)} at graph node '{node.name}' is not piecewise linear or "
                "not supported by layer-wise moment propagation (supported: Linear, Conv, "
                "ConvTranspose, Avg/Max/Adaptive pooling, BatchNorm and Dropout in eval mode, "
                "Flatten/reshapes, +, -, scaling, ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh, clamp, "
                "abs, max/min)"
            )
        return rule(self, node, bound)

    def _target(self, node: fx.Node) -> Callable:
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)
        if node.op == "call_method":
            return lambda obj, *a, **k: getattr(obj, node.target)(*a, **k)
        return node.target

    def _rule_key(self, node: fx.Node) -> object:
        if node.op == "call_module":
            return type(self.gm.get_submodule(node.target))
        if node.op == "call_method":
            return ("method", node.target)
        return node.target


def _fetch_attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---- rules: (lowerer, node, bound) -> Handle or a concrete value ---------------------------
Rule = Callable[[Lowerer, fx.Node, _Bound], object]
_RULES: dict[object, Rule] = {}


def _register(keys, rule: Rule) -> None:
    for k in keys:
        _RULES[k] = rule


def _methods(*names: str) -> list[tuple[str, str]]:
    return [("method", n) for n in names]


def _shape_query(lw: Lowerer, node: fx.Node, b: _Bound) -> object:
    """size(), dim(), .shape …: concrete, from the reference value."""
    del lw, node
    return b.ref()


def _structural(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    """Reshapes, selections and copies: every output is one input element (or 0), so the
    squared map is the map itself; constant tensors (cat with a constant, padding value)
    become zeros in the linear part."""
    del node
    if _is_cat(b.fn):
        lin_flat = b.constants_mapped(lambda v: torch.zeros_like(v) if torch.is_tensor(v) else v)
    elif b.fn in (F.pad,):
        lin_flat = b.constants_mapped(lambda v: 0.0 if isinstance(v, float) else v)
    else:
        lin_flat = None
    lin = b.caller(flat=lin_flat)
    return lw.affine(b.handles, b.caller(), lin, lin)


def _is_cat(fn: Callable) -> bool:
    return fn in (torch.cat, torch.stack, torch.concat, torch.concatenate)


def _additive(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    """a ± b (± alpha·b): constants drop out of the linear part; the squared map adds the
    squared coefficients."""
    fn = b.fn
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    args, kwargs = tree_unflatten(list(b.flat), b.spec)
    if fn in (operator.neg, torch.neg) or (len(args) == 1 and not kwargs):
        return lw.affine(b.handles, b.caller(), sq=lambda d: d)
    alpha = kwargs.get("alpha", 1)
    if len(args) > 2:
        alpha = args[2]
    negate = name in ("sub", "isub", "subtract", "sub_", "__sub__")
    a, c = args[0], args[1]
    coef = [1.0, (-1.0 if negate else 1.0) * float(alpha)]

    def combine(*t, square: bool = False, keep_const: bool = True):
        it = iter(t)
        vals = []
        for v, k in zip((a, c), coef, strict=True):
            if _is_handle(v):
                vals.append((k * k if square else k) * next(it))
            elif keep_const:
                vals.append(k * v)
        out = vals[0]
        for v in vals[1:]:
            out = out + v
        return out

    ref_shape = b.ref().shape

    def sq(*t):
        return combine(*t, square=True, keep_const=False).expand(ref_shape)

    def lin(*t):
        return combine(*t, keep_const=False).expand(ref_shape)

    return lw.affine(b.handles, lambda *t: combine(*t), lin, sq)


def _scaling(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    """Products with constants (mul, div, matmul, F.linear, F.conv*): linear in the one random
    argument; the bias drops out of the linear part; squared map: constants squared."""
    if len(b.handles) != 1:
        raise NotPiecewiseLinearError(
            f"{describe(node, lw.gm)} at graph node '{node.name}' multiplies two random tensors: "
            "not piecewise linear"
        )
    if b.fn in (operator.truediv, torch.div, torch.true_divide) or node.target == "div":
        if b.pos[0] != 0:
            raise NotPiecewiseLinearError(
                f"{describe(node, lw.gm)} at graph node '{node.name}' divides by a random tensor: "
                "not piecewise linear"
            )
    args, kwargs = tree_unflatten(list(b.flat), b.spec)
    is_layer = b.fn in _LAYER_FUNCTIONS
    if is_layer:
        # bias is positional argument 2 (linear, conv, conv_transpose) or the keyword
        lin_args = list(args)
        lin_kwargs = dict(kwargs)
        if len(lin_args) > 2:
            lin_args[2] = None
        if "bias" in lin_kwargs:
            lin_kwargs["bias"] = None
        lin_flat, _ = tree_flatten((tuple(lin_args), lin_kwargs))
        square = [v.square() if torch.is_tensor(v) and not _is_handle(v) else v for v in lin_flat]
        return lw.affine(b.handles, b.caller(), b.caller(flat=lin_flat), b.caller(flat=square))
    square = b.constants_mapped(lambda v: v * v)
    return lw.affine(b.handles, b.caller(), b.caller(), b.caller(flat=square))


_LAYER_FUNCTIONS = (
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
)


def _weighted_module(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    """Linear / Conv / ConvTranspose modules: bias zeroed for the linear part, weight squared
    for the squared map (``torch.func.functional_call``)."""
    del node
    m: nn.Module = b.fn
    zero_bias = {} if m.bias is None else {"bias": torch.zeros_like(m.bias)}
    lin = lambda x: functional_call(m, zero_bias, (x,))  # noqa: E731
    sq = lambda x: functional_call(m, {**zero_bias, "weight": m.weight.square()}, (x,))  # noqa: E731
    return lw.affine(b.handles, lambda x: m(x), lin, sq)


def _batch_norm_module(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    m: nn.modules.batchnorm._BatchNorm = b.fn
    if m.training or m.running_var is None:
        raise NotPiecewiseLinearError(
            f"{describe(node, lw.gm)} at graph node '{node.name}' normalizes with batch "
            "statistics (training mode or track_running_stats=False): call model.eval()"
        )
    inv = torch.rsqrt(m.running_var + m.eps)
    scale = inv if m.weight is None else m.weight * inv
    shape = lambda x: (1, -1) + (1,) * (x.ndim - 2)  # noqa: E731
    return lw.affine(
        b.handles,
        lambda x: m(x),
        lambda x: x * scale.reshape(shape(x)),
        lambda x: x * scale.square().reshape(shape(x)),
    )


def _dropout(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    training = b.fn.training if isinstance(b.fn, nn.Module) else _arg(b, 2, "training", True)
    if training:
        raise NotPiecewiseLinearError(
            f"{describe(node, lw.gm)} at graph node '{node.name}' is in training mode: call "
            "model.eval()"
        )
    h = b.handles[0]
    return lw.affine([h], lambda x: x, lambda x: x, lambda x: x)


def _avg_pool(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    """Average pooling (and mean/sum): linear; squared map = pool / window size when every
    window has the same size (no padding, divisible adaptive pooling), else by columns."""
    del node
    lin = b.caller()
    sq = None
    m = b.fn
    h = b.handles[0]
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
        if all(p == 0 for p in pad) and m.divisor_override is None and not m.ceil_mode:
            k = m.kernel_size
            size = math.prod(k) if isinstance(k, tuple) else k ** (h.ref.ndim - 2)
            sq = lambda x: m(x) / size  # noqa: E731
    elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        out = b.ref()
        ins, outs = h.ref.shape[2:], out.shape[2:]
        if all(i % o == 0 for i, o in zip(ins, outs, strict=True)):
            size = math.prod(i // o for i, o in zip(ins, outs, strict=True))
            sq = lambda x: m(x) / size  # noqa: E731
    return lw.affine(b.handles, b.caller(), lin, sq)


def _arg(b: _Bound, index: int, name: str, default: object) -> object:
    args, kwargs = tree_unflatten(list(b.flat), b.spec)
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _relu(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    del node
    return lw.relu(b.handles[0])


def _leaky(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    if isinstance(b.fn, nn.LeakyReLU):
        slope = b.fn.negative_slope
    else:
        slope = _arg(b, 1, "negative_slope", 0.01)
    del node
    return lw.leaky(b.handles[0], float(slope))


def _prelu(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    h = b.handles[0]
    weight = b.fn.weight if isinstance(b.fn, nn.PReLU) else _arg(b, 1, "weight", None)
    if _is_handle(weight) or len(b.handles) != 1:
        raise NotPiecewiseLinearError(
            f"{describe(node, lw.gm)} at graph node '{node.name}' has a random slope"
        )
    if weight.numel() == 1:
        slope = weight.reshape(())
    else:  # one slope per channel (dimension 1)
        slope = weight.reshape((1, -1) + (1,) * (h.ref.ndim - 2))
    return lw.leaky(h, slope)


def _hardtanh(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    del node
    m = b.fn
    if isinstance(m, nn.ReLU6) or m is F.relu6:
        lo, hi = 0.0, 6.0
    elif isinstance(m, nn.Hardtanh):
        lo, hi = m.min_val, m.max_val
    else:
        lo, hi = _arg(b, 1, "min_val", -1.0), _arg(b, 2, "max_val", 1.0)
    return lw.hardtanh(b.handles[0], float(lo), float(hi))


def _clamp(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    name = getattr(b.fn, "__name__", "") if not isinstance(node.target, str) else node.target
    if len(b.handles) != 1 or b.pos[0] != 0:
        raise NotPiecewiseLinearError(
            f"{describe(node, lw.gm)} at graph node '{node.name}': clamp bounds must be constants"
        )
    if "clamp_min" in name:
        lo, hi = _arg(b, 1, "min", None), None
    elif "clamp_max" in name:
        lo, hi = None, _arg(b, 1, "max", None)
    else:
        lo, hi = _arg(b, 1, "min", None), _arg(b, 2, "max", None)
    for v in (lo, hi):
        if v is not None and not isinstance(v, (int, float)):
            if not (torch.is_tensor(v) and v.numel() == 1):
                raise NotPiecewiseLinearError(
                    f"{describe(node, lw.gm)} at graph node '{node.name}': only scalar clamp "
                    "bounds are supported"
                )
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    return lw.hardtanh(b.handles[0], lo, hi)


def _abs(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    del node
    return lw.absolute(b.handles[0])


def _max2(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    args, kwargs = tree_unflatten(list(b.flat), b.spec)
    other = args[1] if len(args) > 1 else kwargs.get("other")
    if other is None or (isinstance(other, int) and not isinstance(other, bool)):
        raise NotPiecewiseLinearError(
            f"{describe(node, lw.gm)} at graph node '{node.name}': only the elementwise max/min "
            "of two tensors is supported (not a reduction over a dimension)"
        )
    name = node.target if isinstance(node.target, str) else node.target.__name__
    sign = -1 if name in ("min", "minimum", "fmin") else 1
    return lw.maximum(args[0], other, sign)


def _max_pool(lw: Lowerer, node: fx.Node, b: _Bound) -> Handle:
    h = b.handles[0]
    m = b.fn
    name = type(m).__name__ if isinstance(m, nn.Module) else m.__name__
    nd = int(name.rstrip("d")[-1])  # MaxPool2d / max_pool2d -> 2
    full = tuple(h.ref.shape)
    shape = (1, math.prod(full[: len(full) - nd]), *full[len(full) - nd :])
    if isinstance(m, nn.Module):
        if getattr(m, "return_indices", False):
            raise NotPiecewiseLinearError(
                f"{describe(node, lw.gm)} at graph node '{node.name}': return_indices=True"
            )
        if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            windows = adaptive_max_pool_windows(shape, m.output_size)
        else:
            windows = max_pool_windows(
                shape, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
            )
    else:
        if "adaptive" in m.__name__:
            windows = adaptive_max_pool_windows(shape, _arg(b, 1, "output_size", None))
        else:
            windows = max_pool_windows(
                shape,
                _arg(b, 1, "kernel_size", None),
                _arg(b, 2, "stride", None),
                _arg(b, 3, "padding", 0),
                _arg(b, 4, "dilation", 1),
                bool(_arg(b, 5, "ceil_mode", False)),
            )
        if _arg(b, 6, "return_indices", False):
            raise NotPiecewiseLinearError(
                f"{describe(node, lw.gm)} at graph node '{node.name}': return_indices=True"
            )
    out_shape = tuple(b.ref().shape)
    return lw.max_pool(h, windows, out_shape)


_register(
    [
        *_methods("size", "dim", "numel", "ndimension", "type", "get_device"),
        getattr,
    ],
    _shape_query,
)
_register(
    [
        nn.Flatten,
        nn.Unflatten,
        nn.Identity,
        nn.ZeroPad1d,
        nn.ZeroPad2d,
        nn.ZeroPad3d,
        nn.PixelShuffle,
        nn.PixelUnshuffle,
        nn.ChannelShuffle,
        torch.flatten,
        torch.reshape,
        torch.squeeze,
        torch.unsqueeze,
        torch.transpose,
        torch.permute,
        torch.cat,
        torch.concat,
        torch.stack,
        torch.narrow,
        torch.movedim,
        operator.getitem,
        F.pad,
        *_methods(
            "view",
            "reshape",
            "flatten",
            "unflatten",
            "permute",
            "transpose",
            "contiguous",
            "squeeze",
            "unsqueeze",
            "expand",
            "expand_as",
            "view_as",
            "reshape_as",
            "narrow",
            "movedim",
            "__getitem__",
            "clone",
        ),
    ],
    _structural,
)
_register(
    [
        operator.add,
        operator.sub,
        operator.iadd,
        operator.isub,
        operator.neg,
        operator.pos,
        torch.add,
        torch.sub,
        torch.subtract,
        torch.neg,
        *_methods("add", "sub", "neg", "add_", "sub_", "__add__", "__sub__", "__radd__"),
    ],
    _additive,
)
_register(
    [
        operator.mul,
        operator.imul,
        operator.truediv,
        operator.matmul,
        torch.mul,
        torch.div,
        torch.true_divide,
        torch.matmul,
        torch.mm,
        *_LAYER_FUNCTIONS,
        *_methods("mul", "div", "matmul", "mm", "__mul__", "__rmul__", "__truediv__"),
    ],
    _scaling,
)
_register(
    [
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    ],
    _weighted_module,
)
_register([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d], _batch_norm_module)
_register([nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, F.dropout], _dropout)
_register(
    [
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        torch.mean,
        torch.sum,
        *_methods("mean", "sum"),
    ],
    _avg_pool,
)
_register([*RELU_MODULES, *RELU_FUNCTIONS, *_methods(*RELU_METHODS)], _relu)
_register([nn.LeakyReLU, F.leaky_relu], _leaky)
_register([nn.PReLU, F.prelu], _prelu)
_register([nn.ReLU6, nn.Hardtanh, F.relu6, F.hardtanh], _hardtanh)
_register(
    [torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max]
    + _methods("clamp", "clip", "clamp_min", "clamp_max"),
    _clamp,
)
_register([torch.abs, operator.abs, *_methods("abs")], _abs)
_register(
    [torch.max, torch.maximum, torch.min, torch.minimum, torch.fmax, torch.fmin]
    + _methods("max", "maximum", "min", "minimum"),
    _max2,
)
_register(
    [
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.MaxPool3d,
        nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d,
        nn.AdaptiveMaxPool3d,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
    ],
    _max_pool,
)
