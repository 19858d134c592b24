"""Argument preparation for the generated PyTorch kernels (no sympy, no mpmath)."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator

import torch

_FLOATS = (torch.float32, torch.float64)
_FORCE_SYNC_FREE = [False]


def _init_vector_math() -> None:
    """One tiny float64 ``torch.exp`` on the importing thread, so that MKL's vector math
    library initializes itself outside a parallel region. Where its first call was from two
    OpenMP threads at once (torch 2.13, MKL 2024.2, this 2-core machine: ``torch.exp`` on
    3,000 float64 elements, 2 threads, in a fresh process), some of that call's values were
    off by 3.3e-9 relative, the next call's right: 9 fresh processes in 120. After one call
    on 8 elements (below torch's parallel grain: one thread), 0 in 160 (exp or log first;
    tests/test_torch_support.py)."""
    torch.exp(torch.ones(8, dtype=torch.float64))


_init_vector_math()


def sync_free(x: torch.Tensor) -> bool:
    """True where the runtime must not branch on tensor values: ``x`` lives on an accelerator
    (a branch would be a host-device sync), the code is traced by ``torch.compile`` (it would
    be a graph break), or ``force_sync_free`` is active. Then every data-dependent branch is
    masked arithmetic; on eager CPU the runtime gathers the elements of each branch instead
    (cheaper there, with no device to wait for)."""
    return _FORCE_SYNC_FREE[0] or x.device.type != "cpu" or torch.compiler.is_compiling()


@contextlib.contextmanager
def force_sync_free(on: bool = True) -> Iterator[None]:
    """Run the sync-free (masked, accelerator/compile) code path on the CPU too (tests)."""
    old = _FORCE_SYNC_FREE[0]
    _FORCE_SYNC_FREE[0] = on
    try:
        yield
    finally:
        _FORCE_SYNC_FREE[0] = old


_COMPILED_BULK = [os.environ.get("NM_COMPILED_BULK", "0") == "1"]
_COMPILED: dict = {}


@contextlib.contextmanager
def compiled_bulk(on: bool = True) -> Iterator[None]:
    """Run the bulk of the exact pair covariance through ``torch.compile`` on eager CPU
    tensors without autograd: the direct route as one fused pass per |ρ| group (its node loop
    unrolled over the rule's constants, one compile per rule size, dynamic in the pair
    count), the closed form with its Φ2, the cheap-route masks and Mehler's loop in blocks.
    Opt-in (``relu_moments(..., compiled=True)`` enters it): the first call per process and
    dtype pays the compile, measured by ``nm bench floor --compiled``. Also on for the whole
    process with the environment variable ``NM_COMPILED_BULK=1``."""
    old = _COMPILED_BULK[0]
    _COMPILED_BULK[0] = on
    try:
        yield
    finally:
        _COMPILED_BULK[0] = old


#: inductor options of every compiled function here. ``cpp.dynamic_threads``: a kernel's
#: loops are split between ``omp_get_max_threads()`` threads at the call (torch's count on the
#: calling thread: ``torch.set_num_threads``) instead of the count baked in at its compile, so
#: one compile serves every thread count (``torchbridge.pair_split.Team`` sets it per step).
KERNEL_OPTIONS = {"cpp.dynamic_threads": True}

_COMPILE_FAILED: list = [None]  # the first compile error (then the compiled bulk is off)


def compiled(
    x: torch.Tensor, name: str, fn, indices_in_range: bool = False, releases_gil: bool = False
):
    """``torch.compile(fn, dynamic=True, fullgraph=True)`` (cached under ``name``) where the
    compiled bulk is on and ``x`` is an eager CPU tensor outside autograd; else None.

    ``indices_in_range``: the caller guarantees that every index ``fn`` gathers or scatters
    with is in range (built by the caller, never taken from user input): inductor's bounds
    assertions on indirect indexing are left out of this function's kernels (its
    ``assert_indirect_indexing`` option, for this compile only).

    ``releases_gil``: the compiled call runs without the GIL (inductor's ``cpp_wrapper``: the
    graph's wrapper is C++ and releases it): the process's other Python threads run meanwhile.
    Same kernels, same values; its first compile takes longer (float64 ``relu_moments`` at
    p = 1024 with an empty inductor cache: 40.5 s vs 37.1 s).

    Every kernel runs on the calling thread's torch thread count at the call, as an eager op
    does (``KERNEL_OPTIONS``), not the count at its compile.

    Where compiling fails (no C++ compiler, an inductor error), the call warns once, runs
    ``fn`` eagerly, and the compiled bulk stays off for the rest of the process (an error of
    ``fn`` itself is then raised by the eager call)."""
    if not _COMPILED_BULK[0] or _COMPILE_FAILED[0] is not None or sync_free(x):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    if name not in _COMPILED:
        options = dict(KERNEL_OPTIONS)
        if indices_in_range:
            options["assert_indirect_indexing"] = False
        if releases_gil:
            options["cpp_wrapper"] = True
        cfn = torch.compile(fn, dynamic=True, fullgraph=True, options=options or None)
        _COMPILED[name] = _eager_on_failure(_with_compile_settings(cfn), fn)
    return _COMPILED[name]


def compiled_graph(
    x: torch.Tensor, name: str, fn, indices_in_range: bool = False, releases_gil: bool = False
):
    """``compiled``'s function for a hot loop, called without dynamo: ``fn`` (tensor
    arguments only, one or more tensors out) traced by ``make_fx`` with symbolic sizes
    (without duck sizing: no two sizes assumed equal) and compiled by inductor's
    ``standalone_compile``, once per signature (each argument's dtype, device, rank,
    contiguity and sizes 0, 1 or more per dimension: what dynamo would specialize on).
    A call then checks its signature in Python instead of entering dynamo's frame, its
    guards and AOTAutograd's wrappers: 14–17 µs instead of 135–157 µs per call of a compiled
    pass of ``relu_moments`` on 2–64 pairs (torch 2.13, 1 thread; scratch
    ``/tmp/s32/scpass.py``), the same kernels and the same values bit for bit. A
    signature that does not trace or compile runs ``compiled``'s function (dynamo). None
    where ``compiled`` gives None."""
    fallback = compiled(x, name, fn, indices_in_range, releases_gil)
    if fallback is None:
        return None
    key = f"graph:{name}"
    if key not in _COMPILED:
        options = dict(KERNEL_OPTIONS)
        if indices_in_range:
            options["assert_indirect_indexing"] = False
        if releases_gil:
            options["cpp_wrapper"] = True
        _COMPILED[key] = _Graphs(fn, options, fallback)
    return _COMPILED[key]


class _Graphs:
    """The standalone-compiled graphs of one function, by signature (``compiled_graph``)."""

    def __init__(self, fn, options: dict, fallback) -> None:
        self.fn, self.options, self.fallback = fn, options, fallback
        self.runs: dict = {}
        self.failed: Exception | None = None  # the last trace or compile error
        self.lock = threading.Lock()

    def __call__(self, *args):
        # list comprehensions, not generators: 9.9 vs 14.6 µs for a band pass's 9 arguments
        key = tuple(
            [
                (a.dtype, a.device, tuple([min(n, 2) for n in a.shape]), a.is_contiguous())
                for a in args
            ]
        )
        run = self.runs.get(key)
        if run is None:
            with self.lock:  # one thread traces and compiles a signature
                run = self.runs.get(key)
                if run is None:
                    run = self.runs[key] = self._build(args)
        return run(*args)

    def _build(self, args: tuple):
        from torch._inductor import standalone_compile
        from torch.fx.experimental import _config as fx_config
        from torch.fx.experimental.proxy_tensor import make_fx

        try:
            with torch.no_grad(), force_sync_free(), fx_config.patch(use_duck_shape=False):
                graph = make_fx(self.fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(
                    *args
                )
                return standalone_compile(
                    graph, list(args), options={"config_patches": self.options}
                )
        except Exception as err:  # any trace or compile failure: dynamo's function
            self.failed = err
            return self.fallback


def _with_compile_settings(cfn):
    """``cfn`` run under ``compile_settings``. Python floats are traced as constants (dynamo's
    ``specialize_float``): the rules' nodes and weights, unrolled from closures, enter the
    kernels as immediates. By default ``dynamic=True`` makes each such float a graph input,
    converted to a tensor on every call (66 conversions per call of the 32-node direct rule;
    5,350 per p = 1024 ``relu_moments`` call). No compiled function here takes a float
    argument that varies between calls (which would then recompile)."""

    def run(*args):
        with compile_settings():
            return cfn(*args)

    return run


#: dynamo's recompiles per function allowed inside ``compile_settings`` (its default is 8).
#: One function here serves both dtypes, views and plain tensors, and sizes 0, 1 and more,
#: each a specialization of its own. A mixed workload (both dtypes, a batch, small ``chunk``
#: values: scratch ``/tmp/s27/edge3.py``) hit 8 on ``direct_front``, and the compiled bulk was
#: then off for the rest of the process.
RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """dynamo's ``specialize_float`` on and its recompile limit at least ``RECOMPILE_LIMIT``
    inside, for the calling thread: dynamo's config is thread-local (torch 2.13), so each
    thread that runs a compiled function sets its own (``_with_compile_settings``). Set and
    restored by hand: 6.4 µs per use where ``config.patch`` of the two took 23.6 µs."""
    config = torch._dynamo.config
    old = (config.specialize_float, config.recompile_limit)
    config.specialize_float = True
    config.recompile_limit = max(old[1], RECOMPILE_LIMIT)
    try:
        yield
    finally:
        config.specialize_float, config.recompile_limit = old


def _eager_on_failure(cfn, fn):
    """``cfn``, or ``fn`` after ``cfn`` raised (see ``compiled``)."""

    def run(*args):
        if _COMPILE_FAILED[0] is None:
            try:
                return cfn(*args)
            except Exception as err:  # any compile failure: eager instead
                _COMPILE_FAILED[0] = err
                warnings.warn(
                    f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); the "
                    "compiled bulk is off for this process, the exact values come from the "
                    "eager path",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return fn(*args)

    return run


def prepare(
    name: str,
    values: tuple,
    names: tuple[str, ...],
    kinds: tuple[str, ...],
    validate: bool = True,
):
    """Convert, type-check, broadcast and domain-check kernel arguments.

    Args:
        name: kernel name (for error messages).
        values: tensors or Python numbers; numbers take the tensors' dtype and device
            (float64 on CPU when no argument is a tensor).
        names: argument names; kinds: "real" | "extreal" (±inf allowed) | "nonneg" | "corr"
            per argument.
        validate: check the values (finite, σ >= 0, |ρ| <= 1); False skips those checks
            (dtypes, devices and shapes are always checked): no data-dependent Python
            control flow, for hot loops and ``torch.compile``.

    Returns:
        tuple of tensors with one dtype (the promoted float dtype of the tensor arguments),
        one device and one broadcast shape; autograd history is kept.

    Raises:
        TypeError: a tensor that is not float32/float64.
        ValueError: NaN/Inf, negative std, |corr| > 1, mixed devices, non-broadcastable shapes.
    """
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    for n, v in zip(names, values, strict=True):
        if isinstance(v, torch.Tensor) and v.dtype not in _FLOATS:
            raise TypeError(f"{name}: argument {n!r} has dtype {v.dtype}; use float32 or float64")
    if tensors:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            found = sorted(map(str, devices))
            raise ValueError(f"{name}: arguments are on different devices: {found}")
        device = tensors[0].device
    else:
        dtype, device = torch.float64, torch.device("cpu")
    out = [
        v.to(dtype) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype, device=device)
        for v in values
    ]
    try:
        out = torch.broadcast_tensors(*out)
    except RuntimeError:
        shapes = ", ".join(f"{n}{tuple(t.shape)}" for n, t in zip(names, out, strict=True))
        raise ValueError(f"{name}: argument shapes do not broadcast: {shapes}") from None
    if not validate:
        return tuple(out)
    for n, t, kind in zip(names, out, kinds, strict=True):
        d = t.detach()
        if kind == "extreal" and bool(torch.isnan(d).any()):
            raise ValueError(f"{name}: argument {n!r} contains NaN")
        if kind != "extreal" and not bool(torch.isfinite(d).all()):
            what = "NaN" if bool(torch.isnan(d).any()) else "an infinite value"
            raise ValueError(f"{name}: argument {n!r} contains {what}")
        if kind == "nonneg" and bool((d < 0).any()):
            raise ValueError(
                f"{name}: argument {n!r} is a standard deviation and must be >= 0; "
                f"got minimum {d.min().item()}"
            )
        if kind == "corr" and bool((d.abs() > 1).any()):
            raise ValueError(
                f"{name}: argument {n!r} is a correlation and must lie in [-1, 1]; "
                f"got max |{n}| = {d.abs().max().item()}"
            )
    return tuple(out)
