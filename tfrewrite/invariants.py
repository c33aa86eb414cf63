"""The graph's invariants, checked after every pass (`Model.validate()`): what the writer or LiteRT would
reject, or run wrongly, if a rewrite got it wrong.

- every tensor an op, a subgraph or a signature names is listed in that subgraph;
- the use-def links (Tensor.producer / consumers, Buffer.users) match the operator and tensor lists, and no
  tensor is written by two ops;
- every tensor an op reads is a constant, a variable, a subgraph input or written by an earlier op;
- a constant's buffer holds exactly its shape's bytes; a sparse tensor has stored values (LiteRT: "Input tensor
  N lacks data"); DENSIFY reads a sparse constant (densify.cc: IsConstantTensor);
- shapes agree along the edges where that is cheap to see: FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D
  weight against input channels, output channels and bias; DEQUANTIZE and DENSIFY keep the shape;
- the ops we emit carry a version the runtime knows and at least the one their tensors need
  (ops/versions.py); subgraph indices in options name a subgraph.
Each problem is one line naming subgraph, op and tensor, so that a rewrite's problems can be told apart from
the ones an input model already had.
"""
from __future__ import annotations

import numpy as np

from . import schema

OP = schema.BuiltinOperator
T = schema.TensorType


def model_problems(model) -> list[str]:
    out: list[str] = []
    n_subgraphs = len(model.subgraphs)
    for si, sg in enumerate(model.subgraphs):
        out += _subgraph_problems(si, sg, n_subgraphs)
    for sig in model.signature_defs:
        if not any(sg is sig.subgraph for sg in model.subgraphs):
            out.append(f"signature {sig.key!r}: its subgraph is not in the model")
            continue
        listed = {id(t) for t in sig.subgraph.tensors}
        for name, t in sig.inputs + sig.outputs:
            if id(t) not in listed:
                out.append(f"signature {sig.key!r}: tensor {name!r} is not listed in its subgraph")
    return out


def _subgraph_problems(si: int, sg, n_subgraphs: int) -> list[str]:
    out: list[str] = []
    listed = {id(t) for t in sg.tensors}
    for t in sg.inputs + sg.outputs:
        if id(t) not in listed:
            out.append(f"subgraph {si}: input/output {t.name!r} is not listed in it")
    for t in sg.tensors:
        out += _tensor_problems(si, t)
    out += _link_problems(si, sg)
    available = {id(t) for t in sg.inputs} | {id(t) for t in sg.tensors if t.is_constant or t.is_variable}
    written_later = {id(t) for op in sg.operators for t in op.outputs}
    for oi, op in enumerate(sg.operators):
        where = f"subgraph {si}: {op.name} -> {op.outputs[0].name if op.outputs else '?'!r}"
        for t in list(op.inputs) + list(op.outputs) + list(op.intermediates):
            if t is not None and id(t) not in listed:
                out.append(f"{where} uses tensor {t.name!r}, which is not listed in its subgraph")
        for t in op.inputs:
            if t is None or id(t) in available:
                continue
            if id(t) in written_later:
                out.append(f"{where} reads {t.name!r} before it is written")
            elif not _empty_optional(t):
                out.append(f"{where} reads {t.name!r}, which nothing writes (no data, not an input)")
        available.update(id(t) for t in op.outputs)
        out += [f"{where}: {p}" for p in _op_problems(op, n_subgraphs)]
    return out


def _link_problems(si: int, sg) -> list[str]:
    """The live links against what the operator and tensor lists say."""
    out: list[str] = []
    writers: dict[int, list] = {}
    readers: dict[int, dict] = {}
    for op in sg.operators:
        if op.subgraph is not sg:
            out.append(f"subgraph {si}: {op.name} does not know it is in this subgraph")
        for t in op.outputs:
            writers.setdefault(id(t), []).append(op)
        for t in op.inputs:
            if t is not None:
                readers.setdefault(id(t), {})[op] = None
    tensors = {id(t): t for t in sg.tensors}
    tensors.update((id(t), t) for op in sg.operators for t in list(op.inputs) + list(op.outputs) if t is not None)
    for key, t in tensors.items():
        written = writers.get(key, [])
        if len(written) > 1:
            out.append(f"subgraph {si}: tensor {t.name!r} is written by {len(written)} ops")
        if t.producer is not (written[-1] if written else None):
            out.append(f"subgraph {si}: tensor {t.name!r}: its producer link does not match the operators")
        if set(map(id, t.consumers)) != set(map(id, readers.get(key, {}))):
            out.append(f"subgraph {si}: tensor {t.name!r}: its consumer links do not match the operators")
    for t in sg.tensors:
        if t.subgraph is not sg:
            out.append(f"subgraph {si}: tensor {t.name!r} does not know it is listed here")
        elif t.buffer is not None and t not in t.buffer._users:
            out.append(f"subgraph {si}: tensor {t.name!r} is missing from its buffer's users")
    return out


def _empty_optional(t) -> bool:
    """A tensor with no shape and no data some converters write for an omitted optional input."""
    return not t.shape and t.buffer is None


def _tensor_problems(si: int, t) -> list[str]:
    where = f"subgraph {si}: tensor {t.name!r}"
    if t.sparsity is not None:
        if not t.is_constant:
            return [f"{where} is sparse but has no stored values"]
        return []
    if t.is_constant and t.dtype is not None and t.shape and all(d >= 0 for d in t.shape):
        expected = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
        if expected != t.buffer.nbytes:
            return [f"{where} of shape {list(t.shape)} needs {expected} bytes, its buffer has {t.buffer.nbytes}"]
    return []


def _known(shape) -> bool:
    return bool(shape) and all(d > 0 for d in shape)


def _op_problems(op, n_subgraphs: int) -> list[str]:
    out: list[str] = []
    b = op.builtin
    ins = op.inputs
    x = ins[0] if ins else None
    w = ins[1] if len(ins) > 1 else None
    bias = ins[2] if len(ins) > 2 else None
    y = op.outputs[0] if op.outputs else None
    for options in (op.builtin_options, op.builtin_options2):
        for attr, value in (vars(options).items() if options is not None else ()):
            if attr.endswith(("SubgraphIndex", "SubgraphIndices")) or attr == "subgraph":
                for v in np.atleast_1d(np.asarray(value if value is not None else [], np.int64)):
                    if not 0 <= int(v) < n_subgraphs:
                        out.append(f"{attr} {int(v)} names no subgraph")
    if b == OP.DENSIFY:
        if x is None or not x.is_constant or x.sparsity is None:
            out.append("DENSIFY reads something other than a sparse constant")
        elif y is not None and list(y.shape) != list(x.shape):
            out.append(f"DENSIFY changes the shape {list(x.shape)} -> {list(y.shape)}")
    if b == OP.DEQUANTIZE and x is not None and y is not None and _known(x.shape) and _known(y.shape) \
            and list(x.shape) != list(y.shape):
        out.append(f"DEQUANTIZE changes the shape {list(x.shape)} -> {list(y.shape)}")
    if b in (OP.FULLY_CONNECTED, OP.CONV_2D, OP.DEPTHWISE_CONV_2D) and x is not None and w is not None:
        out += _layer_shape_problems(op, x, w, bias, y)
        out += _version_problems(op, x, w, y)
    if b in (OP.DEQUANTIZE, OP.DENSIFY):
        out += _version_problems(op, x, None, y)
    return out


def _layer_shape_problems(op, x, w, bias, y) -> list[str]:
    b, ws = op.builtin, list(w.shape)
    out = []
    channels = None  # output channels the weight gives
    if b == OP.FULLY_CONNECTED:
        if len(ws) != 2:
            return [f"weight {w.name!r} is {len(ws)}-D, not 2-D"]
        channels = ws[0]
        if _known(x.shape) and ws[1] > 0 and int(np.prod(x.shape)) % ws[1]:
            out.append(f"input {list(x.shape)} does not split into rows of {ws[1]} (weight {ws})")
    else:
        if len(ws) != 4:
            return [f"weight {w.name!r} is {len(ws)}-D, not 4-D"]
        if b == OP.CONV_2D:
            channels = ws[0]
            if _known(x.shape) and len(x.shape) == 4 and ws[3] > 0 and x.shape[3] % ws[3]:
                out.append(f"input channels {x.shape[3]} do not match the kernel's {ws[3]}")
        else:
            channels = ws[3]
            mult = getattr(op.builtin_options, "depthMultiplier", 0) or 0
            if _known(x.shape) and len(x.shape) == 4 and mult > 0 and x.shape[3] * mult != ws[3]:
                out.append(f"input channels {x.shape[3]} x depth multiplier {mult} != kernel channels {ws[3]}")
    if y is not None and _known(y.shape) and channels > 0 and y.shape[-1] != channels:
        out.append(f"output channels {y.shape[-1]} do not match the weight's {channels}")
    if bias is not None and _known(bias.shape) and channels > 0 and int(np.prod(bias.shape)) != channels:
        out.append(f"bias of {int(np.prod(bias.shape))} values for {channels} output channels")
    return out


def _version_problems(op, x, w, y) -> list[str]:
    """The version must be one the runtime knows, and not below what the op's tensors need."""
    from .ops import versions
    version = op.opcode.version
    if (op.builtin, version) not in versions.MIN_RUNTIME_VERSIONS:
        return [f"version {version} is not a {op.name} version the runtime knows"]
    if op.builtin == OP.FULLY_CONNECTED and x is not None and y is not None and x.type != T.INT16 \
            and w.sparsity is not None and version != 8:
        return [f"reads a sparse weight at version {version} (only version 8 reads it sparse)"]
    need = required_version(op, x, w, y)
    if need is not None and version < need:
        return [f"version {version} is below the {need} its tensors need"]
    return []


def required_version(op, x, w, y) -> int | None:
    """The version TFLite's op-version rules give this conv / FC / DEQUANTIZE for its tensors (None: no rule
    here, or an int16 model, whose legacy quantizer writes its own versions)."""
    from .ops import versions
    b = op.builtin
    if x is None or y is None or x.type == T.INT16:
        return None
    need = None
    scales = len(w.quantization.scale) if w is not None and w.quantization is not None and \
        w.quantization.scale is not None else 0
    hybrid = x.type == T.FLOAT32 and w is not None and w.type == T.INT8
    options = op.builtin_options
    if b == OP.FULLY_CONNECTED:
        need = versions.fully_connected_version(
            x.type, w.type, y.type, keep_num_dims=bool(getattr(options, "keepNumDims", False)),
            sparse_weights=w.sparsity is not None,
            asymmetric_quantize_inputs=bool(getattr(options, "asymmetricQuantizeInputs", False)),
            per_channel_hybrid=hybrid and versions.fully_connected_is_per_channel(scales, w.shape),
            num_inputs=len(op.inputs))
    elif b == OP.CONV_2D:
        need = versions.conv2d_version(x.type, w.type, output_type=y.type,
                                       per_channel_hybrid=hybrid and versions.conv2d_is_per_channel(scales, w.shape))
    elif b == OP.DEPTHWISE_CONV_2D:
        need = versions.depthwise_conv2d_version(
            x.type, w.type, output_type=y.type,
            per_channel_hybrid=hybrid and versions.depthwise_conv2d_is_per_channel(scales, w.shape))
    elif b == OP.DEQUANTIZE:
        q = x.quantization
        n = len(q.scale) if q is not None and q.scale is not None else 0
        need = versions.dequantize_version(
            x.type, versions.dequantize_is_per_channel(n, x.shape, getattr(q, "axis", 0) or 0))
    return need
