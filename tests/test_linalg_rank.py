import numpy as np
import pytest

from tfrewrite.linalg import (
    cp3,
    cp_max_useful_rank,
    cp_params,
    cp_rank_for_energy,
    cp_rank_for_ratio,
    cp_reconstruct,
    svd_params,
    tucker2,
    tucker2_params,
    tucker2_ranks_for_energy,
    tucker2_ranks_for_ratio,
)


def test_param_formulas():
    assert svd_params(4096, 25088, 64) == 64 * (4096 + 25088)
    assert cp_params(512, 9, 256, 100) == 100 * (512 + 9 + 256)
    # pointwise S->r_in, core r_in->r_out over K taps, pointwise r_out->T
    assert tucker2_params(64, 9, 32, 16, 8) == 32 * 8 + 9 * 8 * 16 + 16 * 64


@pytest.mark.parametrize("t,k,s", [(1, 1, 1), (8, 9, 3), (64, 9, 64), (512, 9, 512), (256, 1, 128)])
def test_cp_max_useful_rank_brute_force(t, k, s):
    r = cp_max_useful_rank(t, k, s)
    assert cp_params(t, k, s, r) < t * k * s or r == 0
    assert cp_params(t, k, s, r + 1) >= t * k * s


def test_cp_rank_for_ratio():
    r = cp_rank_for_ratio(512, 9, 512, 4)
    assert cp_params(512, 9, 512, r) <= 512 * 9 * 512 / 4 < cp_params(512, 9, 512, r + 1)
    assert cp_rank_for_ratio(2, 1, 2, 1000) == 1
    with pytest.raises(ValueError):
        cp_rank_for_ratio(2, 1, 2, 0)


@pytest.mark.parametrize("t,k,s,ratio", [(512, 9, 256, 4), (64, 9, 64, 2), (128, 9, 32, 8), (16, 1, 16, 3)])
def test_tucker2_ranks_for_ratio(t, k, s, ratio):
    r_out, r_in = tucker2_ranks_for_ratio(t, k, s, ratio)
    budget = t * k * s / ratio
    assert 1 <= r_out <= t and 1 <= r_in <= s
    assert tucker2_params(t, k, s, r_out, r_in) <= budget
    # Proportional to the mode sizes (up to flooring) and not wastefully small.
    assert abs(r_out / t - r_in / s) <= 1.0 / min(t, s) + 1e-12
    assert tucker2_params(t, k, s, r_out + 1, r_in + 1) > budget


def test_energy_ranks_from_unfoldings():
    rng = np.random.default_rng(0)
    # Multilinear rank (3, 9, 2) exactly: energy 1.0 gives those ranks.
    core = rng.standard_normal((3, 9, 2))
    u = np.linalg.qr(rng.standard_normal((20, 3)))[0]
    v = np.linalg.qr(rng.standard_normal((15, 2)))[0]
    x = np.einsum("tp,pkq,sq->tks", u, core, v)
    assert tucker2_ranks_for_energy(x, 1.0) == (3, 2)
    assert cp_rank_for_energy(x, 1.0) == 3
    assert tucker2_ranks_for_energy(x, 1e-9) == (1, 1)
    # Ranks grow with the energy asked for.
    y = rng.standard_normal((20, 9, 15))
    ranks = [tucker2_ranks_for_energy(y, e) for e in (0.5, 0.8, 0.95, 0.999)]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(ranks, ranks[1:]))


def test_energy_ranks_are_sensible_for_decompositions():
    rng = np.random.default_rng(1)
    x = cp_reconstruct(*[rng.standard_normal((d, 4)) for d in (12, 9, 10)])
    x += 1e-3 * rng.standard_normal(x.shape)
    r = cp_rank_for_energy(x, 0.999)
    assert r == 4
    assert cp3(x, r).rel_error < 0.01
    r_out, r_in = tucker2_ranks_for_energy(x, 0.999)
    # HOSVD bound: discarded energy <= sum of what each mode's truncation drops.
    assert tucker2(x, r_out, r_in).rel_error ** 2 <= 2 * (1 - 0.999) + 1e-9
