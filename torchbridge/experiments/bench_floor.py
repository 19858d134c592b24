"""`nm bench floor`: the p×p ReLU covariance against this machine's elementwise floor.

One seeded problem (the ``nm bench kernels`` one: μ ~ N(0, 1)^p, Σ = W Wᵀ/r + 0.05 I, r = 4)
is timed, side by side in one run, for every thread count of ``--threads`` and every dtype
of ``--dtypes``:

* **floor**: the transcendental element-evaluations the exact covariance performs (counted
  by a ``TorchDispatchMode`` over one call: exp, erfc, sqrt, sin, asin, … weighted by their
  output sizes; per pair in the table) times this machine's ``torch.exp`` time per element
  (2²⁰-element tensor, same dtype and threads). Every such call is costed as one exp, and
  the arithmetic between them is free: a lower bound for any kernel that evaluates those
  functions one tensor pass at a time.
* **exact**: ``relu_moments(..., "exact", check_psd=False)`` (ours);
* with ``--compiled``: **exact, compiled bulk** (the same call inside
  ``nmruntime.torch_support.compiled_bulk``: the pairs in a few fused ``torch.compile``
  passes in their own order, each on torch's OpenMP team at the thread count the load leaves
  (``torchbridge.pair_split``), the few pairs they leave by the other routes) and
  **DVI, torch.compile** (DVI's
  function under ``torch.compile``); their first, compiling call is reported apart;
* **DVI**: ``torchbridge.propagate.approx.dvi_relu_moments`` — the approximate closed form
  of Wu et al. 2019 (deterministic variational inference, Table 1's ReLU row), implemented
  here from the paper's formula;
* **2-term Mehler**: ``approx_relu_moments`` — the project's earlier stand-in for DVI (two
  terms of Mehler's expansion, O(ρ³) error; not DVI's formula);
* **series(5)**, **series(20)**: Lemma 4 truncated (the paper's method);
* with ``--authors-series DIR``: **authors' series(5)**, **(20)**: the authors' own code
  (``relu_cov_mean`` of github.com/xmodar/network_moments, branch ``no-assumptions``),
  imported from the user's checkout in DIR at run time, never shipped here
  (``torchbridge.experiments.authors_series``);
* **MC 1e4**: ``monte_carlo_moments`` with ``--mc-samples`` samples.

Times are medians of ``--repeats`` runs after one warm-up. With several ``--threads``, the
exact call (and with ``--compiled`` the compiled one) and DVI are timed at every thread count,
all interleaved inside each repeat ("Thread counts" lines: more threads must never be slower,
and the exact call no slower than DVI at each count). With 1 among ``--threads``, the
exact call (and with ``--compiled`` the compiled one) and DVI are also timed interleaved inside
each repeat at 1 thread ("Exact vs DVI" lines: the issue's bar as a ratio that a load change
on the shared machine hits alike), with each call's minor page faults. With several
``--threads`` the floor's ``torch.exp`` is also timed among the calls in each repeat, and the
floor bar is checked again on those interleaved times (a floor timed minutes away from the
calls moved the ratio by up to 1.5× on the shared 2-core machine). In both, the order of
the calls (and of the thread counts) changes from one repeat to the next (``repeat_order``).

``--device cuda`` times every call and the floor's ``torch.exp`` (2²⁶ elements there) on the
GPU, each call up to a device synchronisation (``synced``); ``--threads`` then sets the host's
threads only and ``--compiled`` (the CPU-only compiled bulk) is refused. The prepared GPU run
of issue #13 is ``scripts/device-check.sh``.

``--heap keep`` (the default, as every ``nm`` command): freed memory stays in the process
(``torchbridge.heap``). With ``--heap default`` glibc returns it to the system after each call,
so every large temporary page-faults on every call; methods then slow down by how much they
allocate and by what ran before them (DVI interleaved with the exact call took 15,000–31,000
faults per call and ran 1.9–2.2× slower than with the heap kept): the ratios measure the
allocator, not the kernels.

A table puts issue #13's bars on the times of the main table (``issue_bars``): for the
exact call (and with ``--compiled`` the compiled one) at each thread count and dtype, its time
over DVI's (in its own block, and interleaved where several thread counts ran) and over the
floor, each marked met or not (at most DVI's time in both; within 2× the floor). The last
(``own_floors``) times each closed form, ours and DVI's, eager and compiled, against the floor
of its own transcendental evaluations, counted the same way: what the floor bar asks of ours,
measured on DVI's formula.

Errors: max abs difference from the exact covariance of the same dtype, and max relative
difference over its entries with |exact| ≥ 1e-6·max|exact| (below that an approximation's
relative error says little); the float64 exact covariance is checked against mpmath by
``nmgen check-points <out>/bench_floor_oracle_points.json`` on ``--check-entries`` random
entries (as in ``nm bench kernels``), and with ``--compiled`` the compiled call's covariance on
the same entries by ``<out>/bench_floor_compiled_oracle_points.json``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchbridge.experiments.authors_series import load_authors_series
from torchbridge.experiments.bench_kernels import oracle_entries, random_problem, timed
from torchbridge.experiments.common import (
    add_common_args,
    markdown_table,
    out_dir,
    write_json,
    write_markdown,
)
from torchbridge.experiments.oracle_points import check_hint, write_points
from torchbridge.heap import keep_freed_memory, minor_faults
from torchbridge.moments import relu_moments
from torchbridge.montecarlo import monte_carlo_moments
from torchbridge.propagate.approx import approx_relu_moments, dvi_relu_moments

T = TypeVar("T")

#: aten ops counted as one transcendental evaluation per output element
TRANSCENDENTAL = frozenset(
    {
        "exp",
        "exp_",
        "expm1",
        "log",
        "log1p",
        "sqrt",
        "sqrt_",
        "rsqrt",
        "rsqrt_",
        "erf",
        "erfc",
        "special_erfcx",
        "special_log_ndtr",
        "special_ndtr",
        "sin",
        "sin_",
        "cos",
        "asin",
        "acos",
        "asinh",
        "sinh",
        "cosh",
        "atan",
    }
)

DTYPES = {"float64": torch.float64, "float32": torch.float32}
_COMPILED_DVI: dict = {}
#: The authors' series by ``--authors-series`` directory (loaded once per process).
_AUTHORS: dict = {}
#: The authors' term counts timed (``--authors-series``), as issue #13 names them.
AUTHORS_TERMS = (5, 20)


class _CountTranscendental(TorchDispatchMode):
    """Counts output elements of transcendental aten ops (see ``TRANSCENDENTAL``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in TRANSCENDENTAL and isinstance(out, torch.Tensor):
            self.counts[name] = self.counts.get(name, 0) + out.numel()
        return out


def count_transcendental(fn) -> dict[str, int]:
    """{op: output elements} of the transcendental aten ops ``fn()`` runs."""
    with _CountTranscendental() as mode:
        fn()
    return dict(sorted(mode.counts.items()))


def bench_device(name: str) -> torch.device:
    """The ``--device`` of a benchmark: "cpu", or "cuda" / "cuda:N" where torch sees it
    (else ValueError naming the flag)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device: {name!r} is not a torch device ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N]; got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return device


def device_name(device: torch.device) -> str:
    """``device`` as the tables name it: "cpu", or e.g. "cuda:0 (NVIDIA H200)"."""
    if device.type != "cuda":
        return str(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def synced(fn: Callable, device: torch.device) -> Callable:
    """``fn`` itself on the CPU; on a GPU ``fn`` followed by a device synchronisation, so that
    a wall-clock time around the call covers the work it queued, not only its launch."""
    if device.type == "cpu":
        return fn

    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize(device)
        return out

    return run


def exp_call(
    dtype: torch.dtype, device: torch.device, n: int | None = None
) -> tuple[Callable[[], object], int]:
    """(fn, n): ``fn()`` runs the floor's unit, ``torch.exp`` on an n-element tensor into an
    out= buffer on ``device`` (synchronised there: ``synced``). n defaults to 2²⁰ on the CPU
    and 2²⁶ on a GPU, where 2²⁰ elements take a few microseconds and the time would be the
    kernel launch's."""
    if n is None:
        n = 1 << 20 if device.type == "cpu" else 1 << 26
    x = torch.linspace(-5.0, 5.0, n, dtype=dtype, device=device)
    out = torch.empty_like(x)
    return synced(lambda: torch.exp(x, out=out), device), n


def exp_seconds_per_element(
    dtype: torch.dtype, repeats: int, n: int | None = None, device: torch.device | None = None
) -> float:
    """Median seconds per element of ``exp_call``'s ``torch.exp`` on ``device`` (default
    CPU)."""
    fn, n = exp_call(dtype, torch.device("cpu") if device is None else device, n)
    t, _, _ = timed(fn, max(repeats, 5), 2)
    return t / n


#: ``thread_check``'s entry of the floor's unit, ``torch.exp`` timed among the calls
EXP_UNIT = "torch.exp"
#: Labels of the ``--compiled`` rows (their first call, which compiles, is timed apart).
EXACT_COMPILED = "exact, compiled bulk"
DVI_COMPILED = "DVI, torch.compile"
#: The DVI row the issue's bars compare with (eager, as users call it)
DVI = "DVI (Wu et al. 2019)"


def _exact_compiled(m: torch.Tensor, c: torch.Tensor):
    return relu_moments(m, c, "exact", check_psd=False, compiled=True)


def _device(args: argparse.Namespace) -> torch.device:
    """``args.device`` (validated by ``run_floor``; CPU where the namespace has none)."""
    return torch.device(getattr(args, "device", "cpu"))


def _on_device(x: torch.Tensor, dname: str, args: argparse.Namespace) -> torch.Tensor:
    """``x`` in the dtype named ``dname`` on the benchmark's device."""
    return x.to(device=_device(args), dtype=DTYPES[dname])


def _methods(args: argparse.Namespace) -> list[tuple[str, Callable]]:
    """(label, fn(mean, cov)) of the timed methods, each synchronised on a GPU (``synced``)."""
    compiled = []
    if getattr(args, "compiled", False):
        dvi_c = _COMPILED_DVI.setdefault("fn", torch.compile(dvi_relu_moments))
        compiled = [(EXACT_COMPILED, _exact_compiled), (DVI_COMPILED, dvi_c)]
    methods = [
        ("exact", lambda m, c: relu_moments(m, c, "exact", check_psd=False)),
        *compiled,
        (DVI, dvi_relu_moments),
        ("2-term Mehler (old stand-in)", approx_relu_moments),
        ("series(5)", lambda m, c: relu_moments(m, c, "series", 5, check_psd=False)),
        ("series(20)", lambda m, c: relu_moments(m, c, "series", 20, check_psd=False)),
        *_authors_methods(args),
        (
            f"MC {args.mc_samples:.0e}",
            lambda m, c: monte_carlo_moments(
                torch.relu, m, c, samples=args.mc_samples, seed=args.seed, full=True
            ),
        ),
    ]
    return [(label, synced(fn, _device(args))) for label, fn in methods]


def _authors_methods(args: argparse.Namespace) -> list[tuple[str, Callable]]:
    """The authors' series at 5 and 20 terms where ``--authors-series`` names their code
    (``authors_series.load_authors_series``); none otherwise."""
    directory = getattr(args, "authors_series", None)
    if not directory:
        return []
    if directory not in _AUTHORS:
        _AUTHORS[directory] = load_authors_series(directory)
    series = _AUTHORS[directory]
    return [(f"authors' series({n})", lambda m, c, n=n: series(m, c, n)) for n in AUTHORS_TERMS]


def repeat_order(items: list[T], r: int) -> list[T]:
    """The order of ``items`` in repeat r of an interleaved check: rotated left by r // 2,
    and reversed in odd repeats. Over 2n repeats each of n items takes each position twice,
    and each call follows the one before it in ``items`` as often as the one after. What ran
    just before a call sets its cache state: in a fixed order the compiled call always
    followed the eager one (the largest working set) and took 0.0281 s at 2 threads against
    0.0229 s in its own block (float64, p = 1024; DVI, after it, 0.0265 s vs 0.0255 s)."""
    if not items:
        return []
    k = (r // 2) % len(items)
    order = [*items[k:], *items[:k]]
    return order if r % 2 == 0 else order[::-1]


def thread_check(mean64: torch.Tensor, cov64: torch.Tensor, threads: list[int], args) -> dict:
    """{dtype: {label: {"seconds": {threads: median s}, "ratio": max/min-thread time,
    "ratio_to_dvi": {threads: time / DVI's}}}} of the exact call (with ``--compiled`` the
    compiled one too) and DVI, every thread count and call interleaved inside each repeat (so
    a load change on the shared machine hits every count alike; the main table times each
    count minutes apart): the issue's bars that more threads are never slower and that the
    exact call is no slower than DVI at each count. The floor's unit is timed among them
    (``EXP_UNIT``: {"seconds_per_element": {threads: median s}}, ``exp_call``'s
    ``torch.exp``): the floor bar on times taken side by side (``issue_bars``)."""
    fns = [("exact", lambda m, c: relu_moments(m, c, "exact", check_psd=False))]
    if getattr(args, "compiled", False):
        fns.append((EXACT_COMPILED, _exact_compiled))
    fns.append(("DVI", dvi_relu_moments))
    fns = [(label, synced(fn, _device(args))) for label, fn in fns]
    out = {}
    for dname in [d for d in str(args.dtypes).split(",") if d.strip()]:
        mean, cov = _on_device(mean64, dname, args), _on_device(cov64, dname, args)
        # the floor's unit, timed among the calls: torch.exp as ``exp_seconds_per_element``
        exp_fn, n_exp = exp_call(DTYPES[dname], _device(args))
        unit = (EXP_UNIT, lambda m, c, exp_fn=exp_fn: exp_fn())
        times = {label: {t: [] for t in threads} for label, _ in [*fns, unit]}
        for r in range(max(args.repeats, 3)):
            for t in repeat_order(threads, r):
                torch.set_num_threads(t)
                for label, fn in repeat_order([*fns, unit], r):
                    t0 = time.perf_counter()
                    fn(mean, cov)
                    times[label][t].append(time.perf_counter() - t0)
        med = {
            label: {t: float(torch.tensor(v).median()) for t, v in per.items()}
            for label, per in times.items()
        }
        exp = med.pop(EXP_UNIT)
        out[dname] = {
            label: {
                "seconds": m,
                "ratio": m[max(threads)] / m[min(threads)],
                "ratio_to_dvi": {t: m[t] / med["DVI"][t] for t in threads},
            }
            for label, m in med.items()
        }
        out[dname][EXP_UNIT] = {"seconds_per_element": {t: v / n_exp for t, v in exp.items()}}
    return out


def bar_check(mean64: torch.Tensor, cov64: torch.Tensor, args: argparse.Namespace) -> dict:
    """{dtype: {"seconds": {label: median s}, "ratio_to_dvi": {label: ratio}, "faults":
    {label: minor page faults per call (mean; None where not measurable)}}} at 1 thread: the
    exact call (and, with ``--compiled``, the compiled one) and DVI interleaved inside each
    repeat, so a load change on the shared machine hits each alike (the issue's bar: exact no
    slower than DVI measured in the same run)."""
    torch.set_num_threads(1)
    fns = [("exact", lambda m, c: relu_moments(m, c, "exact", check_psd=False))]
    if getattr(args, "compiled", False):
        fns.append((EXACT_COMPILED, _exact_compiled))
    fns.append(("DVI", dvi_relu_moments))
    fns = [(label, synced(fn, _device(args))) for label, fn in fns]
    out = {}
    for dname in str(args.dtypes).split(","):
        if not dname.strip():
            continue
        mean, cov = _on_device(mean64, dname, args), _on_device(cov64, dname, args)
        times: dict[str, list[float]] = {label: [] for label, _ in fns}
        faults: dict[str, list[int]] = {label: [] for label, _ in fns}
        for _, fn in fns:  # warm-up (compiled already by the main table)
            fn(mean, cov)
        for r in range(max(args.repeats, 5)):
            for label, fn in repeat_order(fns, r):
                f0 = minor_faults()
                t0 = time.perf_counter()
                fn(mean, cov)
                times[label].append(time.perf_counter() - t0)
                if f0 is not None:
                    faults[label].append(minor_faults() - f0)
        med = {label: float(torch.tensor(v).median()) for label, v in times.items()}
        out[dname] = {
            "seconds": med,
            "ratio_to_dvi": {label: v / med["DVI"] for label, v in med.items()},
            "faults": {label: (sum(v) / len(v) if v else None) for label, v in faults.items()},
        }
    return out


#: issue #13's bars on the exact covariance's time: at most DVI's, within this many floors
BAR_DVI, BAR_FLOOR = 1.0, 2.0


def issue_bars(result: dict) -> list[dict]:
    """Per run (thread count, dtype) and exact method (the eager call and, with
    ``--compiled``, the compiled one): its time over DVI's (each in its own block of the main
    table, and interleaved in each repeat where ``thread_check`` ran) and over the floor,
    with whether each is within issue #13's bar (``BAR_DVI``, ``BAR_FLOOR``)."""
    out = []
    for run in result["runs"]:
        methods, dvi = run["methods"], run["methods"][DVI]["seconds"]
        check = result.get("thread_check", {}).get(run["dtype"], {})
        for label in ("exact", EXACT_COMPILED):
            if label not in methods:
                continue
            sec = methods[label]["seconds"]
            inter = check.get(label, {}).get("ratio_to_dvi", {}).get(run["threads"])
            floor_inter = None
            if inter is not None and EXP_UNIT in check:  # the floor from the interleaved exp
                per_elem = check[EXP_UNIT]["seconds_per_element"][run["threads"]]
                evaluations = run["transcendental_per_pair"] * result["pairs"]
                floor_inter = check[label]["seconds"][run["threads"]] / (evaluations * per_elem)
            row = {
                "threads": run["threads"],
                "dtype": run["dtype"],
                "method": label,
                "seconds": sec,
                "dvi_seconds": dvi,
                "ratio_to_dvi": sec / dvi,
                "ratio_to_dvi_interleaved": inter,
                "ratio_to_floor": sec / run["floor_seconds"],
                "ratio_to_floor_interleaved": floor_inter,
            }
            row["dvi_bar_met"] = row["ratio_to_dvi"] <= BAR_DVI and (
                inter is None or inter <= BAR_DVI
            )
            row["floor_bar_met"] = row["ratio_to_floor"] <= BAR_FLOOR and (
                floor_inter is None or floor_inter <= BAR_FLOOR
            )
            out.append(row)
    return out


def _bars_markdown(bars: list[dict]) -> list[str]:
    """``issue_bars``' rows as a markdown table with its heading lines."""
    if not bars:
        return []
    heads = [
        "threads",
        "dtype",
        "method",
        "time (s)",
        "DVI (s)",
        "time / DVI",
        "interleaved",
        "time / floor",
        "interleaved",
        f"≤ {BAR_DVI:g}× DVI",
        f"≤ {BAR_FLOOR:g}× floor",
    ]
    rows = [
        [
            b["threads"],
            b["dtype"],
            b["method"],
            b["seconds"],
            b["dvi_seconds"],
            f"{b['ratio_to_dvi']:.2f}×",
            "—"
            if b["ratio_to_dvi_interleaved"] is None
            else f"{b['ratio_to_dvi_interleaved']:.2f}×",
            f"{b['ratio_to_floor']:.2f}×",
            "—"
            if b["ratio_to_floor_interleaved"] is None
            else f"{b['ratio_to_floor_interleaved']:.2f}×",
            "met" if b["dvi_bar_met"] else "not met",
            "met" if b["floor_bar_met"] else "not met",
        ]
        for b in bars
    ]
    return [
        "Issue #13's bars on these times (DVI: `DVI (Wu et al. 2019)`; each call in its own "
        "block, and interleaved in each repeat where several thread counts ran, the floor's "
        "torch.exp timed among them; both must be within the bar):",
        "",
        markdown_table(heads, rows),
        "",
    ]


#: The closed forms timed against their own floor (``own_floors``): label, whose count
OWN_FLOOR_METHODS = (
    ("exact", "exact"),
    (EXACT_COMPILED, "exact"),
    (DVI, "DVI"),
    (DVI_COMPILED, "DVI"),
)


def own_floors(result: dict) -> list[dict]:
    """Per run, each closed form's time over the floor of its own transcendental evaluations
    (the exact call's count for ours, ``dvi_relu_moments``' for DVI's; both × the same
    ``torch.exp`` time per element): how far a kernel of each kind runs from the floor that
    issue #13's bar measures ours against."""
    out = []
    for run in result["runs"]:
        floors = {"exact": run["floor_seconds"], "DVI": run["dvi_floor_seconds"]}
        counts = {
            "exact": sum(run["transcendental_ops"].values()),
            "DVI": sum(run["dvi_transcendental_ops"].values()),
        }
        for label, kind in OWN_FLOOR_METHODS:
            if label not in run["methods"]:
                continue
            sec = run["methods"][label]["seconds"]
            out.append(
                {
                    "threads": run["threads"],
                    "dtype": run["dtype"],
                    "method": label,
                    "transcendental": counts[kind],
                    "floor_seconds": floors[kind],
                    "seconds": sec,
                    "ratio_to_own_floor": sec / floors[kind],
                }
            )
    return out


def _own_floors_markdown(rows: list[dict]) -> list[str]:
    """``own_floors``' rows as a markdown table with its heading lines."""
    if not rows:
        return []
    heads = [
        "threads",
        "dtype",
        "method",
        "transcendental evaluations",
        "its floor (s)",
        "time (s)",
        "time / its floor",
    ]
    body = [
        [
            r["threads"],
            r["dtype"],
            r["method"],
            r["transcendental"],
            r["floor_seconds"],
            r["seconds"],
            f"{r['ratio_to_own_floor']:.2f}×",
        ]
        for r in rows
    ]
    return [
        "Each closed form against the floor of its own transcendental evaluations (counted "
        "the same way, × the same `torch.exp` time; DVI's evaluates its sqrt, asin and exp "
        "on all p² entries):",
        "",
        markdown_table(heads, body),
        "",
    ]


def run_floor(args: argparse.Namespace) -> dict:
    """Run the benchmark; write ``bench_floor.{json,md}``; return the JSON object."""
    from tqdm.auto import tqdm

    from torchbridge.experiments.tightness import command_line

    if args.heap not in ("keep", "default"):
        raise ValueError(f"--heap must be 'keep' or 'default'; got {args.heap!r}")
    device = bench_device(getattr(args, "device", "cpu"))
    if device.type != "cpu" and getattr(args, "compiled", False):
        raise ValueError(
            f"--compiled: the compiled bulk runs on the CPU only; leave it out with --device "
            f"{args.device} (there relu_moments(..., compiled=True) is the default call)"
        )
    _authors_methods(args)  # a bad --authors-series fails here, before any timing
    kept = keep_freed_memory() if args.heap == "keep" else False
    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    dtypes = [d for d in str(args.dtypes).split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"--dtypes: unknown dtype {d!r}; use float64 and/or float32")
    mean64, cov64 = random_problem(args.p, args.seed)
    pairs = args.p * (args.p - 1) // 2
    old_threads = torch.get_num_threads()
    rows, result = [], {"p": args.p, "pairs": pairs, "runs": [], "heap": args.heap, "kept": kept}
    result["device"] = device_name(device)
    jobs = [(t, d) for t in threads for d in dtypes]
    exact_ref: dict = {}
    compiled_ref: dict = {}  # the compiled exact covariance (``--compiled``), by dtype
    try:
        for nthreads, dname in tqdm(jobs, desc="bench floor", disable=args.no_progress):
            torch.set_num_threads(nthreads)
            dt = DTYPES[dname]
            mean, cov = _on_device(mean64, dname, args), _on_device(cov64, dname, args)
            ops = count_transcendental(
                lambda mean=mean, cov=cov: relu_moments(mean, cov, "exact", check_psd=False)
            )
            per_pair = sum(ops.values()) / pairs
            dvi_ops = count_transcendental(lambda mean=mean, cov=cov: dvi_relu_moments(mean, cov))
            t_exp = exp_seconds_per_element(dt, args.repeats, device=device)
            floor = per_pair * pairs * t_exp
            run = {
                "threads": nthreads,
                "dtype": dname,
                "exp_ns_per_element": t_exp * 1e9,
                "transcendental_per_pair": per_pair,
                "transcendental_ops": ops,
                "floor_seconds": floor,
                "dvi_transcendental_ops": dvi_ops,
                "dvi_floor_seconds": sum(dvi_ops.values()) * t_exp,
                "methods": {},
            }
            outs = {}
            for label, fn in _methods(args):
                first = None
                if label in (EXACT_COMPILED, DVI_COMPILED):  # the first call compiles
                    t0 = time.perf_counter()
                    fn(mean, cov)
                    first = time.perf_counter() - t0
                t, times, out = timed(lambda fn=fn, m=mean, c=cov: fn(m, c), args.repeats, 1)
                outs[label] = out[1]
                run["methods"][label] = {"seconds": t, "times": times}
                if first is not None:
                    run["methods"][label]["first_call_seconds"] = first
            ex = outs["exact"]
            exact_ref.setdefault(dname, ex)
            if EXACT_COMPILED in outs:
                compiled_ref.setdefault(dname, outs[EXACT_COMPILED])
            for label, m in run["methods"].items():
                m["ratio_to_exact"] = m["seconds"] / run["methods"]["exact"]["seconds"]
                m["ratio_to_floor"] = m["seconds"] / floor
                diff = (outs[label] - ex).abs()
                m["max_abs_err_vs_exact"] = float(diff.max())
                big = ex.abs() >= 1e-6 * ex.abs().max()
                m["max_rel_err_vs_exact"] = float((diff[big] / ex.abs()[big]).max())
            if dname == "float32" and "float64" in exact_ref:
                run["exact_float32_vs_float64"] = float(
                    (ex.double() - exact_ref["float64"]).abs().max()
                )
            result["runs"].append(run)
            rows.append(
                [
                    nthreads,
                    dname,
                    "floor",
                    floor,
                    floor / run["methods"]["exact"]["seconds"],
                    "—",
                    "—",
                ]
            )
            for label, m in run["methods"].items():
                ref = label == "exact"
                rows.append(
                    [
                        nthreads,
                        dname,
                        label,
                        m["seconds"],
                        m["ratio_to_exact"],
                        "(reference)" if ref else m["max_abs_err_vs_exact"],
                        "(reference)" if ref else m["max_rel_err_vs_exact"],
                    ]
                )
        if len(threads) > 1:
            result["thread_check"] = thread_check(mean64, cov64, threads, args)
        if 1 in threads:
            result["bar_check"] = bar_check(mean64, cov64, args)
    finally:
        torch.set_num_threads(old_threads)
    result["bars"] = issue_bars(result)
    result["own_floors"] = own_floors(result)
    cmd = command_line(args)
    points = None
    if "float64" in exact_ref:
        points = write_points(
            out_dir(args.out) / "bench_floor_oracle_points.json",
            oracle_entries(
                mean64, cov64, exact_ref["float64"].cpu(), args.check_entries, args.seed
            ),
            cmd,
        )
        result["oracle_points"] = {"file": str(points), "check": check_hint(points)}
    compiled_points = None
    if "float64" in compiled_ref:  # the same entries of the compiled call's covariance
        compiled_points = write_points(
            out_dir(args.out) / "bench_floor_compiled_oracle_points.json",
            oracle_entries(
                mean64, cov64, compiled_ref["float64"].cpu(), args.check_entries, args.seed
            ),
            cmd,
        )
        result["compiled_oracle_points"] = {
            "file": str(compiled_points),
            "check": check_hint(compiled_points),
        }
    heads = [
        "threads",
        "dtype",
        "method",
        "time (s)",
        "time / exact",
        "max abs err vs exact",
        "max rel err vs exact",
    ]
    ops_lines = [
        f"- {r['threads']} thread(s), {r['dtype']}: exp {r['exp_ns_per_element']:.2f} ns/element, "
        f"{r['transcendental_per_pair']:.1f} transcendental evaluations per pair "
        f"({', '.join(f'{k} {v}' for k, v in r['transcendental_ops'].items())})"
        for r in result["runs"]
    ]
    first_lines = [
        f"- {r['threads']} thread(s), {r['dtype']}: first call (compiling) of {label}: "
        f"{m['first_call_seconds']:.1f} s"
        for r in result["runs"]
        for label, m in r["methods"].items()
        if "first_call_seconds" in m
    ]
    thread_lines = [
        f"- {d}, {label}: "
        + ", ".join(
            f"{t} thread(s) {v:.3g} s ({c['ratio_to_dvi'][t]:.2f}× DVI)"
            for t, v in c["seconds"].items()
        )
        + f"; {max(threads)} vs {min(threads)} thread(s): {c['ratio']:.2f}×"
        for d, per in result.get("thread_check", {}).items()
        for label, c in per.items()
        if label not in ("DVI", EXP_UNIT)
    ]
    exp_lines = [
        f"- {d}, torch.exp (the floor's unit): "
        + ", ".join(
            f"{t} thread(s) {v * 1e9:.2f} ns/element"
            for t, v in per[EXP_UNIT]["seconds_per_element"].items()
        )
        for d, per in result.get("thread_check", {}).items()
    ]
    bar_lines = [
        f"- {d}: "
        + ", ".join(
            f"{label} {v:.3g} s ({c['ratio_to_dvi'][label]:.2f}× DVI"
            + (
                f", {c['faults'][label]:.0f} page faults/call)"
                if c["faults"][label] is not None
                else ")"
            )
            for label, v in c["seconds"].items()
        )
        for d, c in result.get("bar_check", {}).items()
    ]
    md = "\n".join(
        [
            f"p = {args.p} ReLU covariance ({pairs} off-diagonal pairs) on {result['device']}, "
            "measured in one run; "
            + (
                "freed memory kept in the process (`--heap keep`)."
                if kept
                else f"glibc's default heap (`--heap {args.heap}`"
                + (", keeping was refused)." if args.heap == "keep" else ").")
            ),
            "",
            markdown_table(heads, rows),
            "",
            *_bars_markdown(result["bars"]),
            *_own_floors_markdown(result["own_floors"]),
            "Floor = transcendental evaluations of the exact method × torch.exp time per element:",
            "",
            *ops_lines,
            *(
                ["", "Compile cost (not in the medians above):", "", *first_lines]
                if first_lines
                else []
            ),
            *(
                [
                    "",
                    "Thread counts and calls interleaved in each repeat (medians):",
                    "",
                    *thread_lines,
                    *exp_lines,
                ]
                if thread_lines
                else []
            ),
            *(
                [
                    "",
                    "Exact vs DVI at 1 thread, interleaved in each repeat (medians):",
                    "",
                    *bar_lines,
                ]
                if bar_lines
                else []
            ),
            "",
            f"Exact float64 vs mpmath: `{check_hint(points)}` ({args.check_entries} random "
            "off-diagonal and 5 diagonal entries)."
            if points is not None
            else "No float64 run: no oracle points written.",
            *(
                [f"Exact float64, compiled bulk, vs mpmath: `{check_hint(compiled_points)}`."]
                if compiled_points is not None
                else []
            ),
            "",
            f"Command: `{cmd}`",
        ]
    )
    result["command"] = cmd
    write_json(args.out, "bench_floor", result)
    write_markdown(args.out, "bench_floor", md)
    print(md)
    return result


def add_bench_parser(bench_subparsers) -> None:
    """Register `nm bench floor`."""
    p = bench_subparsers.add_parser(
        "floor",
        help="p×p ReLU covariance: exact vs the elementwise floor, DVI, series, Monte Carlo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p, device=False)
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of every timed call and of the floor's torch.exp: cpu or cuda[:N] "
        "(on a GPU each call is timed to a device synchronisation, torch.exp on 2^26 "
        "elements, and --threads sets the host's threads only; --compiled is CPU-only) "
        "(default cpu)",
    )
    p.add_argument("--p", type=int, default=1024, help="number of variables p (default 1024)")
    p.add_argument(
        "--threads",
        default="1,2",
        help="comma-separated torch thread counts, each timed (default 1,2)",
    )
    p.add_argument(
        "--dtypes", default="float64,float32", help="comma-separated dtypes (default both)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, median (default 3)")
    p.add_argument(
        "--mc-samples", type=int, default=10_000, help="Monte Carlo samples (default 10^4)"
    )
    p.add_argument(
        "--check-entries",
        type=int,
        default=50,
        help="random off-diagonal entries of the float64 exact covariance (plus 5 diagonal "
        "ones) written for `nmgen check-points` (default 50)",
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also time the exact method with the compiled bulk (nmruntime.torch_support."
        "compiled_bulk) and DVI under torch.compile; their first (compiling) call is timed "
        "apart (default: off)",
    )
    p.add_argument(
        "--heap",
        choices=("keep", "default"),
        default="keep",
        help="keep: freed memory stays in the process (torchbridge.heap, as every nm "
        "command); default: glibc returns it after each call and large temporaries "
        "page-fault on every call (default: keep)",
    )
    p.add_argument(
        "--authors-series",
        default=None,
        metavar="DIR",
        help="a checkout of the authors' code (github.com/xmodar/network_moments, branch "
        "no-assumptions: gaussian_relu_moments.py and erf_exp_integral.py): also time their "
        "series at 5 and 20 terms, imported from DIR at run time (default: none, rows left out)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_floor)
