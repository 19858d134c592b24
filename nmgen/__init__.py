"""nmgen: turns the SymPy derivations into verified NumPy and PyTorch kernels.

Importing this package (or ``nmgen.generated``) never imports sympy or mpmath; only the
generator (``nmgen.generate``) and the verifier (``nmgen.verify``) do.
"""
