"""Gaussian states over the live tensors of a network, and the two primitives that move them.

A propagation keeps the joint Gaussian of every *live* tensor of the network (a tensor whose
value is still needed: the current activation, and skip paths of residual blocks). Every
operation of a piecewise-linear network is lowered (``torchbridge.propagate.lowering``) to two
primitives:

* ``affine``: y = L(x_1, ..., x_k) + c, linear in the random inputs. Exact: the mean goes
  through the operation; Cov(y, w) = Σ_k L_k Cov(x_k, w) for every live w, and
  Cov(y, y) = Σ_k L_k Cov(x_k, y). ``L`` is applied with ``torch.func.vmap`` to the columns
  of the covariance blocks, so no layer needs a hand-written covariance formula.
* ``relu``: y = relu(z), elementwise. Mean and Cov(y, y) from the exact kernels
  (``torchbridge.moments.relu_moments``); the cross-covariance with every other live unit w,
  jointly Gaussian with z, is Stein's lemma: Cov(relu(z_i), w) = Φ(μ_i/σ_i) Cov(z_i, w)
  (``derivations/piecewise_linear.py``). Then y is *re-fitted* as jointly Gaussian with the
  other live tensors: this is the one approximation of layer-wise propagation.

Three representations of the joint covariance:

* ``FullState``: every block Cov(a, b) of the live tensors (memory Σ q² over live tensors).
* ``FactorState``: Cov = F Fᵀ + diag(D), F of shape (q, r) over the r input noise
  directions, D a per-unit residual variance (diagonal-plus-low-rank). Affine maps are exact
  on F; for D only the diagonal of L diag(D) Lᵀ is kept. At a ReLU, F ← diag(Φ) F (the exact
  cross-covariance with the input noise, Stein) and D takes the rest of the exact marginal
  variance: memory O(q r) instead of O(q²). With r = 0 this is diagonal assumed density
  filtering (ADF, Gast & Roth 2018). Max-pooling is one step (``FactorState.max_pool``):
  each window's K × K covariance is formed in full and its tree of pairwise maxima computed
  as in ``FullState`` (the within-window residual covariances are kept: the maxima of a
  window are strongly correlated, and dropping them overstated LeNet's pooled variances by
  15–35%); only the window's factor row and residual variance leave it. With a
  ``LocalResidual`` (``PropagateOptions.residual = "local"``), where the factor is still
  sparse (local receptive fields), the residual covariances *between* correlated units of a
  ReLU or max-pooling output are kept on local pairs (``propagate.residual``) and turned
  into new factor columns before the next non-elementwise layer. A max-pooling whose input
  factor is already dense gets window pairs too when its output is small
  (``LocalResidual.pool_units``: LeNet's pool2, 3136 windows), the pairs above a correlation
  ``pool_rho``, their cross blocks from blocked Grams (``residual.window_cross_blocks``).
  A ReLU of a max-pooling output (``window_relu = "qmc"``) takes the mean and variance of
  max(0, window elements) integrated numerically over the window's Gaussian
  (``propagate.window_max``) instead of those of the re-fitted tree; the unit's factor row,
  residual variance and local pairs are scaled to the new variance (its correlations stay).
  Options of that step (``PropagateOptions``): ``window_gain="stein"`` sets the unit's factor
  row to Σ_i g_i F_{z_i} with the numerical gains g_i = P(z_i = max > 0) (Stein's lemma,
  exact for the window's Gaussian); ``window_pairs`` integrates the local pairs'
  Cov(max(0, z_a), max(0, z_b)) over the two windows' joint Gaussian; ``window_full``
  hands the windows to ``FullState``, whose ReLU of a max-pooling output then also takes the
  numerical mean and variance (and, with ``window_pairs``, the numerical covariance of the
  dense-input pool's window pairs).
* A ``FactorState`` can be converted to a ``FullState`` (F Fᵀ + diag D) when the remaining
  layers are small enough (``PropagateOptions.max_full``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from nmgen.generated import torch_kernels as K
from torch.func import vmap

from torchbridge.moments import relu_moments
from torchbridge.propagate import residual as local_residual
from torchbridge.propagate.residual import LocalResidual, Pairs

#: Elements of one vmapped batch (columns × per-column size) before it is split in chunks.
_BATCH_ELEMENTS = 1 << 24

LinearFn = Callable[..., torch.Tensor]


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), 0.0)


def stein_factor(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """E[relu'(z)] = Φ(μ/σ) for z ~ N(μ, σ²) (1[μ > 0] when σ = 0), elementwise."""
    sigma = _safe_sqrt(var)
    pos = sigma > 0
    ratio = mean / torch.where(pos, sigma, torch.ones_like(sigma))
    return torch.where(pos, torch.special.ndtr(ratio), (mean > 0).to(mean.dtype))


def apply_columns(
    fn: LinearFn, cols: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]]
) -> torch.Tensor:
    """``fn`` applied to each of the Q columns: ``cols[k]`` is (Q, q_k) -> (Q, q_out).

    ``fn`` takes one tensor per input, each of the input's own shape (batch dimension 1
    included), and returns one tensor; it is vmapped over the columns in chunks of about
    ``_BATCH_ELEMENTS`` elements.
    """
    Q = cols[0].shape[0]
    if Q == 0:
        out = fn(*(torch.zeros(s, dtype=cols[0].dtype, device=cols[0].device) for s in shapes))
        return cols[0].new_zeros(0, out.numel())
    per = max(max(c.shape[1] for c in cols), 1)
    chunk = max(1, _BATCH_ELEMENTS // per)
    mapped = vmap(fn, chunk_size=chunk if chunk < Q else None)
    out = mapped(*(c.reshape(Q, *s) for c, s in zip(cols, shapes, strict=True)))
    return out.reshape(Q, -1)


class FullState:
    """Means and every covariance block of the live tensors (flattened, batch 1)."""

    kind = "full"

    def __init__(self) -> None:
        self.mean: dict[int, torch.Tensor] = {}
        self.shape: dict[int, tuple[int, ...]] = {}
        self.cov: dict[tuple[int, int], torch.Tensor] = {}  # key (a, b) with a <= b
        #: max-pooling outputs whose ReLU takes numerical window moments (``window_full``
        #: of ``FactorState``): their windows' element Gaussians (mean (q, K), cov (q, K, K))
        self.windows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        #: of those, window pairs (i, j) with their cross blocks Cov(z_a, z_b) (P, K, K), whose
        #: ReLU covariance is integrated numerically (``FactorState.pair_blocks``)
        self.pair_blocks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def block(self, a: int, b: int) -> torch.Tensor:
        """Cov(a, b), shape (q_a, q_b)."""
        return self.cov[(a, b)] if a <= b else self.cov[(b, a)].T

    def add_input(self, nid: int, mean: torch.Tensor, cov: torch.Tensor) -> None:
        """Input tensor ``nid``: ``mean`` of its shape, ``cov`` (q, q)."""
        self.mean[nid] = mean.reshape(-1)
        self.shape[nid] = tuple(mean.shape)
        self.cov[(nid, nid)] = cov

    def affine(
        self, nid: int, inputs: Sequence[int], fn: LinearFn, lin: LinearFn, sq: LinearFn | None
    ) -> torch.Tensor:
        """New tensor ``nid`` = fn(inputs) with linear part ``lin``; returns its mean."""
        del sq  # only the factor/diagonal representation needs the squared map
        shapes = [self.shape[k] for k in inputs]
        y = fn(*(self.mean[k].reshape(s) for k, s in zip(inputs, shapes, strict=True)))
        live = list(self.mean)
        sizes = [self.mean[w].numel() for w in live]
        # Cov(w, y) for all live w at once: L applied to the columns of Cov(x_k, w)
        cols = [torch.cat([self.block(w, k) for w in live], dim=0) for k in inputs]
        cwy = apply_columns(lin, cols, shapes)
        for w, part in zip(live, torch.split(cwy, sizes, dim=0), strict=True):
            self.cov[(w, nid)] = part
        cyy = apply_columns(lin, [self.cov[(k, nid)].T for k in inputs], shapes)
        self.cov[(nid, nid)] = (cyy + cyy.T) / 2
        self.mean[nid] = y.reshape(-1)
        self.shape[nid] = tuple(y.shape)
        return y

    def relu(self, nid: int, src: int, method: str) -> torch.Tensor:
        """New tensor ``nid`` = relu(``src``) with the ``method`` ReLU covariance; its mean."""
        m = self.mean[src]
        S = self.cov[(src, src)]
        if bool((S.diagonal() < 0).any()):  # rounding of e.g. Var(a − b) for a ≈ b
            S = S.clone()
            S.diagonal().clamp_(min=0)
        rm, C = relu_covariance(m, S, method)
        phi = stein_factor(m, S.diagonal())
        for w in list(self.mean):  # Stein's lemma for the cross-covariances
            self.cov[(w, nid)] = self.block(w, src) * phi
        self.cov[(nid, nid)] = C
        self.mean[nid] = rm
        self.shape[nid] = self.shape[src]
        if src in self.windows:
            ok = self._window_relu(nid, *self.windows[src])
            if src in self.pair_blocks:
                self._window_pair_qmc(
                    nid,
                    mu=self.windows[src][0],
                    S=self.windows[src][1],
                    blocks=self.pair_blocks[src],
                    ok=ok,
                )
        return self.mean[nid].reshape(self.shape[src])

    def _window_pair_qmc(
        self,
        nid: int,
        mu: torch.Tensor,
        S: torch.Tensor,
        blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        ok: torch.Tensor,
    ) -> None:
        """Cov(relu(max a), relu(max b)) of the window pairs in ``blocks`` = (i, j, cross
        blocks (P, K, K)) where both windows took numerical moments (``ok``): integrated over
        the two windows' joint Gaussian (``window_max.window_pair_covariance``), replacing
        the exact kernel's value on the re-fitted maxima."""
        from torchbridge.propagate import window_max

        i, j, cab = blocks
        sel = torch.nonzero(ok[i] & ok[j]).flatten()
        C = self.cov[(nid, nid)]
        step = 1 << 15
        for a in range(0, sel.numel(), step):
            t = sel[a : a + step]
            ia, ib, c = i[t], j[t], cab[t]
            Sj = torch.cat([torch.cat([S[ia], c], 2), torch.cat([c.transpose(1, 2), S[ib]], 2)], 1)
            v = window_max.window_pair_covariance(torch.stack([mu[ia], mu[ib]], 1), Sj)
            C[ia, ib] = v
            C[ib, ia] = v

    def _window_relu(self, nid: int, mu: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """relu(max-pool) in full covariance: each unit's mean and variance replaced by those
        of max(0, window elements) (``window_max``, where its integration error is below
        ``window_max.MAX_REL_SE`` of the variance); its row and column of every covariance
        block scaled so that its correlations stay as propagated. Returns the (q,) bool mask
        of the units that took the numerical moments."""
        from torchbridge.propagate import window_max

        w = window_max.window_moments(mu, S, replicates=2)
        old = self.cov[(nid, nid)].diagonal()
        ok = (w.var > 0) & (old > 0) & (w.se[:, 1] <= window_max.MAX_REL_SE * w.var)
        s = torch.where(ok, (w.var / torch.where(ok, old, 1.0)).sqrt(), 1.0)
        self.mean[nid] = torch.where(ok, w.mean, self.mean[nid])
        for a, b in list(self.cov):
            if a == nid and b == nid:
                self.cov[(a, b)] = self.cov[(a, b)] * s[:, None] * s[None, :]
            elif a == nid:
                self.cov[(a, b)] = self.cov[(a, b)] * s[:, None]
            elif b == nid:
                self.cov[(a, b)] = self.cov[(a, b)] * s[None, :]
        return ok

    def pair_nonlinearity(self, nid: int, ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
        """Nonlinear variance of relu(x[ia] − x[ib]) of tensor ``nid`` (see ``_nonlinear``)."""
        S = self.cov[(nid, nid)]
        var = S[ia, ia] + S[ib, ib] - 2 * S[ia, ib]
        m = self.mean[nid]
        return _nonlinear(m[ia] - m[ib], var)

    def free(self, nid: int) -> None:
        self.mean.pop(nid)
        self.shape.pop(nid)
        self.windows.pop(nid, None)
        self.pair_blocks.pop(nid, None)
        for key in [k for k in self.cov if nid in k]:
            del self.cov[key]

    def moments(self, nid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (q,), covariance (q, q)) of tensor ``nid``."""
        return self.mean[nid], self.cov[(nid, nid)]

    def numel(self) -> int:
        """Elements held by the covariance blocks (memory measure)."""
        return sum(c.numel() for c in self.cov.values())


class FactorState:
    """Cov = F Fᵀ + diag(D) over the live tensors (F: (q, r) shared noise, D: (q,))."""

    kind = "factor"

    def __init__(
        self,
        diagonal: bool = False,
        local: LocalResidual | None = None,
        window_relu: str = "tree",
        window_gain: str = "tree",
        window_full: bool = False,
        window_pairs: bool = False,
    ) -> None:
        self.diagonal = diagonal  # ADF: a ReLU's output keeps no factor (variance in D)
        self.local = None if diagonal else local  # local residual covariances (residual.py)
        #: "qmc": a ReLU of a max-pooling output gets the mean and variance of
        #: max(0, window) integrated numerically (``window_max``); "tree": the re-fits'
        self.window_relu = window_relu
        #: with "qmc": "stein" — the unit's factor row (its cross-covariance with the noise
        #: directions) is Σ_i g_i F_{z_i} with the numerical gains g_i = P(z_i = max > 0)
        #: (exact by Stein's lemma); "tree" — the re-fitted tree's row, rescaled
        self.window_gain = window_gain
        #: with "qmc": also where the ReLU of a max-pooling output runs in full covariance
        #: (``to_full`` hands the windows over)
        self.window_full = window_full
        #: with "qmc": the local pairs of relu(max-pool) get Cov(max(0, z_a), max(0, z_b))
        #: integrated numerically over the two windows' joint Gaussian
        #: (``window_max.window_pair_covariance``) instead of the re-fitted trees'
        self.window_pairs = window_pairs
        #: max-pooling outputs: their windows' element Gaussians (mean (q, K), cov (q, K, K)),
        #: element indices (q, K), the factor (q_src, r) and residual variance (q_src,) of the
        #: pooled tensor
        self.windows: dict[int, tuple[torch.Tensor, ...]] = {}
        self.mean: dict[int, torch.Tensor] = {}
        self.shape: dict[int, tuple[int, ...]] = {}
        self.factor: dict[int, torch.Tensor] = {}
        self.resid: dict[int, torch.Tensor] = {}
        #: pending off-diagonal residual covariance of a tensor on local pairs, turned into
        #: new factor columns (``materialize``) before a non-elementwise operation reads it
        self.pairs: dict[int, Pairs] = {}
        #: window pairs (i, j) of a dense-input max-pooling (``LocalResidual.pool_units``) and
        #: the cross blocks Cov(z_a, z_b) (P, K, K) of their elements, for ``FullState``
        self.pair_blocks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def materialize(self, nid: int) -> None:
        """Move tensor ``nid``'s pending local residual covariance into new factor columns
        (``residual.materialize``); the other live tensors get zero columns there."""
        pairs = self.pairs.pop(nid, None)
        if pairs is None or pairs.i.numel() == 0:
            return
        G, D = local_residual.materialize(
            self.mean[nid].numel(), pairs, self.resid[nid], self.local.eig_tol
        )
        self.resid[nid] = D
        self.factor[nid] = torch.cat([self.factor[nid], G], dim=1)
        width = self.factor[nid].shape[1]
        for w, f in self.factor.items():
            if f.shape[1] < width:
                self.factor[w] = torch.nn.functional.pad(f, (0, width - f.shape[1]))

    def add_input(
        self, nid: int, mean: torch.Tensor, factor: torch.Tensor, resid: torch.Tensor
    ) -> None:
        """Input ``nid``: ``mean`` of its shape, ``factor`` (q, r), ``resid`` (q,)."""
        self.mean[nid] = mean.reshape(-1)
        self.shape[nid] = tuple(mean.shape)
        self.factor[nid] = factor
        self.resid[nid] = resid

    def affine(
        self, nid: int, inputs: Sequence[int], fn: LinearFn, lin: LinearFn, sq: LinearFn | None
    ) -> torch.Tensor:
        for k in inputs:
            self.materialize(k)
        shapes = [self.shape[k] for k in inputs]
        y = fn(*(self.mean[k].reshape(s) for k, s in zip(inputs, shapes, strict=True)))
        fs = [self.factor[k] for k in inputs]
        r = max(f.shape[1] for f in fs)  # a ReLU output of ADF has no factor: pad with zeros
        fs = [f if f.shape[1] == r else torch.nn.functional.pad(f, (0, r - f.shape[1])) for f in fs]
        self.factor[nid] = apply_columns(lin, [f.T for f in fs], shapes).T
        self.resid[nid] = self._squared_map(inputs, shapes, lin, sq, y.numel())
        self.mean[nid] = y.reshape(-1)
        self.shape[nid] = tuple(y.shape)
        return y

    def _squared_map(
        self,
        inputs: Sequence[int],
        shapes: Sequence[tuple[int, ...]],
        lin: LinearFn,
        sq: LinearFn | None,
        q_out: int,
    ) -> torch.Tensor:
        """diag(L diag(D) Lᵀ) = (L∘L) D: by ``sq`` when given, else column by column."""
        ds = [self.resid[k] for k in inputs]
        ref = ds[0]
        if not any(bool((d != 0).any()) for d in ds):
            return ref.new_zeros(q_out)
        if sq is not None:
            out = sq(*(d.reshape(s) for d, s in zip(ds, shapes, strict=True)))
            return out.reshape(-1).clamp_min(0)
        total = ref.new_zeros(q_out)
        for k, d in enumerate(ds):
            idx = torch.nonzero(d > 0).flatten()
            step = max(1, _BATCH_ELEMENTS // max(q_out, d.numel()))
            for a in range(0, idx.numel(), step):
                cols_idx = idx[a : a + step]
                cols = [ref.new_zeros(cols_idx.numel(), dd.numel()) for dd in ds]
                cols[k][torch.arange(cols_idx.numel()), cols_idx] = d[cols_idx].sqrt()
                total = total + apply_columns(lin, cols, shapes).square().sum(0)
        return total

    def relu(self, nid: int, src: int, method: str) -> torch.Tensor:
        del method  # the marginal moments are always the exact ones here
        m, F, D = self.mean[src], self.factor[src], self.resid[src]
        low = F.square().sum(1)
        sigma = _safe_sqrt(low + D)
        rm, rv = K.relu_mean_variance(m, sigma)
        phi = stein_factor(m, sigma.square())
        if self.diagonal:
            self.factor[nid] = F[:, :0]
            self.resid[nid] = rv
        else:
            self.factor[nid] = F * phi[:, None]
            self.resid[nid] = (rv - phi.square() * low).clamp_min(0)
            if self.local is not None and self._local_here(src):
                self._relu_pairs(nid, src, sigma, rv, phi)
        self.mean[nid] = rm
        self.shape[nid] = self.shape[src]
        if src in self.windows and not self.diagonal:
            self._window_relu(nid, *self.windows[src])
        return self.mean[nid].reshape(self.shape[src])

    def _window_relu(
        self,
        nid: int,
        mu: torch.Tensor,
        S: torch.Tensor,
        idx: torch.Tensor,
        F_src: torch.Tensor,
        D_src: torch.Tensor,
    ) -> None:
        """relu(max-pool): replace the re-fitted mean and variance of each unit by those of
        max(0, window elements) (``window_max.window_moments``, where its integration error
        is below ``window_max.MAX_REL_SE`` of the variance), scaling the unit's factor row,
        residual variance and local pairs so that its correlations with everything else stay
        as propagated. ``window_gain="stein"``: the factor row becomes Σ_i g_i F_src[idx_i]
        (exact cross-covariance with the noise directions), the residual variance the rest
        of the variance, and each local pair keeps its rescaled total covariance."""
        from torchbridge.propagate import window_max

        w = window_max.window_moments(mu, S, replicates=2)
        v = w.var
        old = self.variance(nid)
        ok = (v > 0) & (old > 0) & (w.se[:, 1] <= window_max.MAX_REL_SE * v)
        s = torch.where(ok, (v / torch.where(ok, old, 1.0)).sqrt(), 1.0)
        self.mean[nid] = torch.where(ok, w.mean, self.mean[nid])
        F_old = self.factor[nid]
        p = self.pairs.get(nid)
        if self.window_gain != "stein":
            self.factor[nid] = F_old * s[:, None]
            self.resid[nid] = self.resid[nid] * s.square()
            if p is not None:
                self.pairs[nid] = Pairs(p.i, p.j, p.v * s[p.i] * s[p.j])
                if self.window_pairs:
                    self._window_pair_qmc(nid, mu, S, idx, F_src, D_src, ok)
            return
        F_new = F_old.new_zeros(F_old.shape)
        r = F_src.shape[1]
        for k in range(idx.shape[1]):
            F_new[:, :r] += w.gain[:, k, None] * F_src[idx[:, k]]
        F_new = torch.where(ok[:, None], F_new, F_old)
        D_new = torch.where(ok, (v - F_new.square().sum(1)).clamp_min(0), self.resid[nid])
        self.factor[nid] = F_new
        self.resid[nid] = D_new
        if p is not None:
            total = (local_residual.pair_dots(F_old, p.i, p.j) + p.v) * s[p.i] * s[p.j]
            self.pairs[nid] = Pairs(p.i, p.j, total - local_residual.pair_dots(F_new, p.i, p.j))
            if self.window_pairs:
                self._window_pair_qmc(nid, mu, S, idx, F_src, D_src, ok)

    def _window_pair_qmc(
        self,
        nid: int,
        mu: torch.Tensor,
        S: torch.Tensor,
        idx: torch.Tensor,
        F_src: torch.Tensor,
        D_src: torch.Tensor,
        ok: torch.Tensor,
    ) -> None:
        """The local pairs (a, b) of relu(max-pool) ``nid`` where both units took numerical
        moments (``ok``): residual covariance = Cov(max(0, z_a), max(0, z_b)) over the two
        windows' joint Gaussian (``window_max.window_pair_covariance``; the cross block
        Cov(z_a, z_b) = F_src rows' dots + D_src on shared elements) − F_a·F_b."""
        from torchbridge.propagate import window_max

        p = self.pairs[nid]
        sel = torch.nonzero(ok[p.i] & ok[p.j]).flatten()
        if sel.numel() == 0:
            return
        i, j = p.i[sel], p.j[sel]
        K_ = idx.shape[1]
        if local_residual.density(F_src) > self.local.max_density:  # dense: blocked Grams
            cab = local_residual.window_cross_blocks(F_src, D_src, idx, i, j)
        else:
            kl = [(k, l_) for k in range(K_) for l_ in range(K_)]
            lists = [(idx[i, k], idx[j, l_]) for k, l_ in kl]
            dots = local_residual.pair_dots_many(F_src, lists)
            cab = S.new_empty(i.numel(), K_, K_)
            for (k, l_), (ek, el), d in zip(kl, lists, dots, strict=True):
                cab[:, k, l_] = d + (ek == el) * D_src[ek]
        total = S.new_empty(i.numel())
        step = 1 << 15
        for a in range(0, i.numel(), step):
            ia, ib, c = i[a : a + step], j[a : a + step], cab[a : a + step]
            Sj = torch.cat([torch.cat([S[ia], c], 2), torch.cat([c.transpose(1, 2), S[ib]], 2)], 1)
            total[a : a + step] = window_max.window_pair_covariance(
                torch.stack([mu[ia], mu[ib]], 1), Sj
            )
        v = p.v.clone()
        v[sel] = total - local_residual.pair_dots(self.factor[nid], i, j)
        self.pairs[nid] = Pairs(p.i, p.j, v)

    def _local_here(self, src: int) -> bool:
        """Local residuals at this layer: its input is still local (pending pairs, or a
        sparse factor: ``LocalResidual.max_density``)."""
        return src in self.pairs or local_residual.density(self.factor[src]) <= (
            self.local.max_density
        )

    def _relu_pairs(
        self, nid: int, src: int, sigma: torch.Tensor, rv: torch.Tensor, phi: torch.Tensor
    ) -> None:
        """Local residual covariance of relu(``src``): on the input's pending pairs and the
        correlated pairs of units with a nonlinear residual (``residual.select_pairs``),
        R_ij = Cov(relu z_i, relu z_j) (exact kernel) − Φ_iΦ_j F_i·F_j."""
        m, F = self.mean[src], self.factor[src]
        q = m.numel()
        nonlin = (rv - phi.square() * sigma.square()).clamp_min(0)
        top = nonlin.max() if q else nonlin.new_zeros(())
        lists = []
        old = self.pairs.get(src)
        if old is not None:
            lists.append((old.i, old.j))
        if float(top) > 0 and local_residual.density(F) <= self.local.max_density:
            active = torch.nonzero(nonlin >= self.local.tol * top).flatten()
            lists.append(local_residual.select_pairs(F, sigma.square(), active, self.local.rho))
        if not lists:
            return
        keys = local_residual.merge_pairs(q, *lists)
        i, j = keys // q, keys % q
        low = local_residual.pair_dots(F, i, j)
        cov = low.clone()
        if old is not None and old.i.numel():
            at = torch.searchsorted(keys, old.i * q + old.j)
            cov[at] += old.v
        c = local_residual.relu_pair_cross(m, sigma, cov, i, j)
        self.pairs[nid] = Pairs(i, j, c - phi[i] * phi[j] * low)

    def pair_nonlinearity(self, nid: int, ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
        """Nonlinear variance of relu(x[ia] − x[ib]) of tensor ``nid`` (see ``_nonlinear``)."""
        F, D, m = self.factor[nid], self.resid[nid], self.mean[nid]
        var = (F[ia] - F[ib]).square().sum(1) + D[ia] + D[ib]
        return _nonlinear(m[ia] - m[ib], var)

    def max_pool(
        self, nid: int, src: int, rows: torch.Tensor, method: str, adaptive: bool
    ) -> torch.Tensor:
        """New tensor ``nid`` (q_out,) = max over the K rows of ``rows`` (K, q_out) of flat
        indices into ``src``: a tree of pairwise maxima max(a, b) = b + relu(a − b) computed
        with each window's own K × K covariance held in full.

        Within a window everything is as in ``FullState``: the ReLUs of one level are taken
        jointly (exact bivariate covariances of their residuals), Stein's lemma gives their
        covariance with the other elements, and the Gaussian re-fit after each level is the
        one approximation. Only the factor part F (the exact cross-covariance with the input
        noise) leaves the window; the output's residual variance D is the rest of its
        variance, as at a ReLU. ``adaptive``: pair a 4-element level by
        ``pair_nonlinearity`` (most nearly linear maxima first). Returns the mean (q_out,).
        """
        if method == "approx":
            method = "exact"
        self.materialize(src)
        local_here = self.local is not None and (
            self._local_here(src) or 0 < rows.shape[1] <= self.local.pool_units
        )
        m, F, D = self.mean[src], self.factor[src], self.resid[src]
        mu = m[rows].T  # (q_out, K)
        Fw = F[rows].transpose(0, 1)  # (q_out, K, r)
        S = Fw @ Fw.transpose(1, 2) + torch.diag_embed(D[rows].T)  # (q_out, K, K)
        idx = rows.T  # (q_out, K) element indices, in the order the tree pairs them
        if mu.shape[1] == 4 and adaptive:
            mu, S, Fw, idx = _pair_window(mu, S, Fw, idx)
        level0 = (mu, S, Fw, idx)
        first = True
        while mu.shape[1] > 1:
            K = mu.shape[1]
            if K == 4 and adaptive and not first:
                mu, S, Fw, _ = _pair_window(mu, S, Fw, None)
            first = False
            half = K // 2
            Ld = mu.new_zeros(half, K)  # d_i = e_{2i} − e_{2i+1}
            ar = torch.arange(half, device=mu.device)
            Ld[ar, 2 * ar] = 1.0
            Ld[ar, 2 * ar + 1] = -1.0
            mu_d = mu @ Ld.T
            C_ed = S @ Ld.T  # Cov(e, d): (q_out, K, half)
            S_d = Ld @ C_ed
            S_d = (S_d + S_d.transpose(1, 2)) / 2
            S_d = S_d - torch.diag_embed(S_d.diagonal(dim1=1, dim2=2).clamp_max(0))
            rm, C_r = relu_moments(mu_d, S_d, method, check_psd=False)
            phi = stein_factor(mu_d, S_d.diagonal(dim1=1, dim2=2))  # (q_out, half)
            C_er = C_ed * phi[:, None, :]  # Cov(e, r) by Stein
            # next level: y_i = e_{2i+1} + r_i (i < half), then the odd element if any
            Me = mu.new_zeros(K - half, K)
            Me[ar, 2 * ar + 1] = 1.0
            if K % 2:
                Me[half, K - 1] = 1.0
            Mr = mu.new_zeros(K - half, half)
            Mr[ar, ar] = 1.0
            M = torch.cat([Me, Mr], dim=1)
            J = torch.cat(
                [torch.cat([S, C_er], dim=2), torch.cat([C_er.transpose(1, 2), C_r], dim=2)],
                dim=1,
            )
            S = M @ J @ M.T
            S = (S + S.transpose(1, 2)) / 2
            mu = mu @ Me.T + rm @ Mr.T
            F_r = phi[:, :, None] * (Ld @ Fw)
            Fw = Me @ Fw + Mr @ F_r
        Fo = Fw[:, 0, :]
        var = S[:, 0, 0].clamp_min(0)
        self.mean[nid] = mu[:, 0]
        self.factor[nid] = Fo
        self.resid[nid] = (var - Fo.square().sum(1)).clamp_min(0)
        self.shape[nid] = (1, mu.shape[0])
        if self.window_relu == "qmc" and not self.diagonal and level0[0].shape[1] > 1:
            self.windows[nid] = (level0[0], level0[1], level0[3], F, D)
        if self.local is not None and level0[0].shape[1] > 1 and local_here:
            self._window_pairs(nid, src, level0, var, method)
        return mu[:, 0]

    def _window_pairs(
        self, nid: int, src: int, level0: tuple, var: torch.Tensor, method: str
    ) -> None:
        """Local residual covariance of the window maxima ``nid``: for correlated pairs of
        windows with a residual (``residual.select_pairs``), Cov(max a, max b) from their
        joint elements (``residual.window_pair_cross``) − F_a·F_b."""
        mu0, S0, _, idx0 = level0
        Fo, resid, D = self.factor[nid], self.resid[nid], self.resid[src]
        top = resid.max()
        if float(top) <= 0:
            return
        active = torch.nonzero(resid >= self.local.tol * top).flatten()
        dense = not self._local_here(src)  # admitted by ``LocalResidual.pool_units``
        rho = self.local.pool_rho if dense else self.local.rho
        i, j = local_residual.select_pairs(Fo, var, active, rho)
        if i.numel() == 0:
            return
        if dense:
            cab = local_residual.window_cross_blocks(self.factor[src], D, idx0, i, j)
        else:
            K = mu0.shape[1]
            kl = [(k, l_) for k in range(K) for l_ in range(K)]
            lists = [(idx0[i, k], idx0[j, l_]) for k, l_ in kl]
            dots = local_residual.pair_dots_many(self.factor[src], lists)
            cab = var.new_empty(i.numel(), K, K)  # Cov(elements of a, elements of b)
            for (k, l_), (ek, el), d in zip(kl, lists, dots, strict=True):
                cab[:, k, l_] = d + (ek == el) * D[ek]
        out = var.new_empty(i.numel())
        step = 1 << 15
        for a in range(0, i.numel(), step):
            ia, ib, c = i[a : a + step], j[a : a + step], cab[a : a + step]
            S = torch.cat([torch.cat([S0[ia], c], 2), torch.cat([c.transpose(1, 2), S0[ib]], 2)], 1)
            mu = torch.stack([mu0[ia], mu0[ib]], 1)
            out[a : a + step] = local_residual.window_pair_cross(mu, S, method)
        self.pairs[nid] = Pairs(i, j, out - local_residual.pair_dots(Fo, i, j))
        # pairs that a ReLU in full covariance integrates numerically (``window_pairs`` with
        # ``window_full``): their cross blocks go along (``to_full``)
        if dense and self.window_relu == "qmc" and self.window_full and self.window_pairs:
            self.pair_blocks[nid] = (i, j, cab)

    def free(self, nid: int) -> None:
        for d in (self.mean, self.shape, self.factor, self.resid):
            d.pop(nid)
        self.pairs.pop(nid, None)
        self.pair_blocks.pop(nid, None)
        self.windows.pop(nid, None)

    def _add_pairs(self, nid: int, cov: torch.Tensor) -> torch.Tensor:
        p = self.pairs.get(nid)
        if p is not None:
            cov = cov.clone()
            cov[p.i, p.j] += p.v
            cov[p.j, p.i] += p.v
        return cov

    def moments(self, nid: int) -> tuple[torch.Tensor, torch.Tensor]:
        F = self.factor[nid]
        return self.mean[nid], self._add_pairs(nid, F @ F.T + torch.diag(self.resid[nid]))

    def variance(self, nid: int) -> torch.Tensor:
        return self.factor[nid].square().sum(1) + self.resid[nid]

    def to_full(self) -> FullState:
        """The same Gaussian with every block materialized: F_a F_bᵀ (+ diag D_a on a = b)."""
        full = FullState()
        if self.window_relu == "qmc" and self.window_full and not self.diagonal:
            full.windows = {a: w[:2] for a, w in self.windows.items()}
            full.pair_blocks = dict(self.pair_blocks)
        ids = list(self.mean)
        width = max(f.shape[1] for f in self.factor.values())
        fac = {
            a: torch.nn.functional.pad(f, (0, width - f.shape[1])) for a, f in self.factor.items()
        }
        for i, a in enumerate(ids):
            full.mean[a] = self.mean[a]
            full.shape[a] = self.shape[a]
            for b in ids[i:]:
                blk = fac[a] @ fac[b].T
                if a == b:
                    blk = self._add_pairs(a, (blk + blk.T) / 2 + torch.diag(self.resid[a]))
                full.cov[(a, b)] = blk
        return full

    def numel(self) -> int:
        return sum(
            f.numel() + d.numel()
            for f, d in zip(self.factor.values(), self.resid.values(), strict=True)
        ) + sum(p.v.numel() for p in self.pairs.values())


def _pair_window(
    mu: torch.Tensor, S: torch.Tensor, Fw: torch.Tensor, idx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reorder each window's 4 elements (mu (q, 4), S (q, 4, 4), Fw (q, 4, r), element
    indices ``idx`` (q, 4) or None) so that the pairs (0, 1), (2, 3) have the smallest total
    nonlinear variance (``_nonlinear``)."""
    orders = torch.tensor([[0, 1, 2, 3], [0, 2, 1, 3], [0, 3, 1, 2]], device=mu.device)

    def score(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return _nonlinear(mu[:, i] - mu[:, j], S[:, i, i] + S[:, j, j] - 2 * S[:, i, j])

    total = torch.stack([score(o[0], o[1]) + score(o[2], o[3]) for o in orders])
    perm = orders[total.argmin(0)]  # (q, 4)
    mu = torch.gather(mu, 1, perm)
    S = torch.gather(S, 1, perm[:, :, None].expand_as(S))
    S = torch.gather(S, 2, perm[:, None, :].expand_as(S))
    Fw = torch.gather(Fw, 1, perm[:, :, None].expand_as(Fw))
    if idx is not None:
        idx = torch.gather(idx, 1, perm)
    return mu, S, Fw, idx


def _nonlinear(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Var(relu(d)) − Φ(μ/θ)²θ² for d ~ N(μ, θ²): the variance of relu(d) not explained by
    its best linear function of d (Stein), elementwise; 0 where θ = 0."""
    theta = _safe_sqrt(var.clamp_min(0))
    _, rv = K.relu_mean_variance(mean, theta)
    phi = stein_factor(mean, theta.square())
    return (rv - phi.square() * theta.square()).clamp_min(0)


def relu_covariance(
    mean: torch.Tensor, cov: torch.Tensor, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (q,) and covariance (q, q) of relu(z), z ~ N(mean, cov), by ``method``.

    "exact" | "series" | "zero_mean": ``relu_moments``; "approx": the benchmark-only
    approximate covariance of ``torchbridge.propagate.approx`` (exact diagonal).
    """
    if method == "approx":
        from torchbridge.propagate.approx import approx_relu_moments

        return approx_relu_moments(mean, cov)
    return relu_moments(mean, cov, method, check_psd=False)
