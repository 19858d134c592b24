"""Code printers: SymPy expression -> NumPy / PyTorch source (math only).

Both printers fold every numeric non-integer subexpression (√2, 1/√(2π), π/4, …) into a
Python float literal with 17 significant digits: a Python float keeps an array's or a tensor's
dtype (float32 stays float32), whereas ``numpy.sqrt(2)`` is a float64 scalar and
``torch.sqrt(2)`` fails on an int. Anything without a mapping raises.
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.numpy import SciPyPrinter
from sympy.printing.pycode import PythonCodePrinter
from sympy.printing.pytorch import TorchPrinter

from nmgen.derivations.functions import BVN, RUNTIME_CALLS, Item, Phi, _RuntimeCall, phi


def _fold(expr: sp.Basic) -> sp.Basic:
    """Replace numeric subtrees by Floats (rational exponents of Pow are kept exact)."""
    if isinstance(expr, sp.logic.boolalg.BooleanAtom) or (expr.is_Atom and not expr.is_number):
        return expr
    if getattr(expr, "is_number", False) and not expr.is_Integer:
        if expr.is_Rational and expr.q == 1:
            return expr
        return sp.Float(float(sp.N(expr, 40)), 17)
    if expr.is_Pow:
        exp = expr.exp if expr.exp.is_Rational else _fold(expr.exp)
        return sp.Pow(_fold(expr.base), exp, evaluate=False)
    if not expr.args:
        return expr
    return expr.func(*[_fold(a) for a in expr.args])


def fold_numbers(expr: sp.Basic) -> sp.Basic:
    """Public entry: fold numeric subexpressions to float literals."""
    return _fold(expr)


class _KernelPrinterMixin:
    """Shared rules: float literals, powers, comparisons and boolean masks."""

    _lib: str  # "numpy" or "torch"

    def _print_Float(self, expr):
        v = float(expr)
        return repr(v) if v >= 0 else f"({v!r})"

    def _print_Rational(self, expr):
        if expr.q == 1:
            return str(expr.p)
        return repr(float(expr))

    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Pow(self, expr, rational=False):
        base, e = expr.base, expr.exp
        b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Pow"])
        if e == sp.Rational(1, 2):
            return f"{self._sqrt}({self._print(base)})"
        if e == sp.Rational(-1, 2):
            return f"(1.0/{self._sqrt}({self._print(base)}))"
        if e.is_Integer:
            n = int(e)
            if n == 2:
                return f"({b}*{b})" if base.is_Symbol else f"({b})**2"
            if n == -1:
                return f"(1.0/{b})"
            return f"({b})**{n}" if n > 0 else f"(1.0/({b})**{-n})"
        return f"({b})**({self._print(e)})"

    def _print_Relational(self, expr):
        op = {"<": "<", ">": ">", "<=": "<=", ">=": ">=", "==": "==", "!=": "!="}[expr.rel_op]
        return f"({self._print(expr.lhs)} {op} {self._print(expr.rhs)})"

    def _print_And(self, expr):
        return "(" + " & ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"(~{self._print(expr.args[0])})"

    def _print_phi(self, expr):
        x = self._print(expr.args[0])
        return f"(0.3989422804014327*{self._exp}(-0.5*({x})**2))"

    def _print_BVN(self, expr):
        return "_bvn(" + ", ".join(self._print(a) for a in expr.args) + ")"

    def _print_Item(self, expr):
        return f"{self._print(expr.args[0])}[{int(expr.args[1])}]"

    def _print_Function(self, expr):
        if isinstance(expr, _RuntimeCall):
            return f"{expr.call_name}(" + ", ".join(self._print(a) for a in expr.args) + ")"
        return super()._print_Function(expr)

    def _print_Abs(self, expr):
        return f"abs({self._print(expr.args[0])})"

    def _print_Piecewise(self, expr):
        raise NotImplementedError("use derivations.spec.Case for piecewise kernels")

    def _print_Infinity(self, expr):
        return 'float("inf")'

    def _print_NegativeInfinity(self, expr):
        return '(-float("inf"))'


class NumpyKernelPrinter(_KernelPrinterMixin, SciPyPrinter):
    """SciPy printer with Φ -> scipy.special.ndtr and folded float literals."""

    _lib = "numpy"
    _sqrt = "numpy.sqrt"
    _exp = "numpy.exp"

    def __init__(self):
        super().__init__({"fully_qualified_modules": True, "strict": True})

    def _print_Phi(self, expr):
        return f"scipy.special.ndtr({self._print(expr.args[0])})"

    def _print_HermiteH(self, expr):
        n, x = expr.args
        return f"scipy.special.eval_hermite({int(n)}, {self._print(x)})"

    def _print_Max(self, expr):
        a, b = expr.args
        return f"numpy.maximum({self._print(a)}, {self._print(b)})"

    def _print_sign(self, expr):
        return f"numpy.sign({self._print(expr.args[0])})"

    def _print_Min(self, expr):
        a, b = expr.args
        return f"numpy.minimum({self._print(a)}, {self._print(b)})"


class TorchKernelPrinter(_KernelPrinterMixin, TorchPrinter):
    """TorchPrinter with erfc/log1p/expm1, Φ via erfc, float literals; raises on the unmapped.

    Φ(x) is printed as 0.5·erfc(−x/√2): ``torch.special.ndtr`` (torch 2.13, CPU) underflows to
    0 for x < −8.3 in float64, whereas erfc keeps full relative accuracy in the tail.
    """

    _lib = "torch"
    _sqrt = "torch.sqrt"
    _exp = "torch.exp"

    def __init__(self):
        super().__init__({"strict": True})

    def _print_Phi(self, expr):
        return f"(0.5*torch.special.erfc(-0.7071067811865476*({self._print(expr.args[0])})))"

    def _print_erfc(self, expr):
        return f"torch.special.erfc({self._print(expr.args[0])})"

    def _print_erf(self, expr):
        return f"torch.special.erf({self._print(expr.args[0])})"

    def _print_log1p(self, expr):
        return f"torch.log1p({self._print(expr.args[0])})"

    def _print_expm1(self, expr):
        return f"torch.expm1({self._print(expr.args[0])})"

    def _print_HermiteH(self, expr):
        n, x = expr.args
        return f"torch.special.hermite_polynomial_h({self._print(x)}, {int(n)})"

    def _print_Max(self, expr):
        a, b = expr.args
        if b == 0:
            a, b = b, a
        if a == 0:
            return f"torch.clamp({self._print(b)}, min=0.0)"
        return f"torch.maximum({self._print(a)}, {self._print(b)})"

    def _print_Min(self, expr):
        a, b = expr.args
        return f"torch.minimum({self._print(a)}, {self._print(b)})"

    def _print_Abs(self, expr):
        return f"torch.abs({self._print(expr.args[0])})"

    def _print_sign(self, expr):
        return f"torch.sign({self._print(expr.args[0])})"


SUPPORTED_FUNCTIONS = (
    Phi,
    phi,
    BVN,
    *RUNTIME_CALLS,
    Item,
    sp.exp,
    sp.erf,
    sp.erfc,
    sp.sqrt,
    sp.asin,
    sp.atan,
    sp.Abs,
    sp.sign,
    sp.Max,
    sp.log,
)


class ScalarPrinter(PythonCodePrinter):
    """Python-float arithmetic on loop counters (``math.sqrt(1/u)``): per-iteration scalar
    coefficients of a printed loop, never array operations."""

    def __init__(self):
        super().__init__({"fully_qualified_modules": True, "strict": True})
