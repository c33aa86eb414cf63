"""Small models with the inputs users bring that plain random floats do not fit: index inputs (GATHER,
EMBEDDING_LOOKUP, GATHER_ND, SLICE), a batch fixed above 1, several signatures. Built with tfrewrite's own IR."""
import numpy as np

from tfrewrite import io, ops, schema
from tfrewrite.graph import Model, OpCode, Operator, SignatureDef, Subgraph, Tensor

T = schema.TensorType
OP = schema.BuiltinOperator


def _fc_head(sg, x, rows, features, rng, name="head/fc"):
    """A FULLY_CONNECTED layer after x ([rows, features]) that a low-rank pass may rewrite."""
    w = sg.add_constant(f"{name}/weight", rng.standard_normal((32, features)).astype(np.float32))
    y = sg.add_tensor(Tensor(name, T.FLOAT32, [rows, 32]))
    return ops.fully_connected(x, w, None, y), y


def index_model(kind: str, seed: int = 0) -> bytes:
    """An int32 index input read by `kind` (GATHER, EMBEDDING_LOOKUP, GATHER_ND or SLICE) from a [10, 24] float
    table, then a FULLY_CONNECTED. Any index outside the table fails in the runtime."""
    rng = np.random.default_rng(seed)
    sg = Subgraph()
    table = sg.add_constant("table", rng.standard_normal((10, 24)).astype(np.float32))
    if kind == "GATHER":
        idx = sg.add_tensor(Tensor("ids", T.INT32, [3]))
        rows = sg.add_tensor(Tensor("rows", T.FLOAT32, [3, 24]))
        options = schema.GatherOptionsT()
        options.axis = 0
        first = Operator(OpCode(OP.GATHER), [table, idx], [rows], options, schema.BuiltinOptions.GatherOptions)
        n = 3
    elif kind == "EMBEDDING_LOOKUP":
        idx = sg.add_tensor(Tensor("ids", T.INT32, [3]))
        rows = sg.add_tensor(Tensor("rows", T.FLOAT32, [3, 24]))
        first = Operator(OpCode(OP.EMBEDDING_LOOKUP), [idx, table], [rows])
        n = 3
    elif kind == "GATHER_ND":
        idx = sg.add_tensor(Tensor("ids", T.INT32, [3, 2]))
        picked = sg.add_tensor(Tensor("picked", T.FLOAT32, [3]))
        shape = sg.add_constant("shape", np.array([1, 3], np.int32))
        rows = sg.add_tensor(Tensor("rows", T.FLOAT32, [1, 3]))
        sg.operators = [Operator(OpCode(OP.GATHER_ND), [table, idx], [picked])]
        reshape = Operator(OpCode(OP.RESHAPE), [picked, shape], [rows], schema.ReshapeOptionsT(),
                           schema.BuiltinOptions.ReshapeOptions)
        fc, y = _fc_head(sg, rows, 1, 3, rng)
        sg.operators += [reshape, fc]
        sg.inputs, sg.outputs = [idx], [y]
        return io.to_bytes(Model(subgraphs=[sg]))
    elif kind == "SLICE":
        idx = sg.add_tensor(Tensor("begin", T.INT32, [2]))
        size = sg.add_constant("size", np.array([3, 24], np.int32))
        rows = sg.add_tensor(Tensor("rows", T.FLOAT32, [3, 24]))
        first = Operator(OpCode(OP.SLICE), [table, idx, size], [rows], schema.SliceOptionsT(),
                         schema.BuiltinOptions.SliceOptions)
        n = 3
    else:
        raise ValueError(kind)
    fc, y = _fc_head(sg, rows, n, 24, rng)
    sg.operators = [first, fc]
    sg.inputs, sg.outputs = [idx], [y]
    return io.to_bytes(Model(subgraphs=[sg]))


def two_signature_fc(seed: int = 0) -> bytes:
    """Two subgraphs, each a FULLY_CONNECTED with its own weights, exposed as signatures 'encode' (subgraph 0,
    input 'features') and 'decode' (subgraph 1, input 'code')."""
    rng = np.random.default_rng(seed)
    subgraphs, sigs = [], []
    for key, in_name, n, m in (("encode", "features", 24, 12), ("decode", "code", 12, 24)):
        sg = Subgraph()
        x = sg.add_tensor(Tensor(f"{key}_x", T.FLOAT32, [1, n]))
        w = sg.add_constant(f"{key}/weight", rng.standard_normal((m, n)).astype(np.float32))
        y = sg.add_tensor(Tensor(f"{key}/fc", T.FLOAT32, [1, m]))
        sg.operators = [ops.fully_connected(x, w, None, y)]
        sg.inputs, sg.outputs = [x], [y]
        subgraphs.append(sg)
        sigs.append(SignatureDef(key=key, subgraph=sg, inputs=[(in_name, x)], outputs=[("out", y)]))
    return io.to_bytes(Model(subgraphs=subgraphs, signature_defs=sigs))
