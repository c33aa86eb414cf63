"""Calibration rows: what `calibrate.collect` samples is exactly the layer's input (FC rows, k·k·C conv patches
in kernel order, SAME padding included), bounded and reproducible."""
import numpy as np
import pytest

import builders as B
from tfrewrite import calibrate, io, schema

OP = schema.BuiltinOperator


def _all_patches(x, kh, kw, stride, padding):
    """Every k×k×C patch of `x` [N, H, W, C] at the conv's output positions, TensorFlow's SAME/VALID padding."""
    n, h, w, c = x.shape
    if padding == "SAME":
        out_h, out_w = -(-h // stride), -(-w // stride)
        ph, pw = max((out_h - 1) * stride + kh - h, 0), max((out_w - 1) * stride + kw - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        out_h, out_w = (h - kh) // stride + 1, (w - kw) // stride + 1
    return np.array([x[i, a * stride:a * stride + kh, b * stride:b * stride + kw, :].reshape(-1)
                     for i in range(n) for a in range(out_h) for b in range(out_w)], np.float32)


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "SAME"), (2, "VALID")])
def test_conv_rows_are_patches_of_the_layer_input(stride, padding):
    rng = np.random.default_rng(3)
    model = io.read_buffer(B.conv_model(rng.standard_normal((6, 3, 3, 4)), None, (7, 7),
                                           stride=stride, padding=padding))
    op = next(op for op in model.main.operators if op.builtin == OP.CONV_2D)
    samples = [[rng.standard_normal((1, 7, 7, 4)).astype(np.float32)] for _ in range(3)]
    rows = calibrate.collect(model, samples, [op])[id(op)]
    patches = np.concatenate([_all_patches(s[0], 3, 3, stride, padding) for s in samples])
    assert rows.rows.shape[1] == 3 * 3 * 4 == calibrate.row_dim(op)
    # Every sampled row is one of the true patches (kernel order [kh, kw, C]).
    for r in rows.rows:
        assert np.min(np.abs(patches - r).max(axis=1)) < 1e-6
    np.testing.assert_allclose(rows.mean, rows.rows.mean(axis=0, dtype=np.float64), rtol=1e-9, atol=1e-12)
    again = calibrate.collect(model, samples, [op])[id(op)]
    np.testing.assert_array_equal(rows.rows, again.rows)  # the same positions every time


def test_fc_rows_are_the_input_rows_and_bounded():
    rng = np.random.default_rng(4)
    model = io.read_buffer(B.fc_model(rng.standard_normal((5, 12)), None, (2, 12)))
    op = next(op for op in model.main.operators if op.builtin == OP.FULLY_CONNECTED)
    samples = [[rng.standard_normal((2, 12)).astype(np.float32)] for _ in range(4)]
    rows = calibrate.collect(model, samples, [op])[id(op)]
    np.testing.assert_array_equal(rows.rows, np.concatenate([s[0] for s in samples]))
    bounded = calibrate.collect(model, samples, [op], max_rows=3)[id(op)]
    assert len(bounded.rows) <= 2 * 3
    assert all(any(np.array_equal(r, s) for s in rows.rows) for r in bounded.rows)
