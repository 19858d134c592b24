"""The public solvers of Section 4.3: ``targeted`` (Eq. 7), ``pixel_support`` (Eq. 8) and
``sparse_smooth`` (Eq. 9; with ``target`` Eq. 10).

Each builds a :class:`PixelBox` (valid pixel range ``bounds``, default (0, 1), intersected with
the equation's +-beta box), a problem object (:mod:`.problems`), runs a driver with exact
derivatives (Eq. 7: the augmented Lagrangian :func:`run_auglag` by default, or SLSQP; Eqs.
8-10: the thin SLSQP driver :func:`run_slsqp`) and combines the strategies of
:mod:`.strategies`. Every returned ``mu`` satisfies ``lo <= image + mu <= hi`` at every
pixel (the drivers' variable bounds, then an exact projection); ``bounds=None`` is the paper's unconstrained problem.
Every solve runs on one intra-op thread (:func:`single_thread`), so its result does not depend
on the caller's thread count.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from torchbridge.attacks.auglag import AugLagOptions, run_auglag
from torchbridge.attacks.box import DEFAULT_BOUNDS, PixelBox
from torchbridge.attacks.expected import ExpectedLogits
from torchbridge.attacks.problems import (
    MarginConstraint,
    PixelSupportProblem,
    SparseSmoothProblem,
    TargetedProblem,
    targeted_margin,
    untargeted_margin,
)
from torchbridge.attacks.result import ZERO_THRESHOLD, AttackResult
from torchbridge.attacks.slsqp import SlsqpFit, SlsqpOptions, run_slsqp
from torchbridge.attacks.strategies import (
    clipped_check,
    greedy_support,
    prune,
    relinearize,
    restore_on_support,
    single_thread,
)
from torchbridge.linearize import two_stage_linearize
from torchbridge.network import AffineReLUAffine

__all__ = [
    "PixelSupportOptions",
    "RelinearizeOptions",
    "SparseSmoothOptions",
    "TargetedOptions",
    "pixel_support",
    "sparse_smooth",
    "targeted",
]

_F64 = torch.float64
Bounds = tuple[float, float] | None


@dataclass(frozen=True)
class RelinearizeOptions:
    """Re-linearization rounds of Eq. 7 (an EXTENSION; ``rounds=0`` is the paper's procedure).

    After a solve, the real network's expected margin on ``check_samples`` clipped noisy images
    is estimated; while it is ``>= -stop_margin`` the network is re-linearized at
    ``image + mu`` and Eq. 7 re-solved from ``mu``, each re-solve limited to
    ``|mu_new - mu| <= trust_radius`` per pixel (input units; ``None`` = whole box).
    ``progress``: a tqdm bar over the rounds.
    """

    rounds: int = 0
    trust_radius: float | None = None
    stop_margin: float = 0.25
    check_samples: int = 256
    progress: bool = False


@dataclass(frozen=True)
class TargetedOptions:
    """``solver``: :class:`AugLagOptions` (default: augmented Lagrangian with L-BFGS-B inner
    solves, cheap iterations) or :class:`SlsqpOptions` (SciPy's SLSQP; its bounded QP costs
    about 0.4 s per iteration on 786 variables); ``warm_steps``: projected sign-gradient steps
    on the linearized margin before the solver (0 = start at ``mu = 0``); ``relinearize``: see
    :class:`RelinearizeOptions`; ``relu_index``: where the network is linearized."""

    solver: AugLagOptions | SlsqpOptions = field(default_factory=AugLagOptions)
    warm_steps: int = 0
    relinearize: RelinearizeOptions = field(default_factory=RelinearizeOptions)
    relu_index: int = -1


@dataclass(frozen=True)
class PixelSupportOptions:
    """``competitor``: ``"all"`` (one smooth solve per class k != i, keep the best: exact),
    ``"lse"`` (log-sum-exp lower bound of the max, temperature ``tau``) or ``"runner_up"``."""

    competitor: str = "all"
    tau: float = 0.1
    slsqp: SlsqpOptions = field(default_factory=lambda: SlsqpOptions(maxiter=200, ftol=1e-7))
    relu_index: int = -1


@dataclass(frozen=True)
class SparseSmoothOptions:
    """Options of the support / re-linearization strategy for Eqs. 9 and 10.

    ``beta``: optional box ``|mu| <= beta`` (input units; the paper has none). ``competitor``:
    ``"lse"`` (smooth conservative lower bound of ``max_{k!=i} E_k``, temperature ``tau``) or
    ``"runner_up"`` (the source's strongest competitor at ``mu = 0``); Eq. 10 ignores it.
    ``tv_weight``/``eps``: weight and smoothing of the TV term. ``max_support``: at most this
    fraction of pixels may be non-zero; ``expand``: the support is ``expand`` times the fewest
    pixels whose push to the box limit satisfies the linearized constraint. ``rounds``: solves,
    the first at the linearization at the clean image, each further one re-linearized at
    ``image + mu`` while the real network on ``check_samples`` clipped samples does not meet
    the constraint in expectation (``nn.Sequential`` models only); each such round asks the
    linearized constraint for ``gamma + boost``, the boost growing by half the gap between the
    real and the linearized margin of the previous round, up to ``max_boost``. A round whose
    result misses the constraint on the real network is first repaired by
    :func:`restore_on_support` (``restore_steps`` projected gradient steps on the real
    network, on that round's support only; 0 = off) and kept if that lowers the real margin.
    ``progress``: a tqdm bar over the rounds.
    """

    beta: float | None = None
    competitor: str = "lse"
    tau: float = 0.1
    tv_weight: float = 1.0
    eps: float = 1e-3
    max_support: float = 0.2
    expand: float = 2.0
    rounds: int = 5
    max_boost: float = 2.0
    restore_steps: int = 40
    progress: bool = False
    check_samples: int = 128
    slsqp: SlsqpOptions = field(default_factory=lambda: SlsqpOptions(maxiter=100, ftol=1e-7))
    relu_index: int = -1


# --------------------------------------------------------------------------- shared set-up


@dataclass
class _Setup:
    lin: AffineReLUAffine
    net: nn.Module
    is_lin: bool
    image: torch.Tensor
    source: int


def _setup(model: nn.Module, image: torch.Tensor, relu_index: int) -> _Setup:
    """Linearization at the image, verification network, float64 image, source class."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image contains NaN or infinite values")
    img = image.detach()
    if isinstance(model, AffineReLUAffine):
        if img.numel() != model.in_features:
            raise ValueError(
                f"image has shape {tuple(img.shape)} ({img.numel()} elements) but the "
                f"linearization expects {model.in_features} inputs"
            )
        with torch.no_grad():
            src = int(model(img.to(model.A.dtype).reshape(1, -1)).argmax())
        return _Setup(model, model, True, img.to(_F64), src)
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            "model must be an nn.Sequential (linearized at the image) or an AffineReLUAffine, "
            f"got {type(model).__name__}"
        )
    p = next(iter(model.parameters()))
    try:
        with torch.no_grad():
            out = model.eval()(img.to(p.dtype)[None])
    except RuntimeError as e:
        raise ValueError(
            f"image of shape {tuple(img.shape)} does not fit the model (give one input without "
            f"the batch dimension, e.g. (1, 28, 28)): {e}"
        ) from None
    if out.ndim != 2 or out.shape[0] != 1:
        raise ValueError(
            f"image of shape {tuple(img.shape)} must be one model input without the batch "
            f"dimension; the model returned shape {tuple(out.shape)}"
        )
    lin = two_stage_linearize(model, img.to(p.dtype), relu_index=relu_index)
    return _Setup(lin, model, False, img.to(_F64), int(out.argmax()))


def _check_class(name: str, k: int, d: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= int(k) < d:
        raise ValueError(f"{name} must be a class index in 0..{d - 1}, got {k!r}")
    return int(k)


def _sigma_range(sigma2_max: float, ratio: float = 1e-4) -> tuple[float, float]:
    if not sigma2_max > 0:
        raise ValueError(f"sigma2_max must be > 0, got {sigma2_max}")
    s = math.sqrt(sigma2_max)
    return s * ratio, s


def _totals(fits: list[SlsqpFit], started: float) -> dict:
    """Summed SLSQP counters; ``wall_time`` is the whole attack (linearizations included)."""
    return {
        "iterations": sum(max(0, f.nit) for f in fits),
        "nfev": sum(f.nfev for f in fits),
        "njev": sum(f.njev for f in fits),
        "wall_time": time.perf_counter() - started,
        "eval_time": sum(f.eval_wall for f in fits),
        "hit_iteration_cap": any(f.hit_iteration_cap for f in fits),
    }


def _result(
    kind: str,
    s: _Setup,
    box: PixelBox,
    fit: SlsqpFit,
    fits: list[SlsqpFit],
    sol: tuple[torch.Tensor, float, ExpectedLogits],
    classes: tuple[int | None, float],
    extra: dict,
    started: float,
) -> AttackResult:
    """Assemble an AttackResult; ``sol = (mu, sigma, f)``, ``classes = (target, gamma)``.

    ``success`` needs the margin constraint under the linearization (to 1e-9) and the range;
    with the real network (an ``nn.Sequential``) also its expected margin on 256 clipped
    samples (seed 0) below 0, resp. ``<= -gamma`` (``extra["real_margin_check"]``)."""
    mu, sigma, f = sol
    target, gamma = classes
    mu = box.project(mu.reshape(-1))

    def margin_of(e: torch.Tensor) -> torch.Tensor:
        return targeted_margin(e, target) if target is not None else untargeted_margin(e, s.source)

    with torch.no_grad():
        e = f(mu, sigma)
    margin = float(margin_of(e))
    fooled = margin <= -gamma + 1e-9  # the margin constraint, to rounding
    if not s.is_lin:
        rate, real = clipped_check(s.net, box, mu, sigma, margin_of, 256)
        extra = {**extra, "real_margin_check": real, "real_fooling_check": rate}
        fooled = fooled and _meets(real, gamma)
    violation = box.violation(mu)
    return AttackResult(
        kind=kind,
        mu=mu.reshape(s.image.shape).clone(),
        sigma2=float(sigma) ** 2,
        status=fit.status,
        message=fit.message,
        converged=fit.converged,
        success=bool(fooled and violation <= 1e-12),
        margin=margin,
        objective=fit.objective,
        expected_logits=e.detach().clone(),
        source=s.source,
        target=target,
        image=s.image,
        network=s.net,
        network_is_linearization=s.is_lin,
        bounds=box.bounds,
        box_violation=violation,
        extra={"beta": box.beta, **extra},
        **_totals(fits, started),
    )


# --------------------------------------------------------------------------- Eq. 7


def targeted(
    model: nn.Module,
    image: torch.Tensor,
    target: int,
    beta: float = 30 / 255,
    sigma2_max: float = 2 / 255**2,
    *,
    bounds: Bounds = DEFAULT_BOUNDS,
    options: TargetedOptions | None = None,
) -> AttackResult:
    """Targeted attack, Eq. 7: ``min_{mu, sigma} max_{k!=j} E_k - E_j`` with ``|mu| <= beta``,
    ``lo <= image + mu <= hi`` and ``0 < sigma^2 <= sigma2_max``.

    ``model``: an ``nn.Sequential`` (linearized at ``image``) or an ``AffineReLUAffine``.
    ``image``: one input without batch dim, input units (the paper's beta = 30 and
    sigma^2 <= 2 on the 255 scale are the defaults). ``bounds``: the valid input range
    (``None``: unconstrained, invalid images possible). See :class:`TargetedOptions`;
    ``extra["rounds"]`` lists the re-linearization rounds (linearized and real margin).
    """
    opt = options or TargetedOptions()
    if not isinstance(opt.solver, (AugLagOptions, SlsqpOptions)):
        raise TypeError(
            f"options.solver must be AugLagOptions or SlsqpOptions, got {type(opt.solver).__name__}"
        )
    rl = opt.relinearize
    if not isinstance(rl.rounds, int) or rl.rounds < 0:
        raise ValueError(f"relinearize rounds must be an int >= 0, got {rl.rounds!r}")
    if not rl.stop_margin >= 0:
        raise ValueError(f"stop_margin must be >= 0, got {rl.stop_margin}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    started = time.perf_counter()
    with single_thread():
        s = _setup(model, image, opt.relu_index)
        if rl.rounds > 0 and s.is_lin:
            raise ValueError("relinearize rounds need the nn.Sequential model, not a linearization")
        j = _check_class("target", target, s.lin.out_features)
        if j == s.source:
            raise ValueError(
                f"target {j} equals the source class (the predicted class of the image)"
            )
        box = PixelBox.build(s.image, bounds, beta)
        srange = _sigma_range(sigma2_max)
        f = ExpectedLogits(s.lin, s.image)
        mu = torch.zeros(box.n, dtype=_F64)
        fits, rounds, best = [], [], None
        for r in tqdm(range(rl.rounds + 1), desc="Eq. 7 rounds", disable=not rl.progress):
            if r > 0:
                f = relinearize(model, box, mu, opt.relu_index)
            trust = rl.trust_radius if r > 0 else None
            prob = TargetedProblem(f, box, j, srange)
            fit, m, sig = _solve_targeted(prob, mu, trust, opt)
            fits.append(fit)
            real = math.nan
            if rl.rounds > 0:
                _, real = clipped_check(
                    model, box, m, sig, lambda e: targeted_margin(e, j), rl.check_samples
                )
            with torch.no_grad():
                lin_margin = float(targeted_margin(f(m, sig), j))
            rounds.append(
                {
                    "round": r,
                    "linearized_margin": lin_margin,
                    "real_margin": real,
                    "iterations": fit.nit,
                    "wall": fit.wall,
                    "status": fit.status,
                }
            )
            if best is None or real < best[0]:
                best = (real, fit, m, sig, f)
            if rl.rounds == 0 or real < -rl.stop_margin:
                break
            mu = m
        real, fit, m, sig, f = best
        extra = {
            "sigma2_max": sigma2_max,
            "exact_gradients": opt.solver.exact,
            "solver": "auglag" if isinstance(opt.solver, AugLagOptions) else "slsqp",
            "relinearize": rl.rounds,
        }
        if rl.rounds > 0:
            extra.update(rounds=rounds, real_margin=real)
        return _result("targeted", s, box, fit, fits, (m, sig, f), (j, 0.0), extra, started)


def _solve_targeted(
    prob: TargetedProblem, mu: torch.Tensor, trust: float | None, opt: TargetedOptions
) -> tuple[SlsqpFit, torch.Tensor, float]:
    """One Eq. 7 solve from ``mu`` (optionally within a trust region and after warm steps)."""
    box, smax = prob.box, prob.sigma_range[1]
    lower = upper = None
    if trust is not None:
        lower, upper = mu - trust, mu + trust
    lo = box.lower if lower is None else torch.maximum(box.lower, lower)
    hi = box.upper if upper is None else torch.minimum(box.upper, upper)
    m0 = mu.clone()
    if opt.warm_steps > 0:
        # Projected sign-gradient descent on the linearized expected margin (cheap, exact
        # autograd); the solver then solves Eq. 7 from it. The step spans the box (capped at 1).
        width = float((hi.clamp(max=1.0) - lo.clamp(min=-1.0)).max())
        step = width * 1.25 / opt.warm_steps
        for _ in range(opt.warm_steps):
            x = m0.clone().requires_grad_()
            (g,) = torch.autograd.grad(targeted_margin(prob.f(x, smax), prob.j), x)
            m0 = torch.minimum(torch.maximum(m0 - step * g.sign(), lo), hi)
    x0, bnds = prob.x0(m0, smax), prob.bounds(lower, upper)
    if isinstance(opt.solver, AugLagOptions):
        fit = run_auglag(prob, x0, bnds, opt.solver, repair=prob.repair)
    else:
        fit = run_slsqp(prob, x0, bnds, opt.solver)
    x = torch.as_tensor(fit.x, dtype=_F64)
    m = torch.minimum(torch.maximum(prob.mu(x), lo), hi)
    return fit, box.project(m), prob.sigma(x)


# --------------------------------------------------------------------------- Eq. 8


def pixel_support(
    model: nn.Module,
    image: torch.Tensor,
    alpha: float = 0.04,
    beta: float = 550 / 255,
    sigma2_max: float = 2 / 255**2,
    seed: int = 0,
    *,
    bounds: Bounds = DEFAULT_BOUNDS,
    options: PixelSupportOptions | None = None,
) -> AttackResult:
    """Non-targeted attack with alpha-pixel support, Eq. 8.

    A random fixed set of ``round(alpha n)`` pixels (``seed``) may move within
    ``[-beta, beta]`` intersected with the valid range (``bounds``); minimize
    ``E_i - max_{k!=i} E_k``. ``extra["support"]`` is the boolean image-shaped mask.
    """
    opt = options or PixelSupportOptions()
    if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
        raise ValueError(f"alpha must lie in (0, 1], got {alpha!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if opt.competitor not in ("all", "lse", "runner_up"):
        raise ValueError(f"competitor must be 'all', 'lse' or 'runner_up', got {opt.competitor!r}")
    started = time.perf_counter()
    with single_thread():
        s = _setup(model, image, opt.relu_index)
        box = PixelBox.build(s.image, bounds, beta)
        f = ExpectedLogits(s.lin, s.image)
        n = f.n
        m = max(1, round(alpha * n))
        rng = np.random.default_rng(seed)
        idx = torch.as_tensor(np.sort(rng.choice(n, size=m, replace=False)))
        srange = _sigma_range(sigma2_max)
        ks = _competitors(opt.competitor, f, s.source, srange[1])
        fits, best = [], None
        for k in ks:
            prob = PixelSupportProblem(f, box, s.source, idx, srange, k, opt.tau)
            fit = run_slsqp(prob, prob.x0(), prob.bounds(), opt.slsqp)
            fits.append(fit)
            x = torch.as_tensor(fit.x, dtype=_F64)
            mu, sig = box.project(prob.mu(x)), float(x[-1])
            with torch.no_grad():
                marg = float(untargeted_margin(f(mu, sig), s.source))
            if best is None or marg < best[0]:
                best = (marg, fit, mu, sig, k)
        _, fit, mu, sig, k = best
        mask = torch.zeros(n, dtype=torch.bool)
        mask[idx] = True
        extra = {"support": mask.reshape(s.image.shape), "alpha": alpha, "competitor": k}
        return _result(
            "pixel_support", s, box, fit, fits, (mu, sig, f), (None, 0.0), extra, started
        )


def _competitors(competitor: str, f: ExpectedLogits, i: int, sigma: float) -> list[int | None]:
    if competitor == "all":
        return [k for k in range(f.d) if k != i]
    if competitor == "lse":
        return [None]
    with torch.no_grad():
        e = f(torch.zeros(f.n, dtype=_F64), sigma)
    e[i] = -math.inf
    return [int(e.argmax())]


# --------------------------------------------------------------------------- Eqs. 9, 10

#: Pruning thresholds after a support solve (input units: 4, 2, 1, 0.5 grey levels, zero).
PRUNE_THRESHOLDS = (4 / 255, 2 / 255, 1 / 255, 0.5 / 255, ZERO_THRESHOLD)


def sparse_smooth(
    model: nn.Module,
    image: torch.Tensor,
    gamma: float = 0.0,
    target: int | None = None,
    sigma2: float = 1 / 255**2,
    *,
    bounds: Bounds = DEFAULT_BOUNDS,
    options: SparseSmoothOptions | None = None,
) -> AttackResult:
    """Sparse and smooth attack: ``min ||mu||_1 + TV(mu)`` s.t. a margin constraint ``<= -gamma``
    and ``lo <= image + mu <= hi``, noise ``Sigma = sigma2 I`` fixed (paper: identity on the
    255 scale = (1/255)^2 here).

    Non-targeted (Eq. 9, ``target=None``): ``E_i - max_{k!=i} E_k <= -gamma``; targeted
    (Eq. 10): ``max_{k!=j} E_k - E_j <= -gamma``. Strategy per round (see
    :class:`SparseSmoothOptions`): :func:`greedy_support` picks at most ``max_support * n``
    pixels; SLSQP solves the exact-l1 split problem on them (:class:`SparseSmoothProblem`);
    :func:`prune` zeroes what is below 4 grey levels if the constraint survives; the real
    network is checked on clipped samples and, if it does not meet the constraint in
    expectation, re-linearized at ``image + mu`` for the next round. The returned round is
    the one that meets it on the real network with the most zero pixels (else the one with the
    lowest real margin); ``extra["rounds"]`` records each.
    """
    opt = options or SparseSmoothOptions()
    if not sigma2 >= 0:
        raise ValueError(f"sigma2 must be >= 0, got {sigma2}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if opt.competitor not in ("lse", "runner_up"):
        raise ValueError(f"competitor must be 'lse' or 'runner_up', got {opt.competitor!r}")
    if not 0 < opt.max_support <= 1:
        raise ValueError(f"max_support must lie in (0, 1], got {opt.max_support}")
    if opt.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {opt.rounds}")
    started = time.perf_counter()
    with single_thread():
        s = _setup(model, image, opt.relu_index)
        d = s.lin.out_features
        if target is not None:
            target = _check_class("target", target, d)
            if target == s.source:
                raise ValueError(
                    f"target {target} equals the source class (the predicted class of the image)"
                )
        box = PixelBox.build(s.image, bounds, opt.beta)
        sigma = math.sqrt(sigma2)
        f = ExpectedLogits(s.lin, s.image)
        k = None
        if target is None and opt.competitor == "runner_up":
            k = _competitors("runner_up", f, s.source, sigma)[0]
        cons = MarginConstraint(s.source, target, gamma, sigma, k, opt.tau)
        hw = tuple(s.image.shape[-2:]) if s.image.ndim >= 2 else (1, box.n)
        kmax = max(1, min(box.n, math.floor(opt.max_support * box.n)))
        real_model = None if s.is_lin else model
        mu = torch.zeros(box.n, dtype=_F64)
        fits, rounds, cands, boost = [], [], [], 0.0
        total = opt.rounds if real_model is not None else 1
        for r in tqdm(range(total), desc="sparse_smooth rounds", disable=not opt.progress):
            if r > 0:
                f = relinearize(real_model, box, mu, opt.relu_index)
            m, fit, info, support = _sparse_round(
                f, box, cons.with_gamma(gamma + boost), mu, (hw, kmax), opt
            )
            fits.append(fit)
            key, restored = (1, 0.0, 0.0), False
            if real_model is not None:
                rate, real = clipped_check(
                    real_model, box, m, sigma, cons.margin, opt.check_samples
                )
                info.update(real_margin=real, real_fooling=rate, solve_gamma=gamma + boost)
                if not _meets(real, gamma) and opt.restore_steps > 0:
                    m2, _ = restore_on_support(
                        real_model, box, m, support, cons.margin, -gamma - 0.1, opt.restore_steps
                    )
                    rate2, real2 = clipped_check(
                        real_model, box, m2, sigma, cons.margin, opt.check_samples
                    )
                    if real2 < real:
                        m, rate, real, restored = m2, rate2, real2, True
                        info.update(restored_real_margin=real2, restored_fooling=rate2)
                info["restored"] = restored
                zeros = int((m.abs() <= ZERO_THRESHOLD).sum())
                key = (0, -zeros, fit.objective) if _meets(real, gamma) else (1, real, 0.0)
                # The next (re-linearized) solve asks for a larger margin, by half the gap
                # between the real and the linearized margin just seen.
                gap = real - info["linearized_margin"]
                boost = min(opt.max_boost, boost + 0.5 * max(0.0, gap))
            rounds.append(info)
            cands.append((key, r, m, fit, f, restored))
            if key[0] == 0:
                break
            mu = m
        key, r, m, fit, f, restored = min(cands, key=lambda c: (c[0], c[1]))
        if restored:  # report the expected margin of a linearization at the attacked image
            f = relinearize(real_model, box, m, opt.relu_index)
        extra = {
            "gamma": gamma,
            "competitor": k if target is None else None,
            "rounds": rounds,
            "chosen_round": r,
            "restored": restored,
            "max_support": kmax,
            "tv_weight": opt.tv_weight,
            "eps": opt.eps,
        }
        return _result(
            "sparse_smooth", s, box, fit, fits, (m, sigma, f), (target, gamma), extra, started
        )


def _sparse_round(
    f: ExpectedLogits,
    box: PixelBox,
    cons: MarginConstraint,
    mu: torch.Tensor,
    geometry: tuple[tuple[int, int], int],
    opt: SparseSmoothOptions,
) -> tuple[torch.Tensor, SlsqpFit, dict, torch.Tensor]:
    """Support selection, exact-l1 SLSQP on it, pruning; returns ``(mu, fit, info, support)``."""
    hw, kmax = geometry

    def slack(m: torch.Tensor) -> torch.Tensor:
        return cons(f(m, cons.sigma)).min()

    support, start, k_min = greedy_support(box, mu, slack, kmax, opt.expand)
    prob = SparseSmoothProblem(f, box, support, hw, cons, (opt.tv_weight, opt.eps))
    fit = run_slsqp(prob, prob.x0(start), prob.bounds(), opt.slsqp)
    m = box.project(prob.mu(torch.as_tensor(fit.x, dtype=_F64)))

    def feasible(v: torch.Tensor) -> bool:
        with torch.no_grad():
            return bool(float(cons.margin(f(v, cons.sigma))) <= -cons.gamma + 1e-9)

    m, thr = prune(m, feasible, PRUNE_THRESHOLDS)
    with torch.no_grad():
        lin_margin = float(cons.margin(f(m, cons.sigma)))
    info = {
        "support": int(support.numel()),
        "k_min": k_min,
        "nonzero": int((m.abs() > ZERO_THRESHOLD).sum()),
        "threshold": thr,
        "linearized_margin": lin_margin,
        "iterations": fit.nit,
        "status": fit.status,
        "wall": fit.wall,
    }
    return m, fit, info, support


def _meets(real_margin: float, gamma: float) -> bool:
    """The real network meets the margin constraint in expectation (strictly fooled at 0)."""
    return real_margin <= -gamma if gamma > 0 else real_margin < 0
