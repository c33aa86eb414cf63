"""Fitting a layer's *outputs* on sample inputs instead of its weights.

A layer maps input rows x (length n: FC inputs, conv pixels, or k·k·C conv patches) to W·x. With sample rows
X [N, n] the fits below minimise the expected output error

    E ‖(W − Ŵ) x‖² + δ ‖W − Ŵ‖²_F   =   ‖(W − Ŵ) Σ^½‖²_F,   Σ = XᵀX / N + δ I,

where the damping δ (a fraction of the mean input energy) keeps directions that the few samples never visit
close to the original weights. Σ is never formed when n is large: its eigen-decomposition comes from the Gram
matrix of the smaller side of X, and Σ^±½ act as "√δ·I plus a low-rank correction".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_DAMPING = 0.05


@dataclass
class InputMetric:
    """Σ = V·diag(lam)·Vᵀ + δ·(I − V·Vᵀ): `basis` V [n, k] orthonormal, `lam` [k] (δ included), `delta` δ."""
    basis: np.ndarray
    lam: np.ndarray
    delta: float
    n: int
    mean: np.ndarray | None = None       # the rows' mean [n]
    centered_delta: float | None = None  # δ of the rows' covariance (the same damping of its smaller energy)

    def sqrt_apply(self, w: np.ndarray, power: float = 0.5) -> np.ndarray:
        """W·Σ^power for W [m, n] (power ±½ or 1)."""
        v = self.basis
        wv = w @ v
        base = self.delta ** power
        return base * w + (wv * (self.lam ** power - base)) @ v.T

    def tempered(self, power: float) -> "InputMetric":
        """Σ^power (same eigenbasis; the damping raised too): between the weights' own metric (power 0, I) and
        the samples' (power 1). Fits only: a tempered metric has no mean to measure errors around."""
        return InputMetric(basis=self.basis, lam=self.lam ** power, delta=self.delta ** power, n=self.n)

    def apply(self, phi: np.ndarray) -> np.ndarray:
        """Σ·Φ for Φ [n, R], through the eigenbasis (cheaper than touching the sample rows again)."""
        v = self.basis
        return v @ ((self.lam - self.delta)[:, None] * (v.T @ phi)) + self.delta * phi


def input_metric(rows: np.ndarray, damping: float = DEFAULT_DAMPING) -> InputMetric:
    """The damped second-moment metric of sample input rows [N, n] (float64 maths), with the rows' mean and the
    damping their covariance would get (`centered_output_error`)."""
    x = np.asarray(rows, np.float64)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    n_rows, n = x.shape
    energy = float(np.sum(x * x)) / max(n_rows, 1) / n  # mean of diag(XᵀX/N)
    delta = damping * energy if energy > 0 else 1.0
    centered_energy = energy - float(mean @ mean) / n
    centered_delta = damping * centered_energy if centered_energy > 0 else 1.0
    if n <= n_rows:
        lam, v = np.linalg.eigh(x.T @ x / n_rows)
    else:
        # Eigenvectors of XᵀX from the small Gram X·Xᵀ: v = Xᵀu / σ.
        g_lam, u = np.linalg.eigh(x @ x.T / n_rows)
        keep = g_lam > g_lam.max(initial=0.0) * 1e-12
        g_lam, u = g_lam[keep], u[:, keep]
        v = (x.T @ u) / np.sqrt(g_lam * n_rows)
        lam = g_lam
    lam = np.maximum(lam, 0.0) + delta
    return InputMetric(basis=v, lam=lam, delta=delta, n=n, mean=mean, centered_delta=centered_delta)


def cross_term(weight: np.ndarray, metric: InputMetric, rows: np.ndarray, target_rows: np.ndarray) -> np.ndarray:
    """B = W·E[t·xᵀ] + δ·W, for fitting Ŵ·x to the original W·t when the layer's inputs have changed from t
    (original model) to x (already rewritten layers before it; rows sampled at the same positions).
    Without a change (t = x) B = W·Σ, and every fit below reduces to its plain form."""
    w = np.asarray(weight, np.float64)
    x = np.asarray(rows, np.float64)
    t = np.asarray(target_rows, np.float64)
    return (w @ t.T) @ x / x.shape[0] + metric.delta * w


def output_lowrank_factors(weight: np.ndarray, metric: InputMetric, rank: int, cross: np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Rank-r (left [m, r], right [r, n]) minimising ‖(W − L·R) Σ^½‖_F: the truncated SVD of W·Σ^½, mapped back
    through Σ^-½. Exact for this objective (Eckart–Young in the Σ metric). With `cross` (B of `cross_term`) the
    objective is E‖W·t − L·R·x‖² + δ‖W − L·R‖² instead: reduced-rank regression, the SVD of B·Σ^-½."""
    from .svd import truncated_svd
    w = np.asarray(weight)
    target = metric.sqrt_apply(w, 0.5) if cross is None else metric.sqrt_apply(np.asarray(cross, np.float64), -0.5)
    if target.size > 10_000_000:  # large layers: the truncated SVD works in float32 anyway; halve the memory
        target = target.astype(np.float32)
    u, s, vt = truncated_svd(target, rank)
    root = np.sqrt(s)
    right = metric.sqrt_apply(root[:, None] * vt, -0.5)
    return (u * root).astype(np.float32), right.astype(np.float32)


def whitened_singular_values(weight: np.ndarray, metric: InputMetric) -> np.ndarray:
    """All singular values of W·Σ^½: damage(r)² = Σ_{i>r} s_i² / Σ s_i² for every rank at once."""
    m = metric.sqrt_apply(np.asarray(weight, np.float64), 0.5)
    small = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return np.sqrt(np.maximum(np.linalg.eigvalsh(small)[::-1], 0.0))


def output_error(weight: np.ndarray, approx: np.ndarray, metric: InputMetric) -> float:
    """‖(W − Ŵ) Σ^½‖ / ‖W Σ^½‖: the layer's relative output error on the (damped) sample inputs."""
    w = np.asarray(weight, np.float64)
    d = metric.sqrt_apply(w - np.asarray(approx, np.float64), 0.5)
    ref = metric.sqrt_apply(w, 0.5)
    den = float(np.linalg.norm(ref))
    return float(np.linalg.norm(d)) / den if den > 0 else 0.0


def lowrank_output_error(weight: np.ndarray, left: np.ndarray, right: np.ndarray, metric: InputMetric,
                         centered: bool = False) -> float:
    """`output_error` of Ŵ = L·R without forming Ŵ or a float64 copy of W (VGG16's fc1 is 400 MB in float32):
    ‖(W − LR)Σ^½‖² = δ‖W − LR‖² + Σ_j (λ_j − δ)‖(W − LR)v_j‖². `centered`: `centered_output_error`'s."""
    from .svd import squared_norm
    v = metric.basis
    left64, right64 = np.asarray(left, np.float64), np.asarray(right, np.float64)
    wv = weight @ v
    dv = wv - left64 @ (right64 @ v)
    extra = metric.lam - metric.delta
    w_norm2 = squared_norm(weight)
    wr = np.asarray(weight @ right64.T.astype(weight.dtype), np.float64)
    diff_norm2 = max(w_norm2 - 2 * float(np.sum(left64 * wr)) +
                     float(np.sum((left64.T @ left64) * (right64 @ right64.T))), 0.0)
    num = metric.delta * diff_norm2 + float(np.sum(extra * np.sum(dv * dv, axis=0)))
    den = metric.delta * w_norm2 + float(np.sum(extra * np.sum(wv * wv, axis=0)))
    if centered:
        w_mean = np.asarray(weight @ metric.mean.astype(weight.dtype), np.float64)
        d_mean = w_mean - left64 @ (right64 @ metric.mean)
        num, den = _centered(num, den, d_mean, w_mean, diff_norm2, w_norm2, metric)
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def centered_output_error(weight: np.ndarray, approx: np.ndarray, metric: InputMetric) -> float:
    """The relative output error around the rows' mean, ‖(W − Ŵ)Σ_c^½‖ / ‖W·Σ_c^½‖ with Σ_c = C + δ_c·I the
    rows' damped covariance (what remains after a bias correction restores the mean output), from the
    second-moment metric alone: C = XᵀX/N − μμᵀ, so ‖E·Σ_c^½‖² = ‖E·Σ^½‖² − ‖Eμ‖² + (δ_c − δ)‖E‖²
    (no second eigendecomposition of the rows)."""
    w = np.asarray(weight, np.float64)
    e = w - np.asarray(approx, np.float64)
    num, den = (float(np.sum(metric.sqrt_apply(a, 0.5) ** 2)) for a in (e, w))
    num, den = _centered(num, den, e @ metric.mean, w @ metric.mean, float(np.sum(e * e)), float(np.sum(w * w)),
                         metric)
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def _centered(num: float, den: float, e_mean, w_mean, e_norm2: float, w_norm2: float, metric: InputMetric):
    """Squared error and signal in the uncentered metric → around the mean (see `centered_output_error`)."""
    shift = metric.centered_delta - metric.delta
    return (num - float(np.sum(np.square(e_mean))) + shift * e_norm2,
            den - float(np.sum(np.square(w_mean))) + shift * w_norm2)


def refit_output_factor(weight: np.ndarray, features: np.ndarray, metric: InputMetric,
                        cross: np.ndarray | None = None) -> np.ndarray:
    """Given the chain's linear map to its bottleneck, z = Φᵀx (Φ = `features` [n, R]), the last factor
    A [m, R] minimising ‖(W − A·Φᵀ) Σ^½‖: A = (W·Σ·Φ)(Φᵀ·Σ·Φ)⁻¹ — ridge least squares on the samples."""
    w = np.asarray(weight, np.float64)
    phi = np.asarray(features, np.float64)
    sigma_phi = metric.apply(phi)  # Σ = XᵀX/N + δI: the same objective as the SVD fits
    gram = phi.T @ sigma_phi
    gram = 0.5 * (gram + gram.T) + 1e-12 * np.trace(gram) / len(gram) * np.eye(len(gram))
    rhs = w @ sigma_phi if cross is None else np.asarray(cross, np.float64) @ phi
    try:
        return np.linalg.solve(gram, rhs.T).T
    except np.linalg.LinAlgError:  # a zero Φ (an all-zero kernel's factors): the least-squares answer, zero
        return np.linalg.lstsq(gram, rhs.T, rcond=None)[0].T


def tucker2_output_fit(weight3: np.ndarray, in_factor: np.ndarray, rank_out: int, metric: InputMetric,
                       cross: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tucker-2 of a conv kernel [O, K, C] fitted to outputs: given the input factor V [C, R_in], the output
    factor U [O, R_out] and core [R_out, K, R_in] by reduced-rank regression — the best unconstrained map from
    the reduced patches z = (I_K ⊗ Vᵀ)x, then its top-R_out output directions in the Σ metric."""
    o, k, c = weight3.shape
    v = np.asarray(in_factor, np.float64)
    r_in = v.shape[1]
    phi = np.kron(np.eye(k), v)  # [K·C, K·R_in]: patch → reduced patch (patch layout is [K, C])
    a = refit_output_factor(weight3.reshape(o, k * c), phi, metric, cross)  # [O, K·R_in]
    cov_z = phi.T @ metric.apply(phi)
    pred = a @ cov_z @ a.T  # covariance of the predicted outputs
    lam, vec = np.linalg.eigh(0.5 * (pred + pred.T))
    u = vec[:, ::-1][:, :rank_out]
    core = (u.T @ a).reshape(rank_out, k, r_in)
    return u, core


def bias_shift(weight: np.ndarray, approx: np.ndarray, mean_input: np.ndarray,
               target_mean: np.ndarray | None = None) -> np.ndarray:
    """W·E[t] − Ŵ·E[x] (t = x unless the inputs changed): added to the bias, the mean output on the samples
    matches the original's."""
    t = mean_input if target_mean is None else target_mean
    return np.asarray(weight, np.float64) @ np.asarray(t, np.float64) - \
        np.asarray(approx, np.float64) @ np.asarray(mean_input, np.float64)
