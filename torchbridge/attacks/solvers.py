"""SLSQP solvers for the Gaussian adversarial attacks of Section 4.3 (Eqs. 7, 8, 9, 10).

Every problem is solved with ``scipy.optimize.minimize(method="SLSQP")``; the objective, the
constraints and their exact gradients / Jacobians come from torch autograd (float64) through
the generated ``relu_mean`` kernel (:class:`~torchbridge.attacks.expected.ExpectedLogits`).

Formulation choices (all in the model's input units, [0, 1] pixels for the LeNet):

* Box bounds on many variables make scipy's SLSQP slow (each finite bound becomes a dense
  inequality row of its least-squares subproblem: 2.1 s/iteration at n = 1568 with 1568 lower
  bounds vs 0.17 s without, scipy 1.17). Hence a box ``-beta <= mu <= beta`` is enforced
  exactly by the reparametrization ``mu = beta sin(w)`` (w free), and only ``sigma`` keeps an
  SLSQP bound ``sigma_min <= sigma <= sqrt(sigma2_max)``.
* Eq. 7 / Eq. 10 (targeted): ``max_{k!=j}`` via an epigraph variable ``t``:
  minimize ``t - E_j`` s.t. ``E_k <= t`` (k != j), resp. the d - 1 smooth constraints
  ``E_k - E_j <= -gamma``.
* Eq. 8 / Eq. 9 (non-targeted, "some k beats the source i"): ``competitor=``
  ``"all"`` — solve one smooth problem per k != i (``E_i - E_k`` as objective / ``<= -gamma``
  as constraint) and keep the best: an exact reformulation, since the feasible set of Eq. 9 is
  the union over k and min over x of ``E_i - max_k E_k`` is ``min_k min_x (E_i - E_k)``;
  ``"lse"`` — replace ``max_{k!=i} E_k`` by the lower bound
  ``tau logsumexp(E_k / tau) - tau log(d - 1)`` (smooth, conservative: a feasible point is
  feasible for the exact constraint); ``"runner_up"`` — the strongest competitor k* of the
  unperturbed expected logits only.
* Eq. 9 / 10 objective ``||mu||_1 + TV(mu)``: ``l1="smooth"`` (default) uses
  ``sum sqrt(mu^2 + eps^2) - eps`` and the smoothed isotropic TV
  ``sum sqrt(dx^2 + dy^2 + eps^2) - eps`` on the n pixel variables, followed by a
  feasibility-preserving hard threshold (the largest threshold whose zeroing keeps the margin
  constraint satisfied), which produces exact zeros; ``l1="split"`` uses ``mu = u - v``,
  ``u, v >= 0`` as SLSQP bounds (exact l1, 2n variables and 2n bounds: much slower).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn

from torchbridge.attacks.expected import ExpectedLogits, total_variation
from torchbridge.attacks.result import ZERO_THRESHOLD, AttackResult
from torchbridge.linearize import two_stage_linearize
from torchbridge.network import AffineReLUAffine

__all__ = ["pixel_support", "run_slsqp", "sparse_smooth", "targeted"]

_F64 = torch.float64
_FEAS_TOL = 1e-8

Problem = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _TimeLimitError(Exception):
    pass


def run_slsqp(
    fn: Problem,
    x0: np.ndarray,
    bounds: list[tuple[float | None, float | None]] | None = None,
    maxiter: int = 200,
    ftol: float = 1e-7,
    exact: bool = True,
    time_limit: float | None = None,
) -> dict:
    """Minimize ``obj(x)`` s.t. ``cons(x) >= 0`` with SLSQP, ``fn(x) -> (obj, cons)`` in torch.

    ``exact=True``: gradient and constraint Jacobian by autograd (one forward pass per point,
    cached); ``exact=False``: values only, scipy's 2-point finite differences (``jac=None``).
    ``time_limit`` (seconds) stops the run at the next evaluation after it expires. Returns a
    dict with ``x`` (solution, or the best evaluated point when not converged), ``status``,
    ``message``, ``converged``, ``nit``, ``nfev`` (point evaluations incl. FD), ``njev``,
    ``wall``, ``objective``, ``violation``.
    """
    cache: dict = {}
    best: dict = {"x": np.asarray(x0, dtype=float), "key": (math.inf, math.inf)}
    counts = {"nfev": 0, "njev": 0}
    start = time.perf_counter()

    def record(x: np.ndarray, obj: float, cons: np.ndarray) -> None:
        viol = float(max(0.0, -cons.min())) if cons.size else 0.0
        key = (0.0, obj) if viol <= _FEAS_TOL else (viol, obj)
        if key < best["key"]:
            best.update(x=x.copy(), key=key)

    def evaluate(x: np.ndarray) -> tuple:
        k = x.tobytes()
        if cache.get("key") == k:
            return cache["val"]
        if time_limit is not None and time.perf_counter() - start > time_limit:
            raise _TimeLimitError
        counts["nfev"] += 1
        xt = torch.tensor(x, dtype=_F64, requires_grad=exact)
        obj, cons = fn(xt)
        if exact:
            counts["njev"] += 1
            g = torch.autograd.grad(obj, xt, retain_graph=True)[0].numpy()
            rows = [
                torch.autograd.grad(cons[i], xt, retain_graph=i < cons.numel() - 1)[0]
                for i in range(cons.numel())
            ]
            jac = torch.stack(rows).numpy() if rows else np.zeros((0, x.size))
        else:
            g = jac = None
        val = (float(obj.detach()), cons.detach().numpy().astype(float), g, jac)
        record(x, val[0], val[1])
        cache.update(key=k, val=val)
        return val

    cons_spec = {"type": "ineq", "fun": lambda x: evaluate(x)[1]}
    if exact:
        cons_spec["jac"] = lambda x: evaluate(x)[3]
    options = {"maxiter": int(maxiter), "ftol": ftol}
    try:
        has_cons = evaluate(np.asarray(x0, dtype=float))[1].size > 0
        res = minimize(
            lambda x: evaluate(x)[0],
            np.asarray(x0, dtype=float),
            jac=(lambda x: evaluate(x)[2]) if exact else None,
            method="SLSQP",
            bounds=bounds,
            constraints=[cons_spec] if has_cons else (),
            options=options,
        )
        status, message, converged, nit = (
            int(res.status),
            str(res.message),
            bool(res.success),
            int(res.nit),
        )
        x = res.x if converged else best["x"]
    except _TimeLimitError:
        status, message, converged, nit = (
            -1,
            f"stopped by the time limit ({time_limit} s)",
            False,
            -1,
        )
        x = best["x"]
    with torch.no_grad():
        obj, cons = fn(torch.tensor(x, dtype=_F64))
    cons_np = cons.numpy()
    return {
        "x": np.asarray(x, dtype=float),
        "status": status,
        "message": message,
        "converged": converged,
        "nit": nit,
        "nfev": counts["nfev"],
        "njev": counts["njev"],
        "wall": time.perf_counter() - start,
        "objective": float(obj),
        "violation": float(max(0.0, -cons_np.min())) if cons_np.size else 0.0,
    }


# --------------------------------------------------------------------------- setup helpers


def _setup(
    model: nn.Module, image: torch.Tensor, relu_index: int, at: torch.Tensor | None = None
) -> tuple[AffineReLUAffine, nn.Module, bool, torch.Tensor, int]:
    """(linearization, verification network, is_linearization, image float64, source class)."""
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
        return model, model, True, img.to(_F64), src
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
    point = img if at is None else at.detach().reshape(img.shape)
    lin = two_stage_linearize(model, point.to(p.dtype), relu_index=relu_index)
    return lin, model, False, img.to(_F64), int(out.argmax())


def _check_class(name: str, k: int, d: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= int(k) < d:
        raise ValueError(f"{name} must be a class index in 0..{d - 1}, got {k!r}")
    return int(k)


def _targeted_margin(e: torch.Tensor, j: int) -> torch.Tensor:
    others = torch.cat([e[..., :j], e[..., j + 1 :]], dim=-1)
    return others.max(dim=-1).values - e[..., j]


def _untargeted_margin(e: torch.Tensor, i: int) -> torch.Tensor:
    return -_targeted_margin(e, i)


def _smax_lower(e: torch.Tensor, i: int, tau: float) -> torch.Tensor:
    """tau logsumexp(E_k / tau) - tau log(d - 1) over k != i: a smooth lower bound of max."""
    others = torch.cat([e[:i], e[i + 1 :]])
    return tau * torch.logsumexp(others / tau, dim=0) - tau * math.log(others.numel())


def _competitors(competitor: str, e0: torch.Tensor, i: int) -> list[int | None]:
    d = e0.numel()
    if competitor == "all":
        return [k for k in range(d) if k != i]
    if competitor == "runner_up":
        e = e0.clone()
        e[i] = -math.inf
        return [int(e.argmax())]
    if competitor == "lse":
        return [None]
    raise ValueError(f"competitor must be 'all', 'lse' or 'runner_up', got {competitor!r}")


def _sigma_bounds(sigma2_max: float, sigma_min_ratio: float = 1e-4) -> tuple[float, float]:
    if not sigma2_max > 0:
        raise ValueError(f"sigma2_max must be > 0, got {sigma2_max}")
    s = math.sqrt(sigma2_max)
    return s * sigma_min_ratio, s


def _result(
    kind: str,
    fit: dict,
    mu: torch.Tensor,
    sigma: float,
    f: ExpectedLogits,
    image: torch.Tensor,
    net: nn.Module,
    is_lin: bool,
    source: int,
    target: int | None,
    gamma: float,
    extra: dict,
) -> AttackResult:
    with torch.no_grad():
        e = f(mu.reshape(-1), sigma)
    margin = float(
        _targeted_margin(e, target) if target is not None else _untargeted_margin(e, source)
    )
    ok_margin = margin <= -gamma + 1e-9 if gamma > 0 else margin < 0
    return AttackResult(
        kind=kind,
        mu=mu.detach().reshape(image.shape).clone(),
        sigma2=float(sigma) ** 2,
        status=fit["status"],
        message=fit["message"],
        converged=fit["converged"],
        success=bool(fit["converged"] and ok_margin),
        margin=margin,
        objective=fit["objective"],
        iterations=fit["nit"],
        nfev=fit["nfev"],
        njev=fit["njev"],
        wall_time=fit["wall"],
        expected_logits=e.detach().clone(),
        source=source,
        target=target,
        image=image,
        network=net,
        network_is_linearization=is_lin,
        extra=extra,
    )


# --------------------------------------------------------------------------- Eq. 7


def targeted(
    model: nn.Module,
    image: torch.Tensor,
    target: int,
    beta: float = 30 / 255,
    sigma2_max: float = 2 / 255**2,
    *,
    relu_index: int = -1,
    maxiter: int = 60,
    ftol: float = 1e-6,
    exact: bool = True,
    time_limit: float | None = None,
    box: str = "bounds",
    warm_steps: int = 0,
    relinearize: int = 0,
    check_samples: int = 256,
    trust_radius: float | None = None,
    stop_margin: float = 0.25,
    linearize_at: torch.Tensor | None = None,
    mu0: torch.Tensor | None = None,
) -> AttackResult:
    """Targeted attack, Eq. 7: min_{mu, sigma} max_{k!=j} E_k - E_j, |mu| <= beta,
    0 < sigma^2 <= sigma2_max.

    ``model``: an ``nn.Sequential`` (linearized at ``image``, at its ``relu_index``-th ReLU) or
    an ``AffineReLUAffine``. ``image``: one input without batch dim. Units are the model's
    input units (paper's beta = 30, sigma^2 <= 2 on the 255 scale are the defaults here).
    Epigraph: variables (mu / beta, sigma, t), minimize t - E_j s.t. E_k <= t; the box is
    SLSQP bounds (``box="bounds"``) or the reparametrization mu = beta sin(w) (``box="sin"``).
    ``exact=False`` uses SLSQP's finite differences instead (benchmarks only).
    ``warm_steps > 0``: start SLSQP from that many projected sign-gradient steps on the same
    objective (cheap, exact autograd) instead of ``mu = 0`` (resp. ``mu0``).

    ``relinearize = R > 0`` (``nn.Sequential`` only) is an EXTENSION of the paper's procedure,
    which linearizes the network once, at the clean image M (``relinearize=0``, the default,
    reproduces the paper). Far from M the two-stage linearization is inaccurate and the
    solve can end with a positive margin although the box allows fooling the real network.
    With R > 0: after a solve, the real network's expected margin
    ``max_{k!=j} E[f_k] - E[f_j]`` at ``N(M + mu, sigma^2 I)`` is estimated by Monte Carlo
    (``check_samples`` draws, fixed seed 0); while it is >= ``-stop_margin`` (a real margin
    just below 0 fools only part of the samples), the real network is re-linearized
    at ``M + mu`` (``two_stage_linearize(model, M + mu)``) and Eq. 7 is solved again with
    Theorem 1 on the new linearization, warm-started from ``mu`` (then ``warm_steps``
    projected sign-gradient steps within the trust region below), same SLSQP with exact
    autograd gradients; at most R re-solves. ``trust_radius`` (input units,
    ``box="bounds"`` only) additionally restricts each re-solve to
    ``|mu_new - mu| <= trust_radius`` per pixel (intersected with the box), so that the solve
    stays where the new linearization is accurate; ``None`` = the whole box.
    ``result.extra["rounds"]`` lists, per solve, the linearized margin, the real Monte Carlo
    margin, the SLSQP iterations and the wall time; the returned solution is the round with
    the lowest real margin (``extra["real_margin"]``), its ``margin`` and
    ``expected_logits`` refer to that round's linearization; ``wall_time`` and
    ``iterations`` are summed over all solves. ``linearize_at`` / ``mu0``: linearization
    point and warm start of a single solve (used by the rounds).
    """
    if not isinstance(relinearize, int) or relinearize < 0:
        raise ValueError(f"relinearize must be an int >= 0, got {relinearize!r}")
    if not stop_margin >= 0:
        raise ValueError(f"stop_margin must be >= 0, got {stop_margin}")
    kw = dict(
        relu_index=relu_index,
        maxiter=maxiter,
        ftol=ftol,
        exact=exact,
        time_limit=time_limit,
        box=box,
        warm_steps=warm_steps,
    )
    if relinearize > 0:
        if not isinstance(model, nn.Sequential):
            raise ValueError("relinearize needs the nn.Sequential model, not a linearization")
        rounds = []
        res = targeted(
            model, image, target, beta, sigma2_max, **kw, linearize_at=linearize_at, mu0=mu0
        )
        total_wall, total_it = res.wall_time, res.iterations
        best: tuple[float, AttackResult] | None = None
        for r in range(relinearize + 1):
            real = _real_targeted_margin(model, res, check_samples)
            if best is None or real < best[0]:
                best = (real, res)
            rounds.append(
                {
                    "round": r,
                    "linearized_margin": res.margin,
                    "real_margin": real,
                    "iterations": res.iterations,
                    "wall": res.wall_time,
                }
            )
            if real < -stop_margin or r == relinearize:
                break
            at = image.detach().double() + res.mu
            res = targeted(
                model,
                image,
                target,
                beta,
                sigma2_max,
                **kw,
                trust_radius=trust_radius,
                linearize_at=at,
                mu0=res.mu,
            )
            total_wall += res.wall_time
            total_it += res.iterations
        real, res = best
        res.wall_time, res.iterations = total_wall, total_it
        res.extra.update(relinearize=relinearize, rounds=rounds, real_margin=real)
        return res
    lin, net, is_lin, img, src = _setup(model, image, relu_index, linearize_at)
    j = _check_class("target", target, lin.out_features)
    if j == src:
        raise ValueError(f"target {j} equals the source class (the predicted class of the image)")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    f = ExpectedLogits(lin, img)
    n = f.n
    lo, hi = _sigma_bounds(sigma2_max)
    others = [k for k in range(f.d) if k != j]

    if box not in ("bounds", "sin"):
        raise ValueError(f"box must be 'bounds' or 'sin', got {box!r}")

    def to_mu(x: torch.Tensor) -> torch.Tensor:
        return beta * (x[:n] if box == "bounds" else torch.sin(x[:n]))

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = to_mu(x)
        e = f(mu, x[n])
        t = x[n + 1]
        return t - e[j], t - e[others]

    m0 = torch.zeros(n, dtype=_F64)
    if mu0 is not None:
        m0 = (mu0.detach().to(_F64).reshape(-1) / beta).clamp(-1.0, 1.0)
    lo_m, hi_m = -torch.ones(n, dtype=_F64), torch.ones(n, dtype=_F64)
    bounds = [(-1.0, 1.0) if box == "bounds" else (None, None)] * n
    if trust_radius is not None and mu0 is not None:
        if box != "bounds":
            raise ValueError("trust_radius needs box='bounds'")
        r = float(trust_radius) / beta
        lo_m, hi_m = (m0 - r).clamp(min=-1.0), (m0 + r).clamp(max=1.0)
        bounds = list(zip(lo_m.tolist(), hi_m.tolist(), strict=True))
    if warm_steps > 0:
        # Warm start: projected sign-gradient descent on the same (linearized, expected)
        # objective max_{k!=j} E_k - E_j within the box (and trust region); SLSQP then
        # solves Eq. 7 from it.
        step = float((hi_m - lo_m).max()) * 1.25 / warm_steps
        for _ in range(warm_steps):
            m = m0.clone().requires_grad_()
            g = torch.autograd.grad(_targeted_margin(f(beta * m, hi), j), m)[0]
            m0 = torch.minimum(torch.maximum(m0 - step * g.sign(), lo_m), hi_m)
    if box == "sin":
        m0 = torch.asin(m0.clamp(-0.95, 0.95))
    with torch.no_grad():
        e0 = f(to_mu(torch.cat([m0, m0.new_zeros(2)])), hi)
    x0 = np.concatenate([m0.numpy(), [hi], [float(e0[others].max())]])
    bounds += [(lo, hi), (None, None)]
    fit = run_slsqp(fn, x0, bounds, maxiter, ftol, exact=exact, time_limit=time_limit)
    x = torch.tensor(fit["x"], dtype=_F64)
    mu = to_mu(x)
    return _result(
        "targeted",
        fit,
        mu,
        float(x[n]),
        f,
        img,
        net,
        is_lin,
        src,
        j,
        0.0,
        {"beta": beta, "sigma2_max": sigma2_max, "exact_gradients": exact, "relinearize": 0},
    )


def _real_targeted_margin(model: nn.Module, res: AttackResult, samples: int) -> float:
    """Monte Carlo estimate of max_{k!=j} E[f_k] - E[f_j] of the real network at the solution."""
    p = next(iter(model.parameters()))
    with torch.no_grad():
        x = res.samples(max(1, samples), seed=0) if res.sigma2 > 0 else None
        if x is None:
            x = (res.image.double() + res.mu.double())[None]
        out = model.eval()(x.to(p.dtype)).double().mean(0)
    return float(_targeted_margin(out, res.target))


# --------------------------------------------------------------------------- Eq. 8


def pixel_support(
    model: nn.Module,
    image: torch.Tensor,
    alpha: float = 0.04,
    beta: float = 550 / 255,
    sigma2_max: float = 2 / 255**2,
    seed: int = 0,
    *,
    competitor: str = "all",
    tau: float = 0.1,
    relu_index: int = -1,
    maxiter: int = 200,
    ftol: float = 1e-7,
) -> AttackResult:
    """Non-targeted attack with alpha-pixel support, Eq. 8.

    A random fixed set of ``round(alpha n)`` pixels (``seed``) may move, within ``[-beta, beta]``;
    minimize ``E_i - max_{k!=i} E_k`` (see the module docstring for ``competitor``).
    ``result.extra["support"]`` is the boolean image-shaped mask.
    """
    if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
        raise ValueError(f"alpha must lie in (0, 1], got {alpha!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    lin, net, is_lin, img, src = _setup(model, image, relu_index)
    f = ExpectedLogits(lin, img)
    n = f.n
    m = max(1, round(alpha * n))
    rng = np.random.default_rng(seed)
    idx = torch.as_tensor(np.sort(rng.choice(n, size=m, replace=False)))
    lo, hi = _sigma_bounds(sigma2_max)
    with torch.no_grad():
        e0 = f(torch.zeros(n, dtype=_F64), hi)

    def build(k: int | None) -> Problem:
        def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mu = torch.zeros(n, dtype=_F64).index_put((idx,), beta * torch.sin(x[:m]))
            e = f(mu, x[m])
            comp = _smax_lower(e, src, tau) if k is None else e[k]
            return e[src] - comp, x.new_zeros(0)

        return fn

    bounds = [(None, None)] * m + [(lo, hi)]
    x0 = np.concatenate([np.zeros(m), [hi]])
    best = None
    total = {"nfev": 0, "njev": 0, "wall": 0.0, "nit": 0}
    for k in _competitors(competitor, e0, src):
        fit = run_slsqp(build(k), x0, bounds, maxiter, ftol)
        for key in total:
            total[key] += fit[key]
        x = torch.tensor(fit["x"], dtype=_F64)
        mu = torch.zeros(n, dtype=_F64).index_put((idx,), beta * torch.sin(x[:m]))
        with torch.no_grad():
            marg = float(_untargeted_margin(f(mu, x[m]), src))
        if best is None or marg < best[0]:
            best = (marg, fit, mu, float(x[m]), k)
    _, fit, mu, sigma, k = best
    fit = {**fit, **total}
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return _result(
        "pixel_support",
        fit,
        mu,
        sigma,
        f,
        img,
        net,
        is_lin,
        src,
        None,
        0.0,
        {"support": mask.reshape(img.shape), "alpha": alpha, "beta": beta, "competitor": k},
    )


# --------------------------------------------------------------------------- Eqs. 9, 10


def sparse_smooth(
    model: nn.Module,
    image: torch.Tensor,
    gamma: float = 0.0,
    target: int | None = None,
    sigma2: float = 1 / 255**2,
    *,
    beta: float | None = None,
    competitor: str = "lse",
    tau: float = 0.1,
    l1: str = "smooth",
    eps: float = 1e-3,
    tv_weight: float = 1.0,
    polish: bool = True,
    polish_max: float = 0.02,
    relu_index: int = -1,
    maxiter: int = 150,
    ftol: float = 1e-7,
    relinearize: int = 0,
    linearize_at: torch.Tensor | None = None,
    mu0: torch.Tensor | None = None,
    refine: bool = False,
    refine_rounds: int = 3,
    refine_maxiter: int = 60,
    refine_linearization: str = "both",
    max_support: float = 0.2,
) -> AttackResult:
    """Sparse and smooth attack: min ||mu||_1 + TV(mu) s.t. a margin constraint <= -gamma.

    Non-targeted (Eq. 9, ``target=None``): ``E_i - max_{k!=i} E_k <= -gamma``, the max handled
    per ``competitor``; targeted (Eq. 10): ``E_k - E_j <= -gamma`` for all k != j. Fixed noise
    ``Sigma = sigma2 I`` (paper: identity on the 255 scale = (1/255)^2 in [0, 1] units).
    Optional box ``|mu| <= beta`` (mu = beta sin(w)). ``l1``/``eps``/``polish``: see the module
    docstring; ``result.extra["threshold"]`` is the hard threshold applied by the polish.
    ``relinearize`` (``nn.Sequential`` only): after the solve, re-linearize the network at
    ``image + mu`` and re-solve from ``mu`` that many times (corrects the linearization error
    of large perturbations). ``linearize_at``/``mu0``: linearization point and warm start.

    ``refine=True`` adds a support-restricted stage after the full solve (see
    :func:`_refine_support`): keep the ``k`` largest ``|mu|`` pixels, ``k`` the smallest (by
    bisection) for which the truncated ``mu`` still satisfies the margin constraint, at most
    ``max_support * n``, and re-solve the same problem with only those ``k`` pixels as variables
    (the rest exactly zero), ``refine_rounds`` times. ``refine_linearization``: ``"fixed"``
    keeps the linearization of the full solve for every round; ``"moving"`` re-linearizes the
    network at ``image + mu`` before every round after the first (``nn.Sequential`` only);
    ``"both"`` runs both schedules. Of all candidates (the unrefined ``mu`` and every round's
    result) the one that fools the real network with the most zero pixels is kept. Neither
    schedule dominates: on the LeNet digits of ``nm fig6`` each one alone missed a sparse
    fooling solution on some image that the other found.
    """
    kw = dict(
        beta=beta,
        competitor=competitor,
        tau=tau,
        l1=l1,
        eps=eps,
        tv_weight=tv_weight,
        polish=polish,
        polish_max=polish_max,
        relu_index=relu_index,
        maxiter=maxiter,
        ftol=ftol,
        refine=refine,
        refine_rounds=refine_rounds,
        refine_maxiter=refine_maxiter,
        refine_linearization=refine_linearization,
        max_support=max_support,
    )
    if relinearize > 0:
        if not isinstance(model, nn.Sequential):
            raise ValueError("relinearize needs the nn.Sequential model, not a linearization")
        res = sparse_smooth(
            model, image, gamma, target, sigma2, **kw, linearize_at=linearize_at, mu0=mu0
        )
        for _ in range(relinearize):
            at = image.detach().double() + res.mu
            nxt = sparse_smooth(
                model, image, gamma, target, sigma2, **kw, linearize_at=at, mu0=res.mu
            )
            nxt.wall_time += res.wall_time
            nxt.iterations += res.iterations
            res = nxt
        res.extra["relinearize"] = relinearize
        return res
    if l1 not in ("smooth", "split"):
        raise ValueError(f"l1 must be 'smooth' or 'split', got {l1!r}")
    if not sigma2 >= 0:
        raise ValueError(f"sigma2 must be >= 0, got {sigma2}")
    lin, net, is_lin, img, src = _setup(model, image, relu_index, linearize_at)
    f = ExpectedLogits(lin, img)
    n, d = f.n, f.d
    if target is not None:
        target = _check_class("target", target, d)
        if target == src:
            raise ValueError(
                f"target {target} equals the source class (the predicted class of the image)"
            )
    sigma = math.sqrt(sigma2)
    hw = img.shape[-2:] if img.ndim >= 2 else (1, n)
    with torch.no_grad():
        e0 = f(torch.zeros(n, dtype=_F64), sigma)

    def to_mu(x: torch.Tensor) -> torch.Tensor:
        w = x[:n] - x[n:] if l1 == "split" else x
        return beta * torch.sin(w / beta) if beta is not None else w

    def objective(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        l1v = x.sum() if l1 == "split" else (torch.sqrt(mu**2 + eps**2) - eps).sum()
        return l1v + tv_weight * total_variation(mu.reshape(-1, *hw), eps)

    def build(k: int | None) -> Problem:
        def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mu = to_mu(x)
            e = f(mu, sigma)
            if target is not None:
                cons = e[target] - torch.cat([e[:target], e[target + 1 :]]) - gamma
            else:
                comp = _smax_lower(e, src, tau) if k is None else e[k]
                cons = (comp - e[src] - gamma).reshape(1)
            return objective(x, mu), cons

        return fn

    nvar = 2 * n if l1 == "split" else n
    bounds = [(0.0, None)] * nvar if l1 == "split" else None
    x0 = np.zeros(nvar)
    if mu0 is not None:
        m0 = mu0.detach().double().reshape(-1).numpy()
        if beta is not None:
            m0 = beta * np.arcsin(np.clip(m0 / beta, -1, 1))
        x0 = np.concatenate([m0.clip(min=0), (-m0).clip(min=0)]) if l1 == "split" else m0
    ks = [None] if target is not None else _competitors(competitor, e0, src)
    best = None
    total = {"nfev": 0, "njev": 0, "wall": 0.0, "nit": 0}
    for k in ks:
        fit = run_slsqp(build(k), x0, bounds, maxiter, ftol)
        for key in total:
            total[key] += fit[key]
        key = (fit["violation"] > 1e-6, fit["objective"])
        if best is None or key < best[0]:
            best = (key, fit, k)
    _, fit, k = best
    fit = {**fit, **total}
    mu = to_mu(torch.tensor(fit["x"], dtype=_F64)).detach()

    def margin(m: torch.Tensor) -> float:
        with torch.no_grad():
            e = f(m, sigma)
        return float(
            _targeted_margin(e, target) if target is not None else _untargeted_margin(e, src)
        )

    threshold = 0.0
    if polish and margin(mu) <= -gamma:
        amax = min(float(mu.abs().max()), polish_max)
        if amax > ZERO_THRESHOLD:
            for thr in np.geomspace(amax, ZERO_THRESHOLD, 60):
                cand = torch.where(mu.abs() <= thr, torch.zeros_like(mu), mu)
                if margin(cand) <= -gamma:
                    mu, threshold = cand, float(thr)
                    break
    extra = {
        "gamma": gamma,
        "competitor": k,
        "l1": l1,
        "eps": eps,
        "threshold": threshold,
        "beta": beta,
    }
    if refine:
        schedules = {"fixed": (False,), "moving": (True,), "both": (False, True)}
        if refine_linearization not in schedules:
            raise ValueError(
                "refine_linearization must be 'fixed', 'moving' or 'both', "
                f"got {refine_linearization!r}"
            )
        real = model if isinstance(model, nn.Sequential) else None
        runs = []
        for moving in schedules[refine_linearization] if real is not None else (False,):
            runs.append(
                _refine_support(
                    real,
                    f,
                    img,
                    mu,
                    sigma,
                    margin_fn=lambda e: (
                        _targeted_margin(e, target)
                        if target is not None
                        else _untargeted_margin(e, src)
                    ),
                    cons_fn=lambda e: (
                        e[target] - torch.cat([e[:target], e[target + 1 :]]) - gamma
                        if target is not None
                        else (_smax_lower(e, src, tau) - e[src] - gamma).reshape(1)
                    ),
                    objective=lambda m: (
                        (torch.sqrt(m**2 + eps**2) - eps).sum()
                        + tv_weight * total_variation(m.reshape(-1, *hw), eps)
                    ),
                    gamma=gamma,
                    rounds=refine_rounds,
                    maxiter=refine_maxiter,
                    ftol=ftol,
                    max_support=max_support,
                    relu_index=relu_index,
                    fit=fit,
                    box=beta,
                    relinearize=moving,
                )
            )
        counts = ("nfev", "njev", "wall", "nit")
        spent = {k: sum(r[2][k] - fit[k] for r in runs) for k in counts}
        mu, f, sub, info = min(runs, key=lambda r: r[3].get("key", ()))
        fit = {**sub, **{k: fit[k] + spent[k] for k in counts}}
        info["schedule"] = "moving" if info.pop("relinearized") else "fixed"
        info.pop("key", None)
        extra.update(info)
    return _result("sparse_smooth", fit, mu, sigma, f, img, net, is_lin, src, target, gamma, extra)


def _refine_support(
    model: nn.Sequential | None,
    f: ExpectedLogits,
    img: torch.Tensor,
    mu: torch.Tensor,
    sigma: float,
    *,
    margin_fn: Callable[[torch.Tensor], torch.Tensor],
    cons_fn: Callable[[torch.Tensor], torch.Tensor],
    objective: Callable[[torch.Tensor], torch.Tensor],
    gamma: float,
    rounds: int,
    maxiter: int,
    ftol: float,
    max_support: float,
    relu_index: int,
    fit: dict,
    box: float | None = None,
    relinearize: bool = True,
) -> tuple[torch.Tensor, ExpectedLogits, dict, dict]:
    """Support-restricted re-solve of Eq. 9 / 10 (see ``sparse_smooth(refine=True)``).

    Each round: (1) optionally re-linearize ``model`` at ``image + mu``; (2) order pixels by
    ``|mu|`` and find by bisection the smallest ``k <= max_support * n`` whose top-``k``
    truncation of ``mu`` satisfies ``margin <= -gamma`` under the current linearization
    (``k = max_support * n`` if none does); (3) re-solve ``min l1 + TV`` s.t. the margin
    constraint with only those ``k`` pixels as SLSQP variables (warm start: the truncation),
    all others fixed at exactly zero. With ``model`` (the real network), the unrefined ``mu``
    and every round's result are candidates: each is scaled on its support by the smallest
    ``s`` in [1, 3] that makes the real network's noise-free margin ``<= -gamma`` (if any),
    and the returned one is the best by (fooling the real network, then most zero pixels,
    then lowest objective); ``info["chosen_round"]`` (0 = unrefined) says which.
    Returns ``(mu, f, fit, info)``, ``f`` linearized at the returned point.
    """
    n = mu.numel()
    kmax = max(1, min(n, round(max_support * n)))
    total = {key: fit[key] for key in ("nfev", "njev", "wall", "nit")}
    supports = []
    flat = mu.reshape(-1).clone()
    p = next(model.parameters()) if model is not None else None

    def margin(fe: ExpectedLogits, m: torch.Tensor) -> float:
        with torch.no_grad():
            return float(margin_fn(fe(m, sigma)))

    def real_margin(m: torch.Tensor) -> float:
        with torch.no_grad():
            out = model((img + m.reshape(img.shape)).to(p.dtype)[None])[0].double()
        return float(margin_fn(out))

    def restore(m: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        # Feasibility restoration on the real network: scale mu on its support (sparsity and
        # shape unchanged) until the real margin at image + s mu is <= -gamma.
        for s in np.linspace(1.0, 3.0, 41):
            cand = s * m if box is None else (s * m).clamp(-box, box)
            rm = real_margin(cand)
            if rm <= -gamma:
                return cand, float(s), rm
        return m, 1.0, real_margin(m)

    # Candidates judged on the real network: (infeasible, -zeros, objective), mu, scale.
    candidates: list[tuple[tuple[bool, int, float], torch.Tensor, float]] = []

    def consider(m: torch.Tensor) -> None:
        m, scale, rm = restore(m)
        zeros = int((m.abs() <= ZERO_THRESHOLD).sum())
        with torch.no_grad():
            obj = float(objective(m))
        candidates.append(((rm > -gamma, -zeros, obj), m, scale))

    if model is not None:
        consider(flat)
    for r in range(max(1, rounds)):
        if model is not None and relinearize and r > 0:
            lin = two_stage_linearize(
                model, (img + flat.reshape(img.shape)).to(p.dtype), relu_index=relu_index
            )
            f = ExpectedLogits(lin, img)
        order = flat.abs().argsort(descending=True)
        nnz = int((flat.abs() > 0).sum())

        def trunc(k: int, order: torch.Tensor = order, flat: torch.Tensor = flat) -> torch.Tensor:
            out = torch.zeros_like(flat)
            out[order[:k]] = flat[order[:k]]
            return out

        hi = min(kmax, max(1, nnz))
        if margin(f, trunc(hi)) <= -gamma:
            lo = 0
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if margin(f, trunc(mid)) <= -gamma:
                    hi = mid
                else:
                    lo = mid
        idx = order[:hi].sort().values

        def fn(z: torch.Tensor, idx: torch.Tensor = idx, f: ExpectedLogits = f) -> tuple:
            m = torch.zeros(n, dtype=_F64).index_put((idx,), z)
            return objective(m), cons_fn(f(m, sigma))

        z0 = flat[idx].numpy() if box is None else flat[idx].clamp(-box, box).numpy()
        bnds = None if box is None else [(-box, box)] * len(z0)
        sub = run_slsqp(fn, z0, bnds, maxiter, ftol)
        for key in total:
            total[key] += sub[key]
        new = torch.zeros(n, dtype=_F64)
        new[idx] = torch.tensor(sub["x"], dtype=_F64)
        # Zero the entries the re-solve drove to (near) zero while the constraint holds.
        for thr in (1e-3, 1e-4, 1e-5, ZERO_THRESHOLD):
            cand = torch.where(new.abs() <= thr, torch.zeros_like(new), new)
            if margin(f, cand) <= -gamma:
                new = cand
                break
        flat = new
        fit = sub
        supports.append(int((flat.abs() > ZERO_THRESHOLD).sum()))
        if model is not None:
            consider(flat)
    fit = {**fit, **total}
    info = {
        "refined_supports": supports,
        "max_support": kmax,
        "restoration_scale": 1.0,
        "relinearized": bool(model is not None and relinearize),
    }
    if model is not None:
        # Keep the best candidate on the real network: feasible before infeasible, then the
        # sparsest, then the lowest objective (rounds can overshoot far from the
        # linearization point; the unrefined solution is candidate 0).
        order_key = [c[0] for c in candidates]
        best = min(range(len(candidates)), key=order_key.__getitem__)
        key, flat, scale = candidates[best]
        info.update(restoration_scale=scale, chosen_round=best, key=key)
        lin = two_stage_linearize(model, (img + flat.reshape(img.shape)).to(p.dtype), relu_index)
        f = ExpectedLogits(lin, img)
    return flat.reshape(mu.shape), f, fit, info
