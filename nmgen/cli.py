"""`nmgen`: generate the kernels from the derivations, check them, verify them.

nmgen generate            write generated/numpy_kernels.py and generated/torch_kernels.py
nmgen generate --check    regenerate into a temp dir; fail with a diff if generated/ differs
nmgen verify [--quick]    every kernel, both backends, float64/float32, vs mpmath references
nmgen stress              relative errors on a seeded held-out random stress set
nmgen check-points FILE   mpmath references for the values an `nm` experiment wrote to FILE
nmgen list                registered kernels with their source derivations
nmgen prove               run the derivations' symbolic and numeric checks
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _cmd_generate(args: argparse.Namespace) -> int:
    from nmgen import generate

    out = Path(args.out) if args.out else generate.GENERATED_DIR
    if args.check:
        if args.fresh:
            ok, report = generate.compare(Path(args.fresh), out)
        else:
            ok, report = generate.check(out)
        print(report)
        return 0 if ok else 1
    for p in generate.write(out):
        print(f"wrote {p}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from nmgen import verify

    t = time.perf_counter()
    print(
        f"nmgen verify{' --quick' if args.quick else ''}: kernels vs mpmath references "
        "(quadrature of the definition, 30 digits)"
    )
    rows = verify.run(quick=args.quick, kernels=args.kernel or None, jobs=args.jobs)
    table = verify.format_table(rows)
    print(table)
    failed = [r for r in rows if not r.passed]
    print(
        f"{len(rows) - len(failed)} passed, {len(failed)} failed ({time.perf_counter() - t:.0f} s)"
    )
    if args.json:
        Path(args.json).write_text(verify.to_json(rows))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 1 if failed else 0


def _cmd_stress(args: argparse.Namespace) -> int:
    from nmgen import stress

    t = time.perf_counter()
    rows = stress.run(n=args.n, seed=args.seed, jobs=args.jobs, pow2_sigma=args.pow2_sigma)
    print(stress.format_rows(rows))
    print(f"{args.n} points, seed {args.seed} ({time.perf_counter() - t:.0f} s)")
    return 0


def _cmd_check_points(args: argparse.Namespace) -> int:
    from nmgen import pointcheck

    reports = [pointcheck.check_file(f, dps=args.dps) for f in args.files]
    bad = []
    for rep in reports:
        print(pointcheck.format_report(rep))
        for g in rep["groups"]:
            if args.max_abs is not None and not g["max_abs_diff"] <= args.max_abs:
                bad.append(f"{rep['file']} {g['kind']}: max abs diff > {args.max_abs:g}")
            if args.max_rel is not None and not g["max_rel_diff"] <= args.max_rel:
                bad.append(f"{rep['file']} {g['kind']}: max rel diff > {args.max_rel:g}")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1) + "\n")
    for line in bad:
        print(f"FAIL {line}")
    return 1 if bad else 0


def _cmd_list(args: argparse.Namespace) -> int:
    from nmgen import registry

    for k in registry.kernel_specs():
        argnames = ", ".join(a.symbol.name for a in k.args)
        print(f"{k.name}({argnames})  [{k.equation}; {k.source}]\n    {k.doc}")
    return 0


def _cmd_prove(args: argparse.Namespace) -> int:
    from nmgen import registry

    failed = 0
    for m in registry.modules():
        checks = getattr(m, "CHECKS", ()) + (getattr(m, "SLOW_CHECKS", ()) if args.slow else ())
        for check in checks:
            t = time.perf_counter()
            name = f"{m.__name__.rsplit('.', 1)[-1]}.{check.__name__}"
            try:
                check()
                print(f"PASS {name} ({time.perf_counter() - t:.1f} s)", flush=True)
            except AssertionError as e:
                failed += 1
                print(f"FAIL {name}: {e}", flush=True)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nmgen",
        description="Generate NumPy/PyTorch kernels from the SymPy derivations of the Network "
        "Moments paper and verify them against mpmath references.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write generated/ (or check it with --check)")
    g.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir and fail with a unified diff if generated/ "
        "is stale or hand-edited (default: off, write generated/)",
    )
    g.add_argument("--out", help="directory to write or check (default: generated/)")
    g.add_argument(
        "--fresh",
        help="with --check: compare with this already regenerated directory instead of "
        "regenerating (default: regenerate into a temp dir)",
    )
    g.set_defaults(func=_cmd_generate)
    v = sub.add_parser("verify", help="compare every kernel with mpmath references")
    v.add_argument(
        "--quick",
        action="store_true",
        help="smaller grids (under ~60 s; default: off, the full grids, ~5 min)",
    )
    v.add_argument(
        "--kernel", action="append", help="only this kernel (repeatable; default: every kernel)"
    )
    v.add_argument("--json", help="also write the rows as JSON to this path (default: none)")
    v.add_argument(
        "--markdown", help="also write the table as markdown to this path (default: none)"
    )
    v.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes computing the mpmath references (default: all CPU cores)",
    )
    v.set_defaults(func=_cmd_verify)
    st = sub.add_parser(
        "stress",
        help="relative errors on a seeded held-out random stress set (issue #10)",
        description="Seeded random points (μ/σ from −38 to 1e8, |ρ| to 1, σ from 1e-3 to 1e3): "
        "max relative error per pair/one-variable kernel, backend and dtype against mpmath "
        "(see nmgen/stress.py). Reports only; exit status 0.",
    )
    st.add_argument("--n", type=int, default=200, help="number of points (default: 200)")
    st.add_argument("--seed", type=int, default=20261130, help="random seed (default: 20261130)")
    st.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes computing the mpmath references (default: all CPU cores)",
    )
    st.add_argument(
        "--pow2-sigma",
        action="store_true",
        help="round σ to powers of 2 so μ/σ is exact (default: off)",
    )
    st.set_defaults(func=_cmd_stress)
    ck = sub.add_parser(
        "check-points",
        help="mpmath references for the values an `nm` experiment wrote to a points file",
        description="torchbridge's experiments never import mpmath; those with an oracle "
        "column (nm fig2, nm bench kernels, nm bench floor) write the points they evaluated "
        "and the values they got to a JSON file, and name this command. Format: "
        "nmgen/pointcheck.py.",
    )
    ck.add_argument("files", nargs="+", type=Path, help="points files written by `nm ...`")
    ck.add_argument(
        "--dps", type=int, default=30, help="mpmath working digits of the references (default: 30)"
    )
    ck.add_argument(
        "--max-abs",
        type=float,
        default=None,
        help="fail (exit 1) if a group's max abs difference exceeds this (default: report only)",
    )
    ck.add_argument(
        "--max-rel",
        type=float,
        default=None,
        help="fail (exit 1) if a group's max relative difference exceeds this (default: report "
        "only)",
    )
    ck.add_argument("--json", help="also write the report as JSON to this path (default: none)")
    ck.set_defaults(func=_cmd_check_points)
    sub.add_parser("list", help="list registered kernels").set_defaults(func=_cmd_list)
    pr = sub.add_parser("prove", help="run the derivations' symbolic/numeric checks")
    pr.add_argument(
        "--slow", action="store_true", help="also the slow checks (minutes; default: off)"
    )
    pr.set_defaults(func=_cmd_prove)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
