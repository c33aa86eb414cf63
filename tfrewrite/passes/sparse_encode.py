"""Store weights that hold enough zeros in TFLite's sparse format, in the form each kernel can really use.

The rules (established against LiteRT's sparse kernels and op-version rules; each has a test):

* FULLY_CONNECTED, float32 in / weight / out: 1×4 blocks when whole blocks are zero (block sparsity / element
  sparsity > 0.9, as the TF converter decides): the weight tensor itself becomes sparse and the operator gets
  version 8 exactly. Random sparsity: CSR + DENSIFY by default (like the converter; the direct CSR kernel is
  slower than XNNPACK's dense one on x86), or CSR read directly at version 8 with FLOAT_FC_RANDOM = "direct". The XNNPACK delegate refuses an FC at version 8 (the builtin
  sparse kernel runs it); at versions 1–7 it would take the op and read the short buffer as dense: NaN.
* FULLY_CONNECTED, full-integer int8: 1×16 blocks only, weight zero point 0; version 8 (per-tensor and
  per-channel scales: LiteRT 2.3's kernel matches the dense one to one output quantum, see the tests).
* Hybrid FULLY_CONNECTED (float input, int8 weight): never sparse — its sparse kernel gives wrong results.
* Everything else (CONV_2D, DEPTHWISE_CONV_2D, an FC weight behind a DEQUANTIZE, a float32 weight some
  other op also reads): sparse constant → DENSIFY → the op (float32 and float16 data; for float16 the
  DENSIFY goes before the existing DEQUANTIZE). A sparse tensor fed straight into a conv gives NaN.
* int8 data through DENSIFY makes XNNPACK fail to prepare: int8 conv weights stay dense.
* A weight is encoded only when at least MIN_ZERO_FRACTION of it is zero and the encoding (values + index
  vectors + table overhead) is smaller than the dense bytes. Index vectors use the smallest type that fits
  (uint8 / uint16 / int32); the tensor keeps its dense shape.
A weight shared by several ops (in any subgraph: one Buffer) is decided and encoded once and stays one Buffer,
when every reader is a layer reading it as its weight and none is excluded (the IR's shared-weight policy).
"""
from __future__ import annotations

import numpy as np

from .. import schema
from ..analysis import numel, weight_uses
from ..graph import Buffer, Model, Operator, Tensor
from ..linalg import sparse
from ..ops import builders, semantics, versions
from ..report import Entry
from .common import Skip, StoredWeight, find_stored_weight, new_entry

OP = schema.BuiltinOperator
T = schema.TensorType
DIM = schema.DimensionType
SIV = schema.SparseIndexVector
TARGETS = semantics.LAYER_OPS

MIN_ZERO_FRACTION = 0.3      # the TF converter leaves weights below 30 % zeros dense
FLOAT_BLOCK_RATIO = 0.9      # float FC: 1x4 blocks when block sparsity / element sparsity exceeds this
# Float FC with random (not block) sparsity: "densify" (CSR + DENSIFY, XNNPACK's dense kernel; the default) or
# "direct" (CSR read by the builtin sparse kernel at version 8). On x86 the direct CSR kernel is a scalar,
# single-threaded loop ≈ 2x slower than XNNPACK's dense FC (MobileNetV2 224 at 50 %: +5 % end-to-end), while
# both store the same bytes (DENSIFY adds ~100 B); 1x4 blocks are read directly (about as fast as dense).
FLOAT_FC_RANDOM = "densify"
INT8_FC_BLOCK = (1, 16)      # the only block the full-integer int8 sparse FULLY_CONNECTED kernel reads
FLOAT_FC_BLOCK = (1, 4)
# Flatbuffer cost of a SparsityParameters table (+ per dim metadata) and of a DENSIFY op + its tensor; measured
# on written files: ~132 B for a 2-D FC weight, ~310 B for a 4-D conv weight with its DENSIFY.
SPARSITY_TABLE_BYTES, DIM_BYTES, DENSIFY_BYTES = 48, 40, 96

_INDEX_VECTORS = {np.dtype(np.uint8): (SIV.Uint8Vector, schema.Uint8VectorT),
                  np.dtype(np.uint16): (SIV.Uint16Vector, schema.Uint16VectorT),
                  np.dtype(np.int32): (SIV.Int32Vector, schema.Int32VectorT)}
_INDEX_DTYPES = {SIV.Uint8Vector: np.uint8, SIV.Uint16Vector: np.uint16, SIV.Int32Vector: np.int32}


# ------------------------------------------------------------------------------- schema <-> SparseEncoding
def _index_vector(values: np.ndarray):
    dtype = sparse.smallest_index_dtype(int(values.max()) if values.size else 0)
    code, cls = _INDEX_VECTORS[dtype]
    vec = cls()
    vec.values = np.ascontiguousarray(values, dtype)
    return code, vec


def to_sparsity(enc: sparse.SparseEncoding) -> "schema.SparsityParametersT":
    """The schema's SparsityParameters for an encoding (index vectors in the smallest type that fits)."""
    sp = schema.SparsityParametersT()
    sp.traversalOrder = np.asarray(enc.traversal_order, np.int32)
    sp.blockMap = np.asarray(enc.block_map, np.int32) if len(enc.block_map) else None
    sp.dimMetadata = []
    for meta in enc.dims:
        d = schema.DimensionMetadataT()
        if meta.format == "DENSE":
            d.format, d.denseSize = DIM.DENSE, int(meta.dense_size)
        else:
            d.format = DIM.SPARSE_CSR
            d.arraySegmentsType, d.arraySegments = _index_vector(np.asarray(meta.segments))
            d.arrayIndicesType, d.arrayIndices = _index_vector(np.asarray(meta.indices))
        sp.dimMetadata.append(d)
    return sp


def from_sparsity(tensor: Tensor) -> sparse.SparseEncoding:
    """A sparse tensor's values and parameters as a SparseEncoding (decode it with linalg.sparse.decode)."""
    sp = tensor.sparsity
    dims = []
    for d in sp.dimMetadata:
        if d.format == DIM.DENSE:
            dims.append(sparse.DimMeta("DENSE", dense_size=int(d.denseSize)))
        else:
            dims.append(sparse.DimMeta("SPARSE_CSR", segments=np.asarray(d.arraySegments.values).astype(np.int64),
                                       indices=np.asarray(d.arrayIndices.values).astype(np.int64)))
    return sparse.SparseEncoding(
        values=tensor.buffer.data.view(tensor.dtype).copy(),
        traversal_order=[int(v) for v in sp.traversalOrder],
        block_map=[int(v) for v in (sp.blockMap if sp.blockMap is not None else [])],
        dims=dims, dense_shape=tuple(int(d) for d in tensor.shape))


def stored_nbytes(enc: sparse.SparseEncoding, densify: bool) -> int:
    """Bytes the encoded weight adds to the file, index vectors in their stored (smallest) types."""
    total = np.asarray(enc.values).nbytes + SPARSITY_TABLE_BYTES + DIM_BYTES * len(enc.dims)
    for meta in enc.dims:
        if meta.format == "SPARSE_CSR":
            for v in (np.asarray(meta.segments), np.asarray(meta.indices)):
                total += v.size * sparse.smallest_index_dtype(int(v.max()) if v.size else 0).itemsize
    return int(total) + (DENSIFY_BYTES if densify else 0)


def index_dtypes(tensor: Tensor) -> list[str]:
    names = {SIV.Uint8Vector: "uint8", SIV.Uint16Vector: "uint16", SIV.Int32Vector: "int32"}
    out = []
    for d in tensor.sparsity.dimMetadata:
        if d.format == DIM.SPARSE_CSR:
            out += [names[d.arraySegmentsType], names[d.arrayIndicesType]]
    return out


# ------------------------------------------------------------------------------------------------ decisions
def _fc_version(op: Operator) -> int:
    x, w, out = op.inputs[0], op.inputs[1], op.outputs[0]
    options = op.builtin_options
    return versions.fully_connected_version(
        x.type, w.type, out.type, keep_num_dims=bool(getattr(options, "keepNumDims", False)), sparse_weights=True,
        asymmetric_quantize_inputs=bool(getattr(options, "asymmetricQuantizeInputs", False)),
        num_inputs=len(op.inputs))


def fc_direct_kind(op: Operator, weight: Tensor) -> str | None:
    """'float32' or 'int8' when this FC can read `weight` sparse itself (version 8); None otherwise."""
    if op.builtin != OP.FULLY_CONNECTED or len(op.inputs) < 2 or op.inputs[1] is None or \
            op.inputs[1].buffer is not weight.buffer:
        return None
    x, out = op.inputs[0], op.outputs[0]
    if x is None or getattr(op.builtin_options, "weightsFormat", 0) != 0 or len(weight.shape) != 2:
        return None
    if x.type == T.FLOAT32 and weight.type == T.FLOAT32 and out.type == T.FLOAT32:
        return "float32"
    if x.type == T.INT8 and weight.type == T.INT8 and out.type == T.INT8:
        return "int8"
    return None


def int8_refusal(op: Operator, weight: StoredWeight, becomes_int8: bool = False) -> str | None:
    """Why `op` would not read this int8 weight sparse — with `becomes_int8`, this float weight once --quantize
    full-int8 makes it int8 and its activations int8 — or None when it would. Only a full-integer int8
    FULLY_CONNECTED (int8 input, weight and output) reads an int8 weight sparse, itself, in 1×16 blocks: int8
    through DENSIFY makes XNNPACK fail to prepare, the hybrid FC's sparse kernel gives wrong results, and the
    16x8 (int16 activation) kernels read their int8 weight dense."""
    if becomes_int8:
        if op.builtin != OP.FULLY_CONNECTED or weight.carrier is not None:
            return (f"--quantize full-int8 makes it an int8 {op.name} weight (int8 through DENSIFY makes XNNPACK "
                    "fail to prepare)")
    elif weight.carrier is not None:
        return "an int8 weight behind a DEQUANTIZE (int8 through DENSIFY makes XNNPACK fail to prepare)"
    elif op.builtin != OP.FULLY_CONNECTED:
        return f"an int8 {op.name} weight (int8 through DENSIFY makes XNNPACK fail to prepare)"
    else:
        x = op.inputs[0]
        if x is not None and x.type == T.FLOAT32:
            return "a hybrid FULLY_CONNECTED's int8 weight (its sparse kernel gives wrong results)"
        if fc_direct_kind(op, weight.tensor) != "int8":
            kind = x.type_name if x is not None else "unknown"
            return (f"an int8 weight read with {kind} activations (only the int8 FULLY_CONNECTED kernel reads one "
                    "sparse)")
    if weight.tensor.shape[1] % INT8_FC_BLOCK[1]:
        return f"an int8 FULLY_CONNECTED reads 1x16 blocks only; its {weight.tensor.shape[1]} inputs do not divide"
    return None


def storage_refusal(op: Operator, weight: StoredWeight, settings, min_params: int = 0,
                    full_int8: bool = False) -> str | None:
    """Why this layer's weight, once pruned, could not be stored sparse in a form the runtime reads (None: it
    can): an int8 weight (`int8_refusal`), or a float one that --quantize full-int8 (`full_int8`) or --quantize
    int8 makes int8. Zeros that stay dense save no byte and only cost accuracy, so the prune pass leaves such a
    weight as it is."""
    from .quantize import stored_itemsize
    if weight.kind not in ("float32", "float16") or full_int8:
        return int8_refusal(op, weight, becomes_int8=weight.kind in ("float32", "float16"))
    if stored_itemsize(weight.kind, numel(weight.tensor.shape), settings.quantize, min_params) == 1:
        return "--quantize int8 stores it as int8 for a kernel that reads it dense"
    return None


class Decision:
    def __init__(self, enc=None, method=None, densify=False, reason=None, bytes_before=0, bytes_after=0):
        self.enc, self.method, self.densify, self.reason = enc, method, densify, reason
        self.bytes_before, self.bytes_after = bytes_before, bytes_after


def zero_share(raw: np.ndarray) -> float:
    """The share of a dense weight's values that are zero."""
    return 1.0 - np.count_nonzero(raw) / max(np.size(raw), 1)


def float_encoding(raw: np.ndarray, direct_fc: bool) -> tuple[sparse.SparseEncoding, str]:
    """(encoding, method) of a float32 / float16 weight holding enough zeros; `direct_fc`: a float32
    FULLY_CONNECTED reads it itself (1x4 blocks when whole blocks are zero)."""
    if direct_fc:
        zf = zero_share(raw)
        if raw.shape[1] % FLOAT_FC_BLOCK[1] == 0 and zf > 0 \
                and sparse.block_sparsity(raw, FLOAT_FC_BLOCK) / zf > FLOAT_BLOCK_RATIO:
            return sparse.encode_blocks(raw, FLOAT_FC_BLOCK), "block1x4, FC v8"
        return sparse.encode_csr_last_dim(raw), "csr, FC v8" if FLOAT_FC_RANDOM == "direct" else "csr + DENSIFY"
    return sparse.encode_csr_last_dim(raw), "csr + DENSIFY"


def below_zero_floor(fraction: float) -> bool:
    """Fewer zeros than MIN_ZERO_FRACTION, to the half percent: `--prune 0.3` removes round(0.3·n) weights (per
    column block, with data), which can fall a few short of 30 %, and those zeros must still be stored sparse."""
    return fraction < MIN_ZERO_FRACTION - 0.005


def planned_nbytes(raw: np.ndarray, direct_fc: bool) -> int:
    """Bytes a pruned float32 / float16 weight will take in the file (values, index vectors, tables, a DENSIFY),
    as `decide` stores it: dense below MIN_ZERO_FRACTION zeros or when the encoding saves nothing."""
    raw = np.asarray(raw)
    dense = raw.nbytes
    if below_zero_floor(zero_share(raw)):
        return dense
    enc, method = float_encoding(raw, direct_fc)
    return min(dense, stored_nbytes(enc, method.endswith("DENSIFY")))


def decide(weight: StoredWeight, readers: list[Operator], direct_readers: list[Operator],
           planned: np.ndarray | None = None) -> Decision:
    """How to store one weight, given every op that reads it (directly or through its DEQUANTIZE). `planned`:
    the values the weight will hold when this pass runs, asked before they are written (`prune` does not zero a
    weight this would leave dense); float16 values of a float32 weight: --quantize float16 puts them behind a
    DEQUANTIZE first."""
    t = weight.tensor
    raw = np.asarray(weight.raw if planned is None else planned)
    dense_bytes = t.buffer.nbytes if planned is None else raw.nbytes
    carried = weight.carrier is not None or raw.dtype != t.dtype
    zf = zero_share(raw)
    fc_kinds = [fc_direct_kind(op, t) for op in direct_readers] if not carried else []
    direct_fc = bool(fc_kinds) and all(k is not None for k in fc_kinds) and len(set(fc_kinds)) == 1 \
        and len(direct_readers) == len(readers)
    if t.type == T.INT8:
        reason = next((r for r in (int8_refusal(op, weight) for op in readers) if r), None)
        if reason:
            return Decision(reason=f"{reason}; stays dense")
    # The int8 rules first: a weight the runtime cannot read sparse says so, whatever its zeros.
    if below_zero_floor(zf):
        return Decision(reason=f"only {100 * zf:.1f}% zeros (encoding needs {100 * MIN_ZERO_FRACTION:.0f}%)")
    if t.type == T.INT8:
        bzf = sparse.block_sparsity(raw, INT8_FC_BLOCK)
        if below_zero_floor(bzf):
            return Decision(reason=f"int8 FULLY_CONNECTED reads 1x16 blocks only; only {100 * bzf:.1f}% of them "
                                   "are all zero (prune with --prune-block)")
        enc, method = sparse.encode_blocks(raw, INT8_FC_BLOCK), "block1x16, FC v8"
    elif t.type not in (T.FLOAT32, T.FLOAT16):
        return Decision(reason=f"{t.type_name} weights are not encoded")
    else:
        enc, method = float_encoding(raw, direct_fc and raw.dtype == np.float32)
    densify = method.endswith("DENSIFY")
    after = stored_nbytes(enc, densify)
    if after >= dense_bytes:
        return Decision(reason=f"encoding does not save bytes ({after} >= {dense_bytes} dense, {100 * zf:.1f}% zeros)",
                        bytes_before=dense_bytes, bytes_after=dense_bytes)
    return Decision(enc, method, densify, bytes_before=dense_bytes, bytes_after=after)


def apply(model: Model, weight: StoredWeight, decision: Decision, direct_readers: list[Operator]) -> None:
    """Store the weight encoded, for every tensor over its buffer (in any subgraph): one shared Buffer of values."""
    t = weight.tensor
    values = np.ascontiguousarray(decision.enc.values, t.dtype)
    buf = Buffer(values.reshape(-1).view(np.uint8))
    sp = to_sparsity(decision.enc)
    sharers = model.sharers(t)
    if not decision.densify:
        for _, s in sharers:
            s.buffer, s.sparsity = buf, sp
        for op in direct_readers:
            op.opcode = builders.opcode_for(OP.FULLY_CONNECTED, _fc_version(op))
        return
    # Each tensor over the buffer becomes its DENSIFY's (dense, non-constant) output, so every reader stays wired;
    # each subgraph gets a sparse constant of its own over the one Buffer.
    for sg, s in sharers:
        stored = sg.add_tensor(Tensor(name=sg.unique_name(s.name + "/sparse"), type=s.type, shape=list(s.shape),
                                      buffer=buf, quantization=s.quantization, sparsity=sp))
        s.buffer = None
        if s.consumers:  # a tensor nobody reads is dropped by the cleanup
            sg.add_operator(builders.densify(stored, s))
            sg.toposort()


# ------------------------------------------------------------------------------------------------------ run
def run(model: Model, ctx, progress=None) -> list[Entry]:
    """Decide once per stored weight (one Buffer, whichever subgraphs read it), from every op that reads it."""
    per_op: list[tuple[Operator, dict, StoredWeight | None, int]] = []
    groups: dict[int, list[Operator]] = {}  # id(Buffer) → the target ops that may encode it
    for sg in model.subgraphs:
        for op in [op for op in sg.operators if op.builtin in TARGETS]:
            entry = new_entry(model, sg, op, "sparse_encode", ctx)
            w = op.inputs[1] if len(op.inputs) > 1 else None
            entry.weight_shape = list(w.shape) if w is not None else []
            weight, key = None, 0
            try:
                weight = find_stored_weight(op)
                n = numel(weight.tensor.shape)
                entry.set(weight_dtype=weight.kind, params_before=n, params_after=n)
                reason = ctx.reason_to_skip(op, n)
                if reason:
                    raise Skip(reason)
                key = id(weight.tensor.buffer)
                groups.setdefault(key, []).append(op)
            except Skip as e:
                entry.reason = str(e)
                weight = None
            per_op.append((op, entry, weight, key))

    decisions: dict[int, Decision] = {}
    first_entry: dict[int, Entry] = {}
    for op, entry, weight, key in per_op:
        if weight is None:
            continue
        if key not in decisions:
            decisions[key] = _decide_and_apply(model, weight, groups[key])
            first_entry[key] = entry
        d = decisions[key]
        entry.set(bytes_before=d.bytes_before, bytes_after=d.bytes_after, zero_fraction=d.zero_fraction)
        if d.enc is not None:
            entry.set(action="encoded", method=d.method, params_after=int(np.asarray(d.enc.values).size))
            if entry is not first_entry[key]:
                entry.reason = "weight shared with an earlier layer, encoded once"
        else:
            entry.reason = d.reason
    for _, entry, _, _ in per_op:
        if progress:
            progress(entry)
    return [e for _, e, _, _ in per_op]


def planned_refusal(model: Model, weight: StoredWeight, planned: np.ndarray) -> str | None:
    """Why `decide` would leave this float weight dense once it holds `planned` (None: it will be stored sparse)."""
    found = weight_uses(model, weight.tensor)
    return decide(weight, found.ops, found.carriers or found.ops, planned).reason


def _decide_and_apply(model: Model, weight: StoredWeight, group: list[Operator]) -> Decision:
    t = weight.tensor
    found = weight_uses(model, t)
    readers = found.ops
    direct = found.carriers or readers  # the ops that read the stored tensor itself

    def rewrites(use) -> bool | str:
        if use.op.builtin not in TARGETS or use.index != 1 or (found.carriers and use.op.inputs[1].is_constant):
            return False  # not a layer's weight, or read directly beside the carrier
        return True if any(use.op is op for op in group) else "excluded from encoding"
    zf = zero_share(weight.raw)
    reason = found.refusal(rewrites, left="a reader is excluded from encoding")
    if reason:
        decision = Decision(reason=reason)
    else:
        decision = decide(weight, readers, direct)
    decision.zero_fraction = round(zf, 6)
    if decision.enc is not None:
        apply(model, weight, decision, direct)
    return decision


def planned_int8_fc_nbytes(raw: np.ndarray) -> int:
    """Bytes the weight of a full-integer FULLY_CONNECTED (int8, or float32 that --quantize full-int8 will make
    int8 with its zeros kept) pruned in 1×16 blocks will take, as `decide` stores it: 1×16 blocks of 1-byte
    values, dense below MIN_ZERO_FRACTION all-zero blocks or when the encoding saves nothing."""
    nonzero = np.asarray(raw) != 0
    if below_zero_floor(sparse.block_sparsity(nonzero, INT8_FC_BLOCK)):
        return nonzero.size
    return min(nonzero.size, stored_nbytes(sparse.encode_blocks(nonzero.astype(np.int8), INT8_FC_BLOCK), False))
