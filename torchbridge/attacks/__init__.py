"""Gaussian adversarial attacks (Eqs. 7-10 of the paper)."""
