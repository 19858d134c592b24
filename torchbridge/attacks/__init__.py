"""Gaussian adversarial attacks (Eqs. 7-10 of the paper), solved with exact gradients.

``targeted`` (Eq. 7), ``pixel_support`` (Eq. 8), ``sparse_smooth`` (Eq. 9; with ``target``
Eq. 10). Every attack keeps the attacked image in the model's valid input range
(``bounds=(lo, hi)``, default (0, 1)); ``bounds=None`` is the paper's unconstrained problem
("unconstrained (invalid images possible)"). ``pgd_targeted`` is a feasibility reference on the
real network (not the paper's). Each solver returns an :class:`AttackResult` whose
``.verify(samples, seed)`` classifies noisy images clipped to the bounds with the real network.

Modules: :mod:`.box` (feasible set), :mod:`.slsqp` (thin SLSQP driver), :mod:`.auglag`
(augmented Lagrangian with L-BFGS-B, Eq. 7's default), :mod:`.problems` (one
object per equation), :mod:`.strategies` (support, pruning, re-linearization, checks),
:mod:`.solvers` (the public entry points).
"""

from torchbridge.attacks.auglag import AugLagOptions, run_auglag
from torchbridge.attacks.box import DEFAULT_BOUNDS, UNCONSTRAINED_LABEL, PixelBox
from torchbridge.attacks.expected import ExpectedLogits, expected_logits, total_variation
from torchbridge.attacks.pgd import pgd_targeted
from torchbridge.attacks.result import ZERO_THRESHOLD, AttackResult
from torchbridge.attacks.slsqp import SlsqpFit, SlsqpOptions, run_slsqp
from torchbridge.attacks.solvers import (
    PixelSupportOptions,
    RelinearizeOptions,
    SparseSmoothOptions,
    TargetedOptions,
    pixel_support,
    sparse_smooth,
    targeted,
)

__all__ = [
    "DEFAULT_BOUNDS",
    "UNCONSTRAINED_LABEL",
    "ZERO_THRESHOLD",
    "AttackResult",
    "AugLagOptions",
    "ExpectedLogits",
    "PixelBox",
    "PixelSupportOptions",
    "RelinearizeOptions",
    "SlsqpFit",
    "SlsqpOptions",
    "SparseSmoothOptions",
    "TargetedOptions",
    "expected_logits",
    "pgd_targeted",
    "pixel_support",
    "run_auglag",
    "run_slsqp",
    "sparse_smooth",
    "targeted",
    "total_variation",
]
