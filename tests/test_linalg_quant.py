import numpy as np
import pytest

from tfrewrite.linalg import dequantize_int8, quantize_symmetric_int8, to_float16


@pytest.mark.parametrize("axis", [0, 3, -1])
def test_per_channel_round_trip(axis):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 3, 3, 5)) * rng.uniform(0.01, 10, size=1)).astype(np.float32)
    q, scales = quantize_symmetric_int8(w, axis=axis)
    n_ch = w.shape[axis]
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scales.dtype == np.float32 and scales.shape == (n_ch,)
    assert q.min() >= -127 and q.max() <= 127
    deq = dequantize_int8(q, scales, axis=axis)
    assert deq.dtype == np.float32
    bshape = [1] * w.ndim
    bshape[axis] = -1
    err = np.abs(w.astype(np.float64) - q.astype(np.float64) * scales.astype(np.float64).reshape(bshape))
    assert np.all(err <= scales.reshape(bshape) / 2 * (1 + 1e-6))
    # Each channel's largest weight lands on +-127.
    assert np.all(np.max(np.abs(q), axis=tuple(d for d in range(w.ndim) if d != axis % w.ndim)) == 127)


def test_zero_channel_gets_positive_scale():
    w = np.random.default_rng(1).standard_normal((4, 10)).astype(np.float32)
    w[2] = 0
    q, scales = quantize_symmetric_int8(w, axis=0)
    assert np.all(scales > 0)
    assert scales[2] == 1.0
    assert np.all(q[2] == 0)
    assert np.all(dequantize_int8(q, scales)[2] == 0)
    qz, sz = quantize_symmetric_int8(np.zeros((3, 3)), axis=None)
    assert sz.tolist() == [1.0] and np.all(qz == 0)


def test_per_tensor():
    w = np.array([[-2.54, 0.01], [1.0, 0.0]])
    q, scales = quantize_symmetric_int8(w, axis=None)
    assert scales.shape == (1,)
    np.testing.assert_allclose(scales[0], 2.54 / 127, rtol=1e-6)
    assert q.tolist() == [[-127, 1], [50, 0]]
    assert np.all(np.abs(dequantize_int8(q, scales, axis=None) - w) <= scales[0] / 2 + 1e-7)


def test_round_half_away_from_zero():
    w = np.array([[127.0, 0.5, -0.5, 1.5, -2.5]])
    q, scales = quantize_symmetric_int8(w, axis=0)
    assert scales[0] == 1.0
    assert q.tolist() == [[127, 1, -1, 2, -3]]


def test_float16_clips():
    w = np.array([1.0, 70000.0, -1e9, np.inf, -np.inf, 1e-3, np.nan], dtype=np.float32)
    h = to_float16(w)
    assert h.dtype == np.float16
    assert h[:5].tolist() == [1.0, 65504.0, -65504.0, 65504.0, -65504.0]
    assert abs(float(h[5]) - 1e-3) < 1e-6
    assert np.isnan(h[6])
    assert np.all(np.isfinite(to_float16(np.random.default_rng(2).standard_normal(100) * 1e6)))
