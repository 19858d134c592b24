"""`nmgen check-points`: mpmath references for values that an experiment computed.

torchbridge never imports mpmath (the layering rule: derivations → nmgen → generated →
torchbridge). An experiment or benchmark that wants an oracle column writes the points it
evaluated and the values it got to a JSON file (``torchbridge.experiments.oracle_points``);
this module computes the references from the definitions in ``derivations/`` and reports the
max absolute and relative differences.

File format (one JSON object)::

    {"source": "nm bench floor --p 1024 ...",
     "groups": [{"kind": KIND, "points": [[arg, ..., value], ...]}, ...]}

with KIND one of

- ``relu_cross_moment``: (μ1, μ2, σ1, σ2, ρ, E[relu x1 · relu x2]);
- ``relu_covariance``: (μ1, μ2, σ1, σ2, ρ, Cov[relu x1, relu x2]);
- ``relu_variance``: (μ, σ, Var[relu x]).

The references are the quadratures of the definitions (``relu_cross_moment_ref``,
``relu_cross_covariance_ref`` — cancellation-free — and ``relu_variance_ref``) at ``dps``
digits; a point whose quadrature refuses at ``dps`` is retried at 20 digits and otherwise
listed as ``oracle_failed``, never counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from nmgen.derivations.cross_covariance import relu_cross_covariance_ref
from nmgen.derivations.reference import relu_cross_moment_ref, relu_variance_ref, to_float

#: kind → (number of arguments, reference(args..., dps)).
KINDS: dict[str, tuple[int, Callable]] = {
    "relu_cross_moment": (5, lambda *a, dps: relu_cross_moment_ref(*a, dps=dps)),
    "relu_covariance": (5, lambda *a, dps: relu_cross_covariance_ref(*a, dps=dps)),
    "relu_variance": (2, lambda *a, dps: relu_variance_ref(*a, dps)),
}
#: below this |reference| a relative difference is not reported (it would measure nothing).
REL_FLOOR = 1e-300


def _reference(kind: str, args: Sequence[float], dps: int) -> float | None:
    fn = KINDS[kind][1]
    for digits in (dps, 20):
        try:
            return to_float(fn(*args, dps=digits))
        except ArithmeticError:  # the quadrature refused (error estimate not tiny)
            continue
    return None


def check_group(kind: str, points: Sequence[Sequence[float]], dps: int = 30, progress=True):
    """Max |value − reference| and max relative difference over one group of points.

    Args:
        kind: a key of :data:`KINDS`.
        points: rows ``(args..., value)`` with the number of arguments of ``kind``.
        dps: mpmath working digits of the references.

    Returns:
        dict with ``kind``, ``points`` (checked), ``max_abs_diff``, ``max_rel_diff`` (where
        |reference| ≥ :data:`REL_FLOOR`), ``worst`` (the row of the largest relative
        difference, else of the largest absolute one) and ``oracle_failed`` (rows skipped).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}; got {kind!r}")
    nargs = KINDS[kind][0]
    abs_d, rel_d, worst, failed = [], [], None, []
    best = (-1.0, -1.0)
    for row in tqdm(list(points), desc=f"mpmath {kind}", disable=not progress):
        if len(row) != nargs + 1:
            raise ValueError(f"{kind} points need {nargs} arguments and a value; got {row}")
        *args, value = (float(v) for v in row)
        ref = _reference(kind, args, dps)
        if ref is None:
            failed.append(list(row))
            continue
        a = abs(value - ref)
        r = a / abs(ref) if abs(ref) >= REL_FLOOR else (0.0 if a == 0 else math.inf)
        abs_d.append(a)
        if abs(ref) >= REL_FLOOR:
            rel_d.append(r)
        key = (r if abs(ref) >= REL_FLOOR else -1.0, a)
        if key > best:
            best, worst = key, {"args": args, "value": value, "reference": ref}
    return {
        "kind": kind,
        "points": len(abs_d),
        "dps": dps,
        "max_abs_diff": max(abs_d, default=math.nan),
        "max_rel_diff": max(rel_d, default=math.nan),
        "worst": worst,
        "oracle_failed": failed,
    }


def check_file(path: Path | str, dps: int = 30, progress: bool = True) -> dict:
    """Check every group of a points file (format in the module docstring)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
        raise ValueError(f"{path}: expected an object with a 'groups' list")
    groups = [
        check_group(g["kind"], g["points"], dps=dps, progress=progress) for g in data["groups"]
    ]
    return {"file": str(path), "source": data.get("source", ""), "groups": groups}


def format_report(report: dict) -> str:
    """One line per group: points, max abs and relative difference, worst point."""
    lines = [f"{report['file']} (from `{report['source']}`):"]
    for g in report["groups"]:
        line = (
            f"  {g['kind']}: {g['points']} points, max abs diff {g['max_abs_diff']:.3g}, "
            f"max rel diff {g['max_rel_diff']:.3g} (mpmath, {g['dps']} digits)"
        )
        if g["worst"] is not None:
            w = g["worst"]
            args = ", ".join(f"{v:.6g}" for v in w["args"])
            line += f"; worst at ({args}): {w['value']:.17g} vs {w['reference']:.17g}"
        if g["oracle_failed"]:
            line += f"; {len(g['oracle_failed'])} point(s) refused by the quadrature, skipped"
        lines.append(line)
    return "\n".join(lines)
