"""Per-operator facts about a model: its weight, parameters, MACs and share of zero weights."""
from __future__ import annotations

import numpy as np

from . import schema
from .ops import semantics
from .graph import Model, Operator, Tensor

OP = schema.BuiltinOperator
# Operators whose input 1 is "the weight" of the layer.
WEIGHTED_OPS = semantics.WEIGHTED_OPS
# Operators that only turn a stored constant into its runtime form; their params are counted at the reader.
WEIGHT_CARRIERS = {OP.DEQUANTIZE, OP.DENSIFY}


def static_shape(t: Tensor) -> list[int]:
    """Shape with unknown dimensions counted as 1."""
    return [d if d > 0 else 1 for d in t.shape]


def numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def stored_constant(t: Tensor | None, producers: dict) -> Tensor | None:
    """The constant behind `t`, following DEQUANTIZE / DENSIFY back to the stored tensor."""
    seen = 0
    while t is not None and not t.is_constant and seen < 4:
        op = producers.get(id(t))
        if op is None or op.builtin not in WEIGHT_CARRIERS:
            return None
        t = op.inputs[0]
        seen += 1
    return t if t is not None and t.is_constant else None


def zero_fraction(t: Tensor) -> float:
    """Share of zero weights; a sparse tensor's missing entries count as zeros."""
    n = numel(t.shape)
    if n == 0:
        return 0.0
    if t.sparsity is not None:
        values = t.buffer.data.view(t.dtype) if t.dtype is not None else None
        if values is None:
            return 0.0
        return 1.0 - float(np.count_nonzero(values)) / n
    data = t.data
    if data is None:
        return 0.0
    return float(np.count_nonzero(data == 0)) / n


def macs(op: Operator, weight: Tensor | None) -> int:
    """Multiply-accumulates of one run (unknown batch counted as 1); 0 for ops without a formula."""
    b = op.builtin
    if not op.outputs or op.outputs[0] is None:
        return 0
    out = static_shape(op.outputs[0])
    if b == OP.CONV_2D and weight is not None and len(weight.shape) == 4:
        o, kh, kw, i = weight.shape
        return numel(out) * kh * kw * i
    if b == OP.DEPTHWISE_CONV_2D and weight is not None and len(weight.shape) == 4:
        _, kh, kw, _ = weight.shape
        return numel(out) * kh * kw
    if b == OP.FULLY_CONNECTED and weight is not None and len(weight.shape) == 2:
        return numel(out) * weight.shape[1]
    if b == OP.TRANSPOSE_CONV and weight is not None and len(weight.shape) == 4 and len(op.inputs) > 2 and op.inputs[2] is not None:
        o, kh, kw, i = weight.shape
        return numel(static_shape(op.inputs[2])) * kh * kw * o
    if b == OP.BATCH_MATMUL and op.inputs[0] is not None:
        a = static_shape(op.inputs[0])
        adj_x = bool(getattr(op.builtin_options, "adjX", False))
        k = a[-2] if adj_x else a[-1]
        return numel(out) * k
    if b == OP.CONV_3D and weight is not None and len(weight.shape) == 5:
        kd, kh, kw, i, o = weight.shape
        return numel(out) * kd * kh * kw * i
    return 0


def op_row(sg_index: int, op_index: int, op: Operator, producers: dict, zeros: bool = True) -> dict:
    weight = None
    if op.builtin in WEIGHTED_OPS and len(op.inputs) > 1:
        weight = stored_constant(op.inputs[1], producers)
    params = 0
    if op.builtin not in WEIGHT_CARRIERS:
        for t in op.inputs:
            c = stored_constant(t, producers)
            if c is not None:
                params += numel(c.shape)
    return {
        "subgraph": sg_index,
        "index": op_index,
        "op": op.name,
        "version": op.opcode.version,
        "output": op.outputs[0].name if op.outputs else "",
        "weight_shape": list(weight.shape) if weight is not None else None,
        "weight_dtype": weight.type_name if weight is not None else None,
        "weight_sparse": weight is not None and weight.sparsity is not None,
        "params": params,
        "macs": macs(op, weight),
        "zero_fraction": round(zero_fraction(weight), 4) if weight is not None and zeros else None,
    }


def op_rows(model: Model, zeros: bool = True) -> list[dict]:
    """One row per operator; `zeros=False` skips counting zero weights (it reads every weight byte)."""
    rows = []
    for si, sg in enumerate(model.subgraphs):
        producers = sg.producers()
        rows.extend(op_row(si, oi, op, producers, zeros) for oi, op in enumerate(sg.operators))
    return rows


def weight_bytes(model: Model) -> int:
    """Bytes of constant data the model stores (each shared buffer once)."""
    seen, total = set(), 0
    for sg in model.subgraphs:
        for t in sg.tensors:
            if t.is_constant and id(t.buffer) not in seen:
                seen.add(id(t.buffer))
                total += t.buffer.nbytes
    return total


def summary(model: Model, file_bytes: int | None = None, zeros: bool = True) -> dict:
    rows = op_rows(model, zeros)
    return {
        "file_bytes": file_bytes,
        "ops": rows,
        "totals": {
            "params": sum(r["params"] for r in rows),
            "macs": sum(r["macs"] for r in rows),
            "weight_bytes": weight_bytes(model),
        },
    }
