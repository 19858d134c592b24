"""Experiments of the paper behind the `nm` CLI."""
