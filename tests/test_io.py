"""Read → write without loss, on every fixture the converter produced."""
import hashlib

import numpy as np
import pytest

from conftest import ALL_FIXTURES, FIXTURES, RUNNABLE, assert_outputs_equal, outputs
from tfrewrite import io, schema


def _model_t(data):
    return schema.ModelT.InitFromPackedBuf(bytearray(data), 0)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_round_trip_is_stable_and_parses(name, tmp):
    src = FIXTURES / name
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    model = io.read(src)
    out1, out2 = tmp / "a.tflite", tmp / "b.tflite"
    io.write(model, out1)
    io.write(io.read(out1), out2)
    assert out1.read_bytes() == out2.read_bytes(), "a second write must be byte-identical"
    assert io.to_bytes(model) == out1.read_bytes()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest, "the input must never be written"

    # The independent `tflite` package reads what we wrote, and sees the same structure.
    import tflite
    a = tflite.Model.GetRootAsModel(bytearray(src.read_bytes()), 0)
    b = tflite.Model.GetRootAsModel(bytearray(out1.read_bytes()), 0)
    assert a.SubgraphsLength() == b.SubgraphsLength()
    assert a.SignatureDefsLength() == b.SignatureDefsLength()
    for i in range(a.SubgraphsLength()):
        sa, sb = a.Subgraphs(i), b.Subgraphs(i)
        assert sa.OperatorsLength() == sb.OperatorsLength()
        for j in range(sa.OperatorsLength()):
            oa, ob = sa.Operators(j), sb.Operators(j)
            ca, cb = a.OperatorCodes(oa.OpcodeIndex()), b.OperatorCodes(ob.OpcodeIndex())
            assert max(ca.BuiltinCode(), ca.DeprecatedBuiltinCode()) == cb.BuiltinCode()
            assert cb.DeprecatedBuiltinCode() == min(cb.BuiltinCode(), 127)
            assert ca.Version() == cb.Version() and ca.CustomCode() == cb.CustomCode()
            assert oa.BuiltinOptionsType() == ob.BuiltinOptionsType()
            assert bytes(oa.CustomOptionsAsNumpy() if oa.CustomOptionsLength() else b"") == \
                bytes(ob.CustomOptionsAsNumpy() if ob.CustomOptionsLength() else b"")
            ta = [sa.Tensors(k) for k in oa.OutputsAsNumpy()]
            tb = [sb.Tensors(k) for k in ob.OutputsAsNumpy()]
            assert [t.Name() for t in ta] == [t.Name() for t in tb]
            assert [list(t.ShapeAsNumpy()) for t in ta] == [list(t.ShapeAsNumpy()) for t in tb]


def _same_objects(a, b):
    """Deep equality of two object-API values (options, quantization, sparsity)."""
    if hasattr(a, "__dict__") and hasattr(b, "__dict__"):
        return type(a) is type(b) and all(_same_objects(v, getattr(b, k)) for k, v in vars(a).items())
    if isinstance(a, (list, tuple, np.ndarray)) or isinstance(b, (list, tuple, np.ndarray)):
        a, b = [] if a is None else a, [] if b is None else b
        return len(a) == len(b) and all(_same_objects(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_round_trip_keeps_everything_a_pass_does_not_touch(name):
    src = FIXTURES / name
    a = _model_t(src.read_bytes())
    b = _model_t(io.to_bytes(io.read(src)))
    assert a.description == b.description
    assert [m.name for m in a.metadata or []] == [m.name for m in b.metadata or []]
    for ma, mb in zip(a.metadata or [], b.metadata or []):
        assert bytes(a.buffers[ma.buffer].data) == bytes(b.buffers[mb.buffer].data)
    assert [(s.signatureKey, s.subgraphIndex, [(m.name, m.tensorIndex) for m in s.inputs],
             [(m.name, m.tensorIndex) for m in s.outputs]) for s in a.signatureDefs or []] == \
           [(s.signatureKey, s.subgraphIndex, [(m.name, m.tensorIndex) for m in s.inputs],
             [(m.name, m.tensorIndex) for m in s.outputs]) for s in b.signatureDefs or []]
    assert len(b.buffers[0].data if b.buffers[0].data is not None else []) == 0, "buffer 0 is the empty sentinel"
    for sa, sb in zip(a.subgraphs, b.subgraphs):
        assert sa.name == sb.name
        assert list(sa.inputs) == list(sb.inputs) and list(sa.outputs) == list(sb.outputs)
        for ta, tb in zip(sa.tensors, sb.tensors):
            assert ta.name == tb.name and ta.type == tb.type and list(ta.shape) == list(tb.shape)
            assert _same_objects(ta.shapeSignature, tb.shapeSignature)
            assert _same_objects(ta.quantization, tb.quantization)
            assert _same_objects(ta.sparsity, tb.sparsity)
            assert ta.isVariable == tb.isVariable and ta.hasRank == tb.hasRank
            assert _same_objects(ta.variantTensors, tb.variantTensors)
            da, db = a.buffers[ta.buffer].data, b.buffers[tb.buffer].data
            assert bytes(da if da is not None else b"") == bytes(db if db is not None else b"")
        for oa, ob in zip(sa.operators, sb.operators):
            assert list(oa.inputs) == list(ob.inputs) and list(oa.outputs) == list(ob.outputs)
            assert _same_objects(oa.builtinOptions, ob.builtinOptions)
            assert _same_objects(oa.builtinOptions2, ob.builtinOptions2)


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("xnnpack", [True, False])
def test_round_trip_gives_bit_identical_outputs(name, xnnpack):
    src = FIXTURES / name
    data = io.to_bytes(io.read(src))
    assert_outputs_equal(outputs(src, xnnpack), outputs(data, xnnpack))


@pytest.mark.parametrize("name", ["vgg_digits.tflite", "vgg_digits_sparse.tflite", "control_flow.tflite"])
def test_large_model_layout_runs_the_same(name):
    src = FIXTURES / name
    data = io.to_bytes(io.read(src), large_layout=True)
    m = _model_t(data)
    assert all(b.data is None or len(b.data) == 0 for b in m.buffers)
    assert any(b.offset > 1 for b in m.buffers), "weights must live after the flatbuffer"
    assert all(b.offset % 16 == 0 for b in m.buffers if b.offset > 1)
    assert_outputs_equal(outputs(src), outputs(data))
    # Read back: the reader follows Buffer.offset/size.
    again = io.to_bytes(io.read_buffer(data))
    assert_outputs_equal(outputs(src), outputs(again))


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_weights_start_on_16_byte_boundaries(name):
    import tflite
    data = bytearray(io.to_bytes(io.read(FIXTURES / name)))
    m = tflite.Model.GetRootAsModel(data, 0)
    for i in range(1, m.BuffersLength()):
        b = m.Buffers(i)
        if b.DataLength():
            assert b._tab.Vector(4) % 16 == 0


def test_reading_maps_weights_without_copying():
    model = io.read(FIXTURES / "vgg_digits.tflite")
    import mmap
    consts = [t for t in model.main.tensors if t.is_constant]
    assert consts
    for t in consts:
        base = t.buffer.data
        while getattr(base, "base", None) is not None and not isinstance(base, mmap.mmap):
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        assert isinstance(base, mmap.mmap)
        assert np.shares_memory(t.data, t.buffer.data)


def test_shared_weight_stays_shared():
    model = io.read(FIXTURES / "shared_weight.tflite")
    uses = {}
    for sg in model.subgraphs:
        for op in sg.operators:
            for t in op.inputs:
                if t is not None and t.is_constant:
                    uses.setdefault(id(t.buffer), set()).add(id(op))
    shared = [k for k, v in uses.items() if len(v) > 1]
    assert shared, "the fixture must share a weight between two ops"
    m = _model_t(io.to_bytes(model))
    counts = {}
    for sg in m.subgraphs:
        for op in sg.operators:
            for i in op.inputs:
                if i >= 0 and sg.tensors[i].buffer > 0:
                    counts.setdefault(sg.tensors[i].buffer, set()).add(id(op))
    assert any(len(v) > 1 for v in counts.values())


def test_unused_buffers_are_dropped_and_metadata_buffers_kept():
    src = FIXTURES / "vgg_digits.tflite"
    a = _model_t(src.read_bytes())
    b = _model_t(io.to_bytes(io.read(src)))
    used_a = {t.buffer for sg in a.subgraphs for t in sg.tensors if a.buffers[t.buffer].data is not None}
    assert len(b.buffers) <= len(a.buffers)
    assert len(b.buffers) == 1 + len({t.buffer for sg in b.subgraphs for t in sg.tensors if t.buffer}) + \
        len({m.buffer for m in b.metadata or []} - {t.buffer for sg in b.subgraphs for t in sg.tensors})
    assert used_a


def test_graph_helpers_edit_and_clean_up():
    from tfrewrite.graph import Operator
    from tfrewrite import ops
    model = io.read(FIXTURES / "vgg_digits.tflite")
    sg = model.main
    fc = [op for op in sg.operators if op.name == "FULLY_CONNECTED"][0]
    assert fc.outputs[0].producer is fc
    assert fc.inputs[0].consumers == [fc]
    # Replace the FC by an identical one that reads a fresh copy of its weight.
    w = sg.add_constant("copy_of_weight", np.array(fc.inputs[1].data))
    new = ops.fully_connected(fc.inputs[0], w, fc.inputs[2], fc.outputs[0],
                              activation=fc.builtin_options.fusedActivationFunction)
    old_weight = fc.inputs[1]
    sg.replace_operator(fc, [new])
    sg.check_topological_order()
    model.cleanup()
    assert old_weight not in sg.tensors and w in sg.tensors
    assert_outputs_equal(outputs(FIXTURES / "vgg_digits.tflite"), outputs(io.to_bytes(model)))
    # An op moved ahead of its producer is caught, and toposort repairs it.
    sg.operators.insert(0, sg.operators.pop(sg.operators.index(new)))
    with pytest.raises(ValueError):
        sg.check_topological_order()
    sg.toposort()
    sg.check_topological_order()
    assert isinstance(new, Operator)


def test_write_is_atomic_and_leaves_no_temp_file(tmp, monkeypatch):
    model = io.read(FIXTURES / "vgg_digits.tflite")
    target = tmp / "out.tflite"
    target.write_bytes(b"previous")

    class Boom(Exception):
        pass

    def fail(*a, **k):
        raise Boom()
    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(Boom):
        io.write(model, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp.iterdir()] == ["out.tflite"]


def test_inspect_json_rows_and_totals(capsys):
    from tfrewrite import cli
    assert cli.main(["inspect", str(FIXTURES / "vgg_digits.tflite"), "--json"]) == 0
    doc = __import__("json").loads(capsys.readouterr().out)
    assert set(doc) == {"file_bytes", "ops", "totals"} and set(doc["totals"]) == {"params", "macs", "weight_bytes"}
    assert doc["file_bytes"] == (FIXTURES / "vgg_digits.tflite").stat().st_size
    rows = doc["ops"]
    conv = rows[1]  # 3x3 conv 32 → 32 at 32x32, SAME
    assert conv["op"] == "CONV_2D" and conv["weight_shape"] == [32, 3, 3, 32] and conv["weight_dtype"] == "float32"
    assert conv["macs"] == 32 * 32 * 32 * 3 * 3 * 32 and conv["params"] == 32 * 9 * 32 + 32
    fc = [r for r in rows if r["op"] == "FULLY_CONNECTED"][0]
    assert fc["weight_shape"] == [256, 2048] and fc["macs"] == 256 * 2048
    assert doc["totals"]["params"] == sum(r["params"] for r in rows)
    assert doc["totals"]["macs"] == sum(r["macs"] for r in rows)
    for key in ("subgraph", "index", "op", "output", "weight_shape", "weight_dtype", "params", "macs", "zero_fraction"):
        assert key in rows[0]
    # Depthwise MACs and the zero share of sparse (DENSIFY-fed) weights.
    assert cli.main(["inspect", str(FIXTURES / "mobilenetv2_digits_sparse.tflite"), "--json"]) == 0
    rows = __import__("json").loads(capsys.readouterr().out)["ops"]
    dw = [r for r in rows if r["op"] == "DEPTHWISE_CONV_2D"][0]
    assert dw["macs"] > 0 and dw["weight_shape"][0] == 1
    sparse = [r for r in rows if r["weight_sparse"]]
    assert sparse and all(r["zero_fraction"] >= 0.45 for r in sparse)
    # The table form: one row per op and a total line.
    assert cli.main(["inspect", str(FIXTURES / "control_flow.tflite")]) == 0
    text = capsys.readouterr().out
    assert "WHILE" in text and text.strip().splitlines()[-1].startswith("total:")


def test_plain_rewrite_says_unchanged_and_internal_fault_is_one_line(tmp, capsys, monkeypatch):
    from tfrewrite import cli, rewrite
    out = tmp / "o.tflite"
    assert cli.main([str(FIXTURES / "vgg_digits.tflite"), str(out)]) == 0
    assert "re-serialized unchanged" in capsys.readouterr().out
    monkeypatch.setattr(rewrite, "rewrite_model", lambda *a, **k: 1 / 0)
    assert cli.main([str(FIXTURES / "vgg_digits.tflite"), str(tmp / "p.tflite")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tfrewrite: internal error:") and err.count("\n") == 1


def test_fields_the_ir_does_not_model_survive_a_round_trip(monkeypatch):
    """A newer schema may add fields to Model, SubGraph, Operator or Tensor. Pretend the IR does not know
    Tensor.hasRank, Operator.debugMetadataIndex, SubGraph.name and Model.description: they must still come back
    as they were, carried in `extra`."""
    from tflite.Model import Model as ReadOnlyModel
    model = io.read(FIXTURES / "two_signatures.tflite")
    model.description = "kept"
    model.main.name = "main graph"
    model.main.tensors[0].has_rank = True
    model.main.operators[0].debug_metadata_index = 7
    data = io.to_bytes(model)
    monkeypatch.setattr(io, "_TENSOR_EXTRA", ("hasRank",))
    monkeypatch.setattr(io, "_OPERATOR_EXTRA", ("debugMetadataIndex",))
    monkeypatch.setattr(io, "_SUBGRAPH_EXTRA", ("name",))
    monkeypatch.setattr(io, "_MODEL_EXTRA", ("description",))
    model = io.read_buffer(data)
    assert model.extra == {"description": b"kept"} and model.main.extra == {"name": b"main graph"}
    # Forget them in the modelled fields, as code that does not know them would.
    model.description, model.main.name = None, None
    for sg in model.subgraphs:
        for t in sg.tensors:
            t.has_rank = False
        for op in sg.operators:
            op.debug_metadata_index = -1
    back = ReadOnlyModel.GetRootAs(io.to_bytes(model), 0)
    assert back.Description() == b"kept"
    assert back.Subgraphs(0).Name() == b"main graph"
    assert back.Subgraphs(0).Tensors(0).HasRank()
    assert back.Subgraphs(0).Operators(0).DebugMetadataIndex() == 7


def test_quantization_is_the_irs_own_and_survives_a_round_trip(monkeypatch):
    """Tensors carry the IR's Quantization (no schema object past io); fields it does not model come back as read."""
    from tfrewrite.graph import Quantization
    from tflite.Model import Model as ReadOnlyModel
    src = (FIXTURES / "vgg_digits_int8.tflite").read_bytes()
    model = io.read_buffer(src)
    quantized = [t for t in model.main.tensors if t.quantization is not None]
    assert quantized and all(type(t.quantization) is Quantization for t in quantized)
    assert any(t.quantization.channels > 1 and t.quantization.axis == 0 for t in quantized)
    index, t = next((i, t) for i, t in enumerate(model.main.tensors) if t.quantization is not None)
    t.quantization.min, t.quantization.max = np.array([-1.5], np.float32), np.array([2.5], np.float32)
    data = io.to_bytes(model)
    # A field a newer schema adds is kept in `extra`: pretend min and max were such fields.
    monkeypatch.setattr(io, "_QUANTIZATION_MODELLED", io._QUANTIZATION_MODELLED - {"min", "max"})
    model = io.read_buffer(data)
    q = model.main.tensors[index].quantization
    assert set(q.extra) == {"min", "max"}
    q.min = q.max = None  # forgotten by code that does not know them
    q = ReadOnlyModel.GetRootAs(io.to_bytes(model), 0).Subgraphs(0).Tensors(index).Quantization()
    assert list(q.MinAsNumpy()) == [-1.5] and list(q.MaxAsNumpy()) == [2.5]
