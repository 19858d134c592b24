"""PyTorch side of network-moments, built only on the generated kernels."""
