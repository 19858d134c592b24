"""The authors' own series, loaded from a checkout the user fetched, for `nm bench floor`.

The paper's authors published their PyTorch code at github.com/xmodar/network_moments; its
branch ``no-assumptions`` holds ``gaussian_relu_moments.py`` (``relu_cov_mean(covariance,
mean, num_terms)``: the covariance of ReLU(x) for a Gaussian x with any mean, by their
truncated series) and ``erf_exp_integral.py``, which it imports. Nothing of theirs is shipped
here: ``nm bench floor --authors-series DIR`` imports those two files from ``DIR`` at run time
and times their function beside ours (issue #13). One way to get them::

    git clone --branch no-assumptions https://github.com/xmodar/network_moments DIR
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch

#: The files ``load_authors_series`` needs in its directory.
FILES = ("gaussian_relu_moments.py", "erf_exp_integral.py")


def load_authors_series(directory: str | Path) -> Callable:
    """fn(mean, cov, terms) -> (E[relu(x)], Cov[relu(x)]) by the authors' ``relu_cov_mean``
    (mean ``p``, cov ``p x p``, both of one floating dtype; ``terms``: their ``num_terms``),
    imported from ``directory``. ValueError naming ``--authors-series`` where a file is
    missing or does not define ``relu_cov_mean``."""
    where = Path(directory).expanduser()
    missing = [name for name in FILES if not (where / name).is_file()]
    if missing:
        raise ValueError(
            f"--authors-series: {str(where)!r} lacks {', '.join(missing)} (the branch "
            "no-assumptions of github.com/xmodar/network_moments)"
        )
    # their module imports its sibling as a top-level module: import it under that name
    sibling = _import(where / FILES[1], "erf_exp_integral")
    previous = sys.modules.get("erf_exp_integral")
    sys.modules["erf_exp_integral"] = sibling
    try:
        module = _import(where / FILES[0], "nm_authors_gaussian_relu_moments")
    finally:
        if previous is None:
            sys.modules.pop("erf_exp_integral", None)
        else:
            sys.modules["erf_exp_integral"] = previous
    relu_cov_mean = getattr(module, "relu_cov_mean", None)
    if relu_cov_mean is None:
        raise ValueError(f"--authors-series: {where / FILES[0]} defines no relu_cov_mean")

    def moments(mean: torch.Tensor, cov: torch.Tensor, terms: int):
        cov_out, mean_out = relu_cov_mean(cov, mean, terms)
        return mean_out, cov_out

    return moments


def _import(path: Path, name: str):
    """The module at ``path`` under ``name`` (not added to ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
