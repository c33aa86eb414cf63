"""Per-operator facts about a model: its weight, parameters, MACs and share of zero weights."""
from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np

from . import schema
from .ops import semantics
from .graph import Model, Operator, Subgraph, Tensor

OP = schema.BuiltinOperator
T = schema.TensorType
# Operators whose input 1 is "the weight" of the layer.
WEIGHTED_OPS = semantics.WEIGHTED_OPS
# Operators that only turn a stored constant into its runtime form; their params are counted at the reader.
WEIGHT_CARRIERS = {OP.DEQUANTIZE, OP.DENSIFY}


def static_shape(t: Tensor) -> list[int]:
    """Shape with unknown dimensions counted as 1."""
    return [d if d > 0 else 1 for d in t.shape]


def numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


class Stored(NamedTuple):
    """The constant behind a tensor an op reads, and the ops that carry it there (DEQUANTIZE / DENSIFY, the one
    next to the reader first; none when the op reads the constant itself)."""
    tensor: Tensor
    carriers: tuple

    @property
    def carrier(self) -> Operator | None:
        return self.carriers[0] if self.carriers else None

    def values(self) -> np.ndarray | None:
        """The real values as float32: float32 as stored (a view), float16 widened, int8 dequantized; None for
        a sparse constant or another type."""
        t = self.tensor
        if t.sparsity is not None:
            return None
        if t.type in (T.FLOAT32, T.FLOAT16):
            return np.asarray(t.data, np.float32)
        if t.type == T.INT8 and t.quantization is not None and t.quantization.scale is not None:
            return t.quantization.dequantize(t.data)
        return None


def is_subgraph_output(t: Tensor | None) -> bool:
    """Whether `t` is an output of the subgraph that lists it (a constant can be: its values are then part of what
    the model returns, and no pass may change them)."""
    sg = t.subgraph if t is not None else None
    return sg is not None and any(o is t for o in sg.outputs)


def stored(t: Tensor | None) -> Stored | None:
    """The weight reader every pass uses: the constant behind `t`, following DEQUANTIZE / DENSIFY back to the
    stored tensor (None when `t` is not a stored constant)."""
    carriers = []
    while t is not None and not t.is_constant and len(carriers) < 4:
        op = t.producer
        if op is None or op.builtin not in WEIGHT_CARRIERS:
            return None
        carriers.append(op)
        t = op.inputs[0]
    return Stored(t, tuple(carriers)) if t is not None and t.is_constant else None


def stored_constant(t: Tensor | None) -> Tensor | None:
    """The constant behind `t` (see `stored`)."""
    s = stored(t)
    return s.tensor if s is not None else None


# ------------------------------------------------------------------------------------------- shared weights
# One policy for a weight that several ops read (in one subgraph, or across subgraphs and signatures: one Buffer
# with a tensor in each), which every pass that changes weights follows; `weight_uses` finds the readers:
# - a change made for every reader keeps the weight stored once (prune, sparse_encode, quantize, and the low-rank
#   passes, whose one set of factors serves every reader). It is made only when every reader is an op the pass
#   rewrites, and rewrites the same way (`refusal` says why not, naming the reader in the way, and the weight
#   is left as it is). The first reader in model order decides and carries the bytes; the later ones report
#   that the change was made once there.
# - a change that is one op's own (channel pruning slices a weight with that op's channels) is made on a copy
#   that op alone reads (`private_weight`); the other readers keep theirs.
class WeightUse(NamedTuple):
    """One op input that reads a stored weight's values (directly or through the ops that carry it)."""
    subgraph: Subgraph
    op: Operator
    index: int


class WeightUses(NamedTuple):
    """A stored weight and everything that reads it, in model order (subgraph, then execution order): `uses`
    are the op inputs that read its values, `carriers` the DEQUANTIZE / DENSIFY ops in between (whose readers
    are in `uses`)."""
    stored: Tensor
    uses: list
    carriers: list

    @property
    def ops(self) -> list[Operator]:
        """The reading ops, each once."""
        return list({u.op: None for u in self.uses})

    @property
    def shared(self) -> bool:
        """Read by more than one op."""
        return len(self.ops) > 1

    def refusal(self, rewrites, ask=None, **messages) -> str | None:
        return refusal(self.uses, rewrites, ask, **messages)


def refusal(uses, rewrites, ask=None, left: str = "another reader is left as it is",
            differ: str = "its readers ask for different changes") -> str | None:
    """Why a change for every one of `uses` (each with an `op`) cannot be made, None when it can: `rewrites(use)`
    is True for a use the pass rewrites, False for one it does not rewrite at all ("the weight is also read by
    OP"), or that use's own reason to be left as it is (`left`); `ask(use)` is the change it asks for, which
    must be the same for all (`differ`)."""
    asks = set()
    for use in uses:
        verdict = rewrites(use)
        if verdict is False:
            return f"the weight is also read by {use.op.name}"
        if verdict is not True:
            return f"shared weight: {left}"
        if ask is not None:
            asks.add(ask(use))
    return f"shared weight: {differ}" if len(asks) > 1 else None


def weight_uses(model: Model, t: Tensor) -> WeightUses:
    """Every op input, in any subgraph, that reads the values of the weight stored in `t`'s buffer (`t` the stored
    constant), looking through the DEQUANTIZE / DENSIFY ops that carry it."""
    tensors, carriers = model.sharers(t), []
    frontier = tensors
    while frontier and len(carriers) < 64:
        frontier = [(sg, op.outputs[0]) for sg, op, i in model.readers(frontier)
                    if op.builtin in WEIGHT_CARRIERS and i == 0 and op.outputs]
        carriers += [out.producer for _, out in frontier]
        tensors = tensors + frontier
    uses = [WeightUse(sg, op, i) for sg, op, i in model.readers(tensors) if all(op is not c for c in carriers)]
    return WeightUses(t, uses, carriers)


def private_weight(op: Operator, index: int) -> Stored | None:
    """The constant behind input `index` of `op` (and the DEQUANTIZE / DENSIFY carrying it), made one that only
    `op` reads, for a change that is op's own: where another op of the subgraph reads the same tensor, `op` gets
    a copy of it (and of the carriers and constant behind it) over the same Buffer, so no bytes are copied until
    the pass gives the copy new data. Tensors of other subgraphs over the Buffer need nothing: a pass gives a
    tensor new data in a new Buffer, it never writes into one. None when the input is not a stored constant."""
    if stored(op.inputs[index]) is None:
        return None
    sg, reader, i = op.subgraph, op, index
    while True:
        t = reader.inputs[i]
        carrier = t.producer
        if any(c is not reader for c in t.consumers):
            mine = copy.copy(t)
            mine.name = sg.unique_name(t.name)
            mine.quantization = copy.copy(t.quantization)
            sg.add_tensor(mine)
            if carrier is not None:  # its own carrier, right before the reader, reading the constant
                twin = copy.copy(carrier)
                twin.outputs = [mine]
                sg.insert_before(reader, [twin])
            reader.inputs[i] = mine
            t = mine
            carrier = twin if carrier is not None else None
        if carrier is None:
            return stored(op.inputs[index])
        reader, i = carrier, 0


def zero_fraction(t: Tensor) -> float:
    """Share of zero weights; a sparse tensor's missing entries count as zeros."""
    n = numel(t.shape)
    if n == 0:
        return 0.0
    if t.sparsity is not None:
        values = _stored_values(t)
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
    if b == OP.BATCH_MATMUL and op.inputs[0] is not None and len(static_shape(op.inputs[0])) >= 2:
        a = static_shape(op.inputs[0])
        adj_x = bool(getattr(op.builtin_options, "adjX", False))
        k = a[-2] if adj_x else a[-1]
        return numel(out) * k
    if b == OP.CONV_3D and weight is not None and len(weight.shape) == 5:
        kd, kh, kw, i, o = weight.shape
        return numel(out) * kd * kh * kw * i
    return 0


def layer_weight(op: Operator) -> Tensor | None:
    """The stored weight constant of a weighted op (input 1, through DEQUANTIZE / DENSIFY), else None."""
    return stored_constant(op.inputs[1]) if op.builtin in WEIGHTED_OPS and len(op.inputs) > 1 else None


def _stored_values(c: Tensor):
    """The values a constant stores: a sparse tensor's are only its nonzero ones (None when unreadable)."""
    if c.sparsity is not None:
        return c.buffer.data.view(c.dtype) if c.dtype is not None else None
    return c.data


def _constants_read(op: Operator) -> list[Tensor]:
    """The stored constants `op` reads (through DEQUANTIZE / DENSIFY), one per input; none for those
    carriers themselves (their reader counts them)."""
    if op.builtin in WEIGHT_CARRIERS:
        return []
    return [c for c in map(stored_constant, op.inputs) if c is not None]


def op_row(sg_index: int, op_index: int, op: Operator, zeros: bool = True) -> dict:
    weight = layer_weight(op)
    params = sum(numel(c.shape) for c in _constants_read(op))
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
        # Input → output channels (last axis) of a layer, what structured pruning changes.
        "channels": _layer_channels(op),
        "zero_fraction": round(zero_fraction(weight), 4) if weight is not None and zeros else None,
    }


def _layer_channels(op: Operator) -> list | None:
    """A layer's activation input → output channels (last axis); None for other ops."""
    layout = semantics.LAYERS.get(op.builtin)
    if layout is None or not op.outputs or op.outputs[0] is None:
        return None
    x = op.inputs[layout.data] if len(op.inputs) > layout.data else None
    y = op.outputs[0]
    return [int(x.shape[-1]) if x is not None and x.shape else None, int(y.shape[-1]) if y.shape else None]


def op_rows(model: Model, zeros: bool = True) -> list[dict]:
    """One row per operator; `zeros=False` skips counting zero weights (it reads every weight byte)."""
    rows = []
    for si, sg in enumerate(model.subgraphs):
        rows.extend(op_row(si, oi, op, zeros) for oi, op in enumerate(sg.operators))
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


def nonzero_params(model: Model) -> int:
    """Stored weights that are not zero, counted per reading op as `params` is (a sparse tensor's missing
    entries are zeros): what pruning really leaves."""
    total = 0
    for sg in model.subgraphs:
        for op in sg.operators:
            for c in _constants_read(op):
                values = _stored_values(c)
                total += int(np.count_nonzero(values)) if values is not None else numel(c.shape)
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


# ------------------------------------------------------------------------------- plausible model inputs
# Ops that pass an integer tensor on unchanged in value (only its shape or type may change).
_VALUE_PRESERVING = {OP.CAST, OP.RESHAPE, OP.SQUEEZE, OP.EXPAND_DIMS}
# Integers that are not indices get values in this small non-negative range (counts, positions, flags).
SMALL_INTEGERS = (0, 7)


def _dims(t: Tensor | None) -> list[int] | None:
    return [d if d > 0 else 1 for d in t.shape] if t is not None and t.shape is not None else None


def _index_bounds(op: Operator, position: int):
    """(low, high) inclusive, each a scalar or one value per index component (last axis), of what input
    `position` of `op` may hold without reading out of bounds; None when it is not an index operand."""
    ins = op.inputs
    if op.builtin == OP.EMBEDDING_LOOKUP and position == 0 and _dims(ins[1]):
        return 0, _dims(ins[1])[0] - 1
    if op.builtin == OP.GATHER and position == 1 and _dims(ins[0]):
        params = _dims(ins[0])
        axis = getattr(op.builtin_options, "axis", 0) or 0
        axis = axis + len(params) if axis < 0 else axis
        return (0, params[axis] - 1) if 0 <= axis < len(params) else None
    if op.builtin == OP.GATHER_ND and position == 1 and _dims(ins[0]) and _dims(ins[1]):
        k = _dims(ins[1])[-1]
        return 0, np.array(_dims(ins[0])[:k]) - 1
    if op.builtin in (OP.SLICE, OP.STRIDED_SLICE) and position >= 1 and _dims(ins[0]):
        dims = np.array(_dims(ins[0]))
        if op.builtin == OP.SLICE:  # begin 0, size -1: the whole tensor, valid for any shape
            return (0, 0) if position == 1 else (-1, -1)
        return {1: (0, 0), 2: (dims, dims), 3: (1, 1)}.get(position)
    if op.builtin == OP.DYNAMIC_UPDATE_SLICE and position == 2 and _dims(ins[0]) and _dims(ins[1]):
        return 0, np.maximum(np.array(_dims(ins[0])) - np.array(_dims(ins[1])), 0)
    if op.builtin == OP.ONE_HOT and position == 0 and ins[1] is not None and ins[1].data is not None:
        return 0, int(np.asarray(ins[1].data).reshape(-1)[0]) - 1
    return None


def _index_range(sg, tensor: Tensor, depth: int = 0):
    """The bounds every index use of `tensor` allows (intersected), following value-preserving ops."""
    low, high = None, None
    for op in tensor.consumers:
        found = []
        for pos, t in enumerate(op.inputs):
            if t is tensor:
                if op.builtin in _VALUE_PRESERVING and pos == 0 and depth < 8:
                    found.append(_index_range(sg, op.outputs[0], depth + 1))
                else:
                    found.append(_index_bounds(op, pos))
        for bounds in found:
            if bounds is None:
                continue
            lo, hi = bounds
            if op.builtin in _VALUE_PRESERVING and (np.ndim(lo) or np.ndim(hi)):  # components lost their axis
                lo, hi = np.max(lo), np.min(hi)
            low = lo if low is None else np.maximum(low, lo)
            high = hi if high is None else np.minimum(high, hi)
    return None if low is None else (low, np.maximum(high, low))


def input_ranges(sg, tensors: list[Tensor]) -> list[dict]:
    """How to make plausible values for each of `tensors` (inputs of `sg`), from what reads them:
    index operands stay within the table or tensor they index; quantized integers span their quantized range;
    floats feeding a QUANTIZE span the real range its scale and zero point cover; other integers are small and
    non-negative; other floats are standard normal. Each entry: kind ('index', 'integer', 'uniform',
    'normal', 'bool') and inclusive `low`/`high` (scalars or one per last-axis component)."""
    out = []
    for t in tensors:
        dtype = t.dtype
        if dtype is not None and dtype == np.bool_:
            out.append({"kind": "bool"})
            continue
        if dtype is None:  # strings, resources, variants: the runner decides
            out.append({"kind": "normal"})
            continue
        if dtype.kind in "iu":
            bounds = _index_range(sg, t)
            if bounds is not None:
                out.append({"kind": "index", "low": bounds[0], "high": bounds[1]})
                continue
            info = np.iinfo(dtype)
            q = t.quantization
            if q is not None and q.scale is not None and len(q.scale):
                low = -info.max if dtype == np.int16 else info.min  # int16 activations are symmetric
                out.append({"kind": "integer", "low": low, "high": info.max})
            else:
                out.append({"kind": "integer", "low": max(SMALL_INTEGERS[0], info.min),
                            "high": min(SMALL_INTEGERS[1], info.max)})
            continue
        quantize = next((op for op in t.consumers if op.builtin == OP.QUANTIZE), None)
        q = quantize.outputs[0].quantization if quantize is not None else None
        if q is not None and q.scale is not None and len(q.scale) == 1 and quantize.outputs[0].dtype is not None \
                and quantize.outputs[0].dtype.kind in "iu":
            info = np.iinfo(quantize.outputs[0].dtype)
            zero = int(q.zero_point[0]) if q.zero_point is not None and len(q.zero_point) else 0
            scale = float(q.scale[0])
            out.append({"kind": "uniform", "low": (info.min - zero) * scale, "high": (info.max - zero) * scale})
        else:
            out.append({"kind": "normal"})
    return out
