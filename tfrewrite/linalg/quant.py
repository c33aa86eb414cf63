"""Weight quantisation helpers: symmetric int8 and float16."""
import numpy as np

FLOAT16_MAX = 65504.0


def _channel_axis(ndim, axis):
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for {ndim}-D weights")
    return axis % ndim


def quantize_symmetric_int8(weights, axis=0):
    """Symmetric int8 in [-127, 127]: ``(q int8, scales float32 [n_channels])``.

    ``scale = max|w| / 127`` per slice along ``axis`` (``axis=None``: one scale,
    returned as shape ``[1]``). An all-zero channel gets scale 1.0, never 0, since
    XNNPACK / TFLite reject zero scales; its q values are all 0 anyway.
    Rounds half away from zero like TFLite's reference quantizer; q is computed
    with the float32 scale that is stored, so ``|w - q*scale| <= scale/2``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if axis is None:
        max_abs = np.array([np.max(np.abs(w))]) if w.size else np.zeros(1)
        bshape = (1,) * w.ndim
    else:
        axis = _channel_axis(w.ndim, axis)
        reduce_axes = tuple(d for d in range(w.ndim) if d != axis)
        max_abs = np.max(np.abs(w), axis=reduce_axes) if w.size else np.zeros(w.shape[axis])
        bshape = tuple(-1 if d == axis else 1 for d in range(w.ndim))
    scales = (max_abs / 127.0).astype(np.float32)
    scales[~(scales > 0)] = np.float32(1.0)  # zero (or underflowed) channels
    ratio = w / scales.astype(np.float64).reshape(bshape)
    q = np.sign(ratio) * np.floor(np.abs(ratio) + 0.5)
    return np.clip(q, -127, 127).astype(np.int8), scales


def dequantize_int8(q, scales, axis=0):
    """float32 ``q * scale`` (per channel along ``axis``, or per tensor for ``axis=None``)."""
    q = np.asarray(q)
    scales = np.asarray(scales, dtype=np.float32).ravel()
    if axis is None:
        return q.astype(np.float32) * scales[0]
    axis = _channel_axis(q.ndim, axis)
    bshape = tuple(-1 if d == axis else 1 for d in range(q.ndim))
    return q.astype(np.float32) * scales.reshape(bshape)


def to_float16(weights):
    """float16 copy with values clipped to ``+-65504`` (float16's largest finite).

    Clipping instead of overflowing to inf keeps an out-of-range weight finite
    (inf would poison every output it touches); inf inputs become +-65504, NaN
    stays NaN. Values below float16's subnormal range flush to zero as usual.
    """
    w = np.asarray(weights, dtype=np.float64)
    return np.clip(w, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
