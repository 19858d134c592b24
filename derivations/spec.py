"""Kernel specifications: what a derivation hands to the generator.

A kernel is a piecewise expression given as an ordered list of ``Case``s. The first case
whose ``condition`` holds gives the value. Each case is evaluated on *masked* inputs: where
its condition is false, every argument named in ``safe`` is replaced by the given safe value
before the expression is evaluated, so an untaken branch never produces NaN/Inf in values
or in autograd gradients (a plain ``where`` would propagate NaN gradients from the untaken
branch). The last case must have ``condition=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import sympy as sp


@dataclass(frozen=True)
class Case:
    """One branch of a piecewise kernel.

    Args:
        expr: value (or tuple of values for a multi-output kernel) of this branch.
        condition: SymPy boolean in the kernel's arguments; ``sp.true`` for the last case.
        safe: argument -> value used where ``condition`` is false (keeps the branch finite).
        note: one line saying what the branch is (printed as a comment).
        lets: optional program ``((symbol, expr) | Loop, ...)`` evaluated in order before
            ``expr`` (which may use the symbols): recurrences stay O(n) instead of expanding
            into O(n²) expressions; a ``Loop`` repeats its body a run-time number of times.
    """

    expr: sp.Expr | tuple[sp.Expr, ...]
    condition: sp.Basic = sp.true
    safe: dict[sp.Symbol, float] = field(default_factory=dict)
    note: str = ""
    lets: tuple = ()

    @property
    def outputs(self) -> tuple[sp.Expr, ...]:
        return self.expr if isinstance(self.expr, tuple) else (self.expr,)


@dataclass(frozen=True)
class Loop:
    """``for index in range(start, stop):`` over a straight-line body, printed as a loop.

    Args:
        index: the loop counter (a Python int at run time).
        start: first value of ``index`` (an int).
        stop: a kernel's integer argument (e.g. ``terms``): the loop runs ``stop - start``
            times (not at all when ``stop <= start``).
        scalars: ``((symbol, expr), ...)`` in ``index`` only, evaluated per iteration as
            Python floats (``math``), never as array operations.
        body: ``((symbol, expr), ...)`` assigned in order; assigning a symbol defined before
            the loop updates it (a loop-carried value, visible after the loop).
    """

    index: sp.Symbol
    start: int
    stop: sp.Symbol
    scalars: tuple[tuple[sp.Symbol, sp.Expr], ...]
    body: tuple[tuple[sp.Symbol, sp.Expr], ...]

    def xreplace(self, subs: dict) -> Loop:
        """The loop with ``subs`` applied to its scalars and body."""
        return Loop(
            self.index,
            self.start,
            self.stop,
            tuple((s, sp.sympify(e).xreplace(subs)) for s, e in self.scalars),
            tuple((s, sp.sympify(e).xreplace(subs)) for s, e in self.body),
        )


@dataclass(frozen=True)
class ArgSpec:
    """A kernel argument: symbol plus its domain check in the generated code.

    ``kind`` is one of "real" (finite), "nonneg" (finite, >= 0, e.g. sigma),
    "corr" (finite, in [-1, 1], e.g. rho).
    """

    symbol: sp.Symbol
    kind: str = "real"


#: The arguments of every pairwise kernel (cross moment, cross covariance, Lemma 4's series):
#: means μ1, μ2, standard deviations σ1, σ2 and correlation ρ of a bivariate Gaussian.
PAIR_SYMBOLS: tuple[sp.Symbol, ...] = sp.symbols("mu1 mu2 sigma1 sigma2 rho", real=True)
PAIR_ARGS: tuple[ArgSpec, ...] = tuple(
    ArgSpec(s, kind)
    for s, kind in zip(PAIR_SYMBOLS, ("real", "real", "nonneg", "nonneg", "corr"), strict=True)
)


@dataclass(frozen=True)
class KernelSpec:
    """A registered kernel: name, arguments, piecewise definition and documentation.

    ``source`` names the derivation module (e.g. "derivations/theorem1.py").
    ``equation`` says which result of the paper it implements.
    ``reference`` is the mpmath oracle (from the definition) taking the kernel's arguments
    and returning an mpf (or a tuple for multi-output kernels); ``scale`` maps the arguments
    to the error scale of DESIGN.md; ``grid`` names the verification grid in nmgen.verify.
    ``public=False`` kernels get a leading underscore-free name but are not re-exported.
    ``int_args`` names trailing Python-int arguments (e.g. "terms", >= 1, a ``Loop`` bound);
    ``bound=(kernel, values)`` makes this spec that kernel with its int arguments bound,
    printed as one line ``name = partial(kernel, *values)`` (an entry point for ``nmgen
    verify``; its ``cases`` are the kernel's, used only for documentation and hashing).
    """

    name: str
    args: tuple[ArgSpec, ...]
    cases: tuple[Case, ...]
    doc: str
    source: str
    equation: str
    output_names: tuple[str, ...] = ("out",)
    reference: Callable | None = None
    scale: Callable | None = None
    grid: str = ""
    public: bool = True
    int_args: tuple[str, ...] = ()
    bound: tuple[str, tuple[int, ...]] | None = None

    @property
    def symbols(self) -> tuple[sp.Symbol, ...]:
        return tuple(a.symbol for a in self.args)

    @property
    def n_outputs(self) -> int:
        return len(self.cases[0].outputs)
