"""Generate ``generated/numpy_kernels.py`` and ``generated/torch_kernels.py`` from the specs.

Pipeline per kernel case: stable rewrites (``sympy.codegen.rewriting.optimize`` with
log1p/expm1), multi-output ``sympy.cse``, numeric folding, then one printer per backend.
The file skeleton (header, imports, argument preparation, masked piecewise evaluation) is
built here; the math is printed only by ``nmgen.printers``. Output is byte-identical across
runs: no timestamps, no absolute paths; the header carries a hash of the expressions.
"""

from __future__ import annotations

import difflib
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sympy as sp
from sympy.codegen.rewriting import expm1_opt, log1p_opt, optimize

from nmgen import registry
from nmgen.derivations.functions import BVN, RUNTIME_CALLS
from nmgen.derivations.spec import Case, Dispatcher, KernelSpec
from nmgen.printers import NumpyKernelPrinter, TorchKernelPrinter, fold_numbers

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
        ("import torch", "", "from nmruntime.torch_support import prepare as _prepare"),
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


def _docstring(k: KernelSpec, backend: Backend) -> list[str]:
    arg_doc = {
        "real": "real, finite",
        "extreal": "real, ±inf allowed",
        "nonneg": "standard deviation, >= 0",
        "corr": "correlation, in [-1, 1]",
    }
    kind = "ndarray" if backend.name == "numpy" else "Tensor"
    lines = [f'    """{k.doc}', "", f"    Implements {k.equation} ({k.source}).", "", "    Args:"]
    lines += [f"        {a.symbol.name}: {kind}, {arg_doc[a.kind]}." for a in k.args]
    lines += ["", "    Returns:"]
    if k.n_outputs == 1:
        lines.append(f"        {kind} of the broadcast shape and the arguments' float dtype.")
    else:
        lines.append(f"        tuple ({', '.join(k.output_names)}) of {kind}s, broadcast shape.")
    lines += ["", "    Cases (first match wins):"]
    lines += [f"        {i}. {c.note}" for i, c in enumerate(k.cases)]
    lines.append('    """')
    return lines


def _case_code(
    k: KernelSpec, i: int, case: Case, backend: Backend, pr, claim: str | None = None
) -> tuple[list, list]:
    """Code of case ``i``; its inputs are masked outside ``claim & condition``.

    ``claim`` names the mask of elements no earlier case took: an element whose own condition
    holds but that an earlier case claimed must be masked too, or NaNs of this branch would
    leak into the gradients through ``where``.
    """
    lines = [f"    # case {i}: {case.note}"]
    cond = None
    subs = {}
    if case.condition is not sp.true:
        cond = f"_c{i}"
        c = pr.doprint(case.condition)
        lines.append(f"    {cond} = {claim} & {c}" if claim else f"    {cond} = {c}")
        for sym, val in case.safe.items():
            masked = sp.Symbol(f"{sym.name}_{i}")
            subs[sym] = masked
            lines.append(f"    {masked.name} = {backend.where}({cond}, {sym.name}, {float(val)!r})")
    for sym, expr in case.lets:
        e = fold_numbers(_rewrite(sp.sympify(expr).xreplace(subs)))
        lines.append(f"    {sym.name} = {pr.doprint(e)}")
    outs = [sp.sympify(o).xreplace(subs) for o in case.outputs]
    outs = [_rewrite(o) for o in outs]
    repl, reduced = sp.cse(outs, symbols=sp.numbered_symbols(f"_t{i}_"), order="canonical")
    for s, e in repl:
        lines.append(f"    {s.name} = {pr.doprint(fold_numbers(e))}")
    values = []
    ref = k.args[0].symbol.name
    for j, e in enumerate(reduced):
        e = fold_numbers(e)
        name = f"_v{i}_{j}"
        if e.is_number:
            lines.append(f"    {name} = {backend.full_like}({ref}, {float(e)!r})")
        else:
            lines.append(f"    {name} = {pr.doprint(e)}")
        values.append(name)
    return lines, [(cond, v) for v in values]


def render_kernel(k: KernelSpec, backend: Backend) -> str:
    """Source of one kernel function for ``backend``.

    Case 0 (the interior) is always evaluated; every later case (a limit) is evaluated only
    when some element needs it (``_rest`` tracks the elements no earlier case claimed), so
    the common all-interior call costs one branch.
    """
    pr = backend.printer()
    argnames = [a.symbol.name for a in k.args]
    lines = [f"def {k.name}({', '.join(argnames)}):"]
    lines += _docstring(k, backend)
    names = ", ".join(f'"{n}"' for n in argnames)
    kinds = ", ".join(f'"{a.kind}"' for a in k.args)
    lines.append(
        f'    {", ".join(argnames)} = _prepare(\n        "{k.name}", ({", ".join(argnames)}), '
        f"({names}), ({kinds})\n    )"
    )
    outs = [f"_out{j}" for j in range(k.n_outputs)]
    for i, case in enumerate(k.cases):
        code, vals = _case_code(k, i, case, backend, pr, None if i == 0 else "_rest")
        cond = vals[0][0]
        if i == 0:
            lines += code
            lines.append(f"    {', '.join(outs)} = {', '.join(v for _, v in vals)}")
            if cond is None:
                break
            lines.append(f"    _rest = ~{cond}")
            continue
        lines.append("    if bool(_rest.any()):")
        lines += ["    " + ln for ln in code]
        for (c, v), o in zip(vals, outs, strict=True):
            take = "_rest" if c is None else c
            lines.append(f"        {o} = {backend.where}({take}, {v}, {o})")
        if cond is not None:
            lines.append(f"        _rest = _rest & ~{cond}")
    lines.append(f"    return {', '.join(outs)}")
    return "\n".join(lines) + "\n"


def _uses(specs: list[KernelSpec], func: type) -> bool:
    return any(sp.sympify(o).has(func) for k in specs for c in k.cases for o in c.outputs)


def _bvn_prelude(backend: Backend) -> list[str]:
    """Imports (and, for torch, the printed Gauss–Legendre constants) behind ``_bvn``."""
    if backend.name == "numpy":
        return ["from nmruntime.bvn_numpy import bvn_cdf as _bvn", ""]
    from nmgen.derivations.bvn import GENZ_RULE_SIZES, gauss_legendre

    lines = [
        "from nmruntime.bvn_torch import bvn_cdf as _bvn_cdf",
        "",
        "# Gauss-Legendre rules on [-1, 1] (nodes, weights), computed by",
        "# derivations/bvn.py:gauss_legendre with mpmath at 40 digits.",
        "_GL_RULES = {",
    ]
    for n in GENZ_RULE_SIZES:
        x, w = gauss_legendre(n)
        lines.append(f"    {n}: (")
        lines.append("        (" + ", ".join(repr(float(v)) for v in x) + "),")
        lines.append("        (" + ", ".join(repr(float(v)) for v in w) + "),")
        lines.append("    ),")
    lines += [
        "}",
        "",
        "",
        "def _bvn(h, k, rho):",
        "    return _bvn_cdf(h, k, rho, rules=_GL_RULES)",
        "",
    ]
    return lines


def _relu_pair_prelude(backend: Backend) -> list[str]:
    """The printed Gauss–Legendre rule and the bindings behind ``_relu_cov`` & co."""
    from nmgen.derivations.bvn import gauss_legendre
    from nmgen.derivations.cross_covariance import RULE_SIZE

    x, w = gauss_legendre(RULE_SIZE)
    bind = "numpy_binding" if backend.name == "numpy" else "torch_binding"
    extra = ", _bvn"
    return [
        f"from nmruntime.relu_pair import {bind} as _rp_bind  # noqa: E402",
        "",
        f"# {RULE_SIZE}-point Gauss-Legendre rule on [-1, 1] (nodes, weights) for the ReLU pair",
        "# integrals (derivations/cross_covariance.py), computed by derivations/bvn.py:",
        "# gauss_legendre with mpmath at 40 digits.",
        "_RP_RULE = (",
        "    (" + ", ".join(repr(float(v)) for v in x) + "),",
        "    (" + ", ".join(repr(float(v)) for v in w) + "),",
        ")",
        f"_relu_mean, _relu_second, _relu_var, _relu_cov, _relu_cross = _rp_bind(_RP_RULE{extra})",
        "",
    ]


def render_dispatcher(d: Dispatcher) -> str:
    """Source of a dispatcher (same for both backends: it only picks a variant)."""
    argnames = [a.symbol.name for a in d.args]
    table = "{" + ", ".join(f"{n}: {fn}" for n, fn in sorted(d.variants.items())) + "}"
    allowed = tuple(sorted(d.variants))
    call = ", ".join(argnames)
    return "\n".join(
        [
            f"def {d.name}({call}, {d.int_arg}):",
            f'    """{d.doc}',
            "",
            f"    Implements {d.equation} ({d.source}).",
            f"    ``{d.int_arg}`` must be one of {allowed}: each value has its own generated kernel.",
            '    """',
            f"    variants = {table}",
            f"    if (\n        not isinstance({d.int_arg}, int)\n        or isinstance({d.int_arg}, bool)\n"
            f"        or {d.int_arg} not in variants\n    ):",
            "        raise ValueError(",
            f'            f"{d.name}: {d.int_arg} must be one of {allowed}; got {{{d.int_arg}!r}}"',
            "        )",
            f"    return variants[{d.int_arg}]({call})",
            "",
        ]
    )


def render_module(backend: Backend, specs: list[KernelSpec] | None = None) -> str:
    """Full source of the generated module for ``backend``."""
    specs = registry.kernel_specs() if specs is None else specs
    dispatchers = registry.dispatchers()
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
        *(_bvn_prelude(backend) if _uses(specs, BVN) else []),
        *(_relu_pair_prelude(backend) if any(_uses(specs, f) for f in RUNTIME_CALLS) else []),
        "",
        "__all__ = ["
        + ", ".join(f'"{k.name}"' for k in [*specs, *dispatchers] if not k.name.startswith("_"))
        + "]",
        "",
    ]
    body = ["\n\n" + render_kernel(k, backend) for k in specs]
    body += ["\n\n" + render_dispatcher(d) for d in dispatchers]
    return "\n".join(header) + "".join(body)


def write(out_dir: Path = GENERATED_DIR) -> list[Path]:
    """Write every backend module into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = registry.kernel_specs()
    paths = []
    for b in BACKENDS:
        p = out_dir / b.filename
        p.write_text(render_module(b, specs), encoding="utf-8")
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
    names = [b.filename for b in BACKENDS]
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
