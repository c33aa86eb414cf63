"""Weight-only quantization: float16 (behind DEQUANTIZE) or dynamic-range int8.

- float16, as the TF converter's float16 option writes it: the float32 constant becomes a float16 constant
  (same name) read by a DEQUANTIZE (version 3) at the top of the subgraph, whose float32 output the layer
  reads. Activations and compute stay float32.
- int8, as the converter's dynamic-range option writes it: the weight of CONV_2D, DEPTHWISE_CONV_2D and
  FULLY_CONNECTED with float32 activations becomes int8 itself, symmetric, one scale per output channel
  (quantized dimension 0; 3 for depthwise), zero point 0; the op's version is raised to the hybrid
  per-channel one (CONV_2D 5, DEPTHWISE_CONV_2D 6, FULLY_CONNECTED 12 with asymmetric_quantize_inputs, as
  the converter sets it). Large float32 constants of other ops become int8 behind a DEQUANTIZE.
  An all-zero channel gets scale 1.0 (XNNPACK rejects a zero scale).

Biases (input 2 of conv / depthwise / FC, input 3 of TRANSPOSE_CONV) stay float32. Weights below
`--min-params` stay as they are; without `--min-params`, int8 layer weights and constants of other ops need
at least 1024 elements (the converter's dynamic-range default), float16 layer weights have no minimum. A constant shared by several ops (one Buffer) is quantized once and stays shared,
and only when every reader asks for the same thing. Sparse weights, weights behind DENSIFY and weights
already float16 / int8 are left with a reason.
"""
from __future__ import annotations

import numpy as np

from .. import ops, schema
from ..analysis import macs, numel, refusal
from ..graph import Buffer, Model, OpCode, Operator, Quantization, Subgraph, Tensor
from ..ops import semantics, versions
from ..report import Entry
from .common import Skip, hybrid_reads_alike, new_entry, nonfinite_reason, read_weight

OP = schema.BuiltinOperator
T = schema.TensorType

LAYER_OPS = semantics.LAYER_OPS
# Input index of the bias, which stays float32.
BIAS_INPUT = {OP.CONV_2D: 2, OP.DEPTHWISE_CONV_2D: 2, OP.FULLY_CONNECTED: 2, OP.TRANSPOSE_CONV: 3, OP.CONV_3D: 2}
# Ops whose constant inputs are never quantized here (they are the storage machinery itself).
NOT_READERS = {OP.DEQUANTIZE, OP.DENSIFY, OP.QUANTIZE}
# "Large constant weights" of ops other than conv / depthwise / FC, unless --min-params says otherwise.
OTHER_MIN_ELEMENTS = 1024
# int8 conv / depthwise / FC weights, unless --min-params says otherwise: the TF converter's dynamic-range
# default (weights_min_num_elements = 1024). float16 has no such minimum (the converter has none either).
INT8_MIN_ELEMENTS = 1024


def stored_itemsize(kind: str, size: int, quantize: str | None, min_params: int = 0) -> int:
    """Bytes per weight of a layer's `kind` ('float32', 'float16', 'int8') weight of `size` elements after this
    pass with --quantize `quantize` (for the budget's costs): float32 becomes float16, or int8 from its size
    threshold."""
    if kind == "float32" and quantize == "float16":
        return 2
    if kind == "float32" and quantize == "int8" and size >= (min_params or INT8_MIN_ELEMENTS):
        return 1
    return {"float32": 4, "float16": 2, "int8": 1}.get(kind, 4)


class _Use:
    """One op input reading a float32 constant."""

    __slots__ = ("sg", "op", "index", "tensor", "entry", "mode", "reason", "hybrid", "axis")

    def __init__(self, sg, op, index, tensor):
        self.sg, self.op, self.index, self.tensor = sg, op, index, tensor
        self.entry = None
        self.mode = None
        self.reason = None
        self.hybrid = False
        self.axis = None


def run(model: Model, ctx, progress=None) -> list[Entry]:
    entries: list[Entry] = []
    groups: dict[int, list[_Use]] = {}  # id(Buffer) → every use of a float32 constant on that buffer
    for sg in model.subgraphs:
        # Constants that must keep their float32 type whatever their other readers want.
        blocked = {id(t) for t in sg.outputs}
        for op in sg.operators:
            for i, t in enumerate(op.inputs):
                if t is not None and (op.builtin in NOT_READERS or i == BIAS_INPUT.get(op.builtin)):
                    blocked.add(id(t))
        for op in list(sg.operators):
            if op.builtin in NOT_READERS:
                continue
            for i, t in enumerate(op.inputs):
                if t is None or i == BIAS_INPUT.get(op.builtin):
                    continue
                if op.builtin in LAYER_OPS and i == 1 and not _is_float_constant(t):
                    entries.append(_layer_weight_entry(model, sg, op, ctx))
                    continue
                if not _is_float_constant(t):
                    continue
                use = _Use(sg, op, i, t)
                _judge(model, use, ctx, id(t) in blocked)
                if use.entry is not None:
                    entries.append(use.entry)
                groups.setdefault(id(t.buffer), []).append(use)
    for uses in groups.values():
        _quantize_group(uses)
    if progress:
        for e in entries:
            if e.op in ("CONV_2D", "FULLY_CONNECTED"):
                progress(e)
    return entries


def _is_float_constant(t: Tensor) -> bool:
    return t.is_constant and t.type == T.FLOAT32 and t.sparsity is None and not t.is_variable


def _layer_weight_entry(model, sg, op, ctx) -> Entry:
    """Report entry of a conv / FC whose weight is not a dense float32 constant."""
    entry = _entry(model, sg, op, ctx)
    mode = ctx.settings(op).quantize
    try:
        w = read_weight(op)
    except Skip as e:
        entry.reason = str(e)
        return entry
    entry.set(weight_shape=list(w.stored.shape), weight_dtype=w.kind, dtype_after=w.kind,
              params_before=numel(w.stored.shape), params_after=numel(w.stored.shape))
    if w.kind == mode:
        entry.reason = f"already {w.kind}"
    elif w.kind == "float16":
        entry.reason = "already float16 (int8 needs the float32 weights: quantize the float32 model)"
    else:
        entry.reason = f"already {w.kind} (smaller than {mode})" if mode else f"already {w.kind}"
    return entry


def _entry(model, sg, op, ctx) -> Entry:
    entry = new_entry(model, sg, op, "quantize", ctx)
    # Storing a weight differently leaves the layer's MACs as they are (the table showed 0 -> 0).
    work = macs(op, op.inputs[1] if len(op.inputs) > 1 else None)
    entry.set(dtype_after=None, bytes_before=0, bytes_after=0, macs_before=work, macs_after=work)
    return entry


def _judge(model, use: _Use, ctx, blocked: bool) -> None:
    """Decide what this use asks for; make its report entry (None for small constants of other ops)."""
    op, t = use.op, use.tensor
    n = numel(t.shape)
    layer_weight = op.builtin in LAYER_OPS and use.index == 1
    minimum = ctx.plan.min_params if layer_weight or ctx.plan.min_params > 0 else OTHER_MIN_ELEMENTS
    if not layer_weight and n < minimum:
        return  # a small constant of another op: not a weight worth reporting
    entry = use.entry = _entry(model, use.sg, op, ctx)
    entry.set(weight_shape=list(t.shape), weight_dtype="float32", dtype_after="float32",
              params_before=n, params_after=n, bytes_before=t.buffer.nbytes, bytes_after=t.buffer.nbytes)
    if not layer_weight:
        entry.input = use.index
    reason = ctx.reason_to_skip(op, n, kept_dense_counts=False)
    mode = ctx.settings(op).quantize
    if reason is None and mode == "int8" and layer_weight and ctx.plan.min_params == 0 and n < INT8_MIN_ELEMENTS:
        # Like the converter's dynamic range: a small layer saves a few hundred bytes (less after its
        # per-channel scales) and costs accuracy and speed in the hybrid kernel.
        reason = f"fewer than {INT8_MIN_ELEMENTS} weights (int8 default, as the TF converter; --min-params sets it)"
    if reason is None and mode is None:
        reason = "no quantization asked for this layer"
    if reason is None:
        reason = nonfinite_reason(t.data)
    if reason is None and blocked:
        reason = "the constant is also a bias, a subgraph output or read by DEQUANTIZE/QUANTIZE"
    if reason is None and mode == "int8" and layer_weight:
        use.hybrid, use.axis = _hybrid_form(op, t)
    use.mode, use.reason = mode, reason


def _hybrid_form(op: Operator, t: Tensor) -> tuple[bool, int | None]:
    """(whether the op can read the int8 weight directly, quantized dimension)."""
    x, out = op.inputs[0], op.outputs[0]
    if x is None or x.type != T.FLOAT32 or out.type != T.FLOAT32:
        return False, None
    if op.builtin == OP.CONV_2D:
        if len(t.shape) != 4 or (x.shape and len(x.shape) == 4 and x.shape[3] != t.shape[3]):
            return False, None  # grouped: no hybrid kernel
        # 1x1: XNNPACK and the builtin kernel differ; int8 (per output channel) behind a DEQUANTIZE instead.
        return hybrid_reads_alike(op.builtin, t.shape), 0
    if op.builtin == OP.DEPTHWISE_CONV_2D:
        if len(t.shape) != 4:
            return False, None
        # XNNPACK and the builtin kernel differ: int8 (per channel, dimension 3) behind a DEQUANTIZE instead.
        return hybrid_reads_alike(op.builtin, t.shape), 3
    if op.builtin == OP.FULLY_CONNECTED:
        if getattr(op.builtin_options, "weightsFormat", 0) != 0 or len(t.shape) != 2:
            return False, None
        return True, 0
    return False, None


def _quantize_group(uses: list[_Use]) -> None:
    modes = {u.mode for u in uses}
    tensors = list({id(u.tensor): u.tensor for u in uses}.values())
    # The IR's shared-weight policy: one change for every reader, or none. A small constant input of another op
    # has no entry: it is not a weight this pass quantizes.
    problem = refusal(uses, lambda u: u.entry is not None and (u.reason or True), ask=lambda u: u.mode,
                      differ="its readers ask for different quantization")
    if problem is None and len({tuple(t.shape) for t in tensors}) != 1:
        problem = "buffer shared by tensors of different shapes"
    if problem is None:
        problem = _does_not_pay(uses, tensors, modes)
    if problem:
        for u in uses:
            if u.entry is not None and not u.reason:
                u.entry.reason = problem
            elif u.entry is not None:
                u.entry.reason = u.reason
        return
    mode = modes.pop()
    values = np.asarray(tensors[0].data, np.float32)
    before = tensors[0].buffer.nbytes
    if mode == "float16":
        _to_float16(uses, tensors, values)
    else:
        _to_int8(uses, tensors, values)
    after = tensors[0].buffer.nbytes
    for k, u in enumerate(uses):
        u.entry.set(action="quantized", dtype_after=_dtype_after(u, mode), reason=None,
                    bytes_before=before if k == 0 else 0, bytes_after=after if k == 0 else 0)
        u.entry.method = u.entry.dtype_after
        if len(uses) > 1:
            u.entry.shared = True
            if k:
                u.entry.reason = "shared weight (bytes counted at its first reader)"


def _does_not_pay(uses, tensors, modes) -> str | None:
    """Tiny constants: the bytes saved against the DEQUANTIZE op and its output tensor (or the int8 scales)
    each tensor needs; a reason when the file would not get smaller."""
    from .. import io
    mode = next(iter(modes))
    t = tensors[0]
    dense = t.buffer.nbytes
    saved = dense // 2 if mode == "float16" else dense - dense // 4
    cost = 0
    for tensor in tensors:
        indirect = mode == "float16" or any(u.tensor is tensor and not u.hybrid for u in uses)
        if indirect:  # a DEQUANTIZE and the float32 tensor it writes
            cost += io.operator_bytes(ops.dequantize(tensor, tensor)) + io.tensor_bytes(tensor) + 4
        if mode == "int8":  # one scale (float32) and zero point (int64) per output channel
            channels = tensor.shape[0] if len(tensor.shape) >= 2 else 1
            cost += io.QUANTIZATION_BYTES + 12 * channels
    if saved > cost:
        return None
    return f"does not pay: {mode} saves {saved} bytes of weights, its DEQUANTIZE/scales take {cost}"


def _dtype_after(use: _Use, mode: str) -> str:
    if mode == "float16":
        return "float16"
    if use.hybrid:
        return "int8 per-channel (hybrid)" if len(use.tensor.quantization.scale) > 1 else "int8 (hybrid)"
    return "int8 (dequantize)"


def _to_float16(uses, tensors, values) -> None:
    from ..linalg import quant
    buffer = Buffer(quant.to_float16(values).reshape(-1).view(np.uint8))
    for t in tensors:
        sg = next(u.sg for u in uses if u.tensor is t)
        out = sg.add_activation(t.name + "1", T.FLOAT32, t.shape)  # the converter's naming
        for u in uses:
            if u.tensor is t:
                u.op.inputs[u.index] = out
        t.type, t.buffer, t.quantization, t.shape_signature = T.FLOAT16, buffer, None, None
        sg.operators.insert(_dequantize_position(sg), ops.dequantize(t, out))


def _to_int8(uses, tensors, values) -> None:
    from ..linalg import quant
    axes = {u.axis for u in uses if u.axis is not None}
    if len(axes) > 1:  # readers want different channel axes: all read through a DEQUANTIZE, per tensor
        for u in uses:
            u.hybrid, u.axis = False, None
        axes = set()
    if axes:
        axis = axes.pop()
    else:
        axis = 0 if values.ndim >= 2 and values.shape[0] > 1 else None
    q, scales = quant.quantize_symmetric_int8(values, axis=axis)
    buffer = Buffer(np.ascontiguousarray(q).reshape(-1).view(np.uint8))
    for t in tensors:
        qp = Quantization.symmetric(scales, axis)
        t.type, t.buffer, t.quantization, t.shape_signature = T.INT8, buffer, qp, None
        sg = next(u.sg for u in uses if u.tensor is t)
        indirect = [u for u in uses if u.tensor is t and not u.hybrid]
        if indirect:
            out = sg.add_activation(t.name + "1", T.FLOAT32, t.shape)
            for u in indirect:
                u.op.inputs[u.index] = out
            per_channel = versions.dequantize_is_per_channel(len(qp.scale), t.shape, qp.axis)
            dq = ops.dequantize(t, out)
            dq.opcode = ops.opcode_for(OP.DEQUANTIZE, versions.dequantize_version(T.INT8, per_channel))
            sg.operators.insert(_dequantize_position(sg), dq)
    done = set()
    for u in uses:
        if u.hybrid and id(u.op) not in done:
            done.add(id(u.op))
            _make_hybrid(u.op)


def _make_hybrid(op: Operator) -> None:
    """Raise the version of a conv / FC that now reads an int8 weight (and set the FC options the converter
    sets). Only raises, like the converter; a new OpCode, since OpCodes are shared between ops."""
    x, w, out = op.inputs[0], op.inputs[1], op.outputs[0]
    n_scales = len(w.quantization.scale)
    if op.builtin == OP.CONV_2D:
        version = versions.conv2d_version(x.type, T.INT8, output_type=out.type,
                                          per_channel_hybrid=versions.conv2d_is_per_channel(n_scales, w.shape))
    elif op.builtin == OP.DEPTHWISE_CONV_2D:
        version = versions.depthwise_conv2d_version(
            x.type, T.INT8, output_type=out.type,
            per_channel_hybrid=versions.depthwise_conv2d_is_per_channel(n_scales, w.shape))
    else:
        options = schema.shallow_copy(op.builtin_options) if op.builtin_options is not None else schema.FullyConnectedOptionsT()
        options.asymmetricQuantizeInputs = True
        op.builtin_options, op.builtin_options_type = options, schema.BuiltinOptions.FullyConnectedOptions
        version = versions.fully_connected_version(
            x.type, T.INT8, out.type, keep_num_dims=bool(options.keepNumDims), asymmetric_quantize_inputs=True,
            per_channel_hybrid=versions.fully_connected_is_per_channel(n_scales, w.shape),
            num_inputs=len(op.inputs))
    op.opcode = OpCode(op.opcode.builtin, op.opcode.custom_code, max(op.opcode.version, version))


def _dequantize_position(sg: Subgraph) -> int:
    """After the DEQUANTIZE ops at the top of the subgraph (where the converter puts them)."""
    i = 0
    while i < len(sg.operators) and sg.operators[i].builtin == OP.DEQUANTIZE and \
            sg.operators[i].inputs[0] is not None and sg.operators[i].inputs[0].is_constant:
        i += 1
    return i

