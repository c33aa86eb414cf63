"""Choosing which channels to remove from sample inputs, and refitting the layers that read them.

A layer that reads the channels maps an input row x (its k·k·C patch or FC input, length n) to W·x + b. Removing
a set R of input columns changes its output by W_R·(x_R − μ_R) once the mean goes into the bias, so the
expected squared output change is Σ_{u,v ∈ R} G[u, v] with the unit Gram matrix

    G[u, v] = Σ_{i ∈ cols(u), j ∈ cols(v)} C[i, j] · (WᵀW)[i, j],   C = the centred input covariance,

summed over the reading layers (each divided by its own output variance, so that every layer counts by its
relative error). Units are removed greedily, each time the one that adds least (ThiNet, Luo et al. 2017).
Then each reading layer is refitted on its kept columns S by ridge-damped least squares with a bias term
(He et al. 2017): W'_S = argmin ‖(X − μ)Wᵀ − (X_S − μ_S)W'_Sᵀ‖²/N + δ‖W'_S − W_S‖², b' = b + Wμ − W'_S μ_S.
"""
from __future__ import annotations

import numpy as np

# Beyond this many input columns the covariance is not formed: only the diagonal of G and the mean go in.
FULL_COLUMNS = 4608
DEFAULT_DAMPING = 0.05


def moments(rows: np.ndarray, full: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean [n] and centred covariance [n, n] (None when not `full`) of sample rows [N, n], float64."""
    x = np.asarray(rows, np.float64)
    mean = x.mean(axis=0)
    if not full:
        return mean, None
    xc = x - mean
    return mean, xc.T @ xc / max(len(x), 1)


def _blocks(units: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Column order grouping each unit's columns together, and where each unit's block starts."""
    order = np.concatenate(units)
    starts = np.cumsum([0] + [len(u) for u in units[:-1]])
    return order, starts


def unit_gram(weight: np.ndarray, units: list[np.ndarray], cov: np.ndarray | None = None,
              rows: np.ndarray | None = None) -> np.ndarray:
    """G [U, U] for one reading layer, weight [m, n], `units` = each unit's input columns. With `cov` the full
    matrix; without (large n) only its diagonal, from the centred `rows`."""
    w = np.asarray(weight, np.float64)
    if cov is not None:
        order, starts = _blocks(units)
        ws = w[:, order]
        prod = cov[np.ix_(order, order)] * (ws.T @ ws)
        return np.add.reduceat(np.add.reduceat(prod, starts, axis=0), starts, axis=1)
    x = np.asarray(rows, np.float64)
    xc = x - x.mean(axis=0)
    diag = np.empty(len(units))
    for k, cols in enumerate(units):
        wu = w[:, cols]
        cu = xc[:, cols]
        diag[k] = float(np.sum((cu.T @ cu) * (wu.T @ wu))) / max(len(x), 1)
    return np.diag(diag)


def output_variance(weight: np.ndarray, cov: np.ndarray | None = None, rows: np.ndarray | None = None) -> float:
    """E‖W(x − μ)‖²: the layer's output variance on the samples."""
    w = np.asarray(weight, np.float64)
    if cov is not None:
        return float(np.einsum("ij,ij->", w @ cov, w))
    x = np.asarray(rows, np.float64)
    y = (x - x.mean(axis=0)) @ w.T
    return float(np.sum(y * y)) / max(len(x), 1)


def greedy_removal(gram: np.ndarray, remove: int) -> np.ndarray:
    """Indices of `remove` units chosen one by one, each adding least to Σ_{u,v ∈ R} G[u, v] (sorted)."""
    return np.sort(removal_order(gram, remove))


def removal_order(gram: np.ndarray, remove: int) -> np.ndarray:
    """The first `remove` units in the order the greedy removal takes them: removing r of them is always the
    first r (so one pass serves every removal count the budget considers)."""
    g = np.asarray(gram, np.float64)
    increment = np.diag(g).copy()
    taken = np.zeros(len(g), bool)
    out = []
    for _ in range(remove):
        cost = np.where(taken, np.inf, increment)
        u = int(np.argmin(cost))
        out.append(u)
        taken[u] = True
        increment += 2 * g[:, u]
    return np.asarray(out, np.int64)


def refit(weight: np.ndarray, bias: np.ndarray, keep_cols: np.ndarray, rows: np.ndarray,
          target_rows: np.ndarray | None = None, damping: float = DEFAULT_DAMPING
          ) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(W' [m, n] with zeros outside `keep_cols`, b', relative output error) for a layer whose input columns
    outside `keep_cols` are removed, fitted so that W'·x + b' on `rows` reproduces W·x + b on `target_rows`
    (the same sample positions in the original model; default: `rows` themselves). Beyond FULL_COLUMNS kept
    columns the weights stay and only the mean of what changes moves into the bias; the error is then None."""
    w = np.asarray(weight, np.float64)
    b = np.asarray(bias, np.float64)
    x = np.asarray(rows, np.float64)
    t = x if target_rows is None else np.asarray(target_rows, np.float64)
    mu_x, mu_t = x.mean(axis=0), t.mean(axis=0)
    new = np.zeros_like(w)
    if len(keep_cols) > FULL_COLUMNS:
        new[:, keep_cols] = w[:, keep_cols]
        return new, b + w @ mu_t - w[:, keep_cols] @ mu_x[keep_cols], None
    xs = x[:, keep_cols] - mu_x[keep_cols]
    y = (t - mu_t) @ w.T  # the original layer's centred outputs [N, m]
    css = xs.T @ xs / len(x)
    delta = damping * float(np.trace(css)) / max(len(keep_cols), 1) or 1.0
    rhs = xs.T @ y / len(x) + delta * w[:, keep_cols].T
    ws = np.linalg.solve(css + delta * np.eye(len(keep_cols)), rhs).T
    new[:, keep_cols] = ws
    b_new = b + w @ mu_t - ws @ mu_x[keep_cols]
    total = float(np.sum(y * y))
    err = float(np.sum((y - xs @ ws.T) ** 2))
    return new, b_new, (float(np.sqrt(err / total)) if total > 0 else 0.0)


def refit_error(weight: np.ndarray, cov: np.ndarray, keep_cols: np.ndarray, damping: float = DEFAULT_DAMPING,
                held_out: np.ndarray | None = None) -> tuple[float, float]:
    """(E‖W(x − μ) − W'_S(x_S − μ_S)‖², E‖W(x − μ)‖²) for the ridge-damped least-squares fit W'_S that `refit`
    makes on rows of covariance `cov`, from moments alone; measured on rows of covariance `held_out` when given
    (rows the fit did not see: with fewer rows than columns the fit reproduces its own rows exactly)."""
    w = np.asarray(weight, np.float64)
    c = np.asarray(cov, np.float64)
    e = c if held_out is None else np.asarray(held_out, np.float64)
    s = np.asarray(keep_cols, np.int64)
    css = c[np.ix_(s, s)]
    delta = damping * float(np.trace(css)) / max(len(s), 1) or 1.0
    rhs = (w @ c[:, s]).T + delta * w[:, s].T    # Σ_S,: Wᵀ + δ W_Sᵀ
    ws = np.linalg.solve(css + delta * np.eye(len(s)), rhs).T
    we = w @ e
    total = float(np.einsum("ij,ij->", we, w))
    err = total - 2 * float(np.einsum("ij,ij->", we[:, s], ws)) + float(np.einsum("ij,ij->", ws @ e[np.ix_(s, s)], ws))
    return max(err, 0.0), max(total, 0.0)


def held_out_error(weight: np.ndarray, halves: tuple[np.ndarray, np.ndarray], keep_cols: np.ndarray) -> float:
    """Relative output error of the refit on kept columns, fitted on one half of the rows and measured on the
    other, both ways (two-fold cross-validation); `halves`: the two halves' covariances."""
    a, b = halves
    err_ab, total_b = refit_error(weight, a, keep_cols, held_out=b)
    err_ba, total_a = refit_error(weight, b, keep_cols, held_out=a)
    total = total_a + total_b
    return float(np.sqrt((err_ab + err_ba) / total)) if total > 0 else 0.0
