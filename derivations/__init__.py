"""SymPy derivations, one module per result of the paper, with mpmath references."""
