"""Points files for ``nmgen check-points``: the oracle column of an experiment, out of process.

torchbridge never imports mpmath. An experiment that wants its values checked against the
mpmath references writes the points it evaluated and the values it got with
:func:`write_points`; ``nmgen check-points FILE`` (format: ``nmgen/pointcheck.py``) then
computes the references from the definitions and reports max abs / relative differences.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

#: number of arguments per kind (the value follows them in each row).
NARGS = {"relu_cross_moment": 5, "relu_covariance": 5, "relu_variance": 2}


def write_points(path: Path | str, groups: Mapping[str, torch.Tensor], source: str) -> Path:
    """Write ``{kind: rows}`` to ``path`` for ``nmgen check-points``.

    Args:
        path: the JSON file to write (its folder must exist).
        groups: kind → tensor ``(n, nargs + 1)``: the arguments (μ1, μ2, σ1, σ2, ρ for the pair
            kinds; μ, σ for ``relu_variance``) and the computed value, any float dtype (written
            as float64 with every digit).
        source: the command that produced the values (printed by the checker).

    Returns:
        ``path`` as a :class:`Path`.
    """
    out = []
    for kind, rows in groups.items():
        if kind not in NARGS:
            raise ValueError(f"groups: kind must be one of {sorted(NARGS)}; got {kind!r}")
        if rows.ndim != 2 or rows.shape[1] != NARGS[kind] + 1:
            raise ValueError(
                f"groups[{kind!r}] must have shape (n, {NARGS[kind] + 1}); got {tuple(rows.shape)}"
            )
        out.append({"kind": kind, "points": rows.detach().double().cpu().tolist()})
    path = Path(path)
    path.write_text(json.dumps({"source": source, "groups": out}) + "\n")
    return path


def check_hint(path: Path | str) -> str:
    """The command that checks ``path`` against mpmath."""
    return f"nmgen check-points {path}"
