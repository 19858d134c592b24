"""The (Affine, ReLU, Affine) network g(x) = B relu(A x + c1) + c2 and its moments."""

from __future__ import annotations

import torch
from torch import nn


class AffineReLUAffine(nn.Module):
    """g(x) = B relu(A x + c1) + c2 with A: (p, n), c1: (p,), B: (d, p), c2: (d,).

    ``forward`` takes inputs flattened to (batch, n) and returns (batch, d).
    The parameters are stored as buffers (not trained) under the names A, c1, B, c2.
    """

    def __init__(
        self, A: torch.Tensor, c1: torch.Tensor, B: torch.Tensor, c2: torch.Tensor
    ) -> None:
        super().__init__()
        if A.ndim != 2 or B.ndim != 2 or c1.ndim != 1 or c2.ndim != 1:
            raise ValueError(
                "AffineReLUAffine expects A (p, n), c1 (p,), B (d, p), c2 (d,); got "
                f"A{tuple(A.shape)}, c1{tuple(c1.shape)}, B{tuple(B.shape)}, c2{tuple(c2.shape)}"
            )
        p, _ = A.shape
        d, pb = B.shape
        if c1.shape[0] != p or pb != p or c2.shape[0] != d:
            raise ValueError(
                "AffineReLUAffine shape mismatch: A is "
                f"{tuple(A.shape)}, c1 {tuple(c1.shape)}, B {tuple(B.shape)}, c2 {tuple(c2.shape)}"
            )
        self.register_buffer("A", A)
        self.register_buffer("c1", c1)
        self.register_buffer("B", B)
        self.register_buffer("c2", c2)

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def hidden_features(self) -> int:
        return self.A.shape[0]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n) -> (batch, d)."""
        return torch.relu(x @ self.A.T + self.c1) @ self.B.T + self.c2
