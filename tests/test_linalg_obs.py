"""Data-aware pruning maths (linalg.obs): the OBS update against brute force, SparseGPT against magnitude
pruning on correlated inputs, block layouts, block-diagonal H for wide layers, sequential targets."""
import itertools

import numpy as np
import pytest

from tfrewrite.linalg import obs, sparse


def correlated_rows(rng, n_rows, n, rank):
    return rng.standard_normal((n_rows, rank)) @ rng.standard_normal((rank, n)) + 0.1 * rng.standard_normal((n_rows, n))


def output_cost(w, approx, h):
    d = np.asarray(w, np.float64) - np.asarray(approx, np.float64)
    return float(np.einsum("ij,jk,ik->", d, h, d))


def best_refit(w_row, h, removed):
    """Brute force: the row minimising (w − ŵ)ᵀH(w − ŵ) with the `removed` weights zero (least squares)."""
    kept = [j for j in range(len(w_row)) if j not in removed]
    new = np.zeros_like(w_row)
    # Normal equations of the kept weights: H_kk ŵ_k = H_k: w.
    new[kept] = np.linalg.solve(h[np.ix_(kept, kept)], h[kept] @ w_row)
    return new


def test_obs_update_is_exact_for_one_weight():
    rng = np.random.default_rng(1)
    h, _ = obs.hessian(correlated_rows(rng, 50, 7, 4))
    w = rng.standard_normal(7)
    for q in range(7):
        new, cost = obs.obs_remove(w, np.linalg.inv(h), q)
        np.testing.assert_allclose(new, best_refit(w, h, [q]), atol=1e-9)
        assert cost == pytest.approx(output_cost(w[None], new[None], h), rel=1e-9)


def test_sparsegpt_first_column_step_is_the_obs_update():
    rng = np.random.default_rng(2)
    x = correlated_rows(rng, 80, 8, 5)
    h, _ = obs.hessian(x)
    w = rng.standard_normal((1, 8)) + 2.0
    w[0, 0] = 1e-3  # the least salient weight by far: SparseGPT removes it, at its first step
    new, keep = obs.sparsegpt(w, x, 1 / 8)
    assert keep.tolist() == [[False] + [True] * 7]
    expected, _ = obs.obs_remove(w[0], np.linalg.inv(h), 0)
    np.testing.assert_allclose(new[0], expected, rtol=1e-5, atol=1e-6)


def test_sparsegpt_between_the_brute_force_optimum_and_magnitude_pruning():
    rng = np.random.default_rng(3)
    x = correlated_rows(rng, 60, 8, 3)
    h, _ = obs.hessian(x)
    w = rng.standard_normal((3, 8))
    new, keep = obs.sparsegpt(w, x, 0.5)
    assert np.sum(~keep) == 12 and np.all(new[~keep] == 0)
    optimum = sum(min(output_cost(w[i:i + 1], best_refit(w[i], h, r)[None], h)
                      for r in itertools.combinations(range(8), np.sum(~keep[i]))) for i in range(3))
    magnitude = output_cost(w, w * sparse.prune_magnitude(w, 0.5), h)
    got = output_cost(w, new, h)
    assert optimum - 1e-9 <= got <= magnitude


@pytest.mark.parametrize("width", [1, 4, 16])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_sparsegpt_beats_magnitude_on_correlated_inputs(width, sparsity):
    rng = np.random.default_rng(4)
    x = correlated_rows(rng, 400, 256, 40)
    w = rng.standard_normal((48, 256))
    new, keep = obs.sparsegpt(w, x, sparsity, width=width)
    mask = sparse.prune_magnitude(w, sparsity) if width == 1 else sparse.prune_blocks(w, sparsity, (1, width))
    assert np.sum(~keep) == np.sum(~mask)  # the same number of weights (of whole blocks) removed
    assert np.all(new[~keep] == 0)
    if width > 1:
        # Whole 1×width blocks along the input dimension, the layout the block-sparse kernels read.
        assert sparse.block_sparsity(new, (1, width)) == pytest.approx(sparsity, abs=1 / (48 * 256 / width))
    error, magnitude = obs.output_error(w, new, x), obs.output_error(w, w * mask, x)
    error, magnitude = obs.output_error(w, new, x), obs.output_error(w, w * mask, x)
    assert error < 0.9 * magnitude
    # The exact refit of the kept weights for the chosen mask is better still.
    refit, keep_refit, method = obs.prune(w, x, sparsity, width=width)
    assert method == "sparsegpt+refit" and np.array_equal(keep_refit, keep)
    assert obs.output_error(w, refit, x) < error
    # Block-diagonal H over chunks of 64 inputs (the fallback for wide layers with many samples): the same
    # number of weights removed, whole blocks.
    chunked, keep_chunked = obs.sparsegpt(w, x, sparsity, width=width, max_dim=64)
    assert np.sum(~keep_chunked) == np.sum(~mask) and np.all(chunked[~keep_chunked] == 0)


@pytest.mark.parametrize("n_rows", [20, 200])  # fewer (low-rank H, Woodbury) and more samples than inputs
def test_refit_is_the_least_squares_optimum_for_the_mask(n_rows):
    rng = np.random.default_rng(7)
    x = correlated_rows(rng, n_rows, 40, 10)
    h, _ = obs.hessian(x)
    w = rng.standard_normal((5, 40))
    keep = rng.random((5, 40)) > 0.6
    got = obs.refit_kept(w, keep, x)
    for i in range(5):
        np.testing.assert_allclose(got[i], best_refit(w[i], h, np.flatnonzero(~keep[i])), rtol=1e-4, atol=1e-5)


def test_wide_layer_with_few_samples():
    rng = np.random.default_rng(8)
    x = correlated_rows(rng, 30, 512, 20)  # like VGG16's FC layers: one row per image, far fewer than inputs
    w = rng.standard_normal((24, 512))
    new, keep, method = obs.prune(w, x, 0.8, width=4, max_dim=128)
    assert method == "obs"
    assert np.sum(~keep) == np.sum(~sparse.prune_blocks(w, 0.8, (1, 4)))
    assert sparse.block_sparsity(new, (1, 4)) == pytest.approx(0.8, abs=1e-3)
    np.testing.assert_allclose(new, obs.refit_kept(w, keep, x), rtol=1e-6)
    assert obs.output_error(w, new, x) < 0.5 * obs.output_error(w, w * sparse.prune_blocks(w, 0.8, (1, 4)), x)


def test_sequential_target_rows():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 64))
    for n_rows in (300, 40):  # more and fewer samples than inputs
        t = correlated_rows(rng, n_rows, 64, 16)
        plain, _, _ = obs.prune(w, t, 0.6)
        same, _, _ = obs.prune(w, t, 0.6, target_rows=t)
        np.testing.assert_allclose(same, plain, rtol=1e-4, atol=1e-5)  # unchanged inputs: the plain problem
        x = t + 0.3 * rng.standard_normal(t.shape)  # inputs changed by earlier pruned layers
        naive, _, _ = obs.prune(w, x, 0.6)
        fitted, _, _ = obs.prune(w, x, 0.6, target_rows=t)
        assert obs.output_error(w, fitted, x, t) < 0.9 * obs.output_error(w, naive, x, t)


def test_quota_is_exact_with_ties_and_dead_inputs():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((100, 32))
    x[:, :8] = 0  # inputs never active: their weights cost nothing to remove
    w = np.ones((4, 32))
    new, keep = obs.sparsegpt(w, x, 0.25)
    assert np.sum(~keep) == 32
    assert not keep[:, :8].any()  # exactly the dead inputs' weights go
    np.testing.assert_allclose(new[:, 8:], 1.0)


def test_depthwise_obs_is_the_exact_optimum_for_its_mask_and_beats_magnitude():
    rng = np.random.default_rng(11)
    taps, channels = 9, 24
    x = rng.standard_normal((800, taps, channels))
    x += 0.8 * x[:, :1, :]  # neighbouring taps of an image are correlated
    w = rng.standard_normal((taps, channels))
    new, keep, method = obs.prune_depthwise(w, x, 0.5, damping=1e-9)
    assert method == "obs" and np.sum(~keep) == round(0.5 * taps * channels) and np.all(new[~keep] == 0)
    for c in range(channels):  # each channel: least squares on its own taps, pruned ones zero
        h = x[:, :, c].T @ x[:, :, c] / len(x)
        np.testing.assert_allclose(new[:, c], best_refit(w[:, c], h, set(np.flatnonzero(~keep[:, c]))), atol=1e-5)
    magnitude = w * sparse.prune_magnitude(np.abs(w), 0.5)
    assert obs.depthwise_output_error(w, new, x) < 0.85 * obs.depthwise_output_error(w, magnitude, x)
    # Sequential: inputs changed (x) from the original ones (t); the fit aims at the original outputs.
    t = x + 0.3 * rng.standard_normal(x.shape)
    same, _, _ = obs.prune_depthwise(w, x, 0.5, target_rows=x)
    np.testing.assert_allclose(same, obs.prune_depthwise(w, x, 0.5)[0], atol=1e-4)
    fitted, _, _ = obs.prune_depthwise(w, x, 0.5, target_rows=t)
    assert obs.depthwise_output_error(w, fitted, x, t) < obs.depthwise_output_error(w, new, x, t)
