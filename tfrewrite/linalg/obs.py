"""Data-aware pruning (Optimal Brain Surgeon family): choose which weights to remove and update the kept ones so
that the layer's *outputs* on sample inputs change as little as possible.

A layer maps input rows x (FC inputs or k·k·C conv patches) to W·x. With sample rows X [N, n] each output row w
of W is pruned to ŵ minimising (w − ŵ)ᵀ H (w − ŵ), H = XᵀX/N + δI (δ: `damping` × the mean of diag(XᵀX/N),
which keeps directions the few samples never visit close to the original weights).

* Optimal Brain Surgeon: removing weight q costs w_q² / [H⁻¹]_qq and the best change of the others is
  −(w_q / [H⁻¹]_qq)·H⁻¹[:, q] (`obs_remove`, exact).
* SparseGPT (`sparsegpt`): the columns (inputs) are visited left to right; when column i is pruned, its error
  is spread over the columns right of it with row i of U, the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU) — each
  step is an exact OBS update on the columns not yet visited. The mask of a block of columns is chosen when
  the block is reached, on the already updated weights, by w² / U_ii². Whole 1×k blocks along the input
  dimension (the layout TFLite's block-sparse kernels read: k consecutive inputs of one output) are scored by
  the summed saliency and removed together.
* How many weights each block of columns loses is decided once for the whole layer by the OBS saliency
  w_q² / [H⁻¹]_qq, so inputs that matter little (dead channels, say) lose more than the average share.
* `prune` (what the pass uses): SparseGPT's mask, then the exact optimum of the kept weights for that mask
  (`refit_kept`) where affordable — SparseGPT's left-to-right update cannot use the columns left of a pruned
  one, which costs a lot when the inputs are strongly correlated. With fewer samples N than inputs n (VGG16's
  FC layers get one row per image), H = δI + XᵀX/N has rank-N structure and everything is done in size N
  (Woodbury), nothing n × n; layers wider than `max_dim` inputs then take the one-shot OBS mask.
* `sparsegpt` with `max_dim` < n uses a block-diagonal H over chunks of inputs (bounded memory; an error is
  not compensated with inputs of another chunk) — only a fallback for wide layers with many samples.
"""
from __future__ import annotations

import numpy as np

from .sparse import lowest_count_mask

DEFAULT_DAMPING = 0.01
# Columns whose mask is chosen together, and over which the error is propagated lazily (one matrix product).
COLUMN_BLOCK = 128
# Inputs per diagonal block of H: a 6144² float64 block is 300 MB (VGG16's widest conv has 4608 inputs).
MAX_DIM = 6144


def hessian(rows: np.ndarray, damping: float = DEFAULT_DAMPING) -> tuple[np.ndarray, float]:
    """(H = XᵀX/N + δI in float64, δ) of sample rows [N, n]."""
    x = np.asarray(rows)
    n_rows = max(x.shape[0], 1)
    if x.shape[1] > 1024:  # float32 products for wide layers (a 4608² Gram in float64 is no more accurate here)
        x32 = x.astype(np.float32, copy=False)
        h = (x32.T @ x32).astype(np.float64) / n_rows
    else:
        x64 = x.astype(np.float64)
        h = x64.T @ x64 / n_rows
    h = 0.5 * (h + h.T)
    mean_diag = float(np.mean(np.diag(h))) if len(h) else 0.0
    delta = damping * mean_diag if mean_diag > 0 else 1.0
    h[np.diag_indices_from(h)] += delta
    return h, delta


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """U upper triangular with H⁻¹ = UᵀU, without forming H⁻¹: with J the reversal, chol(JHJ) = M gives
    H = RRᵀ with R = JMJ upper triangular, so U = R⁻¹. Adds damping when rounding breaks definiteness."""
    from scipy import linalg
    h = np.asarray(h, np.float64)
    extra = 0.0
    mean_diag = float(np.mean(np.diag(h)))
    for _ in range(8):
        try:
            m = linalg.cholesky(h[::-1, ::-1] + extra * np.eye(len(h)), lower=True, check_finite=False)
            u, info = linalg.lapack.dtrtri(np.ascontiguousarray(m[::-1, ::-1]), lower=0)
            if info == 0:
                return u
        except linalg.LinAlgError:
            pass
        extra = max(extra * 10, 1e-6 * mean_diag if mean_diag > 0 else 1e-6)
    raise np.linalg.LinAlgError("the damped input Hessian is not positive definite")


def obs_remove(weight_row: np.ndarray, h_inv: np.ndarray, q: int) -> tuple[np.ndarray, float]:
    """Exact OBS: (the best row with weight q removed, the increase of (w − ŵ)ᵀH(w − ŵ) it costs)."""
    w = np.asarray(weight_row, np.float64)
    d = h_inv[q, q]
    new = w - (w[q] / d) * h_inv[:, q]
    new[q] = 0.0
    return new, float(w[q] ** 2 / d)


def _chunks(n: int, max_dim: int, column_block: int) -> list[tuple[int, int]]:
    """[start, stop) input ranges of at most max_dim inputs (at least one column block), cut on column-block
    boundaries so that the blocks of every chunk line up with the layer's."""
    step = max(column_block, (max_dim // column_block) * column_block)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _unit_scores(w: np.ndarray, denom: np.ndarray, width: int) -> np.ndarray:
    """Summed saliency w²/denom of every (row, 1×width block) unit: [m, n/width]."""
    m, n = w.shape
    return (w * w / denom[None, :]).reshape(m, n // width, width).sum(axis=2)


def _quota(scores: list[np.ndarray], sparsity: float, units_per_block: int) -> np.ndarray:
    """Units to remove in each column block: the layer's round(sparsity·units) of lowest OBS saliency.
    `scores`: per chunk [m, units]. Ties at the threshold go by chunk, then column, then row (deterministic)."""
    total = sum(s.size for s in scores)
    count = int(round(sparsity * total))
    per_column = [np.zeros(s.shape[1], np.int64) for s in scores]
    if count > 0:
        flat = np.concatenate([s.ravel() for s in scores])
        threshold = np.partition(flat, count - 1)[count - 1]
        del flat
        below = [np.sum(s < threshold, axis=0) for s in scores]
        ties_left = count - int(sum(int(b.sum()) for b in below))
        for i, s in enumerate(scores):
            ties = np.sum(s == threshold, axis=0)
            take = np.minimum(ties, np.maximum(ties_left - (np.cumsum(ties) - ties), 0))
            ties_left -= int(take.sum())
            per_column[i] = below[i] + take
    per_column = np.concatenate(per_column)
    return np.add.reduceat(per_column, np.arange(0, len(per_column), units_per_block))


def _sparsegpt_chunk(w: np.ndarray, u: np.ndarray, quota: np.ndarray, width: int, column_block: int
                     ) -> np.ndarray:
    """SparseGPT on w [m, n] (float64, updated in place) with U the upper Cholesky factor of this chunk's H⁻¹;
    quota[b]: units to remove in column block b. Returns the prune mask."""
    m, n = w.shape
    pruned = np.zeros((m, n), bool)
    for b, start in enumerate(range(0, n, column_block)):
        stop = min(start + column_block, n)
        w1 = w[:, start:stop]  # a view: updated in place
        u1 = u[start:stop, start:stop]
        d = np.diag(u1)
        units = lowest_count_mask(_unit_scores(w1, d * d, width), int(quota[b]))
        mask1 = np.repeat(units, width, axis=1)
        pruned[:, start:stop] = mask1
        err = np.zeros((m, stop - start))
        for i in range(stop - start):
            e = np.where(mask1[:, i], w1[:, i], 0.0) / d[i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err[:, i] = e
        w1[mask1] = 0.0  # exact zeros (the update leaves rounding residue)
        if stop < n:
            w[:, stop:] -= err @ u[start:stop, stop:]
    return pruned


def sparsegpt(weight: np.ndarray, rows: np.ndarray, sparsity: float, width: int = 1,
              damping: float = DEFAULT_DAMPING, max_dim: int = MAX_DIM, column_block: int = COLUMN_BLOCK,
              h: np.ndarray | None = None, h_factor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prune weight [m, n] (output × input) to `sparsity` in 1×`width` blocks along the input dimension,
    minimising the output error on sample input rows [N, n]. Returns (updated weight float32 with exact zeros,
    keep mask). `h`: the damped H of `rows` when the caller has it (n ≤ max_dim); `h_factor`: its inverse Cholesky
    factor, likewise."""
    w_in = np.asarray(weight)
    m, n = w_in.shape
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if width < 1 or n % width:
        raise ValueError(f"block width {width} does not divide {n} inputs")
    column_block = max(width, (column_block // width) * width)
    x = np.asarray(rows)
    if x.ndim != 2 or x.shape[1] != n:
        raise ValueError(f"rows {x.shape} do not match {n} inputs")
    chunks = _chunks(n, max_dim, column_block)

    def factor(a, b):
        if len(chunks) == 1 and h_factor is not None:
            return h_factor
        return inverse_cholesky_upper(h if h is not None and len(chunks) == 1 else hessian(x[:, a:b], damping)[0])

    # Pass 1: the layer-wide split of the units to remove over the column blocks, by OBS saliency. With one
    # chunk its factor is kept; with several, each is recomputed in pass 2 (one n² factor in memory at a time).
    scores, kept_factor = [], None
    for a, b in chunks:
        u = factor(a, b)
        scores.append(_unit_scores(np.asarray(w_in[:, a:b], np.float64), np.sum(u * u, axis=0), width)
                      .astype(np.float32))
        kept_factor = u if len(chunks) == 1 else None
    quota = _quota(scores, sparsity, column_block // width)
    del scores
    # Pass 2: SparseGPT chunk by chunk.
    keep = np.ones((m, n), bool)
    out = np.empty((m, n), np.float32)
    block_index = 0
    for a, b in chunks:
        u = kept_factor if kept_factor is not None else factor(a, b)
        w = np.asarray(w_in[:, a:b], np.float64).copy()
        blocks = -(-(b - a) // column_block)
        pruned = _sparsegpt_chunk(w, u, quota[block_index:block_index + blocks], width, column_block)
        block_index += blocks
        keep[:, a:b] = ~pruned
        out[:, a:b] = w
    return out, keep


class _LowRankHessian:
    """H = δI + AᵀA with A = X/√N [N, n], for N < n: products and solves of size N, nothing n × n."""

    def __init__(self, rows: np.ndarray, damping: float):
        from scipy import linalg
        x = np.asarray(rows, np.float64)
        self.a = x / np.sqrt(max(len(x), 1))
        n = self.a.shape[1]
        mean_diag = float(np.sum(self.a * self.a)) / n
        self.delta = damping * mean_diag if mean_diag > 0 else 1.0
        self.gram = self.a @ self.a.T
        self.core = linalg.cho_factor(self.gram + self.delta * np.eye(len(self.a)), lower=True)  # δI + AAᵀ

    def inv_diag(self) -> np.ndarray:
        """diag(H⁻¹) by Woodbury: H⁻¹ = (I − Aᵀ(δI + AAᵀ)⁻¹A)/δ."""
        from scipy import linalg
        return (1.0 - np.sum(self.a * linalg.cho_solve(self.core, self.a), axis=0)) / self.delta

    def solve_right(self, b: np.ndarray) -> np.ndarray:
        """B·H⁻¹ for B [m, n]."""
        from scipy import linalg
        return (b - linalg.cho_solve(self.core, self.a @ b.T).T @ self.a) / self.delta


def start_weights(weight: np.ndarray, rows: np.ndarray, target_rows: np.ndarray | None, damping: float):
    """The weights to prune: W itself, or for sequential pruning (inputs x changed from the original model's t)
    argmin E‖W·t − W'·x‖² + δ‖W − W'‖² = (W·E[t xᵀ] + δW)·H⁻¹ (then pruning W' in the H metric minimises the
    same objective)."""
    if target_rows is None:
        return np.asarray(weight)
    w = np.asarray(weight, np.float64)
    x, t = np.asarray(rows, np.float64), np.asarray(target_rows, np.float64)
    n = w.shape[1]
    if len(x) < n:
        lr = _LowRankHessian(x, damping)
        return lr.solve_right((w @ t.T / len(t)) @ x + lr.delta * w)
    h, delta = hessian(x, damping)
    rhs = (w @ t.T / len(t)) @ x + delta * w
    from scipy import linalg
    return linalg.cho_solve(linalg.cho_factor(h), rhs.T).T


def refit_kept(weight: np.ndarray, keep: np.ndarray, rows: np.ndarray, damping: float = DEFAULT_DAMPING,
               h: np.ndarray | None = None, low_rank: "_LowRankHessian | None" = None) -> np.ndarray:
    """For a given mask, every row's kept weights at the exact optimum of (w − ŵ)ᵀH(w − ŵ) (pruned ones zero).
    Fewer rows N than inputs n: a ridge problem of size N per row, ŵ_K = w_K + A_Kᵀ(δI + A_K A_Kᵀ)⁻¹ A_P w_P;
    otherwise H_KK ŵ_K = H_K: w. Returns float32."""
    w_all = np.asarray(weight)
    m, n = w_all.shape
    x = np.asarray(rows)
    out = np.zeros((m, n), np.float32)
    if len(x) < n:
        lr = low_rank or _LowRankHessian(x, damping)
        a, eye = lr.a, lr.delta * np.eye(len(lr.a))
        for i in range(m):
            w = np.asarray(w_all[i], np.float64)
            k_idx, p_idx = np.flatnonzero(keep[i]), np.flatnonzero(~keep[i])
            a_k, a_p = a[:, k_idx], a[:, p_idx]
            g = eye + a_k @ a_k.T if len(k_idx) <= len(p_idx) else eye + lr.gram - a_p @ a_p.T
            out[i, k_idx] = w[k_idx] + a_k.T @ np.linalg.solve(g, a_p @ w[p_idx])
        return out
    from scipy import linalg
    if h is None:
        h, _ = hessian(x, damping)
    for i in range(m):
        w = np.asarray(w_all[i], np.float64)
        k_idx = np.flatnonzero(keep[i])
        if len(k_idx):
            out[i, k_idx] = linalg.solve(h[np.ix_(k_idx, k_idx)], h[k_idx] @ w, assume_a="pos", check_finite=False)
    return out


def refit_cost(m: int, n: int, n_rows: int, sparsity: float) -> float:
    """Rough flops of `refit_kept`."""
    small = min(sparsity, 1 - sparsity) * n
    return m * n_rows * n_rows * small if n_rows < n else m * small ** 3 / 3


# Above this many flops for a layer the exact refit is left out (SparseGPT's own update stays); for layers
# wider than max_dim (no full H) up to WIDE_REFIT_BUDGET, beyond it block-diagonal SparseGPT.
REFIT_BUDGET = 5e10
WIDE_REFIT_BUDGET = 1e12


def prune(weight: np.ndarray, rows: np.ndarray, sparsity: float, width: int = 1,
          damping: float = DEFAULT_DAMPING, target_rows: np.ndarray | None = None, max_dim: int = MAX_DIM,
          cache: dict | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Data-aware pruning of weight [m, n] on sample input rows [N, n]: (pruned float32 weight, keep mask,
    method). The mask comes from SparseGPT (or, for layers wider than `max_dim` inputs with fewer samples than
    inputs, from the one-shot OBS saliency w_q²/[H⁻¹]_qq); the kept weights then get the exact optimum for that
    mask where that is affordable (it is clearly better than SparseGPT's left-to-right update when the inputs
    are strongly correlated), else keep SparseGPT's update (block-diagonal for wide layers with many samples).
    `cache`: a dict kept between calls on the same rows and damping (the budget tries several sparsities of one
    layer): H, its factor and the low-rank form are computed once."""
    from .svd import single_threaded_lapack
    # One BLAS thread: the Cholesky factors, triangular solves and per-row refits are many mid-sized calls, and
    # OpenBLAS's hand-offs between threads cost far more than they save on a shared machine (VGG16's 128 x 1152
    # conv: 1.3 s CPU on one thread, 14.5 s on two at load average 6).
    with single_threaded_lapack():
        return _prune(weight, rows, sparsity, width, damping, target_rows, max_dim,
                      {} if cache is None or target_rows is not None else cache)


def _prune(weight, rows, sparsity, width, damping, target_rows, max_dim, cache: dict):
    def cached(key, make):
        if key not in cache:
            cache[key] = make()
        return cache[key]
    w0 = start_weights(weight, rows, target_rows, damping)
    m, n = w0.shape
    x = np.asarray(rows)
    low_rank = (lambda: cached("low_rank", lambda: _LowRankHessian(x, damping))) if len(x) < n else (lambda: None)
    if n > max_dim and len(x) < n and refit_cost(m, n, len(x), sparsity) <= WIDE_REFIT_BUDGET:
        if width < 1 or n % width:
            raise ValueError(f"block width {width} does not divide {n} inputs")
        inv_diag = cached("inv_diag", lambda: low_rank().inv_diag())
        scores = _unit_scores(np.asarray(w0, np.float32), inv_diag.astype(np.float32), width)
        keep = ~np.repeat(lowest_count_mask(scores, int(round(sparsity * scores.size))), width, axis=1)
        del scores
        return refit_kept(w0, keep, x, damping, low_rank=low_rank()), keep, "obs"
    h = cached("h", lambda: hessian(x, damping)[0]) if n <= max_dim else None
    u = cached("u", lambda: inverse_cholesky_upper(h)) if h is not None else None
    pruned, keep = sparsegpt(w0, x, sparsity, width=width, damping=damping, max_dim=max_dim, h=h, h_factor=u)
    if refit_cost(m, n, len(x), sparsity) <= REFIT_BUDGET:
        return (refit_kept(w0, keep, x, damping, h=h if len(x) >= n else None, low_rank=low_rank()), keep,
                "sparsegpt+refit")
    return pruned, keep, "sparsegpt"


def output_error(weight: np.ndarray, approx: np.ndarray, rows: np.ndarray,
                 target_rows: np.ndarray | None = None) -> float:
    """‖W·T − Ŵ·X‖ / ‖W·T‖ on sample rows (T = X unless the inputs changed): the layer's relative output error."""
    x = np.asarray(rows, np.float32)
    t = x if target_rows is None else np.asarray(target_rows, np.float32)
    ref = t @ np.asarray(weight, np.float32).T
    diff = ref - x @ np.asarray(approx, np.float32).T
    den = float(np.linalg.norm(ref))
    return float(np.linalg.norm(diff)) / den if den > 0 else 0.0


def depthwise_hessians(rows: np.ndarray, damping: float = DEFAULT_DAMPING) -> tuple[np.ndarray, np.ndarray]:
    """(per channel c the damped H_c = X_cᵀX_c/N + δ_c·I [C, k, k], δ [C]) of depthwise input rows [N, k, C]
    (each channel's k = kh·kw taps; δ_c: `damping` × the mean of diag(X_cᵀX_c/N))."""
    x = np.asarray(rows, np.float64)
    h = np.einsum("nkc,nlc->ckl", x, x) / max(len(x), 1)
    mean_diag = np.einsum("ckk->c", h) / h.shape[1]
    delta = np.where(mean_diag > 0, damping * mean_diag, 1.0)
    h[:, np.arange(h.shape[1]), np.arange(h.shape[1])] += delta[:, None]
    return h, delta


def prune_depthwise(weight: np.ndarray, rows: np.ndarray, sparsity: float, damping: float = DEFAULT_DAMPING,
                    target_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Exact OBS (OBC) for a depthwise layer: weight [k, C] (taps × channels), sample rows [N, k, C] (the
    channel's own k taps at sampled positions). Every channel is its own k-input least-squares problem, so the
    layer's round(sparsity·k·C) removals are made one weight at a time, each time the one of least OBS cost
    w_q²/[H_c⁻¹]_qq over all channels (the increase of the layer's summed squared output error), the rest of its
    channel updated exactly and H_c⁻¹ restricted to the channel's remaining weights. The kept weights end at the
    exact optimum for the mask. With `target_rows` (sequential: the original model's inputs at the same
    positions) each channel starts from its best fit to the original outputs (`start_weights`, per channel).
    Returns (pruned float32 weight [k, C] with exact zeros, keep mask, method)."""
    w = np.asarray(weight, np.float64).T.copy()  # [C, k]
    channels, k = w.shape
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    h, delta = depthwise_hessians(rows, damping)
    if target_rows is not None:  # w'_c = H_c⁻¹(E[x tᵀ]_c w_c + δ_c w_c)
        x, t = np.asarray(rows, np.float64), np.asarray(target_rows, np.float64)
        cross = np.einsum("nkc,nlc->ckl", x, t) / max(len(x), 1)
        w = np.linalg.solve(h, (np.einsum("ckl,cl->ck", cross, w) + delta[:, None] * w)[..., None])[..., 0]
    h_inv = np.linalg.inv(h)
    alive = np.ones((channels, k), bool)
    cost = w * w / np.einsum("ckk->ck", h_inv)
    for _ in range(int(round(sparsity * channels * k))):
        c, q = divmod(int(np.argmin(np.where(alive, cost, np.inf))), k)
        hc, wc = h_inv[c], w[c]
        col = hc[:, q].copy()
        wc -= (wc[q] / col[q]) * col
        hc -= np.outer(col, col) / col[q]
        wc[q], alive[c, q] = 0.0, False
        wc[~alive[c]] = 0.0
        diag = np.diag(hc)
        cost[c] = np.where(alive[c] & (diag > 0), wc * wc / np.where(diag > 0, diag, 1.0), np.inf)
    return w.T.astype(np.float32), alive.T, "obs"


def depthwise_output_error(weight: np.ndarray, approx: np.ndarray, rows: np.ndarray,
                           target_rows: np.ndarray | None = None) -> float:
    """The depthwise layer's relative output error on sample rows [N, k, C] (weights [k, C])."""
    x = np.asarray(rows, np.float32)
    t = x if target_rows is None else np.asarray(target_rows, np.float32)
    ref = np.einsum("nkc,kc->nc", t, np.asarray(weight, np.float32))
    den = float(np.linalg.norm(ref))
    return float(np.linalg.norm(ref - np.einsum("nkc,kc->nc", x, np.asarray(approx, np.float32)))) / den \
        if den > 0 else 0.0
