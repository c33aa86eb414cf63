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
from ..analysis import macs, numel, weight_uses
from ..graph import Buffer, Model, Operator, Subgraph, Tensor
from ..linalg import sparse
from ..ops import builders, versions
from ..report import Entry
from .common import Skip, SparsityOption, new_entry
from .prune import TARGETS, StoredWeight, data_aware_reason, data_aware_weights, fc_direct_kind, find_stored_weight

OP = schema.BuiltinOperator
T = schema.TensorType
DIM = schema.DimensionType
SIV = schema.SparseIndexVector

MIN_ZERO_FRACTION = 0.3      # the TF converter leaves weights below 30 % zeros dense
FLOAT_BLOCK_RATIO = 0.9      # float FC: 1x4 blocks when block sparsity / element sparsity exceeds this
# Float FC with random (not block) sparsity: "densify" (CSR + DENSIFY, XNNPACK's dense kernel; the default) or
# "direct" (CSR read by the builtin sparse kernel at version 8). On x86 the direct CSR kernel is a scalar,
# single-threaded loop ≈ 2x slower than XNNPACK's dense FC (MobileNetV2 224 at 50 %: +5 % end-to-end), while
# both store the same bytes (DENSIFY adds ~100 B); 1x4 blocks are read directly (about as fast as dense).
FLOAT_FC_RANDOM = "densify"
INT8_FC_BLOCK = (1, 16)
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


class Decision:
    def __init__(self, enc=None, method=None, densify=False, reason=None, bytes_before=0, bytes_after=0):
        self.enc, self.method, self.densify, self.reason = enc, method, densify, reason
        self.bytes_before, self.bytes_after = bytes_before, bytes_after


def float_encoding(raw: np.ndarray, direct_fc: bool) -> tuple[sparse.SparseEncoding, str]:
    """(encoding, method) of a float32 / float16 weight holding enough zeros; `direct_fc`: a float32
    FULLY_CONNECTED reads it itself (1x4 blocks when whole blocks are zero)."""
    if direct_fc:
        zf = 1.0 - np.count_nonzero(raw) / max(raw.size, 1)
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
    if below_zero_floor(1.0 - np.count_nonzero(raw) / max(raw.size, 1)):
        return dense
    enc, method = float_encoding(raw, direct_fc)
    return min(dense, stored_nbytes(enc, method.endswith("DENSIFY")))


def decide(weight: StoredWeight, readers: list[Operator], direct_readers: list[Operator]) -> Decision:
    """How to store one weight, given every op that reads it (directly or through its DEQUANTIZE)."""
    t = weight.tensor
    raw = np.asarray(weight.raw)
    dense_bytes = t.buffer.nbytes
    zf = 1.0 - np.count_nonzero(raw) / max(raw.size, 1)
    fc_kinds = [fc_direct_kind(op, t) for op in direct_readers] if weight.carrier is None else []
    direct_fc = bool(fc_kinds) and all(k is not None for k in fc_kinds) and len(set(fc_kinds)) == 1 \
        and len(direct_readers) == len(readers)
    if t.type == T.INT8:
        if any(op.builtin == OP.FULLY_CONNECTED and op.inputs[0] is not None and op.inputs[0].type == T.FLOAT32
               for op in readers) and not direct_fc:
            return Decision(reason="hybrid FULLY_CONNECTED (float input, int8 weight): its sparse kernel gives "
                                   "wrong results; stays dense")
        if not direct_fc:
            return Decision(reason="int8 weight: int8 through DENSIFY makes XNNPACK fail to prepare; stays dense")
        if raw.shape[1] % INT8_FC_BLOCK[1]:
            return Decision(reason=f"int8 FULLY_CONNECTED needs 1x16 blocks; {raw.shape[1]} inputs do not divide")
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
        enc, method = float_encoding(raw, direct_fc and t.type == T.FLOAT32)
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


def _decide_and_apply(model: Model, weight: StoredWeight, group: list[Operator]) -> Decision:
    t = weight.tensor
    found = weight_uses(model, t)
    readers = found.ops
    direct = found.carriers or readers  # the ops that read the stored tensor itself

    def rewrites(use) -> bool | str:
        if use.op.builtin not in TARGETS or use.index != 1 or (found.carriers and use.op.inputs[1].is_constant):
            return False  # not a layer's weight, or read directly beside the carrier
        return True if any(use.op is op for op in group) else "excluded from encoding"
    zf = 1.0 - np.count_nonzero(weight.raw) / max(numel(t.shape), 1)
    reason = found.refusal(rewrites, left="a reader is excluded from encoding")
    if reason:
        decision = Decision(reason=reason)
    else:
        decision = decide(weight, readers, direct)
    decision.zero_fraction = round(zf, 6)
    if decision.enc is not None:
        apply(model, weight, decision, direct)
    return decision


# Sparsities the budget (`--prune auto --target-size X`) may give a layer; below 30 % zeros nothing is stored sparse.
SPARSITY_OPTIONS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def planned_int8_fc_nbytes(raw: np.ndarray) -> int:
    """Bytes the weight of a full-integer FULLY_CONNECTED (int8, or float32 that --quantize full-int8 will make
    int8 with its zeros kept) pruned in 1×16 blocks will take, as `decide` stores it: 1×16 blocks of 1-byte
    values, dense below MIN_ZERO_FRACTION all-zero blocks or when the encoding saves nothing."""
    nonzero = np.asarray(raw) != 0
    if below_zero_floor(sparse.block_sparsity(nonzero, INT8_FC_BLOCK)):
        return nonzero.size
    return min(nonzero.size, stored_nbytes(sparse.encode_blocks(nonzero.astype(np.int8), INT8_FC_BLOCK), False))


def sparsity_options(model: Model, op: Operator, settings, data: dict, sparsities=SPARSITY_OPTIONS,
                     min_params: int = 0, full_int8: bool = False) -> list:
    """The budget's options for pruning one layer (`--prune auto`; data-aware, on its calibration rows): per
    sparsity the bytes this pass will really store (after --quantize float16 when asked) and the layer's relative output
    error. Skip when the layer cannot be pruned data-aware or no sparsity would save bytes: an int8 weight is
    never stored sparse except a full-integer FC, in 1×16 blocks — so a full-integer layer (of an int8 model, or
    any with `full_int8`: --quantize full-int8 follows) gets options only as a FULLY_CONNECTED, costed as those
    blocks (the budget adds its per-channel parameters, as for the dense layer: `budget._budget_layer`)."""
    from ..linalg import obs
    from .quantize import stored_itemsize
    weight = find_stored_weight(op)
    reason = data_aware_reason(model, op, weight)
    if reason:
        raise Skip(reason)
    if op.builtin not in (OP.FULLY_CONNECTED, OP.CONV_2D):
        raise Skip("no data-aware pruning for this op")
    n = numel(weight.tensor.shape)
    block = settings.prune_block
    if weight.kind == "int8 (full-integer)" or (full_int8 and weight.kind in ("float32", "float16")):
        if op.builtin != OP.FULLY_CONNECTED or weight.carrier is not None:
            raise Skip("a full-integer int8 weight is stored dense (int8 through DENSIFY makes XNNPACK fail to "
                       "prepare); only a FULLY_CONNECTED reads it sparse")
        if len(weight.tensor.shape) != 2 or weight.tensor.shape[1] % INT8_FC_BLOCK[1]:
            raise Skip(f"a full-integer FULLY_CONNECTED reads 1x16 blocks only; its inputs do not divide")
        store_as, block, dense_bytes = "int8 (full-integer)", INT8_FC_BLOCK, n
    else:
        kind = weight.kind.split()[0]  # "int8 (dequantized)": int8 data behind a DEQUANTIZE
        store_as = {4: "float32", 2: "float16", 1: "int8"}[stored_itemsize(kind, n, settings.quantize, min_params)]
        if store_as not in ("float32", "float16"):
            raise Skip(f"an {store_as} weight is stored dense (the runtime reads no sparse {store_as} here)")
        dense_bytes = n * (2 if store_as == "float16" else 4)
    direct_fc = store_as == "float32" and weight.carrier is None and \
        fc_direct_kind(op, weight.tensor) == "float32"
    macs_ = macs(op, op.inputs[1])
    # Damage is judged on rows the prune did not see: fitted on the first half of the samples, measured on the
    # second. With fewer rows than inputs (an FC layer gets one row per image) the update reproduces the rows it
    # was fitted on almost exactly, whatever the sparsity (VGG fixture, 16 images: damage 0.000 at 85 %).
    rows = data["rows"]
    half = len(rows) // 2
    fit_data = {**data, "rows": rows[:half]}
    cache: dict = {}  # H and its factor, once for all sparsities
    options = []
    for s in sparsities:
        result = data_aware_weights(op, weight, s, block, fit_data,
                                    store_as=store_as if store_as == "float16" else None, cache=cache)
        nbytes = planned_int8_fc_nbytes(result.stored) if block == INT8_FC_BLOCK and store_as.startswith("int8") \
            else planned_nbytes(result.stored, direct_fc)
        if nbytes < dense_bytes:
            options.append(SparsityOption(s, int(np.count_nonzero(result.stored)), nbytes, macs_,
                                          obs.output_error(result.matrix, result.values, rows[half:])))
    if not options:
        raise Skip("no sparsity saves bytes")
    return options
