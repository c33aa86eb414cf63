"""Magnitude pruning of CONV_2D, DEPTHWISE_CONV_2D (with --prune-depthwise) and FULLY_CONNECTED weights.

Per layer, the weights of smallest magnitude are set to zero until the layer holds the requested share of
zeros (weights that are already zero count). FULLY_CONNECTED weights can be pruned in whole 1×k blocks
(--prune-block 1x4) so that the block-sparse kernel can read them; a full-integer int8 FULLY_CONNECTED is
pruned in 1×16 blocks instead, the only block its sparse kernel reads.

The weight keeps its storage form: float32, float16 behind a DEQUANTIZE, or int8 (dynamic-range or
full-integer, pruned in the integer domain: a zeroed value is exactly the zero point 0). Only the zeros are
written here; `sparse_encode` stores them in TFLite's sparse format. A weight shared by several ops (in any
subgraph: one Buffer) is pruned once, at its first reader, and stays one shared Buffer, when every reader is a
layer reading it as its weight that asks for the same pruning (the IR's shared-weight policy, `analysis`).

With calibration rows for the layer (`--calibration`), pruning is data-aware instead (`linalg.obs`): the mask
and the kept weights minimise the change of the layer's outputs on the samples (SparseGPT's mask, then the
exact least-squares update of the kept weights), with the same block shapes; the bias is then corrected so that
the mean output on the samples is unchanged, and an int8 weight is requantized (new per-channel scales) after
the update. Full-integer layers and weights shared with other ops stay with magnitude pruning.
"""
from __future__ import annotations

import numpy as np

from .. import schema
from ..ops import semantics
from ..analysis import macs, numel, stored, weight_uses
from ..graph import Model, Operator, Quantization, Subgraph, Tensor
from ..linalg import sparse
from .common import Skip, bias_values, new_entry

OP = schema.BuiltinOperator
T = schema.TensorType
TARGETS = semantics.LAYER_OPS
# The only block the full-integer int8 sparse FULLY_CONNECTED kernel reads.
INT8_FC_BLOCK = (1, 16)


class StoredWeight:
    """The constant that really holds a layer's weight, and how to read its magnitudes."""

    def __init__(self, tensor: Tensor, kind: str, carrier: Operator | None = None):
        self.tensor, self.kind, self.carrier = tensor, kind, carrier

    @property
    def raw(self) -> np.ndarray:
        return self.tensor.data

    def magnitudes(self) -> np.ndarray:
        """|real value| of every weight (int8: |q - zero point| · scale, per channel when so quantized)."""
        raw = np.asarray(self.raw)
        if raw.dtype.kind == "f":  # |w| of a float32 or float16 value is exact in float32
            return np.abs(raw if raw.dtype == np.float32 else raw.astype(np.float32))
        q = self.tensor.quantization
        scale = np.asarray(q.scale, np.float64).reshape(-1)
        if len(scale) > 1:
            shape = [1] * raw.ndim
            shape[q.axis] = -1
            scale = scale.reshape(shape)
        else:
            scale = scale[0]
        return np.abs(raw.astype(np.float64)) * scale


def find_stored_weight(op: Operator) -> StoredWeight:
    """The stored constant of input 1, following one DEQUANTIZE; Skip when it cannot be pruned."""
    w = op.inputs[1] if len(op.inputs) > 1 else None
    if w is None:
        raise Skip("no weight input")
    src = stored(w)
    carrier = src.carrier if src is not None else w.producer
    if not w.is_constant:
        if carrier is None:
            raise Skip("weight is not a constant")
        if carrier.builtin == OP.DENSIFY:
            raise Skip("weight is already sparse (behind DENSIFY)")
        if carrier.builtin != OP.DEQUANTIZE or src is None or len(src.carriers) > 1:
            raise Skip("weight is not a constant")
        w = src.tensor
    if w.sparsity is not None:
        raise Skip("weight is already sparse")
    if w.type == T.FLOAT32:
        return StoredWeight(w, "float32", carrier)
    if w.type == T.FLOAT16:
        return StoredWeight(w, "float16", carrier)
    if w.type == T.INT8:
        q = w.quantization
        if q is None or q.scale is None or len(q.scale) == 0:
            raise Skip("int8 weight without a scale")
        zp = np.asarray(q.zero_point if q.zero_point is not None else [0])
        if np.any(zp != 0):
            raise Skip("int8 weight with a nonzero zero point")
        if carrier is not None:
            return StoredWeight(w, "int8 (dequantized)", carrier)
        x = op.inputs[0]
        return StoredWeight(w, "int8" if x is not None and x.type == T.FLOAT32 else "int8 (full-integer)")
    raise Skip(f"{w.type_name} weights are not supported")


def keep_mask(op: Operator, weight: StoredWeight, sparsity: float, block) -> tuple[np.ndarray, str]:
    """(keep mask, method) for one layer."""
    mags = weight.magnitudes()
    if op.builtin == OP.FULLY_CONNECTED and block is not None:
        if weight.kind == "int8 (full-integer)":
            block = INT8_FC_BLOCK
        bh, bw = block
        rows, cols = mags.shape
        if rows % bh == 0 and cols % bw == 0:
            return sparse.prune_blocks(mags, sparsity, block, norm="l2"), f"block{bh}x{bw}"
        return sparse.prune_magnitude(mags, sparsity), f"magnitude (block {bh}x{bw} does not divide {rows}x{cols})"
    return sparse.prune_magnitude(mags, sparsity), "magnitude"


def data_aware_reason(model: Model, op: Operator, weight: StoredWeight) -> str | None:
    """Why this layer is pruned by magnitude although calibration rows exist, or None."""
    if weight.kind == "int8 (full-integer)":
        return "full-integer: no data-aware update"
    if op.builtin not in (OP.FULLY_CONNECTED, OP.CONV_2D):
        return "no data-aware pruning for this op"
    if weight_uses(model, weight.tensor).shared:
        return "weight shared with another op: no data-aware update"
    return None


class DataAwarePrune:
    """One layer pruned on its calibration rows: the weight as it will be stored, its float32 values, the
    keep mask and the method; `matrix` is the original weight as [out, in] real values."""

    def __init__(self, stored, values, keep, method, matrix, scales=None):
        self.stored, self.values, self.keep, self.method, self.matrix = stored, values, keep, method, matrix
        self.scales = scales  # new int8 scales (int8 weights only)


def data_aware_weights(op: Operator, weight: StoredWeight, sparsity: float, block, data: dict,
                       store_as: str | None = None, cache: dict | None = None) -> DataAwarePrune:
    """OBS/SparseGPT pruning on the layer's calibration rows, the kept weights updated, stored in the weight's own
    form (or as `store_as`: 'float16', the form --quantize float16 gives it later). Changes nothing in the graph.
    `cache`: kept between calls on the same rows (`obs.prune`)."""
    from ..linalg import obs, quant
    raw = np.asarray(weight.raw)
    shape = raw.shape
    real = weight.magnitudes() * np.sign(raw) if raw.dtype.kind != "f" else np.asarray(raw, np.float32)
    matrix = np.asarray(real, np.float32).reshape(shape[0], -1)  # [out, in]; conv inputs in patch order kh, kw, C
    width, suffix = 1, ""
    if op.builtin == OP.FULLY_CONNECTED and block is not None:
        bh, bw = block
        if bh == 1 and matrix.shape[1] % bw == 0:
            width, suffix = bw, f" block1x{bw}"
        else:
            suffix = f" (block {bh}x{bw} does not fit {matrix.shape[0]}x{matrix.shape[1]})"
    new, keep, method = obs.prune(matrix, data["rows"], sparsity, width=width, target_rows=data.get("target_rows"),
                                  damping=data.get("damping", obs.DEFAULT_DAMPING), cache=cache)
    scales = None
    if weight.kind == "float16" or store_as == "float16":
        stored = quant.to_float16(new.reshape(shape))
        values = stored.astype(np.float32)
    elif raw.dtype.kind == "i":
        q = weight.tensor.quantization
        axis = q.axis if len(np.asarray(q.scale).reshape(-1)) > 1 else None
        stored, scales = quant.quantize_symmetric_int8(new.reshape(shape), axis=axis)
        values = quant.dequantize_int8(stored, scales, axis=axis).astype(np.float32)
    else:
        stored = values = new.reshape(shape)  # float32 already
    return DataAwarePrune(stored, values.reshape(matrix.shape), keep, method + suffix, matrix, scales)


def prune_data_aware(sg: Subgraph, op: Operator, weight: StoredWeight, sparsity: float, block, data: dict,
                     entry: dict) -> tuple[np.ndarray, str]:
    """(new stored weight, method): `data_aware_weights`, an int8 weight requantized (new per-channel scales),
    and the bias corrected (a new bias constant)."""
    from ..linalg import fit, obs
    bias = op.inputs[2] if len(op.inputs) > 2 else None
    bias_before = bias_values(bias, weight.tensor.shape[0])  # a Skip here leaves the layer untouched
    rows, target_rows = data["rows"], data.get("target_rows")
    result = data_aware_weights(op, weight, sparsity, block, data)
    matrix, values = result.matrix, result.values
    if result.scales is not None:
        weight.tensor.quantization = Quantization.symmetric(result.scales, weight.tensor.quantization.axis)
    entry["output_error"] = obs.output_error(matrix, values, rows, target_rows)
    entry["output_error_magnitude"] = obs.output_error(
        matrix, matrix * keep_mask(op, weight, sparsity, block)[0].reshape(matrix.shape), rows, target_rows)
    shift = fit.bias_shift(matrix, values, data["mean"], data.get("target_mean"))
    corrected = bias_before + shift.astype(np.float32)
    new_bias = sg.add_constant(f"{op.outputs[0].name}/pruned_bias", corrected.astype(np.float32))
    if len(op.inputs) > 2:
        op.inputs[2] = new_bias
    else:
        op.inputs.append(new_bias)
    entry["bias_corrected"] = True
    return result.stored, result.method


def prune_op(model: Model, sg: Subgraph, op: Operator, plan, done: dict) -> dict:
    entry = new_entry(model, sg, op, "prune", plan)
    w = op.inputs[1] if len(op.inputs) > 1 else None
    entry["weight_shape"] = list(w.shape) if w is not None else []
    entry["macs_before"] = entry["macs_after"] = macs(op, w) if w is not None else 0
    try:
        settings = plan.settings(op)
        weight = find_stored_weight(op)
        n = numel(weight.tensor.shape)
        nonzero = int(np.count_nonzero(weight.raw))
        entry.update(weight_dtype=weight.kind, params_before=nonzero, params_after=nonzero,
                     sparsity_before=round(1 - nonzero / max(n, 1), 6), sparsity_after=round(1 - nonzero / max(n, 1), 6))
        if id(weight.tensor.buffer) in done:
            raise Skip(f"shares its weight with {done[id(weight.tensor.buffer)]}, pruned once there")
        reason = _reason_to_leave(op, plan, n)
        if reason:
            raise Skip(reason)
        uses = weight_uses(model, weight.tensor)
        if uses.shared:
            # Pruned once for every reader, in any subgraph: each must be a layer reading it as its weight and
            # asking for the same pruning.
            reason = uses.refusal(
                lambda u: u.op.builtin in TARGETS and u.index == 1 and (_reason_to_leave(u.op, plan, n) or True),
                ask=lambda u: _asked(plan.settings(u.op)), differ="its readers ask for different pruning")
            if reason:
                raise Skip(reason)
        data = plan.layer_data.get(id(op))
        if data is not None and data_aware_reason(model, op, weight) is None:
            pruned, method = prune_data_aware(sg, op, weight, float(settings.prune), settings.prune_block, data,
                                              entry)
            plan.layer_data.pop(id(op))  # its rows are not needed again: free them before the next layer
        else:
            keep, method = keep_mask(op, weight, float(settings.prune), settings.prune_block)
            if data is not None:
                method += f" ({data_aware_reason(model, op, weight)})"
            raw = np.asarray(weight.raw)
            pruned = np.where(keep, raw, np.zeros((), raw.dtype)).astype(raw.dtype)
        # A new buffer (the input file's map is never written), still shared by every tensor that shared it.
        model.set_shared_data(weight.tensor, pruned)
        done[id(weight.tensor.buffer)] = f"{op.name} {op.outputs[0].name!r}"
        after = int(np.count_nonzero(pruned))
        entry.update(action="pruned", method=method, params_after=after, sparsity_after=round(1 - after / max(n, 1), 6))
    except Skip as e:
        entry["reason"] = str(e)
    return entry


def _reason_to_leave(op: Operator, plan, n: int) -> str | None:
    """Why this layer is not pruned, whatever its weight (None: it is)."""
    settings = plan.settings(op)
    reason = plan.reason_to_skip(op, n)
    if reason:
        return reason
    if not settings.prune:
        return "no sparsity given"
    if op.builtin == OP.DEPTHWISE_CONV_2D and not settings.prune_depthwise:
        return "depthwise conv (use --prune-depthwise)"
    return None


def _asked(settings) -> tuple:
    return settings.prune, settings.prune_block


def run(model: Model, plan, progress=None, skip=frozenset()) -> list[dict]:
    """Prune every target op except those whose id is in `skip` (already pruned one by one, sequentially)."""
    entries = []
    done: dict = {}  # id(new Buffer) of weights pruned already → their first reader
    for sg in model.subgraphs:
        for op in [op for op in sg.operators if op.builtin in TARGETS and id(op) not in skip]:
            entries.append(prune_op(model, sg, op, plan, done))
            if progress:
                progress(entries[-1])
    return entries
