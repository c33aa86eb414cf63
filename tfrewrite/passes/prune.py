"""Magnitude pruning of CONV_2D, DEPTHWISE_CONV_2D (with --prune-depthwise) and FULLY_CONNECTED weights.

Per layer, the weights of smallest magnitude are set to zero until the layer holds the requested share of
zeros (weights that are already zero count). FULLY_CONNECTED weights can be pruned in whole 1×k blocks
(--prune-block 1x4) so that the block-sparse kernel can read them; a full-integer int8 FULLY_CONNECTED is
pruned in 1×16 blocks instead, the only block its sparse kernel reads.

The weight keeps its storage form: float32, float16 behind a DEQUANTIZE, or int8 (dynamic-range or
full-integer, pruned in the integer domain: a zeroed value is exactly the zero point 0). Only the zeros are
written here; `sparse_encode` stores them in TFLite's sparse format. A weight shared by several ops (in any
subgraph: one Buffer) is pruned once, with the settings of its first reader, and stays one shared Buffer.
"""
from __future__ import annotations

import numpy as np

from .. import schema
from ..ops import semantics
from ..analysis import macs, numel
from ..graph import Model, Operator, Subgraph, Tensor
from ..linalg import sparse
from .common import Skip, new_entry

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
        if raw.dtype.kind == "f":
            return np.abs(raw.astype(np.float64))
        q = self.tensor.quantization
        scale = np.asarray(q.scale, np.float64).reshape(-1)
        if len(scale) > 1:
            shape = [1] * raw.ndim
            shape[q.quantizedDimension] = -1
            scale = scale.reshape(shape)
        else:
            scale = scale[0]
        return np.abs(raw.astype(np.float64)) * scale


def find_stored_weight(op: Operator, producers: dict) -> StoredWeight:
    """The stored constant of input 1, following one DEQUANTIZE; Skip when it cannot be pruned."""
    w = op.inputs[1] if len(op.inputs) > 1 else None
    if w is None:
        raise Skip("no weight input")
    carrier = None
    if not w.is_constant:
        producer = producers.get(id(w))
        if producer is None:
            raise Skip("weight is not a constant")
        if producer.builtin == OP.DENSIFY:
            raise Skip("weight is already sparse (behind DENSIFY)")
        if producer.builtin != OP.DEQUANTIZE or producer.inputs[0] is None or not producer.inputs[0].is_constant:
            raise Skip("weight is not a constant")
        carrier, w = producer, producer.inputs[0]
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
        zp = np.asarray(q.zeroPoint if q.zeroPoint is not None else [0])
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


def prune_op(model: Model, sg: Subgraph, op: Operator, producers: dict, plan, done: dict) -> dict:
    entry = new_entry(model, sg, op, "prune", plan)
    w = op.inputs[1] if len(op.inputs) > 1 else None
    entry["weight_shape"] = list(w.shape) if w is not None else []
    entry["macs_before"] = entry["macs_after"] = macs(op, w) if w is not None else 0
    try:
        settings = plan.settings(op)
        weight = find_stored_weight(op, producers)
        n = numel(weight.tensor.shape)
        nonzero = int(np.count_nonzero(weight.raw))
        entry.update(weight_dtype=weight.kind, params_before=nonzero, params_after=nonzero,
                     sparsity_before=round(1 - nonzero / max(n, 1), 6), sparsity_after=round(1 - nonzero / max(n, 1), 6))
        if id(weight.tensor.buffer) in done:
            raise Skip(f"shares its weight with {done[id(weight.tensor.buffer)]}, pruned once there")
        # Every reader of the stored weight, in any subgraph, must be a layer reading it as its weight.
        sharers = model.sharers(weight.tensor)
        others = [c for _, c, i in model.readers(sharers)
                  if not (c.builtin == OP.DEQUANTIZE or (c.builtin in TARGETS and i == 1))]
        if others:
            raise Skip(f"the weight is also read by {others[0].name}")
        reason = plan.reason_to_skip(op, n)
        if reason:
            raise Skip(reason)
        if not settings.prune:
            raise Skip("no sparsity given")
        if op.builtin == OP.DEPTHWISE_CONV_2D and not settings.prune_depthwise:
            raise Skip("depthwise conv (use --prune-depthwise)")
        keep, method = keep_mask(op, weight, float(settings.prune), settings.prune_block)
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


def run(model: Model, plan, progress=None) -> list[dict]:
    entries = []
    done: dict = {}  # id(new Buffer) of weights pruned already → their first reader
    for sg in model.subgraphs:
        producers = sg.producers()
        for op in [op for op in sg.operators if op.builtin in TARGETS]:
            entries.append(prune_op(model, sg, op, producers, plan, done))
            if progress:
                progress(entries[-1])
    return entries
