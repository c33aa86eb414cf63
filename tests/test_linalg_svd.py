import numpy as np
import pytest

from tfrewrite.linalg import svd as S
from tfrewrite.linalg import (
    lowrank_factors,
    rank_for_energy,
    rank_for_ratio,
    svd_break_even_rank,
    truncated_svd,
    whitened_lowrank_factors,
)


def lowrank_plus_noise(m, n, k, noise, seed):
    rng = np.random.default_rng(seed)
    # Gaussian columns / sqrt(dim) are near-orthonormal; no QR needed.
    u = rng.standard_normal((m, k)) / np.sqrt(m)
    v = rng.standard_normal((n, k)) / np.sqrt(n)
    return (u * np.geomspace(100.0, 1.0, k)) @ v.T + noise * rng.standard_normal((m, n))


def exact_svd(a):
    """Reference thin SVD; for big inputs via the small-side Gram matrix (cheaper
    than LAPACK's gesdd with vectors, still ~1e-12 accurate for these spectra)."""
    a = a.astype(np.float64)
    if a.size < 200_000:
        return np.linalg.svd(a, full_matrices=False)
    if a.shape[0] < a.shape[1]:
        v, s, ut = exact_svd(a.T)
        return ut.T, s, v.T
    lam, w = np.linalg.eigh(a.T @ a)
    lam, w = lam[::-1], w[:, ::-1]
    s = np.sqrt(np.clip(lam, 0, None))
    return (a @ w) / s, s, w.T


def assert_matches_exact(a, rank, u, s, vt, s_tol=1e-6, vec_tol=1e-5):
    ue, se, vte = exact_svd(a)
    assert u.shape == (a.shape[0], rank) and s.shape == (rank,) and vt.shape == (rank, a.shape[1])
    assert np.max(np.abs(s - se[:rank]) / se[:rank]) <= s_tol
    # Well-separated singular values: vectors agree up to sign.
    assert np.all(np.abs(np.sum(u * ue[:, :rank], axis=0)) >= 1 - vec_tol)
    assert np.all(np.abs(np.sum(vt * vte[:rank], axis=1)) >= 1 - vec_tol)
    np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-8)
    np.testing.assert_allclose(vt @ vt.T, np.eye(rank), atol=1e-8)


def test_small_matrix_matches_lapack():
    a = lowrank_plus_noise(60, 40, 30, 1e-3, 0)
    u, s, vt = truncated_svd(a, 10)
    assert_matches_exact(a, 10, u, s, vt, s_tol=1e-12, vec_tol=1e-10)


@pytest.mark.parametrize("shape", [(2100, 480), (480, 2100)])
def test_randomized_path_matches_lapack(shape):
    # > 1e6 elements and rank < min/2: the randomized path is taken.
    a = lowrank_plus_noise(*shape, k=60, noise=1e-3, seed=1).astype(np.float32)
    assert a.size >= S._FULL_SVD_MAX_ELEMENTS
    u, s, vt = truncated_svd(a, 40)
    assert_matches_exact(a, 40, u, s, vt)


def test_randomized_path_direct_and_deterministic():
    a = lowrank_plus_noise(800, 300, 50, 1e-4, 2)
    u, s, vt = S._subspace_svd(a, 20, seed=3)
    assert_matches_exact(a, 20, u, s, vt)
    u2, s2, vt2 = S._subspace_svd(a, 20, seed=3)
    assert np.array_equal(s, s2) and np.array_equal(u, u2) and np.array_equal(vt, vt2)


def test_randomized_path_error_near_optimal_on_flat_spectrum():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((900, 400))
    u, s, vt = S._subspace_svd(a, 30)
    se = np.linalg.svd(a, compute_uv=False)
    best = np.sqrt(np.sum(se[30:] ** 2))
    err = np.linalg.norm(a - (u * s) @ vt)
    assert err <= best * 1.01
    assert np.all(s <= se[:30] * (1 + 1e-10))  # Ritz values converge from below


def test_full_rank_factors_reconstruct_exactly():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((30, 20))
    left, right = lowrank_factors(a, 20)
    assert left.dtype == np.float32 and right.dtype == np.float32
    assert left.shape == (30, 20) and right.shape == (20, 20)
    assert np.linalg.norm(left.astype(np.float64) @ right - a) / np.linalg.norm(a) < 1e-6
    # Balanced: column r of left and row r of right both have norm sqrt(s_r).
    np.testing.assert_allclose(np.linalg.norm(left, axis=0), np.linalg.norm(right, axis=1), rtol=1e-5)


def test_lowrank_factors_is_best_rank_r():
    a = lowrank_plus_noise(50, 40, 40, 0.0, 6)
    left, right = lowrank_factors(a, 8)
    se = np.linalg.svd(a, compute_uv=False)
    err = np.linalg.norm(a - left.astype(np.float64) @ right)
    np.testing.assert_allclose(err, np.sqrt(np.sum(se[8:] ** 2)), rtol=1e-4)


def test_rank_clipped_and_validated():
    a = np.ones((5, 3))
    u, s, vt = truncated_svd(a, 10)
    assert s.shape == (3,)
    with pytest.raises(ValueError):
        truncated_svd(a, 0)
    with pytest.raises(ValueError):
        truncated_svd(np.ones(4), 1)


def test_rank_for_energy():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 9 / 14 + 1e-9) == 2
    assert rank_for_energy(s, 13 / 14) == 2
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(s, 0.0) == 1
    assert rank_for_energy(s[::-1], 0.5) == 1  # order does not matter
    assert rank_for_energy(np.zeros(4), 0.9) == 1
    with pytest.raises(ValueError):
        rank_for_energy(s, 1.5)


@pytest.mark.parametrize("m,n", [(1, 1), (2, 2), (3, 7), (64, 64), (512, 4608), (4096, 25088)])
def test_svd_break_even_rank_brute_force(m, n):
    r = svd_break_even_rank(m, n)
    assert r * (m + n) < m * n
    assert (r + 1) * (m + n) >= m * n


def test_rank_for_ratio():
    assert rank_for_ratio(100, 100, 1) == 50
    assert rank_for_ratio(100, 100, 4) == 12
    assert rank_for_ratio(4096, 25088, 10) == int(4096 * 25088 / (10 * (4096 + 25088)))
    assert rank_for_ratio(3, 3, 1000) == 1
    with pytest.raises(ValueError):
        rank_for_ratio(3, 3, 0)


def correlated_inputs(n, count, seed):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, n)) * np.geomspace(10.0, 0.01, n)
    return rng.standard_normal((count, n)) @ mix.T  # [samples, n], strongly anisotropic


def test_whitened_beats_plain_svd_on_samples():
    rng = np.random.default_rng(7)
    m, n, r = 30, 40, 6
    w = rng.standard_normal((m, n))
    x = correlated_inputs(n, 2000, 8)
    cov = x.T @ x / len(x)
    lw, rw = whitened_lowrank_factors(w, cov, r)
    lp, rp = lowrank_factors(w, r)
    err_white = np.linalg.norm(x @ (w - lw.astype(np.float64) @ rw).T)
    err_plain = np.linalg.norm(x @ (w - lp.astype(np.float64) @ rp).T)
    assert lw.shape == (m, r) and rw.shape == (r, n) and lw.dtype == np.float32
    assert err_white <= err_plain
    assert err_white < 0.5 * err_plain  # anisotropic inputs: a real gain

    # It is the optimum: matches the best rank-r approximation of W @ chol(cov).
    c = np.linalg.cholesky(cov + 1e-6 * np.mean(np.diag(cov)) * np.eye(n))
    se = np.linalg.svd(w @ c, compute_uv=False)
    achieved = np.linalg.norm((w - lw.astype(np.float64) @ rw) @ c)
    np.testing.assert_allclose(achieved, np.sqrt(np.sum(se[r:] ** 2)), rtol=1e-4)


def test_whitened_with_identity_cov_is_plain_svd():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((20, 15))
    lw, rw = whitened_lowrank_factors(w, np.eye(15), 5, damping=0.0)
    lp, rp = lowrank_factors(w, 5)
    np.testing.assert_allclose(lw.astype(np.float64) @ rw, lp.astype(np.float64) @ rp, atol=1e-5)


def test_whitened_singular_cov_is_finite():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((12, 10))
    x = rng.standard_normal((5, 10))  # rank-5 covariance: singular without damping
    lw, rw = whitened_lowrank_factors(w, x.T @ x, 4)
    assert np.all(np.isfinite(lw)) and np.all(np.isfinite(rw))
