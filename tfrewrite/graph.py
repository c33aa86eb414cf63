"""The in-memory graph that passes edit.

Model → Subgraphs → Operators and Tensors that point at each other directly. Indices, the operator-code
table, buffer numbering, signature and metadata indices exist only in the file; `io` rebuilds them on write.
Use-def links are live (as in onnx-graphsurgeon): `Tensor.producer`, `Tensor.consumers` and `Buffer.users`
follow every edit made through the IR's lists (a subgraph's operators and tensors, an operator's inputs and
outputs) and helpers, for the operators and tensors a subgraph lists; the invariant check compares them with
the lists.
Quantization parameters are the IR's own `Quantization`; options and sparsity parameters are kept as the
schema's object-API values and written back unchanged unless a pass replaces them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from . import schema

# TensorType → numpy dtype for the types whose constants we can view as arrays.
NUMPY_DTYPES = {
    schema.TensorType.FLOAT32: np.dtype("<f4"),
    schema.TensorType.FLOAT16: np.dtype("<f2"),
    schema.TensorType.FLOAT64: np.dtype("<f8"),
    schema.TensorType.INT8: np.dtype("i1"),
    schema.TensorType.UINT8: np.dtype("u1"),
    schema.TensorType.INT16: np.dtype("<i2"),
    schema.TensorType.UINT16: np.dtype("<u2"),
    schema.TensorType.INT32: np.dtype("<i4"),
    schema.TensorType.UINT32: np.dtype("<u4"),
    schema.TensorType.INT64: np.dtype("<i8"),
    schema.TensorType.UINT64: np.dtype("<u8"),
    schema.TensorType.BOOL: np.dtype("?"),
    schema.TensorType.COMPLEX64: np.dtype("<c8"),
    schema.TensorType.COMPLEX128: np.dtype("<c16"),
}
TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def tensor_type_for(dtype) -> int:
    dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    for code, d in NUMPY_DTYPES.items():
        if d == dtype:
            return code
    raise ValueError(f"no TFLite tensor type for numpy dtype {dtype}")


class Buffer:
    """Raw bytes of a constant; one Buffer may back several tensors (shared weights stay shared)."""

    __slots__ = ("data", "source", "_users")

    def __init__(self, data, source: tuple[str, int] | None = None):
        self._users: dict[Tensor, None] = {}  # tensors listed in a subgraph over these bytes (kept by the IR)
        # A uint8 view (often on the memory-mapped input file) or any bytes-like object.
        self.data = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        # (path, offset) when the bytes are an untouched region of a file: the writer copies them in the kernel.
        self.source = source

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def users(self) -> list[Tensor]:
        """Every tensor of any subgraph over this buffer (a weight shared across ops, subgraphs or signatures is
        one Buffer with one tensor per subgraph, or several tensors in one subgraph), in the order they were
        listed (`Model.sharers` gives model order)."""
        return list(self._users)


class _Linked(list):
    """A list that tells its owner what enters and leaves it, so that the use-def links follow every edit made
    through it (item and slice assignment, append, insert, extend, remove, pop, del, clear)."""

    __slots__ = ("_added", "_removed")

    def __init__(self, items=(), added=None, removed=None):
        super().__init__(items)
        self._added, self._removed = added, removed
        for x in self:
            added(x)

    def __setitem__(self, i, value):
        if isinstance(i, slice):
            value = list(value)
            for x in list.__getitem__(self, i):
                self._removed(x)
            list.__setitem__(self, i, value)
        else:
            self._removed(list.__getitem__(self, i))
            list.__setitem__(self, i, value)
            value = [value]
        for x in value:
            self._added(x)

    def __delitem__(self, i):
        for x in (list.__getitem__(self, i) if isinstance(i, slice) else [list.__getitem__(self, i)]):
            self._removed(x)
        list.__delitem__(self, i)

    def append(self, x):
        list.append(self, x)
        self._added(x)

    def insert(self, i, x):
        list.insert(self, i, x)
        self._added(x)

    def extend(self, items):
        items = list(items)
        list.extend(self, items)
        for x in items:
            self._added(x)

    def __iadd__(self, items):
        self.extend(items)
        return self

    def __imul__(self, n):
        raise TypeError("repeating IR lists is not supported")

    def remove(self, x):
        i = next((i for i, y in enumerate(self) if y is x), None)
        if i is None:
            raise ValueError(f"{x!r} is not in the list")
        del self[i]

    def pop(self, i=-1):
        x = list.__getitem__(self, i)
        del self[i]
        return x

    def clear(self):
        del self[:]

    def sort(self, *, key=None, reverse=False):
        self[:] = sorted(self, key=key, reverse=reverse)

    def reverse(self):
        self[:] = self[::-1]

    def __copy__(self):
        return list(self)

    def __reduce_ex__(self, protocol):
        return list, (list(self),)


@dataclass(eq=False)
class Quantization:
    """How a tensor's integers map to real values: real = scale · (q − zero_point), one scale and zero point
    per channel along `axis` when there are several. `min`/`max` are the recorded float range (optional);
    `details` (blockwise / multi-axis parameters, whose scale tensors are Tensor references here) and `extra`
    (fields a newer schema adds) are kept as read. Converted from and to the schema only in `io`."""
    scale: np.ndarray | None = None       # float32
    zero_point: np.ndarray | None = None  # int64
    axis: int = 0
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    details: Any = None
    details_type: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def symmetric(cls, scales, axis: int | None = None) -> "Quantization":
        """Zero points 0: one scale (axis None) or one per channel along `axis`."""
        scale = np.asarray(scales, np.float32).reshape(-1)
        return cls(scale=scale, zero_point=np.zeros(len(scale), np.int64), axis=axis or 0)

    @classmethod
    def affine(cls, scales, zero_points, axis: int = 0) -> "Quantization":
        return cls(scale=np.asarray(scales, np.float32).reshape(-1),
                   zero_point=np.asarray(zero_points, np.int64).reshape(-1), axis=int(axis))

    @property
    def channels(self) -> int:
        """How many scales (1: per tensor)."""
        return len(self.scale) if self.scale is not None else 0

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Real values (float32) of integers `q` quantized with these parameters."""
        scale = np.asarray(self.scale, np.float32)
        zero = np.asarray(self.zero_point if self.zero_point is not None and len(self.zero_point)
                          else np.zeros(len(scale)), np.float32)
        data = np.asarray(q).astype(np.float32)
        if len(scale) > 1:
            shape = [1] * data.ndim
            shape[self.axis] = -1
            return (data - zero.reshape(shape)) * scale.reshape(shape)
        return (data - zero[0]) * scale[0]

    def take(self, keep: np.ndarray, axis: int) -> "Quantization":
        """The parameters of the kept channels `keep` (indices or a mask) of `axis`: per-channel ones along that
        axis are sliced, any others stay as they are (a new object either way)."""
        new = copy.copy(self)
        if self.channels > 1 and self.axis == axis:
            new.scale = np.asarray(self.scale, np.float32)[keep]
            if self.zero_point is not None and len(self.zero_point) > 1:
                new.zero_point = np.asarray(self.zero_point, np.int64)[keep]
        return new


def _linked_list(attr: str, added: str, removed: str) -> property:
    """A list attribute whose items the owner links (`added`) and unlinks (`removed`); assigning a new list
    unlinks the old list's items first."""
    def get(self):
        return getattr(self, attr)

    def set(self, items):
        for x in self.__dict__.get(attr, ()):
            getattr(self, removed)(x)
        setattr(self, attr, _Linked(items, getattr(self, added), getattr(self, removed)))
    return property(get, set)


@dataclass(eq=False)
class Tensor:
    name: str
    type: int
    shape: list[int]
    buffer: Buffer | None = None
    quantization: Quantization | None = None
    sparsity: Any = None  # schema.SparsityParametersT
    shape_signature: list[int] | None = None
    is_variable: bool = False
    has_rank: bool = False
    variant_tensors: Any = None
    external_buffer: int = 0
    # Schema fields the IR does not model (a newer schema's), kept as read: object-API name → value.
    extra: dict = field(default_factory=dict)

    @property
    def is_constant(self) -> bool:
        return self.buffer is not None and self.buffer.nbytes > 0

    @property
    def dtype(self) -> np.dtype | None:
        return NUMPY_DTYPES.get(self.type)

    @property
    def data(self) -> np.ndarray | None:
        """The constant as an array (a view, not a copy); None for non-constants and sparse tensors."""
        if not self.is_constant or self.sparsity is not None or self.dtype is None:
            return None
        return self.buffer.data.view(self.dtype).reshape(self.shape)

    def set_data(self, array: np.ndarray) -> None:
        """Give this tensor new constant data in a buffer of its own."""
        array = np.ascontiguousarray(array)
        self.type = tensor_type_for(array.dtype)
        self.shape = [int(d) for d in array.shape]
        self.shape_signature = None
        self.sparsity = None
        self.buffer = Buffer(array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8))

    def take(self, keep, axis: int) -> None:
        """Keep only the entries `keep` (indices or a mask) along `axis` of this constant: data, shape and
        per-channel quantization, in a buffer of its own."""
        data = self.data
        axis = axis % data.ndim
        keep = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
        q = self.quantization.take(keep, axis) if self.quantization is not None else None
        self.set_data(np.take(data, keep, axis=axis))
        self.quantization = q

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, str(self.type)).lower()

    # --- use-def links, kept by the IR's edits (operator lists, op inputs/outputs, tensor lists, buffer) ----
    _producer = None  # the operator of a subgraph that writes this tensor
    _subgraph = None  # the subgraph that lists this tensor

    def __post_init__(self):
        self._readers: dict[Operator, int] = {}  # operator of a subgraph that reads it → how many of its inputs

    @property
    def producer(self) -> Operator | None:
        """The operator that writes this tensor (None for constants, variables and subgraph inputs)."""
        return self._producer

    @property
    def consumers(self) -> list[Operator]:
        """The operators that read this tensor, in execution order (each once)."""
        readers = list(self._readers)
        if len(readers) > 1:
            readers.sort(key=lambda op: op._subgraph._position(op))
        return readers

    @property
    def subgraph(self) -> Subgraph | None:
        """The subgraph that lists this tensor."""
        return self._subgraph

    def _get_buffer(self) -> Buffer | None:
        return self.__dict__.get("_buffer")

    def _set_buffer(self, buffer: Buffer | None) -> None:
        old = self.__dict__.get("_buffer")
        if self._subgraph is not None and old is not buffer:
            if old is not None:
                old._users.pop(self, None)
            if buffer is not None:
                buffer._users[self] = None
        self._buffer = buffer

    def __copy__(self):
        """A tensor with the same fields and no links (it is in no subgraph until listed in one)."""
        new = Tensor.__new__(Tensor)
        new.__dict__.update(self.__dict__)
        new.__dict__.pop("_producer", None)
        new.__dict__.pop("_subgraph", None)
        new._readers = {}
        return new

    def __repr__(self):
        return f"Tensor({self.name!r}, {self.type_name}, {self.shape})"


Tensor.buffer = property(Tensor._get_buffer, Tensor._set_buffer)


@dataclass(eq=False)
class OpCode:
    builtin: int
    custom_code: str | None = None
    version: int = 1

    @property
    def name(self) -> str:
        if self.builtin == schema.BuiltinOperator.CUSTOM:
            return f"CUSTOM({self.custom_code})"
        return OP_NAMES.get(self.builtin, f"OP_{self.builtin}")

    def key(self):
        return (self.builtin, self.custom_code, self.version)


@dataclass(eq=False)
class Operator:
    opcode: OpCode
    inputs: list[Tensor | None]
    outputs: list[Tensor]
    builtin_options: Any = None
    builtin_options_type: int = 0
    builtin_options2: Any = None
    builtin_options2_type: int = 0
    custom_options: bytes | None = None
    custom_options_format: int = 0
    mutating_variable_inputs: list[bool] | None = None
    intermediates: list[Tensor] = field(default_factory=list)
    debug_metadata_index: int = -1
    extra: dict = field(default_factory=dict)  # schema fields the IR does not model, kept as read

    @property
    def builtin(self) -> int:
        return self.opcode.builtin

    @property
    def name(self) -> str:
        return self.opcode.name

    # The operator this one replaces in part (set by `Subgraph.replace_operator`; the report names that op).
    origin = None

    # --- use-def links: while the operator is in a subgraph, its tensors know it as producer / consumer -----
    _subgraph = None

    @property
    def subgraph(self) -> Subgraph | None:
        """The subgraph whose operator list holds this operator."""
        return self._subgraph

    def _input_added(self, t) -> None:
        if self._subgraph is not None and t is not None:
            t._readers[self] = t._readers.get(self, 0) + 1

    def _input_removed(self, t) -> None:
        if self._subgraph is not None and t is not None:
            n = t._readers.get(self, 0) - 1
            if n > 0:
                t._readers[self] = n
            else:
                t._readers.pop(self, None)

    def _output_added(self, t) -> None:
        if self._subgraph is not None and t is not None:
            t._producer = self

    def _output_removed(self, t) -> None:
        if self._subgraph is not None and t is not None and t._producer is self:
            t._producer = None

    def __copy__(self):
        """An operator with the same fields, tensors and options, in no subgraph until one lists it."""
        new = Operator.__new__(Operator)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_inputs", "_outputs", "_subgraph")})
        new.inputs, new.outputs = list(self._inputs), list(self._outputs)
        return new

    def _link(self, subgraph: Subgraph | None) -> None:
        """Join (a subgraph) or leave (None) a subgraph's operator list: register or drop the links."""
        if subgraph is None:
            for t in self._inputs:
                self._input_removed(t)
            for t in self._outputs:
                self._output_removed(t)
            self._subgraph = None
            return
        if self._subgraph is not None:
            raise ValueError(f"{self} is already in a subgraph's operator list")
        self._subgraph = subgraph
        for t in self._inputs:
            self._input_added(t)
        for t in self._outputs:
            self._output_added(t)

    def __repr__(self):
        outs = ", ".join(t.name for t in self.outputs)
        return f"Operator({self.name} -> {outs})"


Operator.inputs = _linked_list("_inputs", "_input_added", "_input_removed")
Operator.outputs = _linked_list("_outputs", "_output_added", "_output_removed")


@dataclass(eq=False)
class Subgraph:
    tensors: list[Tensor] = field(default_factory=list)
    operators: list[Operator] = field(default_factory=list)
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    name: str | None = None
    debug_metadata_index: int = -1
    extra: dict = field(default_factory=dict)  # schema fields the IR does not model, kept as read

    # --- the lists that keep the use-def links: any edit of them (or of an operator's inputs/outputs, or a
    # tensor's buffer) updates Tensor.producer / Tensor.consumers / Buffer.users -------------------------------
    _positions = None  # operator → index in `operators`, rebuilt on demand after an edit

    def _operator_added(self, op: Operator) -> None:
        op._link(self)
        self._positions = None

    def _operator_removed(self, op: Operator) -> None:
        op._link(None)
        self._positions = None

    def _tensor_added(self, t: Tensor) -> None:
        if t._subgraph is not None:
            raise ValueError(f"{t} is already listed in a subgraph")
        t._subgraph = self
        if t.buffer is not None:
            t.buffer._users[t] = None

    def _tensor_removed(self, t: Tensor) -> None:
        if t.buffer is not None:
            t.buffer._users.pop(t, None)
        t._subgraph = None

    def _position(self, op: Operator) -> int:
        if self._positions is None:
            self._positions = {o: i for i, o in enumerate(self._operators)}
        return self._positions[op]

    # --- queries --------------------------------------------------------------------------------------
    def producer_of(self, tensor: Tensor) -> Operator | None:
        return tensor.producer

    def consumers_of(self, tensor: Tensor) -> list[Operator]:
        return tensor.consumers

    # --- edits ----------------------------------------------------------------------------------------
    def add_tensor(self, tensor: Tensor) -> Tensor:
        self.tensors.append(tensor)
        return tensor

    def add_operator(self, op: Operator) -> Operator:
        """Append `op`; a pass that adds several calls `toposort()` once it is done to put them in order."""
        self.operators.append(op)
        return op

    def remove_operator(self, op: Operator) -> None:
        self.operators.remove(op)

    def add_constant(self, name: str, array: np.ndarray, quantization=None) -> Tensor:
        tensor = Tensor(name=self.unique_name(name), type=0, shape=[])
        tensor.set_data(array)
        tensor.quantization = quantization
        return self.add_tensor(tensor)

    def add_activation(self, name: str, type: int, shape: Iterable[int], like: Tensor | None = None) -> Tensor:
        """A new non-constant tensor; `like` lends its dynamic batch dimension, if any."""
        shape = [int(d) for d in shape]
        signature = None
        if like is not None and like.shape_signature is not None and len(like.shape_signature) and like.shape_signature[0] < 0:
            signature = [-1] + shape[1:]
        return self.add_tensor(Tensor(name=self.unique_name(name), type=type, shape=shape,
                                      shape_signature=signature))

    def own_tensor(self, tensor: Tensor) -> Tensor:
        """This subgraph's tensor for a constant: `tensor` itself when listed here, else a tensor of this
        subgraph over the same Buffer (tensors belong to one subgraph; a weight shared across subgraphs is
        one Buffer with a tensor in each)."""
        if any(t is tensor for t in self.tensors):
            return tensor
        for t in self.tensors:
            if tensor.buffer is not None and t.buffer is tensor.buffer and t.type == tensor.type and \
                    t.shape == tensor.shape and t.sparsity is tensor.sparsity and t.quantization is tensor.quantization:
                return t
        return self.add_tensor(Tensor(name=self.unique_name(tensor.name), type=tensor.type, shape=list(tensor.shape),
                                      buffer=tensor.buffer, quantization=tensor.quantization,
                                      sparsity=tensor.sparsity))

    def unique_name(self, name: str) -> str:
        taken = {t.name for t in self.tensors}
        if name not in taken:
            return name
        i = 1
        while f"{name}_{i}" in taken:
            i += 1
        return f"{name}_{i}"

    def replace_operator(self, old: Operator, chain: list[Operator]) -> None:
        """Put `chain` where `old` was in execution order; the chain must write old's outputs itself. Each new
        op's `origin` is old's (old itself when it has none)."""
        for op in chain:
            if op is not old and op.origin is None:
                op.origin = old.origin or old
        i = self._position(old)
        self.operators[i:i + 1] = chain

    def insert_before(self, anchor: Operator, ops: list[Operator]) -> None:
        i = self._position(anchor)
        self.operators[i:i] = ops

    def rewire(self, old: Tensor, new: Tensor, after: Operator | None = None) -> None:
        """Make every reader of `old` (only those after `after`, when given) read `new` instead."""
        start = -1 if after is None else self._position(after)
        for op in old.consumers:
            if self._position(op) > start:
                op.inputs = [new if t is old else t for t in op.inputs]
        for op in self.operators[start + 1:]:
            if any(t is old for t in op.intermediates):
                op.intermediates = [new if t is old else t for t in op.intermediates]
        self.outputs = [new if t is old else t for t in self.outputs]

    def cleanup(self, keep: Iterable[Tensor] = ()) -> None:
        """Drop operators whose outputs nobody needs, then tensors nobody references."""
        self.operators, self.tensors = self.live(keep)

    def live(self, keep: Iterable[Tensor] = ()) -> tuple[list[Operator], list[Tensor]]:
        """The operators and tensors `cleanup` keeps, without dropping anything."""
        keep_ids = {id(t) for t in keep} | {id(t) for t in self.inputs} | {id(t) for t in self.outputs}
        live = set(keep_ids)
        kept_ops = []
        for op in reversed(self.operators):
            side_effects = op.builtin in _SIDE_EFFECT_OPS or not op.outputs or any(t.is_variable for t in op.inputs if t)
            if side_effects or any(id(t) in live for t in op.outputs):
                kept_ops.append(op)
                live.update(id(t) for t in _op_reads(op))
                live.update(id(t) for t in op.outputs)
        return kept_ops[::-1], [t for t in self.tensors if id(t) in live or t.is_variable]

    def check_topological_order(self) -> None:
        """Raise ValueError when an operator reads a tensor that is written only later."""
        written = {id(t) for t in self.inputs}
        written |= {id(t) for t in self.tensors if t.is_constant or t.is_variable}
        later = {id(t) for op in self.operators for t in op.outputs}
        for op in self.operators:
            for t in _op_reads(op):
                if id(t) in later and id(t) not in written:
                    raise ValueError(f"{op} reads {t.name!r} before it is written")
            written.update(id(t) for t in op.outputs)

    def toposort(self) -> None:
        """A topological order that keeps the current one where it is valid: an operator out of place (one a
        pass appended) goes right before the first operator that needs it, directly or through others
        (Kahn's algorithm; each operator ranked by the earliest position among itself and its readers)."""
        import heapq
        ops = list(self.operators)
        index = {op: i for i, op in enumerate(ops)}
        readers = {op: [r for r in {r: None for t in op.outputs for r in t._readers} if r in index and r is not op]
                    for op in ops}
        rank: dict[Operator, int] = {}
        for root in ops:  # post-order over readers, iteratively (chains can be thousands of ops long)
            if root in rank:
                continue
            stack, visiting = [(root, iter(readers[root]))], {root}
            while stack:
                op, pending = stack[-1]
                nxt = next((r for r in pending if r not in rank), None)
                if nxt is not None:
                    if nxt in visiting:
                        raise ValueError("the graph has a cycle")
                    visiting.add(nxt)
                    stack.append((nxt, iter(readers[nxt])))
                    continue
                stack.pop()
                visiting.discard(op)
                rank[op] = min([index[op]] + [rank[r] for r in readers[op]])
        waiting = {op: len({t.producer for t in _op_reads(op)} - {None, op}) for op in ops}
        ready = [(rank[op], index[op]) for op in ops if not waiting[op]]
        heapq.heapify(ready)
        order: list[Operator] = []
        while ready:
            op = ops[heapq.heappop(ready)[1]]
            order.append(op)
            for reader in readers[op]:
                waiting[reader] -= 1
                if not waiting[reader]:
                    heapq.heappush(ready, (rank[reader], index[reader]))
        if len(order) < len(ops):
            raise ValueError("the graph has a cycle")
        self.operators = order


# Operators that must stay even when nothing reads their outputs.
_SIDE_EFFECT_OPS = {
    schema.BuiltinOperator.ASSIGN_VARIABLE, schema.BuiltinOperator.CALL_ONCE,
    schema.BuiltinOperator.VAR_HANDLE, schema.BuiltinOperator.CUSTOM,
    schema.BuiltinOperator.WHILE, schema.BuiltinOperator.IF,
} | ({schema.BuiltinOperator.HASHTABLE_IMPORT} if hasattr(schema.BuiltinOperator, "HASHTABLE_IMPORT") else set())


def _op_reads(op: Operator) -> list[Tensor]:
    return [t for t in op.inputs if t is not None]


@dataclass(eq=False)
class SignatureDef:
    key: str
    subgraph: Subgraph
    inputs: list[tuple[str, Tensor]]
    outputs: list[tuple[str, Tensor]]


@dataclass(eq=False)
class Model:
    subgraphs: list[Subgraph] = field(default_factory=list)
    version: int = 3
    description: str | None = None
    signature_defs: list[SignatureDef] = field(default_factory=list)
    # (name, Buffer) pairs, in file order.
    metadata: list[tuple[str, Buffer]] = field(default_factory=list)
    # Buffers the metadata_buffer list names (deprecated field, kept for old readers).
    metadata_buffer: list[Buffer] = field(default_factory=list)
    # External buffer groups and buffers (schema object-API values), passed through unchanged.
    external: tuple | None = None
    extra: dict = field(default_factory=dict)  # schema fields the IR does not model, kept as read

    @property
    def main(self) -> Subgraph:
        return self.subgraphs[0]

    def operators(self) -> Iterable[tuple[Subgraph, Operator]]:
        for sg in self.subgraphs:
            for op in sg.operators:
                yield sg, op

    def get_metadata(self, name: str) -> Buffer | None:
        return next((b for n, b in self.metadata if n == name), None)

    def set_metadata(self, name: str, data: bytes) -> None:
        buf = Buffer(np.frombuffer(bytes(data), np.uint8))
        for i, (n, _) in enumerate(self.metadata):
            if n == name:
                self.metadata[i] = (name, buf)
                return
        self.metadata.append((name, buf))

    def cleanup(self) -> None:
        for sg in self.subgraphs:
            sg.cleanup(self.signature_tensors(sg))

    def signature_tensors(self, sg: Subgraph) -> list[Tensor]:
        return [t for sig in self.signature_defs if sig.subgraph is sg for _, t in sig.inputs + sig.outputs]

    # --- shared constants -----------------------------------------------------------------------------
    def sharers(self, tensor: Tensor) -> list[tuple[Subgraph, Tensor]]:
        """Every (subgraph, tensor) over `tensor`'s buffer, `tensor` itself included, in model order: a weight
        shared across ops, subgraphs or signatures is one Buffer with one tensor per subgraph (or several
        tensors in one subgraph)."""
        if tensor.buffer is None or not tensor.buffer.nbytes:
            users = [tensor] if tensor.subgraph is not None else []
        else:
            users = tensor.buffer.users
        return [(t.subgraph, t) for t in sorted(users, key=self._tensor_order)]

    def readers(self, tensors: Iterable[tuple[Subgraph, Tensor]]) -> list[tuple[Subgraph, Operator, int]]:
        """(subgraph, op, input index) of every op input reading one of `tensors`, in model order."""
        found = {}
        for _, t in tensors:
            for op in t.consumers:
                for i, u in enumerate(op.inputs):
                    if u is t:
                        found[(op, i)] = None
        return sorted(((op.subgraph, op, i) for op, i in found), key=self._reader_order)

    def _subgraph_index(self, sg: Subgraph) -> int:
        return next(i for i, s in enumerate(self.subgraphs) if s is sg)

    def _tensor_order(self, t: Tensor) -> tuple[int, int]:
        return self._subgraph_index(t.subgraph), next(i for i, u in enumerate(t.subgraph.tensors) if u is t)

    def _reader_order(self, use: tuple[Subgraph, Operator, int]) -> tuple[int, int, int]:
        sg, op, i = use
        return self._subgraph_index(sg), sg._position(op), i

    def set_shared_data(self, tensor: Tensor, array: np.ndarray) -> None:
        """New constant data for `tensor` and every tensor sharing its buffer: one new Buffer, still shared
        (setting each tensor's data on its own would store the weight once per tensor)."""
        sharers = self.sharers(tensor)
        tensor.set_data(array)
        for _, t in sharers:
            if t is not tensor:
                t.type, t.shape, t.shape_signature, t.sparsity, t.buffer = \
                    tensor.type, list(tensor.shape), None, None, tensor.buffer

    def snapshot(self) -> "Snapshot":
        """What a pass may change, to put back when an edit does not pay (the arrays themselves are not copied:
        passes give tensors new buffers, they never write into one)."""
        return Snapshot(self)

    # --- invariants -----------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """What makes the model unwritable or unrunnable, one line each (empty when it is sound)."""
        from .invariants import model_problems
        return model_problems(self)

    def validate(self, known: Iterable[str] = ()) -> None:
        """Raise ValueError on any problem not in `known` (the input's own, which a rewrite did not cause)."""
        new = [p for p in self.problems() if p not in set(known)]
        if new:
            raise ValueError("invalid graph: " + "; ".join(new[:5]) + (f" (+{len(new) - 5} more)" if len(new) > 5 else ""))


Subgraph.operators = _linked_list("_operators", "_operator_added", "_operator_removed")
Subgraph.tensors = _linked_list("_tensors", "_tensor_added", "_tensor_removed")


class Snapshot:
    """The model's structure at one moment: subgraph lists, operator fields and tensor fields."""

    _TENSOR_FIELDS = ("type", "shape", "buffer", "quantization", "sparsity", "shape_signature")
    _OP_FIELDS = ("opcode", "builtin_options", "builtin_options_type")

    def __init__(self, model: Model):
        self.subgraphs = [(sg, list(sg.operators), list(sg.tensors), list(sg.inputs), list(sg.outputs))
                          for sg in model.subgraphs]
        self.ops = [(op, list(op.inputs), list(op.outputs), list(op.intermediates),
                     [getattr(op, f) for f in self._OP_FIELDS]) for sg in model.subgraphs for op in sg.operators]
        self.tensors = [(t, [getattr(t, f) for f in self._TENSOR_FIELDS]) for sg in model.subgraphs for t in sg.tensors]

    def restore(self) -> None:
        for sg, operators, tensors, inputs, outputs in self.subgraphs:
            sg.operators, sg.tensors, sg.inputs, sg.outputs = list(operators), list(tensors), list(inputs), list(outputs)
        for op, inputs, outputs, intermediates, values in self.ops:
            op.inputs, op.outputs, op.intermediates = list(inputs), list(outputs), list(intermediates)
            for f, v in zip(self._OP_FIELDS, values):
                setattr(op, f, v)
        for t, values in self.tensors:
            for f, v in zip(self._TENSOR_FIELDS, values):
                setattr(t, f, v)
