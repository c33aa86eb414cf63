"""Sparse encoding: every rule of issue 4 (and the hazard it guards against, demonstrated in LiteRT), round trips
against an independent decoder and against LiteRT's own DENSIFY, and whole models equal to the same pruned model
stored dense, with XNNPACK on and off.

Tolerance for "equal outputs" of float models: max |a - b| <= 1e-5 · max |a| per output (the sparse FC kernel
sums in another order than XNNPACK's dense one); models whose weights all go through DENSIFY are compared exactly.
"""
import numpy as np
import pytest

import builders as B
from conftest import FIXTURES, outputs
from tfrewrite import cli, io, rewrite, schema, verify
from tfrewrite.graph import OpCode
from tfrewrite.linalg import sparse
from tfrewrite.passes import prune, sparse_encode as se
from tfrewrite.plan import RunContext

OP = schema.BuiltinOperator
T = schema.TensorType
RTOL = 1e-5
MOBILENET = FIXTURES / ("mobilenetv2_digits.tflite" if (FIXTURES / "mobilenetv2_digits.tflite").exists()
                        else "vgg_digits.tflite")


# ------------------------------------------------------------------------------------------------- helpers
def decode_reference(tensor) -> np.ndarray:
    """Independent decoder of a sparse tensor (schema objects → dense), written from the format description:
    a recursive walk over the traversal order, without linalg.sparse."""
    sp = tensor.sparsity
    shape = list(tensor.shape)
    values = tensor.buffer.data.view(tensor.dtype)
    order = [int(v) for v in sp.traversalOrder]
    bmap = [int(v) for v in sp.blockMap] if sp.blockMap is not None else []
    n = len(shape)
    bsize = [1] * n
    for i, d in enumerate(bmap):
        bsize[d] = sp.dimMetadata[order.index(n + i)].denseSize
    out = np.zeros(shape, values.dtype)
    pos = [0]

    def walk(level, parent, coord):
        meta = sp.dimMetadata[level]
        dim = order[level]
        if meta.format == schema.DimensionType.DENSE:
            children = [(parent * meta.denseSize + k, k) for k in range(meta.denseSize)]
        else:
            seg, idx = meta.arraySegments.values, meta.arrayIndices.values
            children = [(j, int(idx[j])) for j in range(int(seg[parent]), int(seg[parent + 1]))]
        for linear, k in children:
            c = dict(coord)
            c[dim] = k
            if level + 1 == len(order):
                full = [c[d] * bsize[d] + (c[n + bmap.index(d)] if d in bmap else 0) for d in range(n)]
                out[tuple(full)] = values[linear]
                pos[0] += 1
            else:
                walk(level + 1, linear, c)

    walk(0, 0, {})
    assert pos[0] == values.size, "the encoding addresses a different number of values than stored"
    return out


def prune_only(model_path_or_bytes, **options) -> bytes:
    """The same pruned model, stored dense (prune pass only)."""
    m = io.read(model_path_or_bytes) if not isinstance(model_path_or_bytes, bytes) else io.read_buffer(model_path_or_bytes)
    ctx = RunContext(rewrite.Options(**options).plan())
    prune.run(m, ctx)
    return io.to_bytes(m)


def rewritten(model_path_or_bytes, **options):
    m = io.read(model_path_or_bytes) if not isinstance(model_path_or_bytes, bytes) else io.read_buffer(model_path_or_bytes)
    entries = rewrite.rewrite_model(m, rewrite.Options(**options))
    return io.to_bytes(m), entries, m


def assert_close(a, b, exact=False):
    for xa, xb in zip(a, b):
        for ya, yb in zip(xa, xb):
            assert not np.isnan(yb).any()
            if exact:
                np.testing.assert_array_equal(ya, yb)
            else:
                np.testing.assert_allclose(yb, ya, rtol=0, atol=RTOL * float(np.max(np.abs(ya))))


def run1(model, x, xnnpack):
    return verify.invoke(verify.interpreter(model, xnnpack=xnnpack), [x.astype(np.float32)])[0]


def pruned(shape, s, seed=0):
    w = np.random.default_rng(seed).standard_normal(shape)
    return np.where(sparse.prune_magnitude(w, s), w, 0)


def sparse_tensors(m):
    return [(sg, t) for sg in m.subgraphs for t in sg.tensors if t.sparsity is not None]


def check_rules(m):
    """Every sparse tensor is read by DENSIFY, or is the weight of a non-hybrid FULLY_CONNECTED at version 8;
    int8 data never goes through DENSIFY."""
    for sg, t in sparse_tensors(m):
        assert list(t.shape) and all(d > 0 for d in t.shape)
        for op in sg.consumers_of(t):
            if op.builtin == OP.DENSIFY:
                assert t.type in (T.FLOAT32, T.FLOAT16), "int8 through DENSIFY"
            else:
                assert op.builtin == OP.FULLY_CONNECTED and op.inputs[1] is t and op.opcode.version == 8
                assert op.inputs[0].type == t.type, "sparse hybrid FULLY_CONNECTED"
                if t.type == T.INT8:
                    assert [int(d.denseSize) for d in t.sparsity.dimMetadata][2] == 16
                    assert not np.any(np.asarray(t.quantization.zero_point))


# ----------------------------------------------------------------------------------------- encoders, decoder
@pytest.mark.parametrize("shape,block", [((24, 40), None), ((24, 40), (1, 4)), ((8, 64), (1, 16)),
                                         ((16, 3, 3, 8), None), ((1, 3, 3, 24), None), ((4, 300), None)])
def test_encoding_round_trips_through_the_file(shape, block):
    if block is None:
        w = pruned(shape, 0.7).astype(np.float32)
        enc = sparse.encode_csr_last_dim(w)
    else:
        w = (np.random.default_rng(1).standard_normal(shape) * np.repeat(
            np.random.default_rng(2).random((shape[0], shape[1] // block[1])) < 0.3, block[1], axis=1)).astype(np.float32)
        enc = sparse.encode_blocks(w, block)
    from tfrewrite.graph import Buffer, Model, Subgraph, Tensor
    sg = Subgraph()
    t = sg.add_tensor(Tensor("w", T.FLOAT32, list(shape), buffer=Buffer(enc.values.astype(np.float32).view(np.uint8)),
                             sparsity=se.to_sparsity(enc)))
    sg.outputs = [t]
    back = io.read_buffer(io.to_bytes(Model(subgraphs=[sg]))).main.tensors[0]
    assert list(back.shape) == list(shape)  # the dense shape stays on the tensor
    np.testing.assert_array_equal(decode_reference(back), w)
    np.testing.assert_array_equal(sparse.decode(se.from_sparsity(back)), w)


def test_our_encoding_matches_the_converter_and_decodes_its_tensors():
    """vgg_digits_sparse (TF converter, EXPERIMENTAL_SPARSITY): re-encoding the decoded weights gives the
    converter's index vectors, values and index types exactly."""
    m = io.read(FIXTURES / "vgg_digits_sparse.tflite")
    tensors = sparse_tensors(m)
    assert len(tensors) == 9
    for _, t in tensors:
        dense = decode_reference(t)
        np.testing.assert_array_equal(sparse.decode(se.from_sparsity(t)), dense)
        ours = se.to_sparsity(sparse.encode_csr_last_dim(dense))
        np.testing.assert_array_equal(sparse.encode_csr_last_dim(dense).values, t.buffer.data.view(np.float32))
        assert list(ours.traversalOrder) == list(t.sparsity.traversalOrder)
        for a, b in zip(ours.dimMetadata, t.sparsity.dimMetadata):
            assert (a.format, a.denseSize, a.arraySegmentsType, a.arrayIndicesType) == \
                   (b.format, b.denseSize, b.arraySegmentsType, b.arrayIndicesType)
            if a.format == schema.DimensionType.SPARSE_CSR:
                np.testing.assert_array_equal(a.arraySegments.values, b.arraySegments.values)
                np.testing.assert_array_equal(a.arrayIndices.values, b.arrayIndices.values)


def test_densify_in_litert_gives_back_the_pruned_weight():
    """LiteRT's own DENSIFY (builtin kernel) reconstructs exactly the weight we encoded (conv, CSR on I)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    w = pruned((16, 3, 3, 8), 0.75).astype(np.float32)
    out, entries, m = rewritten(B.conv_model(w), sparse_encode=True)
    assert entries[0]["method"] == "csr + DENSIFY"
    it = Interpreter(model_content=out, experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    it.invoke()
    dz = m.main.operators[0]
    assert dz.builtin == OP.DENSIFY
    dense_out = next(i for i, t in enumerate(m.main.tensors) if t is dz.outputs[0])
    np.testing.assert_array_equal(it.get_tensor(dense_out), w)


@pytest.mark.parametrize("cols,seg,idx", [(200, "uint8", "uint8"), (300, "uint8", "uint16"),
                                          (2048, "int32", "uint16")])
def test_smallest_index_type(cols, seg, idx, direct_csr):
    rows = 4 if cols < 2048 else 160
    w = pruned((rows, cols), 0.8).astype(np.float32)
    _, entries, m = rewritten(B.fc_model(w, None, (1, cols)), sparse_encode=True)
    assert entries[0]["action"] == "encoded"
    (_, t), = sparse_tensors(m)
    assert se.index_dtypes(t) == [seg, idx]
    assert list(t.shape) == [rows, cols]


# --------------------------------------------------------------------------------------- FULLY_CONNECTED
def test_float_fc_with_random_zeros_goes_through_densify_by_default():
    w = pruned((64, 128), 0.8)
    dense = B.fc_model(w, None, (1, 128))
    out, entries, m = rewritten(dense, sparse_encode=True)
    assert entries[0]["method"] == "csr + DENSIFY"
    assert [op.name for op in m.main.operators] == ["DENSIFY", "FULLY_CONNECTED"]
    check_rules(m)
    x = np.random.default_rng(4).standard_normal((1, 128))
    for xnn in (True, False):
        np.testing.assert_array_equal(run1(out, x, xnn), run1(dense, x, xnn))


@pytest.fixture
def direct_csr(monkeypatch):
    monkeypatch.setattr(se, "FLOAT_FC_RANDOM", "direct")


@pytest.mark.parametrize("block", [False, True])
def test_float_fc_is_read_sparse_at_version_8_and_lower_versions_give_nan_under_xnnpack(block, direct_csr):
    w = pruned((64, 128), 0.8)
    if block:  # whole 1x4 blocks → block encoding
        w = np.where(sparse.prune_blocks(np.random.default_rng(0).standard_normal((64, 128)), 0.8, (1, 4)),
                     np.random.default_rng(0).standard_normal((64, 128)), 0)
    b = np.random.default_rng(3).standard_normal(64)
    dense = B.fc_model(w, b, (1, 128), act="RELU")
    out, entries, m = rewritten(dense, sparse_encode=True)
    assert entries[0]["method"] == ("block1x4, FC v8" if block else "csr, FC v8")
    (fc,) = m.main.operators
    assert fc.opcode.version == 8 and fc.inputs[1].sparsity is not None
    check_rules(m)
    x = np.random.default_rng(4).standard_normal((1, 128))
    for xnn in (True, False):
        ref = run1(dense, x, xnn)
        got = run1(out, x, xnn)
        np.testing.assert_allclose(got, ref, atol=RTOL * np.abs(ref).max(), rtol=0)
    # The hazard: the same sparse FC at version 1 is taken by XNNPACK, which reads the short buffer as dense.
    fc.opcode = OpCode(OP.FULLY_CONNECTED, version=1)
    bad = run1(io.to_bytes(m), x, True)
    assert np.isnan(bad).any() or not np.allclose(bad, run1(dense, x, True), atol=1e-3)


def test_fc_without_bias_and_batched_input(direct_csr):
    w = pruned((32, 64), 0.7)
    dense = B.fc_model(w, None, (3, 64))
    out, entries, m = rewritten(dense, sparse_encode=True)
    assert entries[0]["action"] == "encoded"
    x = np.random.default_rng(5).standard_normal((3, 64))
    for xnn in (True, False):
        ref = run1(dense, x, xnn)
        np.testing.assert_allclose(run1(out, x, xnn), ref, atol=RTOL * np.abs(ref).max(), rtol=0)


def test_hybrid_fc_is_never_sparse_and_would_be_wrong():
    w = pruned((64, 128), 0.8)
    dense = B.fc_model(w, None, (1, 128), form="int8")
    out, entries, m = rewritten(dense, sparse_encode=True)
    assert entries[0]["action"] == "skipped" and "hybrid" in entries[0]["reason"]
    assert not sparse_tensors(m)
    # The hazard: a CSR hybrid FC at version 8 runs without error and gives wrong numbers.
    bad = io.read_buffer(dense)
    fc = bad.main.operators[0]
    raw = np.asarray(fc.inputs[1].data)
    se.apply(bad, se.StoredWeight(fc.inputs[1], "int8"),
             se.Decision(sparse.encode_csr_last_dim(raw), "csr, FC v8", False), [fc])
    fc.opcode = OpCode(OP.FULLY_CONNECTED, version=8)
    x = np.random.default_rng(6).standard_normal((1, 128))
    ref = run1(dense, x, False)
    assert not np.allclose(run1(io.to_bytes(bad), x, False), ref, atol=0.1 * np.abs(ref).max())


def _int8_logits(model, x, xnnpack):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    it = Interpreter(model_content=model, experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    idx = [d["index"] for d in it.get_tensor_details() if "predictions_1/BiasAdd" in d["name"] and d["dtype"] == np.int8][-1]
    inp = it.get_input_details()[0]["index"]
    rows = []
    for xi in x:
        it.set_tensor(inp, xi[None])
        it.invoke()
        rows.append(it.get_tensor(idx).astype(int))
    return np.array(rows)


def test_full_integer_fc_uses_1x16_blocks_at_version_8():
    import digits
    path = FIXTURES / "vgg_digits_int8.tflite"
    opts = dict(prune=0.4, prune_block="1x4", only="fc|predictions")
    dense = prune_only(path, **opts)
    out, entries, m = rewritten(path, **opts)
    enc = [e for e in entries if e["kind"] == "sparse_encode" and e["action"] == "encoded"]
    assert len(enc) == 3 and all(e["method"] == "block1x16, FC v8" for e in enc)
    assert all(e["method"].startswith("block1x16 (--prune-block 1x4 not used") for e in entries
               if e["kind"] == "prune" and e["action"] == "pruned")
    check_rules(m)
    x, _ = digits.load_split("test", 32)
    for xnn in (True, False):  # same integer logits up to one quantum of rounding
        a, b = _int8_logits(dense, x[:24], xnn), _int8_logits(out, x[:24], xnn)
        assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 0.02


def test_full_integer_fc_with_random_zeros_stays_dense():
    # The prune pass zeroes a full-integer FC in 1x16 blocks; zeros put there otherwise are not stored sparse.
    m = io.read(FIXTURES / "vgg_digits_int8.tflite")
    rng = np.random.default_rng(3)
    for op in [op for op in m.main.operators if op.builtin == OP.FULLY_CONNECTED]:
        w = op.inputs[1]
        w.set_data(np.where(rng.random(w.shape) < 0.5, 0, w.data).astype(np.int8))
    out, entries, m = rewritten(io.to_bytes(m), sparse_encode=True, only="fc|predictions")
    fc = [e for e in entries if e["kind"] == "sparse_encode" and e["op"] == "FULLY_CONNECTED"]
    assert fc and all(e["action"] == "skipped" and "1x16" in e["reason"] for e in fc)
    assert not sparse_tensors(m)


# ------------------------------------------------------------------------------------------- convolutions
def test_conv_weights_go_through_densify_and_a_direct_sparse_conv_is_garbage():
    w = pruned((16, 3, 3, 8), 0.8)
    dense = B.conv_model(w, np.arange(16.0))
    out, entries, m = rewritten(dense, sparse_encode=True)
    assert [op.name for op in m.main.operators] == ["DENSIFY", "CONV_2D"]
    check_rules(m)
    x = np.random.default_rng(7).standard_normal((1, 9, 9, 8))
    for xnn in (True, False):
        np.testing.assert_array_equal(run1(out, x, xnn), run1(dense, x, xnn))
    # The hazard: the same sparse constant fed straight into the conv runs and gives garbage.
    dz, conv = m.main.operators
    conv.inputs[1] = dz.inputs[0]
    m.main.operators = [conv]
    m.cleanup()
    for xnn in (True, False):
        bad = run1(io.to_bytes(m), x, xnn)
        assert np.isnan(bad).any() or not np.allclose(bad, run1(dense, x, xnn), atol=1e-3)


def test_depthwise_float16_weights_go_through_densify_then_dequantize():
    w = pruned((1, 3, 3, 96), 0.8)
    from tfrewrite.graph import Model, Subgraph, Tensor
    from tfrewrite import ops
    sg = Subgraph()
    x = sg.add_tensor(Tensor("input", T.FLOAT32, [1, 8, 8, 96]))
    y = sg.add_tensor(Tensor("dw", T.FLOAT32, [1, 8, 8, 96]))
    c = sg.add_constant("k_fp16", w.astype(np.float16))
    k = sg.add_activation("k", T.FLOAT32, w.shape)
    sg.operators = [ops.dequantize(c, k), ops.depthwise_conv2d(x, k, sg.add_constant("b", np.zeros(96, np.float32)), y,
                                                               padding=schema.Padding.SAME)]
    sg.inputs, sg.outputs = [x], [y]
    dense = io.to_bytes(Model(subgraphs=[sg]))
    out, entries, m = rewritten(dense, sparse_encode=True)
    assert entries[0]["method"] == "csr + DENSIFY"
    assert [op.name for op in m.main.operators] == ["DENSIFY", "DEQUANTIZE", "DEPTHWISE_CONV_2D"]
    check_rules(m)
    xin = np.random.default_rng(8).standard_normal((1, 8, 8, 96))
    for xnn in (True, False):
        np.testing.assert_array_equal(run1(out, xin, xnn), run1(dense, xin, xnn))


@pytest.mark.parametrize("layer", ["conv", "fc"])
def test_int8_weights_stay_out_of_densify_which_xnnpack_cannot_prepare(layer):
    w = pruned((16, 3, 3, 8) if layer == "conv" else (64, 128), 0.8)
    dense = B.conv_model(w, form="int8") if layer == "conv" else B.fc_model(w, None, (1, 128), form="int8")
    out, entries, m = rewritten(dense, sparse_encode=True)
    assert entries[0]["action"] == "skipped" and not sparse_tensors(m)
    # The hazard: int8 sparse → DENSIFY → op fails to prepare under XNNPACK.
    bad = io.read_buffer(dense)
    op = next(o for o in bad.main.operators if o.builtin in (OP.CONV_2D, OP.FULLY_CONNECTED))
    raw = np.asarray(op.inputs[1].data)
    se.apply(bad, se.StoredWeight(op.inputs[1], "int8"),
             se.Decision(sparse.encode_csr_last_dim(raw), "csr + DENSIFY", True), [op])
    with pytest.raises(RuntimeError, match="failed to prepare"):
        verify.interpreter(io.to_bytes(bad), xnnpack=True).invoke()


# ----------------------------------------------------------------------------------------- when to encode
def test_encode_only_where_it_saves_bytes_and_above_the_zero_threshold():
    # 32 % zeros with uint16 indices: 0.68·(4+2) > 4 bytes per weight → left dense although above 30 %.
    w = pruned((8, 1024), 0.32)
    _, entries, m = rewritten(B.fc_model(w, None, (1, 1024)), sparse_encode=True)
    assert entries[0]["action"] == "skipped" and "does not save bytes" in entries[0]["reason"]
    # 20 % zeros: below the 30 % threshold even though uint8 indices would save a little.
    w = pruned((8, 200), 0.2)
    _, entries, _ = rewritten(B.fc_model(w, None, (1, 200)), sparse_encode=True)
    assert entries[0]["action"] == "skipped" and "30%" in entries[0]["reason"]
    # float16 at 45 % zeros with uint16 indices: 0.55·(2+2) > 2 bytes → dense.
    w = pruned((8, 1024), 0.45)
    _, entries, m = rewritten(B.fc_model(w, None, (1, 1024), form="float16"), sparse_encode=True)
    assert entries[0]["action"] == "skipped" and "does not save bytes" in entries[0]["reason"]


def test_shared_weight_is_encoded_once_and_both_fcs_get_version_8(direct_csr):
    base = io.read(FIXTURES / "shared_weight.tflite")
    dense = prune_only(io.to_bytes(base), prune=0.6)
    out, entries, m = rewritten(dense, sparse_encode=True)
    fcs = [op for op in m.main.operators if op.builtin == OP.FULLY_CONNECTED]
    assert len(fcs) == 2 and fcs[0].inputs[1] is fcs[1].inputs[1]
    assert all(op.opcode.version == 8 for op in fcs) and len(sparse_tensors(m)) == 1
    for xnn in (True, False):
        assert_close(outputs(dense, xnn), outputs(out, xnn))


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("s", [0.5, 0.8])
def test_pruned_model_encoded_equals_pruned_dense(s):
    dense = prune_only(MOBILENET, prune=s)
    out, entries, m = rewritten(MOBILENET, prune=s)
    check_rules(m)
    assert len(out) < len(dense)
    assert any(e["kind"] == "sparse_encode" and e["action"] == "encoded" for e in entries)
    for xnn in (True, False):
        assert_close(outputs(dense, xnn), outputs(out, xnn))


def test_block_pruned_vgg_via_cli(tmp):
    dst = tmp / "out.tflite"
    # 80 % by magnitude breaks this model (output error above 0.5): --force keeps it, to check its encoding.
    rc = cli.main([str(FIXTURES / "vgg_digits.tflite"), str(dst), "--prune", "0.8", "--prune-block", "1x4",
                   "--report", str(tmp / "r.json"), "--quiet", "--force"])
    assert rc == 0
    m = io.read(dst)
    check_rules(m)
    fcs = [op for op in m.main.operators if op.builtin == OP.FULLY_CONNECTED]
    assert all(op.opcode.version == 8 and len(op.inputs[1].sparsity.dimMetadata) == 3 for op in fcs)
    dense = prune_only(FIXTURES / "vgg_digits.tflite", prune=0.8, prune_block="1x4")
    out = dst.read_bytes()
    assert len(out) < 0.35 * len(dense)
    for xnn in (True, False):
        assert_close(outputs(dense, xnn), outputs(out, xnn))
    import digits
    x, y = digits.load_split("test", 32)
    pa, pb = digits.tflite_predict(dense, x[:96]), digits.tflite_predict(out, x[:96])
    assert (pa.argmax(1) == pb.argmax(1)).all()


def test_float16_model_pruned_and_encoded():
    path = FIXTURES / "vgg_digits_fp16.tflite"
    dense = prune_only(path, prune=0.8)
    out, entries, m = rewritten(path, prune=0.8)
    check_rules(m)
    assert sum(op.builtin == OP.DENSIFY for op in m.main.operators) == 9
    assert len(out) < 0.45 * len(dense)
    for xnn in (True, False):
        assert_close(outputs(dense, xnn), outputs(out, xnn), exact=True)


def test_sparse_encode_alone_encodes_an_already_pruned_dense_model():
    dense = prune_only(FIXTURES / "vgg_digits.tflite", prune=0.7)
    out, entries, m = rewritten(dense, sparse_encode=True)
    assert {e["kind"] for e in entries} == {"sparse_encode"}
    assert sum(e["action"] == "encoded" for e in entries) == 9
    assert len(out) < 0.5 * len(dense)
    for xnn in (True, False):
        assert_close(outputs(dense, xnn), outputs(out, xnn))


def test_converter_sparse_fixture_round_trips_unchanged():
    path = FIXTURES / "vgg_digits_sparse.tflite"
    out, entries, m = rewritten(path, sparse_encode=True, prune=0.5)
    assert all(e["action"] == "skipped" and "already sparse" in e["reason"] for e in entries)
    assert len(sparse_tensors(m)) == 9
    for xnn in (True, False):
        assert_close(outputs(path, xnn), outputs(out, xnn), exact=True)


def test_int8_dynamic_range_model_keeps_int8_weights_dense():
    path = FIXTURES / "vgg_digits_dynint8.tflite"
    dense = prune_only(path, prune=0.8)
    out, entries, m = rewritten(path, prune=0.8)
    check_rules(m)
    assert all(t.type != T.INT8 for _, t in sparse_tensors(m))
    reasons = {e["reason"] for e in entries if e["kind"] == "sparse_encode" and e["action"] == "skipped"}
    assert any("hybrid" in r for r in reasons) and any("DENSIFY" in r for r in reasons)
    for xnn in (True, False):
        assert_close(outputs(dense, xnn), outputs(out, xnn), exact=True)


# ------------------------------------------------------------------------------------- all-zero weights
@pytest.mark.parametrize("layer,form,options,method", [
    ("fc", "float32", {"sparse_encode": True}, "block1x4, FC v8"),    # already all zero
    ("fc", "float32", {"prune": 0.999999}, "block1x4, FC v8"),        # pruned to no nonzeros
    ("fc", "float16", {"prune": 0.999999}, "csr + DENSIFY"),
    ("fc", "float32", {"prune": 0.999999, "quantize": "float16"}, "csr + DENSIFY"),
    ("conv", "float32", {"prune": 0.999999}, "csr + DENSIFY"),
    ("conv", "float32", {"prune": 0.999999, "quantize": "float16"}, "csr + DENSIFY"),  # DENSIFY, then DEQUANTIZE
])
def test_an_all_zero_weight_is_stored_with_one_explicit_zero_and_runs(layer, form, options, method):
    """An encoding with no stored values is an empty buffer: LiteRT rejects the tensor ("lacks data"), and a
    DENSIFY reading it is not fed by a constant. One explicit zero is stored instead."""
    rng = np.random.default_rng(7)
    if layer == "conv":
        w, b = rng.standard_normal((16, 3, 3, 8)), rng.standard_normal(16)
        dense = B.conv_model(w, b, input_hw=(6, 6), form=form)
        zero = B.conv_model(0 * w, b, input_hw=(6, 6))
        x = rng.standard_normal((1, 6, 6, 8))
    else:
        w, b = rng.standard_normal((32, 64)) * (0 if options.get("sparse_encode") else 1), rng.standard_normal(32)
        dense = B.fc_model(w, b, (1, 64), form=form)
        zero = B.fc_model(0 * w, b, (1, 64))
        x = rng.standard_normal((1, 64))
    out, entries, m = rewritten(dense, **options)
    assert [e["method"] for e in entries if e["action"] == "encoded"] == [method]
    assert m.problems() == []
    for _, t in sparse_tensors(m):
        assert t.buffer is not None and t.buffer.nbytes > 0
    check_rules(m)
    for xnn in (True, False):
        np.testing.assert_array_equal(run1(out, x, xnn), run1(zero, x, xnn))


def test_validate_names_a_sparse_tensor_without_data():
    m = io.read_buffer(B.fc_model(np.zeros((8, 16)), None, (1, 16)))
    ctx = RunContext(rewrite.Options(sparse_encode=True).plan())
    se.run(m, ctx)
    (t,) = [t for _, t in sparse_tensors(m)]
    t.buffer = None
    with pytest.raises(ValueError, match="sparse but has no stored values"):
        m.validate()


def test_prune_at_the_floor_is_stored_sparse(tmp_path, capsys):
    """--prune 0.3 removes round(0.3·888) = 266 of 888 weights, 29.95 %: those zeros are stored sparse, not left
    dense (which cost accuracy and saved nothing, then was undone for being larger)."""
    rng = np.random.default_rng(0)
    src, out = tmp_path / "fc.tflite", tmp_path / "o.tflite"
    src.write_bytes(B.fc_model(rng.standard_normal((24, 37)).astype(np.float32)))
    assert cli.main([str(src), str(out), "--prune", "0.3", "--quiet"]) == 0, capsys.readouterr().err
    assert out.stat().st_size < src.stat().st_size
    assert any(t.sparsity is not None for t in io.read(out).main.tensors)


def test_a_sparse_float16_weight_is_left_with_its_true_reason():
    """A float16 weight stored sparse (sparse constant → DENSIFY → DEQUANTIZE, as MediaPipe's *_sparse models
    store theirs): every pass leaves it as it is and says so, not "not a constant" / "not float16"."""
    dense = B.conv_model(np.random.default_rng(35).standard_normal((16, 3, 3, 8)), form="float16")
    sparse_fp16, entries, m = rewritten(dense, prune=0.8)
    assert [op.name for op in m.main.operators] == ["DENSIFY", "DEQUANTIZE", "CONV_2D"]
    why = "sparse float16 weight (DENSIFY → DEQUANTIZE): left as it is"
    for options in ({"prune": 0.5}, {"quantize": "float16"}, {"ratio": 2.0}):
        _, entries, _ = rewritten(sparse_fp16, **options)
        assert entries and all(e["action"] == "skipped" and e["reason"] == why for e in entries), options
