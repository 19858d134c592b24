"""Gaussian adversarial attacks (Eqs. 7-10 of the paper), solved with SLSQP + exact gradients.

``targeted`` (Eq. 7), ``pixel_support`` (Eq. 8), ``sparse_smooth`` (Eq. 9; with ``target``
Eq. 10). ``pgd_targeted`` is a feasibility reference on the real network (not the
paper's). Each solver returns an :class:`AttackResult` with ``.verify(samples, seed)`` on the real net.
"""

from torchbridge.attacks.expected import ExpectedLogits, expected_logits, total_variation
from torchbridge.attacks.pgd import pgd_targeted
from torchbridge.attacks.result import ZERO_THRESHOLD, AttackResult
from torchbridge.attacks.solvers import pixel_support, run_slsqp, sparse_smooth, targeted

__all__ = [
    "ZERO_THRESHOLD",
    "AttackResult",
    "ExpectedLogits",
    "expected_logits",
    "pgd_targeted",
    "pixel_support",
    "run_slsqp",
    "sparse_smooth",
    "targeted",
    "total_variation",
]
