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

    def hidden_gaussian(
        self, mean: torch.Tensor, cov: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ̄, Σ̄) of z = A x + c1 for x ~ N(mean, cov).

        ``mean``: ``batch_shape x n`` (or any tensor with n elements); ``cov``: a scalar
        (isotropic variance), a ``batch_shape x n`` / (n,) tensor (diagonal) or an
        ``batch_shape x n x n`` / (n, n) tensor (full). The n×n input covariance is never
        formed for the scalar and diagonal cases. Returns ``batch_shape x p`` and
        ``batch_shape x p x p``.
        """
        n = self.in_features
        mean = torch.as_tensor(mean, dtype=self.A.dtype, device=self.A.device)
        if mean.shape[-1:] != (n,):
            if mean.numel() != n:
                raise ValueError(f"mean has shape {tuple(mean.shape)}; expected (..., {n})")
            mean = mean.reshape(n)
        A = self.A
        mbar = mean @ A.T + self.c1
        cov = torch.as_tensor(cov, dtype=A.dtype, device=A.device)
        if cov.ndim == 0:
            sbar = cov * (A @ A.T)
        elif cov.shape[-1:] == (n,) and (cov.ndim == 1 or cov.shape == mean.shape):
            sbar = (A * cov[..., None, :]) @ A.T
        elif cov.shape[-2:] == (n, n):
            sbar = A @ cov @ A.T
        elif cov.numel() == n:
            sbar = (A * cov.reshape(n)) @ A.T
        else:
            raise ValueError(
                f"cov has shape {tuple(cov.shape)}; expected a scalar, (..., {n}) or (..., {n}, {n})"
            )
        if not bool(torch.isfinite(cov).all()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("mean or cov contains NaN or Inf")
        if cov.ndim <= 1 or cov.shape == mean.shape:
            if bool((cov < 0).any()):
                raise ValueError("cov is not positive semi-definite: a negative variance")
        sbar = (sbar + sbar.transpose(-1, -2)) / 2  # exact symmetry after rounding
        return mbar, sbar

    def moments(
        self,
        mean: torch.Tensor,
        cov: torch.Tensor | float,
        method: str = "exact",
        terms: int = 5,
        full: bool = False,
        *,
        chunk: int = 1 << 20,
        check_psd: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output mean and variance (or covariance) of g(x), x ~ N(mean, cov).

        Mean: Theorem 1. Variance: B Cov[relu(z)] Bᵀ with the ReLU covariance of
        ``torchbridge.moments`` (method "exact" | "series" (Lemma 4, ``terms``) | "zero_mean"
        (Theorem 2: exact for mean = 0 and c1 = 0)). The p×p ReLU covariance is never held
        in memory: pairs are evaluated in blocks of ``chunk`` and contracted with B at once.

        Args:
            mean, cov: see ``hidden_gaussian``.
            full: return the ``batch_shape x d x d`` output covariance instead of the variance.

        Returns:
            (out_mean ``batch_shape x d``, out_var ``batch_shape x d`` or out_cov
            ``batch_shape x d x d``).
        """
        from torchbridge.moments import _validate, relu_pair_covariances

        mbar, sbar = self.hidden_gaussian(mean, cov)
        _validate(mbar, sbar, check_psd)
        B = self.B
        acc = None
        rmean = None
        for rm, i, j, c in relu_pair_covariances(mbar, sbar, method, terms, chunk):
            rmean = rm
            w = torch.where(i == j, 0.5, 1.0).to(c.dtype) * c  # diagonal pairs counted once
            if full:
                part = torch.einsum("dk,...k,ek->...de", B[:, i], w, B[:, j])
            else:
                part = torch.einsum("dk,...k->...d", B[:, i] * B[:, j], w)
            acc = part if acc is None else acc + part
        out = acc + acc.transpose(-1, -2) if full else 2 * acc
        return rmean @ B.T + self.c2, out

    def theorem2_moments(self, cov: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Theorem 2 for x ~ N(0, cov) and c1 = 0: (E[g²], Var[g]), each of shape (d,).

        E[g_i²] = Σ_vw B_iv B_iw L_vw + 2 c2_i Σ_v B_iv σ̄_v/√(2π) + c2_i², L from Lemma 3
        (L_vv = σ̄_v²/2): the printed theorem's "+ c2(i)" corrected (derivations/theorem2.py).
        Raises if c1 is not zero.
        """
        from nmgen.generated import torch_kernels as K

        if bool((self.c1 != 0).any()):
            raise ValueError("Theorem 2 assumes c1 = 0; use moments(..., method='exact')")
        zero = torch.zeros(self.in_features, dtype=self.A.dtype, device=self.A.device)
        _, sbar = self.hidden_gaussian(zero, cov)
        s = torch.sqrt(sbar.diagonal(dim1=-2, dim2=-1).clamp(min=0))
        denom = s[..., :, None] * s[..., None, :]
        pos = denom > 0
        rho = torch.where(pos, sbar / torch.where(pos, denom, 1.0), 0.0).clamp(-1, 1)
        L = K.relu_cross_moment_zero_mean(s[..., :, None], s[..., None, :], rho)
        B, c2 = self.B, self.c2
        m = 0.3989422804014327 * s  # E[relu(z_v)] at zero mean (Remark 1)
        second = torch.einsum("dv,...vw,dw->...d", B, L, B) + 2 * c2 * (m @ B.T) + c2**2
        mean_g = m @ B.T + c2
        return second, second - mean_g**2
