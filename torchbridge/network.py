"""The (Affine, ReLU, Affine) network g(x) = B relu(A x + c1) + c2 and its moments."""

from __future__ import annotations

import torch
from torch import nn

from torchbridge.covariance import CovKind, InputCovariance, read_covariance, require_tensor


class AffineReLUAffine(nn.Module):
    """g(x) = B relu(A x + c1) + c2 with A: (p, n), c1: (p,), B: (d, p), c2: (d,).

    ``forward`` takes inputs flattened to (batch, n) and returns (batch, d).
    The parameters are stored as buffers (not trained) under the names A, c1, B, c2.
    """

    def __init__(
        self, A: torch.Tensor, c1: torch.Tensor, B: torch.Tensor, c2: torch.Tensor
    ) -> None:
        super().__init__()
        params = {"A": A, "c1": c1, "B": B, "c2": c2}
        for name, t in params.items():
            require_tensor(t, name)
        if A.ndim != 2 or B.ndim != 2 or c1.ndim != 1 or c2.ndim != 1:
            raise ValueError(
                "AffineReLUAffine expects A (p, n), c1 (p,), B (d, p), c2 (d,); got "
                f"A{tuple(A.shape)}, c1{tuple(c1.shape)}, B{tuple(B.shape)}, c2{tuple(c2.shape)}"
            )
        p, n = A.shape
        d, pb = B.shape
        if c1.shape[0] != p or pb != p or c2.shape[0] != d:
            raise ValueError(
                "AffineReLUAffine shape mismatch: A is "
                f"{tuple(A.shape)}, c1 {tuple(c1.shape)}, B {tuple(B.shape)}, c2 {tuple(c2.shape)}"
            )
        if min(n, p, d) == 0:
            raise ValueError(f"AffineReLUAffine needs n, p, d >= 1; got n={n}, p={p}, d={d}")
        for name, t in params.items():
            if t.dtype != A.dtype:
                raise TypeError(
                    f"{name} has dtype {t.dtype} but A has {A.dtype}: A, c1, B and c2 must share "
                    "one dtype (convert them; nothing is cast silently)"
                )
            if t.device != A.device:
                raise ValueError(f"{name} is on {t.device} but A is on {A.device}")
            bad = ~torch.isfinite(t.detach())
            if bool(bad.any()):
                where = tuple(int(v) for v in bad.nonzero()[0])
                raise ValueError(f"{name} contains NaN or Inf (first at index {where})")
        for name, t in params.items():
            self.register_buffer(name, t)

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

    def _read_mean(self, mean: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
        """(mean as ``batch_shape x n``, the per-input shape if an unbatched input was flattened)."""
        n = self.in_features
        mean = require_tensor(mean, "mean")
        if mean.dtype != self.A.dtype:
            raise TypeError(
                f"mean has dtype {mean.dtype} but the network's parameters are {self.A.dtype}; "
                "convert one of them (nothing is cast silently)"
            )
        if mean.device != self.A.device:
            raise ValueError(f"mean is on {mean.device} but the network is on {self.A.device}")
        if not bool(torch.isfinite(mean.detach()).all()):
            raise ValueError("mean contains NaN or Inf")
        if mean.ndim >= 1 and mean.shape[-1] == n:
            return mean, None
        if mean.numel() == n:  # one input in its own shape, e.g. an image (1, 28, 28)
            return mean.reshape(n), tuple(mean.shape)
        raise ValueError(
            f"mean has shape {tuple(mean.shape)}; expected (..., {n}) (a batch of inputs) or one "
            f"input with {n} elements"
        )

    def input_covariance(
        self,
        mean: torch.Tensor,
        cov: torch.Tensor | float,
        cov_kind: CovKind | None = None,
        check_psd: bool = True,
    ) -> tuple[torch.Tensor, InputCovariance]:
        """Validate (mean, cov) as given by the user: (mean ``batch_shape x n``, covariance).

        See ``hidden_gaussian`` for the shapes; ``torchbridge.covariance`` for the checks.
        """
        mean, sample_shape = self._read_mean(mean)
        if (
            sample_shape is not None
            and isinstance(cov, torch.Tensor)
            and tuple(cov.shape) == sample_shape
            and cov_kind in (None, "diag")
        ):
            cov = cov.reshape(self.in_features)  # variances given in the input's own shape
        batch = tuple(mean.shape[:-1])
        return mean, read_covariance(cov, self.in_features, batch, self.A, cov_kind, check_psd)

    def hidden_gaussian(
        self,
        mean: torch.Tensor,
        cov: torch.Tensor | float,
        cov_kind: CovKind | None = None,
        check_psd: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ̄, Σ̄) of z = A x + c1 for x ~ N(mean, cov): μ̄ = A mean + c1, Σ̄ = A Σ Aᵀ.

        Args:
            mean: ``batch_shape x n`` tensor in the network's dtype and device (or one input
                with n elements in any shape, e.g. an image).
            cov: how it is read is stated by ``cov_kind`` ("iso": a Python number or a
                batch-shaped tensor of variances; "diag": ``batch_shape x n`` variances (or
                the input's own shape); "full": ``batch_shape x n x n``); with None it is read
                from the shape where only one reading exists (``torchbridge.covariance``). A
                batch of means with one shared full Σ: ``cov_kind="full"``.
            check_psd: O(n³) PSD check of a full Σ (see ``torchbridge.covariance``).

        The user's Σ is validated as given (finite, symmetric, PSD within the stated
        tolerances) before it is mapped through A; the n×n Σ is never formed for "iso" and
        "diag". Σ̄'s rounding-level asymmetry is removed and, for a full Σ, a diagonal entry
        below 0 by no more than the rounding bound 20·n·eps·max Σ_kk·‖A_v‖₁² is set to 0.

        Returns:
            μ̄ ``batch_shape x p`` and Σ̄ ``cov_batch_shape x p x p`` (batch shapes broadcast).
        """
        mean, icov = self.input_covariance(mean, cov, cov_kind, check_psd)
        A = self.A
        mbar = mean @ A.T + self.c1
        sbar = icov.project(A)
        sbar = (sbar + sbar.transpose(-1, -2)) / 2  # rounding only: Σ was checked symmetric
        if not bool(torch.isfinite(sbar.detach()).all()):
            raise ValueError(f"A cov Aᵀ overflows {A.dtype}: cov is too large for this dtype")
        if icov.kind == "full":  # iso/diag give sums of non-negative terms: never below 0
            sbar = self._clamp_rounding(sbar, icov.value)
        return mbar, sbar

    def _clamp_rounding(self, sbar: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """Σ̄ with diagonal rounding residue below 0 set to 0; ValueError beyond rounding."""
        dg = sbar.diagonal(dim1=-2, dim2=-1)
        if not bool((dg < 0).any()):
            return sbar
        n = self.in_features
        eps = torch.finfo(sbar.dtype).eps
        top = cov.detach().diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True)
        bound = 20 * n * eps * top * self.A.detach().abs().sum(1) ** 2
        if bool((dg < -bound).any()):
            v = int((dg < -bound).nonzero()[0][-1])
            raise ValueError(
                f"cov is not positive semi-definite: a_vᵀ cov a_v = {float(dg.min()):.3e} < 0 "
                f"for row v = {v} of A (beyond rounding; use check_psd=True for the eigenvalue)"
            )
        eye = torch.eye(sbar.shape[-1], dtype=torch.bool, device=sbar.device)
        return torch.where(eye & (sbar < 0), 0.0, sbar)

    def moments(
        self,
        mean: torch.Tensor,
        cov: torch.Tensor | float,
        method: str = "exact",
        terms: int = 5,
        full: bool = False,
        *,
        cov_kind: CovKind | None = None,
        chunk: int = 1 << 20,
        check_psd: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output mean and variance (or covariance) of g(x), x ~ N(mean, cov).

        Mean: Theorem 1. Variance: B Cov[relu(z)] Bᵀ with the ReLU covariance of
        ``torchbridge.moments`` (method "exact" | "series" (Lemma 4, ``terms``) | "zero_mean"
        (Theorem 2: exact for mean = 0 and c1 = 0)). The p×p ReLU covariance is never held
        in memory: pairs are evaluated in blocks of ``chunk`` and contracted with B at once.

        Args:
            mean, cov, cov_kind, check_psd: see ``hidden_gaussian`` (validated as given;
                nothing passed in is modified).
            full: return the ``batch_shape x d x d`` output covariance instead of the variance.

        Returns:
            (out_mean ``batch_shape x d``, out_var ``batch_shape x d`` or out_cov
            ``batch_shape x d x d``), ``batch_shape`` the broadcast of the means' and the
            covariance's batch shapes. A batch of means with one shared covariance gives the
            per-mean results.
        """
        from torchbridge.moments import relu_pair_covariances

        mbar, sbar = self.hidden_gaussian(mean, cov, cov_kind, check_psd)
        batch = torch.broadcast_shapes(mbar.shape[:-1], sbar.shape[:-2])
        mbar = mbar.expand(*batch, -1)
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
        d = self.out_features
        out = out.expand(*batch, d, d) if full else out.expand(*batch, d)
        return (rmean @ B.T + self.c2).expand(*batch, d), out

    def theorem2_moments(
        self, cov: torch.Tensor | float, cov_kind: CovKind | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Theorem 2 for x ~ N(0, cov) and c1 = 0: (E[g²], Var[g]), each of shape (d,).

        E[g_i²] = Σ_vw B_iv B_iw L_vw + 2 c2_i Σ_v B_iv σ̄_v/√(2π) + c2_i², L from Lemma 3
        (L_vv = σ̄_v²/2): the printed theorem's "+ c2(i)" corrected (derivations/theorem2.py).
        Raises if c1 is not zero.
        """
        from nmgen.generated import torch_kernels as K

        if bool((self.c1 != 0).any()):
            raise ValueError("Theorem 2 assumes c1 = 0; use moments(..., method='exact')")
        zero = torch.zeros(self.in_features, dtype=self.A.dtype, device=self.A.device)
        _, sbar = self.hidden_gaussian(zero, cov, cov_kind)
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
