"""Generate ``generated/numpy_kernels.py`` and ``generated/torch_kernels.py`` from the specs.

Pipeline per kernel case: stable rewrites (``sympy.codegen.rewriting.optimize`` with
log1p/expm1), numeric folding, one ``sympy.cse`` over the case's straight-line lets and its
outputs together (a ``Loop`` is printed as a Python ``for`` over Python-float coefficients),
then one printer per backend; the module is formatted by the pinned ``ruff format`` (line
length 100). The file skeleton (header, imports, argument preparation, masked piecewise
evaluation) is built here; the math is printed only by ``nmgen.printers``. Output is
byte-identical across runs: no timestamps, no absolute paths; the header carries a hash of
the expressions. ``generated/gauss_legendre.py`` holds the one copy of the quadrature rules.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sympy as sp
from sympy.codegen.rewriting import expm1_opt, log1p_opt, optimize

from nmgen import registry
from nmgen.derivations.functions import BVN, RUNTIME_CALLS
from nmgen.derivations.spec import Case, KernelSpec, Loop
from nmgen.printers import NumpyKernelPrinter, ScalarPrinter, TorchKernelPrinter, fold_numbers

ROOT = Path(__file__).resolve().parent.parent
GENERATED_DIR = ROOT / "generated"
FIX_COMMAND = "nmgen generate"


@dataclass(frozen=True)
class Backend:
    name: str
    filename: str
    printer: type
    where: str
    full_like: str
    imports: tuple[str, ...]
    description: str


BACKENDS = (
    Backend(
        "numpy",
        "numpy_kernels.py",
        NumpyKernelPrinter,
        "numpy.where",
        "numpy.full_like",
        (
            "import functools",
            "import math",
            "",
            "import numpy",
            "import scipy.special",
            "",
            "from nmruntime.numpy_support import prepare as _prepare",
        ),
        "NumPy/SciPy kernels: elementwise, broadcasting, float32 and float64.",
    ),
    Backend(
        "torch",
        "torch_kernels.py",
        TorchKernelPrinter,
        "torch.where",
        "torch.full_like",
        (
            "import functools",
            "import math",
            "",
            "import torch",
            "",
            "from nmruntime.torch_support import prepare as _prepare",
        ),
        "PyTorch kernels: elementwise, broadcasting, float32 and float64, any device, "
        "differentiable by autograd (untaken branches are evaluated on masked inputs, so "
        "their gradients are never NaN).",
    ),
)


def _rewrite(expr: sp.Expr) -> sp.Expr:
    return optimize(expr, [log1p_opt, expm1_opt]) if isinstance(expr, sp.Expr) else expr


def expressions_hash(specs: list[KernelSpec]) -> str:
    """sha256 over the srepr of every case (expressions, conditions, safe values)."""
    h = hashlib.sha256()
    for k in specs:
        h.update(k.name.encode())
        for c in k.cases:
            h.update(sp.srepr(c.outputs).encode())
            h.update(sp.srepr(c.condition).encode())
            h.update(repr(sorted((str(s), v) for s, v in c.safe.items())).encode())
            h.update(sp.srepr(c.lets).encode())
    return h.hexdigest()[:16]


def _docstring(k: KernelSpec, backend: Backend, ops: str) -> list[str]:
    arg_doc = {
        "real": "real, finite",
        "extreal": "real, ±inf allowed",
        "nonneg": "standard deviation, >= 0",
        "corr": "correlation, in [-1, 1]",
    }
    kind = "ndarray" if backend.name == "numpy" else "Tensor"
    lines = [f'    """{k.doc}', "", f"    Implements {k.equation} ({k.source}).", "", "    Args:"]
    lines += [f"        {a.symbol.name}: {kind}, {arg_doc[a.kind]}." for a in k.args]
    lines += [f"        {n}: int >= 1." for n in k.int_args]
    lines.append("        validate: check the arguments' values (finite, σ >= 0, |ρ| <= 1).")
    lines += ["", "    Returns:"]
    if k.n_outputs == 1:
        lines.append(f"        {kind} of the broadcast shape and the arguments' float dtype.")
    else:
        lines.append(f"        tuple ({', '.join(k.output_names)}) of {kind}s, broadcast shape.")
    lines += ["", "    Cases (first match wins):"]
    lines += [f"        {i}. {c.note}" for i, c in enumerate(k.cases)]
    lines += ["", f"    Printed transcendental calls (all cases; a loop body counts once): {ops}."]
    lines.append('    """')
    return lines


def _loop_symbols(lets) -> tuple[list, Loop | None]:
    """(straight lets, the final ``Loop`` or None); a ``Loop`` must come last."""
    straight = [x for x in lets if not isinstance(x, Loop)]
    loops = [x for x in lets if isinstance(x, Loop)]
    if len(loops) > 1 or (loops and not isinstance(lets[-1], Loop)):
        raise ValueError("a case may have at most one Loop, as its last let")
    return straight, (loops[0] if loops else None)


def _depends(expr: sp.Basic, dirty: set) -> bool:
    return bool(expr.free_symbols & dirty)


def _program(case: Case, subs: dict, tag: str):
    """CSE over the case's straight-line lets and outputs together.

    Returns (pre, named, loop, post, reduced): assignments before the loop (CSE temporaries
    and the lets the loop needs by name), the loop (or None), the CSE temporaries that use
    the loop's results, and the reduced outputs. Lets are inlined (their values take part in
    the CSE); a loop-carried let is inlined with its initial value before the loop and kept
    as a name (its final value) after it.
    """
    straight, loop = _loop_symbols(case.lets)
    carried = {s for s, _ in loop.body} if loop else set()
    used_by_loop = set()
    if loop:
        for _, e in (*loop.scalars, *loop.body):
            used_by_loop |= sp.sympify(e).free_symbols
    env_pre: dict = {}  # every let -> its inlined value (before the loop)
    env_post: dict = {}  # non-carried lets only (after the loop)
    named = []
    for sym, expr in straight:
        e = _rewrite(sp.sympify(expr).xreplace(subs)).xreplace(env_pre)
        env_pre[sym] = e
        if sym not in carried:
            env_post[sym] = e
        if sym in carried or sym in used_by_loop:
            named.append((sym, e))
    outs = [_rewrite(sp.sympify(o).xreplace(subs)).xreplace(env_post) for o in case.outputs]
    exprs = [fold_numbers(e) for e in [*(e for _, e in named), *outs]]
    repl, reduced = sp.cse(exprs, symbols=sp.numbered_symbols(f"_t{tag}_"), order="canonical")
    dirty = set(carried)
    pre, post = [], []
    for s, e in repl:
        if _depends(e, dirty):
            dirty.add(s)
            post.append((s, e))
        else:
            pre.append((s, e))
    named_red = list(zip([s for s, _ in named], reduced[: len(named)], strict=True))
    if loop:
        loop = loop.xreplace(subs)
    return pre, named_red, loop, post, reduced[len(named) :]


def _loop_code(loop: Loop, pr, indent: str) -> list[str]:
    """The printed ``for`` loop: per-iteration Python-float scalars, then the body."""
    sc = ScalarPrinter()
    lines = [f"{indent}for {loop.index.name} in range({loop.start}, {loop.stop.name}):"]
    for sym, expr in loop.scalars:
        lines.append(f"{indent}    {sym.name} = {sc.doprint(sp.sympify(expr))}")
    for sym, expr in loop.body:
        e = fold_numbers(_rewrite(sp.sympify(expr)))
        lines.append(f"{indent}    {sym.name} = {pr.doprint(e)}")
    return lines


def _case_code(
    k: KernelSpec, i: int, case: Case, backend: Backend, pr, claim: str | None = None
) -> tuple[list, list]:
    """Code of case ``i``; its inputs are masked outside ``claim & condition``.

    ``claim`` names the mask of elements no earlier case took: an element whose own condition
    holds but that an earlier case claimed must be masked too, or NaNs of this branch would
    leak into the gradients through ``where``.
    """
    lines = [f"# case {i}: {case.note}"]
    cond = None
    subs = {}
    if case.condition is not sp.true:
        cond = f"_c{i}"
        c = pr.doprint(case.condition)
        lines.append(f"{cond} = {claim} & {c}" if claim else f"{cond} = {c}")
        for sym, val in case.safe.items():
            masked = sp.Symbol(f"{sym.name}_{i}")
            subs[sym] = masked
            lines.append(f"{masked.name} = {backend.where}({cond}, {sym.name}, {float(val)!r})")
    pre, named, loop, post, reduced = _program(case, subs, str(i))
    for s, e in [*pre, *named]:
        lines.append(f"{s.name} = {pr.doprint(fold_numbers(e))}")
    if loop is not None:
        lines += _loop_code(loop, pr, "")
    for s, e in post:
        lines.append(f"{s.name} = {pr.doprint(fold_numbers(e))}")
    values = []
    ref = k.args[0].symbol.name
    for j, e in enumerate(reduced):
        e = fold_numbers(e)
        name = f"_v{i}_{j}"
        if e.is_number:
            lines.append(f"{name} = {backend.full_like}({ref}, {float(e)!r})")
        else:
            lines.append(f"{name} = {pr.doprint(e)}")
        values.append(name)
    return lines, [(cond, v) for v in values]


def _int_checks(k: KernelSpec) -> list[str]:
    lines = []
    for n in k.int_args:
        lines += [
            f"    if not isinstance({n}, int) or isinstance({n}, bool) or {n} < 1:",
            "        raise ValueError(",
            f'            f"{k.name}: {n} must be an int >= 1; got {{{n}!r}}"',
            "        )",
        ]
    return lines


_TRANSCENDENTAL = re.compile(
    r"\b(?:torch|numpy|scipy\.special|torch\.special|math)\.(exp|expm1|log|log1p|sqrt|erf|"
    r"erfc|erfcx|ndtr|asin|arcsin|atan|arctan|sin|cos)\("
)
_RUNTIME = re.compile(r"\b(_bvn|_relu_moments|_relu_cov|_relu_cross)\(")


def op_counts(code_lines: list[str]) -> str:
    """Transcendental calls in printed code: "exp 4, erfc 2, ..." (alphabetical), plus runtime
    calls (whose own cost is measured by ``nm bench floor``)."""
    counts: dict[str, int] = {}
    for ln in code_lines:
        if ln.lstrip().startswith("#"):
            continue
        for m in _TRANSCENDENTAL.finditer(ln):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        for m in _RUNTIME.finditer(ln):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return ", ".join(f"{n} {c}" for n, c in sorted(counts.items())) or "none"


def render_kernel(k: KernelSpec, backend: Backend) -> str:
    """Source of one kernel function for ``backend``.

    Every case is evaluated on masked inputs and merged with ``where``. NumPy skips a limit
    case no element needs (``if _rest.any()``); PyTorch evaluates every case (no
    data-dependent Python control flow: no host-device sync, no graph break under
    ``torch.compile``). Argument value checks run when ``validate`` is true (the default).
    """
    if k.bound is not None:
        target, values = k.bound
        names = next(x for x in registry.kernel_specs() if x.name == target).int_args
        kw = ", ".join(f"{n}={v}" for n, v in zip(names, values, strict=True))
        return f"{k.name} = functools.partial({target}, {kw})\n"
    pr = backend.printer()
    argnames = [a.symbol.name for a in k.args]
    sig = ", ".join([*argnames, *k.int_args])
    body: list[str] = []
    names = ", ".join(f'"{n}"' for n in argnames)
    kinds = ", ".join(f'"{a.kind}"' for a in k.args)
    body += _int_checks(k)
    tup = ",)" if len(argnames) == 1 else ")"
    body.append(
        f'    {", ".join(argnames)} = _prepare("{k.name}", ({", ".join(argnames)}{tup}, '
        f"({names}{tup}, ({kinds}{tup}, validate)"
    )
    code_all: list[str] = []
    outs = [f"_out{j}" for j in range(k.n_outputs)]
    sync_free = backend.name == "torch"
    for i, case in enumerate(k.cases):
        code, vals = _case_code(k, i, case, backend, pr, None if i == 0 else "_rest")
        code_all += code
        cond = vals[0][0]
        if i == 0:
            body += ["    " + ln for ln in code]
            body.append(f"    {', '.join(outs)} = {', '.join(v for _, v in vals)}")
            if cond is None:
                break
            body.append(f"    _rest = ~{cond}")
            continue
        pad = "    " if sync_free else "        "
        if not sync_free:
            body.append("    if _rest.any():")
        body += [pad + ln for ln in code]
        for (c, v), o in zip(vals, outs, strict=True):
            take = "_rest" if c is None else c
            body.append(f"{pad}{o} = {backend.where}({take}, {v}, {o})")
        if cond is not None and i < len(k.cases) - 1:
            body.append(f"{pad}_rest = _rest & ~{cond}")
    body.append(f"    return {', '.join(outs)}")
    head = [f"def {k.name}({sig}, *, validate=True):"]
    head += _docstring(k, backend, op_counts(code_all))
    return "\n".join(head + body) + "\n"


def _uses(specs: list[KernelSpec], func: type) -> bool:
    return any(sp.sympify(o).has(func) for k in specs for c in k.cases for o in c.outputs)


RULES_FILE = "gauss_legendre.py"


def render_rules() -> str:
    """``generated/gauss_legendre.py``: the one copy of every Gauss–Legendre rule the kernels
    use (Φ2's 6/12/20-point rules, the pair integrals' rule and the direct route's rules), from
    ``derivations/bvn.py:gauss_legendre``, and the ρ < 0 tail route's Gauss–Laguerre rule
    (``gauss_laguerre``; mpmath, 40 digits)."""
    from nmgen.derivations.bvn import GENZ_RULE_SIZES, gauss_laguerre, gauss_legendre
    from nmgen.derivations.cross_covariance import DIRECT_RULE_SIZES, LAGUERRE_SIZE, RULE_SIZE

    lines = [
        "# Generated by nmgen from derivations/bvn.py:gauss_legendre and gauss_laguerre"
        " (mpmath, 40 digits).",
        "# DO NOT EDIT BY HAND: change the derivation or the printer, then run `"
        + FIX_COMMAND
        + "`.",
        '"""Gauss–Legendre rules on [−1, 1]: ``RULES[n] = (nodes, weights)`` (n-point rule), and',
        "the Gauss–Laguerre rule of the ρ < 0 tail route: ``LAGUERRE = (nodes, weights)``.",
        "",
        "The only copy of these constants: both kernel modules and nmruntime use it.",
        '"""',
        "",
        "RULES = {",
    ]
    for n in sorted({*GENZ_RULE_SIZES, *DIRECT_RULE_SIZES, RULE_SIZE}):
        x, w = gauss_legendre(n)
        lines.append(f"    {n}: (")
        lines.append("        (" + ", ".join(repr(float(v)) for v in x) + "),")
        lines.append("        (" + ", ".join(repr(float(v)) for v in w) + "),")
        lines.append("    ),")
    x, w = gauss_laguerre(LAGUERRE_SIZE)
    lines += [
        "}",
        f"GENZ_SIZES = {tuple(GENZ_RULE_SIZES)!r}",
        f"PAIR_SIZE = {RULE_SIZE}",
        "LAGUERRE = (",
        "    (" + ", ".join(repr(float(v)) for v in x) + "),",
        "    (" + ", ".join(repr(float(v)) for v in w) + "),",
        ")",
        "",
    ]
    return "\n".join(lines)


def _runtime_prelude(backend: Backend, specs: list[KernelSpec]) -> list[str]:
    """Imports and bindings behind ``_bvn`` and ``_relu_cov`` & co."""
    uses_bvn = _uses(specs, BVN)
    uses_pair = any(_uses(specs, f) for f in RUNTIME_CALLS)
    lines = []
    # the fast Φ2 (absolutely accurate) feeds the pair routes; with the pair runtime, the
    # printed ``_bvn`` is its relatively accurate Φ2 (``nmruntime.relu_pair.phi2_std``)
    fast = "_bvn_fast" if uses_pair else "_bvn"
    if backend.name == "numpy":
        if uses_pair:
            lines.append("from .gauss_legendre import PAIR_SIZE, RULES")
        if uses_bvn or uses_pair:
            lines.append(f"from nmruntime.bvn_numpy import bvn_cdf as {fast}")
    elif uses_bvn or uses_pair:
        lines += [
            "from .gauss_legendre import GENZ_SIZES, PAIR_SIZE, RULES",
            "from nmruntime.bvn_torch import bvn_cdf as _bvn_cdf",
            "",
            "_GL_RULES = {n: RULES[n] for n in GENZ_SIZES}",
            "",
            "",
            f"def {fast}(h, k, rho):",
            "    return _bvn_cdf(h, k, rho, rules=_GL_RULES)",
        ]
    if uses_pair:
        bind = "numpy_binding" if backend.name == "numpy" else "torch_binding"
        lines += [
            "",
            f"from nmruntime.relu_pair import {bind} as _rp_bind  # noqa: E402",
            "",
            "_relu_moments, _relu_cov, _relu_cross, _bvn = _rp_bind(",
            f"    RULES[PAIR_SIZE], {fast}",
            ")",
        ]
    return [*lines, ""]


def ruff_format(source: str) -> str:
    """``source`` formatted by the pinned ruff (line length 100), deterministic."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--isolated", "--line-length", "100", "-"],
        input=source,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ruff format failed on generated code:\n{proc.stderr}")
    return proc.stdout


def render_module(backend: Backend, specs: list[KernelSpec] | None = None) -> str:
    """Full source of the generated module for ``backend`` (ruff-formatted)."""
    specs = registry.kernel_specs() if specs is None else specs
    sources = sorted({k.source for k in specs})
    header = [
        f"# Generated by nmgen from {', '.join(sources)}.",
        "# DO NOT EDIT BY HAND: change the derivation or the printer, then run `"
        + FIX_COMMAND
        + "`.",
        f"# sympy {sp.__version__}; expressions sha256 {expressions_hash(specs)}.",
        f'"""{backend.description}"""',
        "",
        "from __future__ import annotations",
        "",
        *backend.imports,
        *_runtime_prelude(backend, specs),
        "",
        "__all__ = [" + ", ".join(f'"{k.name}"' for k in specs if not k.name.startswith("_")) + "]",
        "",
    ]
    body = ["\n\n" + render_kernel(k, backend) for k in specs if k.bound is None]
    body += ["\n" + render_kernel(k, backend) for k in specs if k.bound is not None]
    return ruff_format("\n".join(header) + "".join(body))


def write(out_dir: Path = GENERATED_DIR) -> list[Path]:
    """Write every backend module into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = registry.kernel_specs()
    paths = []
    for b in BACKENDS:
        p = out_dir / b.filename
        p.write_text(render_module(b, specs), encoding="utf-8")
        paths.append(p)
    p = out_dir / RULES_FILE
    p.write_text(ruff_format(render_rules()), encoding="utf-8")
    paths.append(p)
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated kernels (see nmgen). Never edited by hand."""\n')
    return paths


def check(out_dir: Path = GENERATED_DIR) -> tuple[bool, str]:
    """Regenerate into a temp dir and compare with ``out_dir``.

    Returns (ok, report); the report holds a unified diff and the command that fixes it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        return compare(Path(tmp), out_dir)


def compare(fresh_dir: Path, out_dir: Path) -> tuple[bool, str]:
    """Compare freshly generated files in ``fresh_dir`` with ``out_dir`` (see ``check``)."""
    diffs = []
    names = [*(b.filename for b in BACKENDS), RULES_FILE]
    for name in names:
        target = out_dir / name
        new = (fresh_dir / name).read_text(encoding="utf-8")
        old = target.read_text(encoding="utf-8") if target.exists() else ""
        if new != old:
            diffs += difflib.unified_diff(
                old.splitlines(keepends=True),
                new.splitlines(keepends=True),
                fromfile=f"generated/{name} (on disk)",
                tofile=f"generated/{name} (regenerated)",
            )
    if not diffs:
        return True, f"generated/ is up to date ({len(names)} files)."
    text = "".join(diffs)
    return False, f"{text}\ngenerated/ is stale or hand-edited. Fix: run `{FIX_COMMAND}`."
