"""The feasible set of the mean perturbation: valid pixel range intersected with the +-beta box.

An attack adds ``mu`` to the image ``M``; the image a network sees must stay in the model's
valid input range, ``lo <= M + mu <= hi`` at every pixel (``bounds=(lo, hi)``, (0, 1) for our
MNIST/FER models). Eqs. 7 and 8 of the paper add their own box ``|mu| <= beta``. Both are
per-pixel intervals, so the feasible set is the box ``lower <= mu <= upper`` with
``lower = max(lo - M, -beta)`` and ``upper = min(hi - M, beta)``. ``bounds=None`` drops the
pixel range: the paper's unconstrained problem, whose images may be invalid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_BOUNDS", "UNCONSTRAINED_LABEL", "PixelBox", "check_bounds"]

#: Valid input range of the MNIST/FER models (pixels in [0, 1]).
DEFAULT_BOUNDS: tuple[float, float] = (0.0, 1.0)
#: What every output says when an attack was solved without the pixel range.
UNCONSTRAINED_LABEL = "unconstrained (invalid images possible)"


def check_bounds(bounds: tuple[float, float] | None) -> tuple[float, float] | None:
    """Validate ``bounds`` = ``(lo, hi)`` with finite ``lo < hi``, or ``None``."""
    if bounds is None:
        return None
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be a pair (lo, hi) or None, got {bounds!r}") from None
    if not (torch.isfinite(torch.tensor([lo, hi])).all() and lo < hi):
        raise ValueError(f"bounds must be finite with lo < hi, got {bounds!r}")
    return lo, hi


@dataclass(frozen=True)
class PixelBox:
    """Per-pixel interval ``lower <= mu <= upper`` (flat float64 tensors of n entries).

    Entries are ``-inf``/``inf`` where nothing bounds ``mu``. ``bounds``/``beta`` record where
    the box came from; ``image`` is the flat float64 image, ``shape`` its original shape.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    image: torch.Tensor
    bounds: tuple[float, float] | None
    beta: float | None
    shape: tuple[int, ...]

    @classmethod
    def build(
        cls, image: torch.Tensor, bounds: tuple[float, float] | None, beta: float | None = None
    ) -> PixelBox:
        """Box of ``mu`` for ``image`` (any shape, input units), ``bounds`` and ``beta``."""
        bounds = check_bounds(bounds)
        if beta is not None and not beta > 0:
            raise ValueError(f"beta must be > 0 or None, got {beta}")
        img = image.detach().to(torch.float64).reshape(-1)
        inf = torch.full_like(img, float("inf"))
        lower, upper = -inf, inf.clone()
        if bounds is not None:
            lo, hi = bounds
            if bool((img < lo).any() or (img > hi).any()):
                raise ValueError(
                    f"image has values in [{float(img.min()):.4g}, {float(img.max()):.4g}], "
                    f"outside bounds={bounds}: give the model's valid input range"
                )
            lower, upper = lo - img, hi - img
        if beta is not None:
            lower, upper = lower.clamp(min=-beta), upper.clamp(max=beta)
        return cls(
            lower, upper, img, bounds, None if beta is None else float(beta), tuple(image.shape)
        )

    @property
    def n(self) -> int:
        return self.lower.numel()

    @property
    def label(self) -> str:
        """``"[lo, hi]"`` or :data:`UNCONSTRAINED_LABEL`."""
        if self.bounds is None:
            return UNCONSTRAINED_LABEL
        return f"[{self.bounds[0]:g}, {self.bounds[1]:g}]"

    def project(self, mu: torch.Tensor) -> torch.Tensor:
        """``mu`` clamped into the box (same shape); with ``bounds`` the clamp is applied to
        ``image + mu`` so that ``lo <= image + mu <= hi`` holds after rounding too."""
        flat = mu.detach().to(torch.float64).reshape(-1)
        out = torch.minimum(torch.maximum(flat, self.lower), self.upper)
        if self.bounds is not None:
            lo, hi = self.bounds
            out = (self.image + out).clamp(lo, hi) - self.image
            # x - img can round so that img + (x - img) leaves [lo, hi] by one ulp: fix it.
            for _ in range(2):
                y = self.image + out
                out = torch.where(y > hi, out - (y - hi), torch.where(y < lo, out + (lo - y), out))
        return out.reshape(mu.shape)

    def violation(self, mu: torch.Tensor) -> float:
        """Largest amount by which ``mu`` (or ``image + mu``) leaves the box (0 = inside)."""
        flat = mu.detach().to(torch.float64).reshape(-1)
        v = torch.maximum(self.lower - flat, flat - self.upper).clamp(min=0)
        worst = float(v.max()) if v.numel() else 0.0
        if self.bounds is not None:
            y = self.image + flat
            lo, hi = self.bounds
            worst = max(
                worst, float((lo - y).clamp(min=0).max()), float((y - hi).clamp(min=0).max())
            )
        return worst

    def scipy_bounds(self, idx: torch.Tensor | None = None, scale: float = 1.0) -> list:
        """SLSQP bounds ``(lower/scale, upper/scale)`` per pixel (``None`` for infinite)."""
        lo = self.lower if idx is None else self.lower[idx]
        hi = self.upper if idx is None else self.upper[idx]

        def fin(v: float) -> float | None:
            return v / scale if abs(v) != float("inf") else None

        return [(fin(a), fin(b)) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]

    def room(self, cap: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """How far each pixel can move up and down from 0 (infinite sides capped at ``cap``)."""
        return self.upper.clamp(max=cap).clamp(min=0), (-self.lower).clamp(max=cap).clamp(min=0)
