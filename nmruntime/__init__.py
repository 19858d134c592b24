"""Hand-written, sympy-free support code that the generated kernels import."""
