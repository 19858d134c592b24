"""Result of a Gaussian adversarial attack, with Monte Carlo verification on the real network."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from torchbridge.attacks.box import DEFAULT_BOUNDS, UNCONSTRAINED_LABEL
from torchbridge.attacks.expected import total_variation

__all__ = ["ZERO_THRESHOLD", "AttackResult"]

#: |mu| at or below this (1e-3 on the 0..255 scale, in [0, 1] units) counts as zero.
ZERO_THRESHOLD = 1e-3 / 255


@dataclass
class AttackResult:
    """Solution of one attack problem (Eqs. 7-10).

    ``mu`` is image-shaped (input units), ``sigma2`` the isotropic noise variance. ``margin`` is
    the expected margin at the solution under the linearization: ``max_{k!=j} E_k - E_j`` for
    targeted attacks (negative = fooled in expectation), ``E_i - max_{k!=i} E_k`` for
    non-targeted ones. ``success`` = fooled in expectation (margin below 0, resp.
    ``<= -gamma``) under the linearization AND, when the real network was given, on it (256
    clipped samples) AND ``lo <= image + mu <= hi`` holds (``box_violation`` <= 1e-12). ``converged``/``status``/``message`` are SLSQP's own (of the returned solve);
    ``hit_iteration_cap``: some solve of this attack stopped at its iteration cap.
    ``iterations``, ``nfev``, ``njev`` and ``eval_time`` (seconds in objective / derivative
    evaluations) are summed over every solve; ``wall_time`` is the whole attack.
    ``bounds``: the valid input range, ``None`` = unconstrained (invalid images possible).
    """

    kind: str
    mu: torch.Tensor
    sigma2: float
    status: int
    message: str
    converged: bool
    success: bool
    margin: float
    objective: float
    iterations: int
    nfev: int
    njev: int
    wall_time: float
    expected_logits: torch.Tensor
    source: int
    target: int | None
    image: torch.Tensor = field(repr=False)
    network: nn.Module = field(repr=False)
    network_is_linearization: bool = False
    bounds: tuple[float, float] | None = DEFAULT_BOUNDS
    box_violation: float = 0.0
    hit_iteration_cap: bool = False
    eval_time: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def sigma(self) -> float:
        return self.sigma2**0.5

    def sparsity(self) -> float:
        """Fraction of entries of ``mu`` with |mu| <= 1e-3/255 (zero on the 255 scale)."""
        return float((self.mu.abs() <= ZERO_THRESHOLD).double().mean())

    def tv(self) -> float:
        """Exact isotropic total variation of ``mu`` (input units)."""
        m = self.mu.double()
        return float(total_variation(m.reshape(-1, *m.shape[-2:]) if m.ndim >= 2 else m[None]))

    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Classes predicted by ``network`` for a batch of image-shaped inputs."""
        p = next(iter(self.network.buffers()), None) if self.network_is_linearization else None
        if p is None:
            p = next(iter(self.network.parameters()))
        out = []
        with torch.no_grad():
            for s in range(0, x.shape[0], batch_size):
                xb = x[s : s + batch_size].to(p.dtype)
                if self.network_is_linearization:
                    xb = xb.reshape(xb.shape[0], -1)
                out.append(self.network(xb).argmax(dim=1))
        return torch.cat(out)

    @property
    def range_label(self) -> str:
        """``"[lo, hi]"`` or "unconstrained (invalid images possible)"."""
        if self.bounds is None:
            return UNCONSTRAINED_LABEL
        return f"[{self.bounds[0]:g}, {self.bounds[1]:g}]"

    def attacked_image(self) -> torch.Tensor:
        """``image + mu`` (float64, image-shaped): the mean of the noisy images."""
        return self.image.double() + self.mu.double()

    def samples(self, samples: int = 1000, seed: int = 0) -> torch.Tensor:
        """``samples`` noisy images ``clip(image + x)``, ``x ~ N(mu, sigma2 I)`` (float64),
        clipped to ``bounds`` (not clipped when ``bounds`` is None): what the network sees."""
        return self._draw(samples, seed)[0]

    def _draw(self, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shape = (samples, *self.image.shape)
        noise = torch.randn(shape, generator=g, dtype=torch.float64) * self.sigma
        raw = self.attacked_image() + noise
        if self.bounds is None:
            return raw, torch.zeros(samples, dtype=torch.long)
        lo, hi = self.bounds
        clipped = (raw < lo) | (raw > hi)
        return raw.clamp(lo, hi), clipped.reshape(samples, -1).sum(1)

    def verify(self, samples: int = 1000, seed: int = 0) -> dict:
        """Monte Carlo check on the real network (the linearization only if no network was given).

        Draws ``x ~ N(mu, sigma2 I)``, adds it to the image, CLIPS to ``bounds`` and classifies.
        Returns ``fooling_rate`` (fraction of those clipped images predicted as ``target``, or
        not as ``source`` when non-targeted), ``range`` (``"[lo, hi]"`` or
        "unconstrained (invalid images possible)": then the samples are NOT clipped),
        ``mean_image_min``/``mean_image_max`` (range of image + mu), ``pixels_outside``
        (pixels of image + mu outside ``bounds``), ``clipped_pixels_mean`` (clipped pixels per
        noisy sample), ``sparsity``, ``tv``, ``l1``, ``mean_prediction`` (class of image + mu),
        ``counts`` (predicted class histogram), ``samples``, ``seed`` and ``network``.
        """
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        x, clipped = self._draw(samples, seed)
        pred = self.predict(x)
        hit = pred == self.target if self.target is not None else pred != self.source
        mean_img = self.attacked_image()
        outside = 0
        if self.bounds is not None:
            outside = int(((mean_img < self.bounds[0]) | (mean_img > self.bounds[1])).sum())
        mean_pred = int(self.predict(mean_img[None])[0])
        counts = torch.bincount(pred, minlength=int(self.expected_logits.numel()))
        return {
            "fooling_rate": float(hit.double().mean()),
            "range": self.range_label,
            "mean_image_min": float(mean_img.min()),
            "mean_image_max": float(mean_img.max()),
            "pixels_outside": outside,
            "clipped_pixels_mean": float(clipped.double().mean()),
            "sparsity": self.sparsity(),
            "tv": self.tv(),
            "l1": float(self.mu.abs().sum()),
            "mean_prediction": mean_pred,
            "counts": counts.tolist(),
            "samples": samples,
            "seed": seed,
            "network": "linearization" if self.network_is_linearization else "model",
        }
