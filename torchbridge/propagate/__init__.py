"""Layer-wise propagation of a Gaussian's mean and full covariance through every layer of a
piecewise-linear PyTorch model (torch.fx graph walk, exact ReLU kernels, Gaussian re-fit)."""

from torchbridge.propagate.engine import PropagateOptions, propagate_one, relu_nodes, resolve_relu
from torchbridge.propagate.lowering import NotPiecewiseLinearError, UntraceableModelError, trace

__all__ = [
    "NotPiecewiseLinearError",
    "PropagateOptions",
    "UntraceableModelError",
    "propagate_one",
    "relu_nodes",
    "resolve_relu",
    "trace",
]
