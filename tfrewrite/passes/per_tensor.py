"""Per-tensor weights for full-integer layers (`--per-tensor auto`): an option the budget weighs like a rank.

A full-integer CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED layer quantized per channel stores, for every output
channel, a float32 scale and an int64 zero point for its weight and again for its int32 bias: 24 bytes beside the
4-byte bias value and the 1-byte weights. On a compact model that is a large part of the file (the MobileNetV2
fixture: 170 of its 646 kB), and a size target counts it. Requantized per tensor — one symmetric scale
max|w|/127 for the weight, the int32 bias at s_in·s_w with one scale (grown where a bias would overflow) — the
layer keeps 4 bytes per channel. What that costs is the layer's relative output error on its calibration rows
(the int8 model's own quantized inputs, the bias rounding included), measured per layer; the budget takes the
option where it hurts least, beside ranks and channel shares.

TFLite's int8 spec allows per-tensor weights for all three ops (per channel is the converter's choice); the ops
keep their versions, and XNNPACK delegates them when the bias has one scale too (`linalg.int8.weights_and_bias`).
A requantization scale s_in·s_w/s_out that XNNPACK refuses leaves the layer as it is.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np

from .. import schema
from ..analysis import static_shape, weight_uses
from ..graph import Model, Operator, Quantization
from ..io import CHANNEL_QUANTIZATION_BYTES
from ..report import Entry
from .common import Skip, new_entry, read_weight
from .int8_chain import bias_real, is_full_integer, per_tensor

OP = schema.BuiltinOperator
T = schema.TensorType
KINDS = (OP.CONV_2D, OP.DEPTHWISE_CONV_2D, OP.FULLY_CONNECTED)
# The output channel axis of each kind's weight ([out, kh, kw, in], [1, kh, kw, out], [out, in]).
OUT_AXIS = {OP.CONV_2D: 0, OP.DEPTHWISE_CONV_2D: 3, OP.FULLY_CONNECTED: 0}
# What the weight and its bias keep of their quantization parameters per tensor: one scale and zero point each.
PER_TENSOR_BYTES = 2 * CHANNEL_QUANTIZATION_BYTES
# The calibration rows a layer's damage is measured on (each gives every output channel; a relative error over
# ROWS × channels outputs needs no more). Layers the run only measures collect no more than these: the 17
# depthwise layers of a full-size MobileNetV2 held 0.85 GB of rows at the usual cap.
ROWS = 512


class PerTensorOption(NamedTuple):
    """Per-tensor weights for one layer: the bytes its weight's and bias's quantization parameters keep, its
    MACs (unchanged) and the damage (relative output error on the layer's calibration rows)."""
    params: int
    nbytes: float
    macs: int
    damage: float


def check(model: Model, op: Operator) -> None:
    """Skip what cannot be requantized per tensor here."""
    if op.builtin not in KINDS:
        raise Skip("not a CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED")
    weight = read_weight(op)
    if not (weight.kind == "int8" and weight.full_integer and is_full_integer(op)):
        raise Skip("not a full-integer int8 layer")
    if not weight.per_channel:
        raise Skip("weights already quantized per tensor")
    q = weight.stored.quantization
    if q.axis != OUT_AXIS[op.builtin] or weight.stored is not op.inputs[1] or q.details is not None:
        raise Skip("weight scales not along the output channels")
    per_tensor(op.inputs[0])
    per_tensor(op.outputs[0])
    if op.builtin == OP.DEPTHWISE_CONV_2D and static_shape(op.inputs[0])[-1] != op.inputs[1].shape[3]:
        raise Skip("depthwise conv with a depth multiplier")
    if weight_uses(model, weight.stored).shared:
        raise Skip("weight shared by several ops")
    bias = op.inputs[2] if len(op.inputs) > 2 else None
    if bias is not None:
        bias_real(op, weight_channels(op))  # a constant int32 bias, else Skip
        if len(bias.consumers) > 1:
            raise Skip("bias shared by several ops")


def candidates(model: Model, ctx) -> list[Operator]:
    """The input model's main-subgraph layers (in execution order) this pass may requantize per tensor."""
    out = []
    for op in model.main.operators:
        if op.builtin not in KINDS or not ctx.is_input_op(op):
            continue
        try:
            check(model, op)
        except Skip:
            continue
        # A layer the rank budget keeps dense may still be requantized (kept_dense_counts=False).
        if ctx.reason_to_skip(op, int(np.prod(op.inputs[1].shape)), kept_dense_counts=False) is None:
            out.append(op)
    return out


def weight_channels(op: Operator) -> int:
    return int(op.inputs[1].shape[OUT_AXIS[op.builtin]])


def per_channel_bytes(op: Operator) -> float:
    """The bytes of the layer's weight and bias quantization parameters as they stand (per channel)."""
    return float(sum(CHANNEL_QUANTIZATION_BYTES * t.quantization.channels
                     for t in op.inputs[1:3] if t is not None and t.quantization is not None))


def requantized(op: Operator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(int8 weight, its one scale, int32 bias, its one scale) of the layer quantized per tensor."""
    from ..linalg import int8
    real = read_weight(op).values.astype(np.float64)
    return int8.weights_and_bias(real, bias_real(op, weight_channels(op)), per_tensor(op.inputs[0])[0], None)


def layer_outputs(op: Operator, rows: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The layer's outputs (before its activation) on input `rows` [N, K·C] (patches in [kh, kw, C] order) for
    real `weight` values stored as the op reads them."""
    if op.builtin == OP.DEPTHWISE_CONV_2D:
        taps = weight.reshape(-1, weight.shape[-1])  # [kh·kw, C]
        return np.einsum("nkc,kc->nc", rows.reshape(len(rows), *taps.shape), taps) + bias
    return rows @ weight.reshape(weight.shape[0], -1).T + bias


def output_error(op: Operator, rows: np.ndarray) -> float:
    """The relative output error per-tensor weights give the layer on `rows`: ‖y_pt − y‖ / ‖y‖."""
    q, scale, b, b_scale = requantized(op)
    rows = np.asarray(rows[::max(1, -(-len(rows) // ROWS))], np.float64)
    before = layer_outputs(op, rows, read_weight(op).values.astype(np.float64), bias_real(op, weight_channels(op)))
    after = layer_outputs(op, rows, q.astype(np.float64) * float(scale[0]), b.astype(np.float64) * float(b_scale[0]))
    den = float(np.linalg.norm(before))
    return float(np.linalg.norm(after - before)) / den if den > 0 else 0.0


def option(op: Operator, rows: np.ndarray) -> PerTensorOption:
    """The layer's per-tensor option, its damage measured on its calibration `rows`."""
    from ..analysis import macs
    return PerTensorOption(int(np.prod(op.inputs[1].shape)), float(PER_TENSOR_BYTES), macs(op, op.inputs[1]),
                           output_error(op, rows))


def run(model: Model, ctx) -> list[Entry]:
    """Requantize per tensor the layers the budget chose (`ctx.per_tensor`), in execution order."""
    entries = []
    for op in [op for op in model.main.operators if id(op) in ctx.per_tensor]:
        entry = new_entry(model, model.main, op, "per_tensor", ctx)
        try:
            entry.set(weight_shape=list(op.inputs[1].shape), weight_dtype=op.inputs[1].type_name,
                      params_before=int(np.prod(op.inputs[1].shape)), params_after=int(np.prod(op.inputs[1].shape)))
            check(model, op)
            _requantize(model, op, entry, ctx)
            entry.damage = round(float(ctx.per_tensor[id(op)]), 6)
        except Skip as e:
            entry.reason = str(e)
        entries.append(entry)
    return entries


def _one_scale(q: Quantization, scale: np.ndarray) -> Quantization:
    """`q` with one scale and zero point 0; its other fields as read (a recorded per-channel range no longer
    applies and goes)."""
    new = copy.copy(q)
    new.scale, new.zero_point, new.axis = np.asarray(scale, np.float32).reshape(1), np.zeros(1, np.int64), 0
    new.min = new.max = None
    return new


def _requantize(model: Model, op: Operator, entry: Entry, ctx) -> None:
    from ..analysis import macs
    from ..linalg import int8
    data = ctx.layer_data.get(id(op))
    error = output_error(op, data["rows"]) if data is not None else None
    q, scale, b, b_scale = requantized(op)
    ratio = per_tensor(op.inputs[0])[0] * float(scale[0]) / per_tensor(op.outputs[0])[0]
    if not ratio < int8.MAX_REQUANTIZATION_SCALE:
        raise Skip(f"the requantization scale s_in*s_w/s_out would be {ratio:.3g}: XNNPACK accepts below "
                   f"{int8.MAX_REQUANTIZATION_SCALE:g}")
    before = per_channel_bytes(op)
    weight = op.inputs[1]
    weight.set_data(q)
    weight.quantization = _one_scale(weight.quantization, scale)
    bias = op.inputs[2] if len(op.inputs) > 2 else None
    if bias is not None:
        bias.set_data(b)
        bias.quantization = _one_scale(bias.quantization, b_scale)
    entry.set(action="requantized", method="per-tensor", bytes_before=int(before), bytes_after=int(per_channel_bytes(op)),
              macs_before=macs(op, weight), macs_after=macs(op, weight))
    if error is not None:
        entry.output_error = round(error, 6)
