"""`nm`: the paper's experiments and benchmarks.

Each experiment module registers its own subcommands through ``add_parser(subparsers)`` and
its benchmarks through ``add_bench_parser(bench_subparsers)``; every command writes
``results/<name>.json``, a markdown table and PNG figures (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from torchbridge.heap import keep_freed_memory

#: Modules that contribute subcommands, in help order.
COMMAND_MODULES = (
    "torchbridge.experiments.demo",
    "torchbridge.experiments.fig2",
    "torchbridge.experiments.tightness",
    "torchbridge.experiments.attack_figures",
    "torchbridge.experiments.targeted_pairs",
    "torchbridge.experiments.robust",
    "torchbridge.experiments.robust_attacks",
    "torchbridge.experiments.diagnose_propagate",
)
#: Modules that contribute `nm bench ...` subcommands.
BENCH_MODULES = (
    "torchbridge.experiments.bench_kernels",
    "torchbridge.experiments.bench_floor",
    "torchbridge.experiments.bench_nodes",
    "torchbridge.experiments.bench_small",
    "torchbridge.experiments.bench_moments",
    "torchbridge.experiments.bench_attacks",
    "torchbridge.experiments.bench_propagate",
    "torchbridge.experiments.bench_robust",
)


class _DefaultsMixin:
    """Appends "(default: …)" to an option's help when the help text does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS):
            return text
        if action.nargs == 0:  # a flag: store_true / store_false
            return f"{text} (default: {'on' if action.default else 'off'})"
        value = action.default
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        return f"{text} (default: {str(value).replace('%', '%%')})"


def _document_defaults(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every sub-parser below it the :class:`_DefaultsMixin` formatter."""
    if not issubclass(parser.formatter_class, _DefaultsMixin):
        base = parser.formatter_class
        parser.formatter_class = type(f"Nm{base.__name__}", (_DefaultsMixin, base), {})
    for action in parser._actions:  # argparse has no public walk over sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _document_defaults(child)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nm",
        description="Network Moments: exact output moments of (Affine, ReLU, Affine) networks "
        "under Gaussian input, two-stage linearization of deeper networks, and Gaussian "
        "adversarial attacks. Run `nm demo` for a tour; `nm COMMAND --help` for details. "
        "Every command keeps freed memory in the process (torchbridge.heap: large temporaries "
        "stop page-faulting on each call; `nm bench floor --heap default` measures without).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks (side-by-side timings and ratios)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name in BENCH_MODULES:
        importlib.import_module(name).add_bench_parser(bench_sub)
    _document_defaults(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "heap", "keep") == "keep":
        keep_freed_memory()
    rc = args.func(args)  # commands return an exit code or their results (success)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
