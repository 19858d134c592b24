"""PyTorch side of network-moments, built only on the generated kernels.

Top-level API (names fixed by the design): :func:`relu_moments`, :class:`AffineReLUAffine`,
:func:`two_stage_linearize`, :func:`monte_carlo_moments` and :func:`output_moments` (output
mean and variance of any piecewise-linear model under Gaussian input, in one call).
"""

from torchbridge.linearize import two_stage_linearize
from torchbridge.moments import relu_moments
from torchbridge.montecarlo import monte_carlo_moments
from torchbridge.network import AffineReLUAffine
from torchbridge.output import MonteCarloOptions, OutputMoments, output_moments
from torchbridge.propagate import PropagateOptions

__all__ = [
    "AffineReLUAffine",
    "MonteCarloOptions",
    "OutputMoments",
    "PropagateOptions",
    "monte_carlo_moments",
    "output_moments",
    "relu_moments",
    "two_stage_linearize",
]
