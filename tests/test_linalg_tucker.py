import numpy as np
import pytest

from tfrewrite.linalg import TuckerResult, tucker2, tucker2_reconstruct


def tucker_tensor(shape, r_out, r_in, seed):
    rng = np.random.default_rng(seed)
    t, k, s = shape
    core = rng.standard_normal((r_out, k, r_in))
    u = np.linalg.qr(rng.standard_normal((t, r_out)))[0]
    v = np.linalg.qr(rng.standard_normal((s, r_in)))[0]
    return tucker2_reconstruct(u, core, v)


def test_exact_multilinear_rank_recovered():
    x = tucker_tensor((20, 9, 16), 5, 4, 0)
    res = tucker2(x, 5, 4)
    assert isinstance(res, TuckerResult)
    assert res.out_factor.shape == (20, 5) and res.core.shape == (5, 9, 4) and res.in_factor.shape == (16, 4)
    assert res.rel_error < 1e-10
    np.testing.assert_allclose(tucker2_reconstruct(res.out_factor, res.core, res.in_factor), x, atol=1e-10)


def test_factors_orthonormal_and_error_consistent():
    x = np.random.default_rng(1).standard_normal((30, 9, 25))
    res = tucker2(x, 7, 6)
    np.testing.assert_allclose(res.out_factor.T @ res.out_factor, np.eye(7), atol=1e-12)
    np.testing.assert_allclose(res.in_factor.T @ res.in_factor, np.eye(6), atol=1e-12)
    recon = tucker2_reconstruct(res.out_factor, res.core, res.in_factor)
    np.testing.assert_allclose(np.linalg.norm(x - recon) / np.linalg.norm(x), res.rel_error, rtol=1e-10)


def test_error_decreases_with_rank_and_full_rank_exact():
    rng = np.random.default_rng(2)
    x = tucker_tensor((24, 9, 18), 24, 18, 2) * np.geomspace(1, 0.01, 24)[:, None, None]
    errors = [tucker2(x, r, r).rel_error for r in (1, 2, 4, 8, 16)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert tucker2(x, 24, 18).rel_error < 1e-12
    assert tucker2(x, 100, 100).core.shape == (24, 9, 18)  # ranks clipped to mode sizes
    del rng


def test_hooi_not_worse_than_hosvd():
    x = np.random.default_rng(3).standard_normal((20, 9, 20)) ** 3
    hosvd = tucker2(x, 5, 5, n_iter_max=0)
    hooi = tucker2(x, 5, 5)
    assert hooi.rel_error <= hosvd.rel_error + 1e-12


def test_deterministic_and_zero_tensor():
    x = np.random.default_rng(4).standard_normal((10, 9, 8))
    r1, r2 = tucker2(x, 3, 3), tucker2(x, 3, 3)
    assert np.array_equal(r1.core, r2.core) and np.array_equal(r1.out_factor, r2.out_factor)
    z = tucker2(np.zeros((4, 9, 5)), 2, 2)
    assert z.rel_error == 0.0 and np.all(z.core == 0)
    with pytest.raises(ValueError):
        tucker2(np.ones((3, 3)), 1, 1)
