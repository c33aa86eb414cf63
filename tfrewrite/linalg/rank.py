"""Parameter counts, break-even ranks and rank choice for SVD / CP / Tucker-2.

Conv kernels are viewed as ``[T, K, S]`` = ``[out, kh*kw, in]``. Bias terms are not
counted (they are the same with or without the decomposition).
"""
import math

import numpy as np

from .svd import rank_for_energy


def svd_params(m, n, r):
    """Weights in ``left [m,r]`` + ``right [r,n]``."""
    return int(r) * (int(m) + int(n))


def cp_params(T, K, S, R):
    """Weights in pointwise S->R + depthwise K per channel + pointwise R->T."""
    return int(R) * (int(S) + int(K) + int(T))


def tucker2_params(T, K, S, r_out, r_in):
    """Weights in pointwise S->r_in + conv core r_in->r_out (K taps) + pointwise r_out->T."""
    return int(S) * int(r_in) + int(K) * int(r_in) * int(r_out) + int(r_out) * int(T)


def cp_max_useful_rank(T, K, S):
    """Largest R with ``R*(S+K+T) < K*S*T`` (0 if none)."""
    return (int(K) * int(S) * int(T) - 1) // (int(S) + int(K) + int(T))


def cp_rank_for_ratio(T, K, S, ratio):
    """CP rank with about ``T*K*S/ratio`` params (floor, >= 1)."""
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    return max(1, math.floor(int(T) * int(K) * int(S) / (ratio * (int(T) + int(K) + int(S)))))


def tucker2_ranks_for_ratio(T, K, S, ratio):
    """``(r_out, r_in)`` with ``r_out/r_in ~= T/S`` and params <= ``T*K*S/ratio``.

    With ``r_out = a*T``, ``r_in = a*S`` the params are ``K*T*S*a^2 + (T^2+S^2)*a``;
    solve for ``a`` and floor (each rank at least 1, at most its mode size).
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    T, K, S = int(T), int(K), int(S)
    budget = T * K * S / ratio
    qa, qb = K * T * S, T * T + S * S
    alpha = (-qb + math.sqrt(qb * qb + 4.0 * qa * budget)) / (2.0 * qa)
    r_out = min(T, max(1, math.floor(alpha * T + 1e-9)))
    r_in = min(S, max(1, math.floor(alpha * S + 1e-9)))
    return r_out, r_in


def _unfolding_singular_values(x, mode):
    unf = np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)
    # Eigenvalues of the small Gram matrix are the squared singular values.
    lam = np.linalg.eigvalsh(unf @ unf.T)
    return np.sqrt(np.clip(lam, 0.0, None))[::-1]


def tucker2_ranks_for_energy(tensor, energy):
    """``(r_out, r_in)``: smallest ranks keeping ``energy`` of the mode-0 / mode-2 unfoldings."""
    x = np.asarray(tensor, dtype=np.float64)
    return (rank_for_energy(_unfolding_singular_values(x, 0), energy),
            rank_for_energy(_unfolding_singular_values(x, 2), energy))


def cp_rank_for_energy(tensor, energy):
    """Heuristic CP rank: ``max`` of the mode-0 and mode-2 unfolding ranks for ``energy``.

    A rank-R CP model has unfoldings of rank <= R, so this is a lower bound on
    what CP needs to keep that energy; CP at this rank usually keeps a bit less
    (it is not an orthogonal projection). It never exceeds ``max(T, S)``.
    """
    r_out, r_in = tucker2_ranks_for_energy(tensor, energy)
    return max(r_out, r_in)
