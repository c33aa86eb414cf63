"""The in-memory graph that passes edit.

Model → Subgraphs → Operators and Tensors that point at each other directly. Indices, the operator-code
table, buffer numbering, signature and metadata indices exist only in the file; `io` rebuilds them on write.
Options, quantization and sparsity parameters are kept as the schema's object-API values and written back
unchanged unless a pass replaces them.
"""
from __future__ import annotations

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

    __slots__ = ("data", "source")

    def __init__(self, data, source: tuple[str, int] | None = None):
        # A uint8 view (often on the memory-mapped input file) or any bytes-like object.
        self.data = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        # (path, offset) when the bytes are an untouched region of a file: the writer copies them in the kernel.
        self.source = source

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass(eq=False)
class Tensor:
    name: str
    type: int
    shape: list[int]
    buffer: Buffer | None = None
    quantization: Any = None  # schema.QuantizationParametersT
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

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, str(self.type)).lower()

    def __repr__(self):
        return f"Tensor({self.name!r}, {self.type_name}, {self.shape})"


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

    def __repr__(self):
        outs = ", ".join(t.name for t in self.outputs)
        return f"Operator({self.name} -> {outs})"


@dataclass(eq=False)
class Subgraph:
    tensors: list[Tensor] = field(default_factory=list)
    operators: list[Operator] = field(default_factory=list)
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    name: str | None = None
    debug_metadata_index: int = -1
    extra: dict = field(default_factory=dict)  # schema fields the IR does not model, kept as read

    # --- queries --------------------------------------------------------------------------------------
    def producers(self) -> dict[int, Operator]:
        """id(tensor) → the operator that writes it."""
        return {id(t): op for op in self.operators for t in op.outputs}

    def consumers(self) -> dict[int, list[Operator]]:
        """id(tensor) → operators that read it, in execution order."""
        readers: dict[int, list[Operator]] = {}
        for op in self.operators:
            for t in _op_reads(op):
                readers.setdefault(id(t), []).append(op)
        return readers

    def producer_of(self, tensor: Tensor) -> Operator | None:
        return next((op for op in self.operators if any(t is tensor for t in op.outputs)), None)

    def consumers_of(self, tensor: Tensor) -> list[Operator]:
        return [op for op in self.operators if any(t is tensor for t in _op_reads(op))]

    # --- edits ----------------------------------------------------------------------------------------
    def add_tensor(self, tensor: Tensor) -> Tensor:
        self.tensors.append(tensor)
        return tensor

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
        """Put `chain` where `old` was in execution order; the chain must write old's outputs itself."""
        i = next(i for i, op in enumerate(self.operators) if op is old)
        self.operators[i:i + 1] = chain

    def insert_before(self, anchor: Operator, ops: list[Operator]) -> None:
        i = next(i for i, op in enumerate(self.operators) if op is anchor)
        self.operators[i:i] = ops

    def rewire(self, old: Tensor, new: Tensor, after: Operator | None = None) -> None:
        """Make every reader of `old` (only those after `after`, when given) read `new` instead."""
        started = after is None
        for op in self.operators:
            if not started:
                started = op is after
                continue
            op.inputs = [new if t is old else t for t in op.inputs]
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
        """Stable topological order of the operators (Kahn's algorithm, original order breaks ties)."""
        producers = self.producers()
        index = {id(op): i for i, op in enumerate(self.operators)}
        deps = {id(op): {index[id(producers[id(t)])] for t in _op_reads(op) if id(t) in producers}
                - {index[id(op)]} for op in self.operators}
        done: set[int] = set()
        order: list[Operator] = []
        pending = list(self.operators)
        while pending:
            ready = [op for op in pending if deps[id(op)] <= done]
            if not ready:
                raise ValueError("the graph has a cycle")
            op = ready[0]
            order.append(op)
            done.add(index[id(op)])
            pending.remove(op)
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
    def buffer_users(self) -> dict[int, list[tuple[Subgraph, Tensor]]]:
        """id(Buffer) → every (subgraph, tensor) over that buffer: a weight shared across ops, subgraphs or
        signatures is one Buffer with one tensor per subgraph (or several tensors in one subgraph)."""
        users: dict[int, list[tuple[Subgraph, Tensor]]] = {}
        for sg in self.subgraphs:
            for t in sg.tensors:
                if t.buffer is not None and t.buffer.nbytes:
                    users.setdefault(id(t.buffer), []).append((sg, t))
        return users

    def sharers(self, tensor: Tensor) -> list[tuple[Subgraph, Tensor]]:
        """Every (subgraph, tensor) over `tensor`'s buffer, `tensor` itself included."""
        if tensor.buffer is None or not tensor.buffer.nbytes:
            return [(sg, t) for sg in self.subgraphs for t in sg.tensors if t is tensor]
        return [(sg, t) for sg in self.subgraphs for t in sg.tensors if t.buffer is tensor.buffer]

    def readers(self, tensors: Iterable[tuple[Subgraph, Tensor]]) -> list[tuple[Subgraph, Operator, int]]:
        """(subgraph, op, input index) of every op input reading one of `tensors`."""
        wanted = {id(t) for _, t in tensors}
        return [(sg, op, i) for sg in self.subgraphs for op in sg.operators
                for i, t in enumerate(op.inputs) if t is not None and id(t) in wanted]

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
