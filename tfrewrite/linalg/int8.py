"""Full-integer int8 arithmetic as TFLite's int8 kernels do it: asymmetric activations, symmetric per-channel
weights, int32 biases at s_in·s_w[c] — and the closed-form refit of a chain's last factor on its quantized input.

TFLite's int8 spec: activations int8 per tensor with a zero point (real 0 exactly representable); weights int8 in
[−127, 127] with zero point 0, per output channel; bias int32 with zero point 0 and scale s_in·s_w[c].
"""
from __future__ import annotations

import numpy as np

from .quant import dequantize_int8, quantize_symmetric_int8

INT32_MAX = 2 ** 31 - 1


# XNNPACK refuses an int8 conv / FC whose requantization scale s_in·s_w / s_out reaches this (the op then fails
# to prepare and the whole model does not run with XNNPACK on).
MAX_REQUANTIZATION_SCALE = 256.0


def activation_params(values: np.ndarray, percentile: float = 100.0, fallback: float = 1.0) -> tuple[float, int]:
    """(scale, zero point) of an int8 activation covering `values` from their (100 − p)-th to their p-th
    percentile (p = 100: min/max; below, the rare extremes are clipped for a finer step) and 0, which is then
    exactly representable: the zero point is an integer in [−128, 127]. All zero: (`fallback`, 0)."""
    v = np.asarray(values)
    if v.size and percentile < 100:
        low, high = np.percentile(v, [100 - percentile, percentile])
    else:
        low, high = (v.min(), v.max()) if v.size else (0.0, 0.0)
    lo, hi = min(0.0, float(low)), max(0.0, float(high))
    scale = (hi - lo) / 255.0
    if not scale > 0:
        return float(np.float32(fallback)), 0
    scale = float(np.float32(scale))  # the stored value is float32: compute the zero point with it
    zero = int(np.clip(np.round(-128 - lo / scale), -128, 127))
    return scale, zero


def equalization_scales(first_ranges: np.ndarray, second_ranges: np.ndarray) -> np.ndarray:
    """Cross-layer equalization (Nagel et al. 2019, data-free quantization): for a channel j written by one
    factor (its weights' largest |value| r₁[j]) and read by the next (r₂[j]), the s[j] = √(r₁/r₂) that makes both
    ranges √(r₁·r₂) when the first factor's channel is divided by it and the second's multiplied — exact in real
    arithmetic, and it lets one scale per tensor fit both factors about as well as one per channel. 1 where
    either range is 0."""
    r1, r2 = (np.asarray(r, np.float64) for r in (first_ranges, second_ranges))
    ok = (r1 > 0) & (r2 > 0)
    return np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)


def channel_ranges(values: np.ndarray, axis: int) -> np.ndarray:
    """The largest |value| of each index of `axis`."""
    v = np.abs(np.moveaxis(np.asarray(values), axis, 0))
    return v.reshape(v.shape[0], -1).max(axis=1) if v.size else np.zeros(v.shape[0])


def fake_quant(values: np.ndarray, scale: float, zero: int) -> np.ndarray:
    """The real values an int8 tensor with (scale, zero point) holds for `values`: round, clamp, dequantize."""
    q = np.clip(np.round(np.asarray(values, np.float64) / scale) + zero, -128, 127)
    return (q - zero) * scale


def requantize(values: np.ndarray, in_scale: float, zero: int) -> np.ndarray:
    """Model input/activation int8 values → real values."""
    return (np.asarray(values, np.float64) - zero) * in_scale


def weights(weight: np.ndarray, axis: int | None = 0, zero_channel_scales: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 `weight` (per channel along `axis`, or per tensor for None): (q int8, scales float32).
    `zero_channel_scales`: the scales an all-zero channel gets instead of 1 (a pruned-away output channel keeps
    its old scale, so its requantization scale s_in·s_w/s_out stays what XNNPACK accepted)."""
    q, scales = quantize_symmetric_int8(weight, axis=axis)
    if zero_channel_scales is not None and axis is not None:
        empty = ~np.any(np.moveaxis(q, axis, 0).reshape(len(scales), -1), axis=1)
        scales = np.where(empty, np.asarray(zero_channel_scales, np.float32).reshape(-1), scales).astype(np.float32)
    return q, scales


def weights_and_bias(weight: np.ndarray, bias: np.ndarray, in_scale: float, axis: int | None = 0,
                     zero_channel_scales: np.ndarray | None = None, quantized: tuple | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric int8 `weight` (`weights`) and an int32 `bias` at in_scale·s_w[c]. Where |b / (in_scale·s_w[c])|
    would not fit in int32 the channel's weight scale is grown until it does (the weights are requantized with
    it; they only get smaller). `quantized`: `weights`' result for `weight` when already made.
    Returns (q int8, scales float32, bias int32, bias scales float32: one per channel, or one for `axis` None)."""
    q, scales = quantized if quantized is not None else weights(weight, axis, zero_channel_scales)
    bias = np.asarray(bias, np.float64).reshape(-1)
    channels = len(bias)
    per = np.broadcast_to(scales.astype(np.float64), (channels,)) if axis is None else scales.astype(np.float64)
    need = np.abs(bias) / (in_scale * (INT32_MAX - 1))
    if np.any(need > per):
        if axis is None:
            grown = np.array([max(float(per[0]), float(need.max()) * (1 + 1e-6))], np.float32)
        else:
            grown = np.maximum(per, need * (1 + 1e-6)).astype(np.float32)
        q = _quantize_with(weight, grown, axis)
        scales = grown
        per = np.broadcast_to(scales.astype(np.float64), (channels,)) if axis is None else scales.astype(np.float64)
    bias_scales = (in_scale * per).astype(np.float32)
    b = np.round(bias / bias_scales.astype(np.float64))
    assert np.all(np.abs(b) <= INT32_MAX)
    # A per-tensor weight's bias has one scale too: XNNPACK refuses a per-tensor CONV_2D whose bias has several.
    return q, scales, b.astype(np.int32), bias_scales[:1] if axis is None else bias_scales


def _quantize_with(weight: np.ndarray, scales: np.ndarray, axis: int | None) -> np.ndarray:
    w = np.asarray(weight, np.float64)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    ratio = w / scales.astype(np.float64).reshape(shape)
    return np.clip(np.sign(ratio) * np.floor(np.abs(ratio) + 0.5), -127, 127).astype(np.int8)


def stored(weight: np.ndarray, axis: int | None = 0) -> np.ndarray:
    """The real values of `weight` once quantized symmetric int8 (float64)."""
    q, scales = quantize_symmetric_int8(weight, axis=axis)
    return dequantize_int8(q, scales, axis=axis).astype(np.float64)


def refit_last(features: np.ndarray, targets: np.ndarray, prior: np.ndarray, damping: float = 0.05
               ) -> tuple[np.ndarray, np.ndarray]:
    """The last factor A [m, r] and bias c [m] minimising Σ‖y − A·ẑ − c‖² + λ‖A − A₀‖² over sample rows
    (ẑ = `features` [N, r], the quantized intermediate; y = `targets` [N, m], the original layer's outputs before
    its activation): ridge least squares towards the float fit A₀ = `prior`, λ a `damping` share of the mean
    feature energy, so that few samples cannot pull directions they never visit. The bias is unpenalised: it is
    the per-channel bias correction."""
    z = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    z_mean, y_mean = z.mean(axis=0), y.mean(axis=0)
    zc, yc = z - z_mean, y - y_mean
    gram = zc.T @ zc / len(z)
    lam = damping * max(float(np.trace(gram)) / max(len(gram), 1), 1e-30)
    a = np.linalg.solve(gram + lam * np.eye(len(gram)), (yc.T @ zc / len(z) + lam * np.asarray(prior, np.float64)).T).T
    return a, y_mean - a @ z_mean
