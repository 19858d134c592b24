"""Training Gaussian-robust networks with the analytic moments, and measuring the robustness.

Losses (x a clean image, y its label, n ~ N(0, σ² I) input noise, f the network):

* ``plain``: CE(f(x), y).
* ``augment``: CE on the clean images plus ``copies`` noisy copies of each, x + n clipped
  to [0, 1] (fresh noise every epoch): an epoch has (copies + 1)× the steps of ``plain``.
* ``moment_mean``: CE(f(x), y) + λ CE(E[f(x + n)], y), the regularizer of Alfadly, Bibi and
  Ghanem, "Analytical Moment Regularizer for Gaussian Robust Networks" (arXiv 1904.11005),
  with E[f(x + n)] the analytic mean (Theorem 1) of the two-stage linearization of f at x.
* ``moment_probit``: CE(f(x), y) + λ L_probit, a variance-aware variant (ours). With
  m_j = g_y − g_j the output margins of the linearized network g under x + n, μ_j = E[m_j]
  and v_j = Var[m_j] = C_yy + C_jj − 2 C_yj from the exact output covariance C,

      L_probit = log(1 + Σ_{j≠y} exp(−μ_j / √(1 + π v_j / 8))).

  Each term uses MacKay's probit approximation E[sigmoid(m)] ≈ sigmoid(μ / √(1 + π v / 8))
  of the probability that class y beats class j under the noise; with v = 0 the loss is
  exactly CE(E[g], y), the mean regularizer. A margin whose mean is small compared to its
  standard deviation (noise flips the decision often) is penalized even when the mean
  logits classify correctly, which CE(E[f]) cannot see.

Where the network is cut (``relu_index``) decides the cost. At the first ReLU (index 0),
everything before it is affine (A, c1 do not depend on x), so the hidden pre-activations are
exactly Gaussian with mean z = A x + c1 and standard deviations σ‖A_i‖, and E[g] =
R(y0) + J_R(y0)(E[relu(z)] − y0) with y0 = relu(z) and R the rest of the network: one
Jacobian-vector product per image, batched (:func:`expected_logits_first_relu`); no
Jacobian is formed. The variance needs the q×q hidden covariance: q = 25088 at LeNet's
first ReLU (minutes per image), so ``moment_probit`` cuts at the last ReLU (q = 1024) and
linearizes each image with :func:`two_stage_linearize` (``create_graph=True``), on
``reg_images`` images per step.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from nmgen.generated import torch_kernels as K
from torch import nn
from torch.nn import functional

from torchbridge.linearize import _jacobian, flatten_sequential, two_stage_linearize

__all__ = [
    "KINDS",
    "Method",
    "TrainResult",
    "TrainSettings",
    "cached_robust_lenet",
    "clipped_noise_moments",
    "expected_logits_first_relu",
    "linearized_output_moments",
    "noisy_accuracy",
    "probit_margin_loss",
    "robust_loss",
    "robustness_area",
    "train_robust",
    "trained_robust_lenet",
]

KINDS = ("plain", "augment", "moment_mean", "moment_probit")
#: Layers that are affine in eval mode (allowed before the first ReLU by the batched path).
_AFFINE = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.ZeroPad2d,
)


@dataclass(frozen=True)
class Method:
    """One training method.

    Attributes:
        kind: one of :data:`KINDS`.
        copies: noisy copies per image (``augment`` only; ≥ 1).
        lam: weight λ of the regularizer (moment kinds).
        reg_images: images of each batch the regularizer is evaluated on (the first ones of
            the shuffled batch; None: all). Moment kinds only.
        relu_index: ReLU the network is cut at for the linearization (moment kinds);
            ``moment_mean`` with 0 uses the batched path, anything else linearizes per image.
        clipped: moment kinds model the input clip(x + n, 0, 1) (what is evaluated) by its
            exact per-pixel mean and variance instead of x + n (the reference's N(x, σ² I)).
    """

    kind: str
    copies: int = 0
    lam: float = 1.0
    reg_images: int | None = None
    relu_index: int = 0
    clipped: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {self.kind!r}")
        if self.kind == "augment" and self.copies < 1:
            raise ValueError(f"augment needs copies >= 1; got {self.copies}")
        if self.reg_images is not None and self.reg_images < 1:
            raise ValueError(f"reg_images must be >= 1 or None; got {self.reg_images}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0; got {self.lam}")

    @property
    def label(self) -> str:
        """Short name for tables and cache files, e.g. ``augment x3``."""
        if self.kind == "plain":
            return "plain CE"
        if self.kind == "augment":
            return f"augment x{self.copies}"
        sub = "all" if self.reg_images is None else str(self.reg_images)
        clip = ", clip-matched" if self.clipped else ""
        return f"{self.kind} (l={self.relu_index}, λ={self.lam:g}, {sub}/batch{clip})"


@dataclass(frozen=True)
class TrainSettings:
    """Settings shared by every method (Adam, batches of ``batch_size`` clean images).

    ``sigma`` is the training noise standard deviation in pixel units (images in [0, 1]).
    """

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    sigma: float = 0.25

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.sigma <= 0:
            raise ValueError(f"invalid training settings {self}")


@dataclass
class TrainResult:
    """A trained model's record: wall seconds per epoch and steps per epoch."""

    method: Method
    settings: TrainSettings
    epoch_seconds: list[float] = field(default_factory=list)
    steps_per_epoch: int = 0
    final_loss: float = math.nan
    from_cache: bool = False

    @property
    def seconds_per_epoch(self) -> float:
        return sum(self.epoch_seconds) / max(1, len(self.epoch_seconds))


def _split_first_relu(model: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential]:
    leaves = [m for _, m in flatten_sequential(model)]
    pos = next((i for i, m in enumerate(leaves) if isinstance(m, nn.ReLU)), None)
    if pos is None:
        raise ValueError("model has no nn.ReLU layer")
    first = leaves[:pos]
    bad = [type(m).__name__ for m in first if not isinstance(m, _AFFINE)]
    if bad:
        raise ValueError(
            f"layers before the first ReLU must be affine for the batched mean; found {bad} "
            "(use a Method with relu_index != 0)"
        )
    return nn.Sequential(*first), nn.Sequential(*leaves[pos + 1 :])


def clipped_noise_moments(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and variance of clip(x + n, 0, 1), n ~ N(0, σ²), elementwise.

    clip(v, 0, 1) = relu(v) − relu(v − 1) and clip(v)² = relu(v)² − relu(v − 1)² − 2 relu(v − 1)
    (check v < 0, 0 ≤ v < 1, v ≥ 1), so both moments follow from Theorem 1 / Lemma 1
    (``relu_mean``, ``relu_second_moment``). Evaluated in float64 (the variance subtracts
    mean²), returned in ``x``'s dtype; shapes as ``x``.
    """
    v = x.detach().double()
    s = torch.full_like(v, float(sigma))
    m0, m1 = K.relu_mean(v, s), K.relu_mean(v - 1, s)
    second = K.relu_second_moment(v, s) - K.relu_second_moment(v - 1, s) - 2 * m1
    mean = m0 - m1
    return mean.to(x.dtype), (second - mean**2).clamp(min=0).to(x.dtype)


def _hidden_variances(first: nn.Sequential, var: torch.Tensor) -> torch.Tensor:
    """Σ_j A_ij² var_j for the affine map ``first`` = A x + c1 and independent inputs with
    variances ``var`` (b, *input_shape) -> (b, q), differentiable w.r.t. the weights.

    One Conv/Linear layer (LeNet's case): the layer applied without bias to ``var`` with
    squared weights, O(one forward pass). Otherwise A is formed by the linearization's
    Jacobian (q×n, once per call: A does not depend on x).
    """
    core = [m for m in first if not isinstance(m, (nn.Identity, nn.Dropout, nn.Flatten))]
    if len(core) == 1 and isinstance(core[0], (nn.Conv1d, nn.Conv2d)):
        conv = core[0]
        if conv.padding_mode == "zeros":
            return conv._conv_forward(var, conv.weight.pow(2), None).flatten(1)
    if len(core) == 1 and isinstance(core[0], nn.Linear) and var.ndim == 2:
        return var @ core[0].weight.pow(2).T
    shape = tuple(var.shape[1:])
    origin = torch.zeros(math.prod(shape), dtype=var.dtype, device=var.device)
    A, _ = _jacobian(first, origin, shape, create_graph=True)
    return var.flatten(1) @ A.pow(2).T


def expected_logits_first_relu(
    model: nn.Sequential, x: torch.Tensor, sigma: float, clipped: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean logits f(x) and E[g(x + n)], n ~ N(0, σ² I), g linearized at x at the first ReLU.

    Batched and differentiable w.r.t. the model's parameters. Equals
    ``two_stage_linearize(model, x[i], relu_index=0).moments(x[i], σ²)[0]`` for every i
    (Theorem 1 on the exact Gaussian pre-activations, then the Jacobian of the rest applied
    to E[relu(z)] − y0 by one forward-mode product).

    Args:
        model: ``nn.Sequential`` whose layers before the first ReLU are affine.
        x: ``(b, *input_shape)`` batch of clean images.
        sigma: input noise standard deviation.
        clipped: the input is clip(x + n, 0, 1), modelled by the Gaussian with its exact
            per-pixel mean and variance (:func:`clipped_noise_moments`); the hidden
            pre-activations are then Gaussian only approximately (sums of 25 independent
            pixels for LeNet's 5×5 kernels).

    Returns:
        ``(f(x), E[g(x + n)])``, both ``(b, d)``.
    """
    first, rest = _split_first_relu(model)
    z = first(x)
    if clipped:
        in_mean, in_var = clipped_noise_moments(x, sigma)
        hidden_mean = first(in_mean)
    else:
        in_var, hidden_mean = torch.full_like(x, sigma**2), z
    hidden_sigma = _hidden_variances(first, in_var).reshape(z.shape).sqrt()
    y0 = torch.relu(z)
    mean_relu = K.relu_mean(hidden_mean, hidden_sigma)
    with warnings.catch_warnings():
        # torch's first forward-AD call scripts decompositions with the deprecated
        # torch.jit.script (torch-internal DeprecationWarning, not actionable here).
        warnings.filterwarnings("ignore", message=".*torch.jit.script", category=DeprecationWarning)
        logits, shift = torch.func.jvp(rest, (y0,), (mean_relu - y0,))
    return logits, logits + shift


def linearized_output_moments(
    model: nn.Sequential,
    x: torch.Tensor,
    sigma: float,
    relu_index: int = -1,
    clipped: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output mean ``(b, d)`` and covariance ``(b, d, d)`` of g_i(x_i + n), n ~ N(0, σ² I), g_i
    the two-stage linearization of ``model`` at x_i (exact method), differentiable w.r.t. the
    model's parameters. One linearization per image (about 4 s for LeNet at the last ReLU,
    float32, 1 thread, with the covariance and backward: ``nm bench regularizer``).
    ``clipped``: input N(mean, diag(var)) of clip(x_i + n, 0, 1)
    (:func:`clipped_noise_moments`) instead of N(x_i, σ² I)."""
    means, covs = [], []
    for xi in x:
        g = two_stage_linearize(model, xi, relu_index, create_graph=True)
        if clipped:
            in_mean, in_var = clipped_noise_moments(xi.reshape(-1), sigma)
        else:
            in_mean, in_var = xi.reshape(-1), sigma**2
        # Σ̄ = A Σ Aᵀ is PSD by construction: skip the O(q³) Cholesky check
        m, c = g.moments(in_mean, in_var, full=True, check_psd=False)
        means.append(m)
        covs.append(c)
    return torch.stack(means), torch.stack(covs)


def probit_margin_loss(mean: torch.Tensor, cov: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch mean of log(1 + Σ_{j≠y} exp(−μ_j/√(1 + π v_j/8))) (module docstring).

    Args:
        mean: ``(b, d)`` output means; cov: ``(b, d, d)`` output covariances; y: ``(b,)``.
    """
    idx = y[:, None]
    mu = mean.gather(1, idx) - mean  # (b, d): margins of the true class over each class
    diag = cov.diagonal(dim1=-2, dim2=-1)
    c_yy = diag.gather(1, idx)
    c_yj = cov.gather(1, idx[:, :, None].expand(-1, 1, cov.shape[-1])).squeeze(1)
    v = (c_yy + diag - 2 * c_yj).clamp(min=0)
    scaled = -mu / torch.sqrt(1 + math.pi * v / 8)
    scaled = scaled.scatter(1, idx, 0.0)  # the j = y term is exp(0) = the "1 +"
    return torch.logsumexp(scaled, dim=1).mean()


def robust_loss(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, method: Method, sigma: float
) -> torch.Tensor:
    """Training loss of ``method`` on a batch of clean images ``x`` (moment kinds only add
    their regularizer here; ``augment`` is a data change, see :func:`train_robust`)."""
    if method.kind in ("plain", "augment"):
        return functional.cross_entropy(model(x), y)
    r = x.shape[0] if method.reg_images is None else min(method.reg_images, x.shape[0])
    if method.kind == "moment_mean" and method.relu_index == 0:
        if r == x.shape[0]:
            logits, expected = expected_logits_first_relu(model, x, sigma, method.clipped)
            ce = functional.cross_entropy(logits, y)
        else:
            ce = functional.cross_entropy(model(x), y)
            _, expected = expected_logits_first_relu(model, x[:r], sigma, method.clipped)
        return ce + method.lam * functional.cross_entropy(expected, y[:r])
    ce = functional.cross_entropy(model(x), y)
    was_training = model.training
    model.eval()  # the linearization needs eval mode (no-op for LeNet: no BN/Dropout)
    try:
        mean, cov = linearized_output_moments(
            model, x[:r], sigma, method.relu_index, method.clipped
        )
    finally:
        model.train(was_training)
    if method.kind == "moment_mean":
        reg = functional.cross_entropy(mean, y[:r])
    else:
        reg = probit_margin_loss(mean, cov, y[:r])
    return ce + method.lam * reg


def _epoch_batches(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    method: Method,
    settings: TrainSettings,
    gen: torch.Generator,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of one epoch (``augment``: clean + ``copies`` clipped noisy copies)."""
    x, y = train_x, train_y
    if method.kind == "augment":
        noisy = [
            (train_x + settings.sigma * torch.randn(train_x.shape, generator=gen)).clamp(0, 1)
            for _ in range(method.copies)
        ]
        x = torch.cat([train_x, *noisy])
        y = train_y.repeat(method.copies + 1)
    order = torch.randperm(x.shape[0], generator=gen)
    bs = settings.batch_size
    return [(x[order[i : i + bs]], y[order[i : i + bs]]) for i in range(0, x.shape[0], bs)]


def train_robust(
    model: nn.Sequential,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    method: Method,
    settings: TrainSettings = TrainSettings(),
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place with Adam on ``method``'s loss; returns the timing record.

    ``train_x`` float (N, ...) in [0, 1], ``train_y`` int64 (N,). Shuffling and noise come
    from ``torch.Generator().manual_seed(settings.seed)``; the model is left in eval mode.
    """
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"train_x has {train_x.shape[0]} rows, train_y {train_y.shape[0]}")
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    result = TrainResult(method, settings)
    steps = math.ceil(train_x.shape[0] / settings.batch_size) * (
        method.copies + 1 if method.kind == "augment" else 1
    )
    result.steps_per_epoch = steps
    bar = tqdm(total=settings.epochs * steps, desc=method.label, disable=not progress)
    model.train()
    for epoch in range(settings.epochs):
        start = time.perf_counter()
        total, count = 0.0, 0
        for xb, yb in _epoch_batches(train_x, train_y, method, settings, gen):
            opt.zero_grad()
            loss = robust_loss(model, xb, yb, method, settings.sigma)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * xb.shape[0]
            count += xb.shape[0]
            bar.update(1)
        result.epoch_seconds.append(time.perf_counter() - start)
        result.final_loss = total / max(1, count)
        bar.set_postfix(epoch=epoch + 1, loss=f"{result.final_loss:.4f}")
    bar.close()
    model.eval()
    return result


@torch.no_grad()
def noisy_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigmas: Sequence[float],
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 1000,
) -> tuple[list[float], list[float]]:
    """Monte Carlo accuracy under Gaussian input noise, noisy images clipped to [0, 1].

    For each σ > 0, ``samples`` noise draws per image of ``x`` (N, ...); the noise depends only on
    ``seed``, σ's position and the draw (common random numbers across models). Returns
    ``(accuracy per σ, standard error per σ)``; the standard error is over images (the mean
    over draws of each image's correctness, std / √N), so draws of one image are not
    treated as independent.
    """
    model.eval()
    accs, ses = [], []
    for k, s in enumerate(sigmas):
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        per_image = torch.zeros(x.shape[0], dtype=torch.float64)
        draws = 1 if s == 0 else samples  # no noise: every draw is the same
        for _ in range(draws):
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            for a in range(0, x.shape[0], batch_size):
                xb = (x[a : a + batch_size] + s * noise[a : a + batch_size]).clamp(0, 1)
                per_image[a : a + batch_size] += (
                    model(xb).argmax(1) == y[a : a + batch_size]
                ).double()
        per_image /= draws
        accs.append(float(per_image.mean()))
        ses.append(float(per_image.std() / math.sqrt(x.shape[0])))
    return accs, ses


def robustness_area(sigmas: Sequence[float], accuracies: Sequence[float]) -> float:
    """Trapezoidal area under accuracy(σ) (units of σ; 0.5 is perfect on σ ∈ [0, 0.5])."""
    from scipy.integrate import trapezoid

    return float(trapezoid(list(accuracies), list(sigmas)))


def _slug(method: Method, settings: TrainSettings) -> str:
    text = f"{method.kind}_c{method.copies}_l{method.lam:g}_r{method.reg_images}"
    text += f"_i{method.relu_index}{'_clip' if method.clipped else ''}"
    text += f"_e{settings.epochs}_b{settings.batch_size}_lr{settings.lr:g}_s{settings.seed}"
    text += f"_sig{settings.sigma:g}"
    return re.sub(r"[^A-Za-z0-9_.-]", "", text.replace("-", "m"))


def _checkpoint_paths(
    method: Method, settings: TrainSettings, cache_dir: str | os.PathLike[str] | None
) -> tuple[Path, Path]:
    """``(weights .pt, metadata .json)`` of ``method`` and ``settings`` in the cache folder."""
    from torchbridge.models import cache_dir as resolve_cache

    stem = f"lenet_mnist_robust_{_slug(method, settings)}"
    folder = resolve_cache(cache_dir)
    return folder / f"{stem}.pt", folder / f"{stem}.json"


def cached_robust_lenet(
    method: Method,
    settings: TrainSettings = TrainSettings(),
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[nn.Sequential, TrainResult]:
    """The LeNet cached by :func:`trained_robust_lenet` for ``method`` and ``settings``, in eval
    mode, with its recorded training times; never trains.

    Raises:
        FileNotFoundError: no checkpoint (``.pt`` and ``.json``) for this method and these
            settings in the cache folder (train it first with ``nm robust``).
    """
    from torchbridge.models import lenet

    weights, meta_path = _checkpoint_paths(method, settings, cache_dir)
    if not (weights.is_file() and meta_path.is_file()):
        raise FileNotFoundError(
            f"no cached checkpoint for {method.label!r} with {settings} ({weights.name} in "
            f"{weights.parent}); train it with `nm robust` (this loader never trains)"
        )
    meta = json.loads(meta_path.read_text())
    model = lenet()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    result = TrainResult(
        method,
        settings,
        epoch_seconds=list(meta["epoch_seconds"]),
        steps_per_epoch=int(meta["steps_per_epoch"]),
        final_loss=float(meta["final_loss"]),
        from_cache=True,
    )
    return model.eval(), result


def trained_robust_lenet(
    method: Method,
    settings: TrainSettings = TrainSettings(),
    cache_dir: str | os.PathLike[str] | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> tuple[nn.Sequential, TrainResult]:
    """LeNet trained with ``method`` on the 4000 MNIST training digits, cached.

    Files ``lenet_mnist_robust_<method and settings>.pt`` / ``.json`` in the cache folder of
    :func:`torchbridge.models.cache_dir` (never ``lenet_mnist.pt``). The JSON keeps the
    settings, seed, per-epoch wall times and torch version. The initial weights come from
    ``torch.manual_seed(settings.seed)`` for every method.
    """
    from torchbridge.data import mnist
    from torchbridge.models import lenet

    weights, meta_path = _checkpoint_paths(method, settings, cache_dir)
    if not retrain and weights.is_file() and meta_path.is_file():
        return cached_robust_lenet(method, settings, cache_dir)
    folder = weights.parent
    train_x, train_y, _, _ = mnist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = lenet()
    result = train_robust(model, train_x, train_y, method, settings, progress)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, weights)
    meta = {
        "method": asdict(method),
        "settings": asdict(settings),
        "epoch_seconds": result.epoch_seconds,
        "steps_per_epoch": result.steps_per_epoch,
        "final_loss": result.final_loss,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return model.eval(), result
