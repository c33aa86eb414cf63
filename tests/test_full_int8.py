"""`--quantize full-int8` on models ai-edge-quantizer's output did not run for: a model output another op also
reads, weights stored sparse behind DENSIFY; and what it must say when the quantizer leaves ops float."""
import numpy as np
import pytest

import builders as B
from tfrewrite import cli, io, ops, rewrite, schema, verify
from tfrewrite.graph import Model, Subgraph, Tensor

T = schema.TensorType
OP = schema.BuiltinOperator
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def quantizer():
    pytest.importorskip("ai_edge_quantizer", reason="the test extra installs ai-edge-quantizer")


def with_signature(sg: Subgraph) -> bytes:
    model = Model(subgraphs=[sg])
    model.signature_defs = [B._signature("serving_default", sg)]
    return io.to_bytes(model)


def calibration(path, name, shape, seed, count=16):
    rng = np.random.default_rng(seed)
    np.savez(path, **{name: rng.standard_normal((count, *shape[1:])).astype(np.float32)})
    return path


def output_also_read(seed=0) -> bytes:
    """x[1, 16] → FC 32 (RELU) → emb → FC 10 → logits; both emb and logits are outputs (an embedding the
    classifier head reads)."""
    rng = np.random.default_rng(seed)
    sg = Subgraph(name="main")
    x = sg.add_tensor(Tensor("x", T.FLOAT32, [1, 16]))
    emb = sg.add_activation("emb", T.FLOAT32, [1, 32])
    logits = sg.add_activation("logits", T.FLOAT32, [1, 10])
    w1 = sg.add_constant("emb/weight", (rng.standard_normal((32, 16)) / 4).astype(np.float32))
    w2 = sg.add_constant("logits/weight", (rng.standard_normal((10, 32)) / 6).astype(np.float32))
    sg.operators = [ops.fully_connected(x, w1, sg.add_constant("emb/bias", np.full(32, 0.1, np.float32)), emb,
                                        activation=B.ACT["RELU"]),
                    ops.fully_connected(emb, w2, None, logits)]
    sg.inputs, sg.outputs = [x], [emb, logits]
    return with_signature(sg)


def assert_runs_alike(path, shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    on = verify.invoke(verify.interpreter(path, xnnpack=True), [x])
    off = verify.invoke(verify.interpreter(path, xnnpack=False), [x])
    for a, b in zip(on, off):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, atol=0.05 * float(np.abs(b).max()))


def test_an_output_another_op_reads_stays_integer_inside(tmp_path):
    """ai-edge-quantizer fed the logits FC the DEQUANTIZE'd copy of the emb output; LiteRT's int8 FC refused the
    float input (an internal error). The reader now gets the int8 tensor and the output keeps its float copy."""
    source = tmp_path / "emb.tflite"
    source.write_bytes(output_also_read())
    calib = calibration(tmp_path / "c.npz", "x", (1, 16), 1)
    out = tmp_path / "q.tflite"
    report = rewrite.run(source, out, rewrite.Options(quantize="full-int8", calibration=str(calib)))
    assert report["calibration"]["full_int8"]["integer_inputs_rewired"] == 1
    model = io.read(out)
    fcs = [op for _, op in model.operators() if op.builtin == OP.FULLY_CONNECTED]
    assert len(fcs) == 2 and all(op.inputs[0].type == T.INT8 for op in fcs)
    assert [t.type for t in model.main.outputs] == [T.FLOAT32, T.FLOAT32]
    assert_runs_alike(out, (1, 16), 2)
    # The logits are what ai-edge-quantizer makes of the same model without the emb output.
    alone = io.read(source)
    alone.main.outputs = alone.main.outputs[1:]
    alone.signature_defs[0].outputs = alone.signature_defs[0].outputs[1:]
    (tmp_path / "alone.tflite").write_bytes(io.to_bytes(alone))
    rewrite.run(tmp_path / "alone.tflite", tmp_path / "alone_q.tflite",
                rewrite.Options(quantize="full-int8", calibration=str(calib)))
    x = np.load(calib)["x"][:4]
    with_emb, without = verify.interpreter(out), verify.interpreter(tmp_path / "alone_q.tflite")
    for i in range(len(x)):
        np.testing.assert_array_equal(verify.invoke(with_emb, [x[i:i + 1]])[1], verify.invoke(without, [x[i:i + 1]])[0])


def output_into_concat(seed=0, signed=True) -> bytes:
    """x[1, 16] → FC 32 (RELU) → a, an output; x → FC 32 (RELU) → b; CONCATENATION(a, b) → FC 10 → logits, the
    other output (R6-4: an output another op reads through a CONCATENATION)."""
    rng = np.random.default_rng(seed)
    sg = Subgraph(name="main")
    x = sg.add_tensor(Tensor("x", T.FLOAT32, [1, 16]))
    a, b = (sg.add_activation(n, T.FLOAT32, [1, 32]) for n in ("a", "b"))
    joined, logits = sg.add_activation("joined", T.FLOAT32, [1, 64]), sg.add_activation("logits", T.FLOAT32, [1, 10])
    concat = schema.ConcatenationOptionsT()
    concat.axis = 1
    sg.operators = [
        ops.fully_connected(x, sg.add_constant("a/w", (rng.standard_normal((32, 16)) / 4).astype(np.float32)), None,
                            a, activation=B.ACT["RELU"]),
        ops.fully_connected(x, sg.add_constant("b/w", (rng.standard_normal((32, 16)) / 2).astype(np.float32)), None,
                            b, activation=B.ACT["RELU"]),
        op(OP.CONCATENATION, [a, b], [joined], concat, schema.BuiltinOptions.ConcatenationOptions),
        ops.fully_connected(joined, sg.add_constant("w", (rng.standard_normal((10, 64)) / 6).astype(np.float32)),
                            None, logits)]
    sg.inputs, sg.outputs = [x], [logits, a]
    return with_signature(sg) if signed else io.to_bytes(Model(subgraphs=[sg]))


@pytest.mark.parametrize("signed", [True, False])
def test_an_output_a_concatenation_reads_stays_float(signed, tmp_path):
    """ai-edge-quantizer 0.10 made the QUANTIZE that requantizes the output for the CONCATENATION the model
    output (an int8 output, exit 0) and left the output's DEQUANTIZE unread. The DEQUANTIZE'd tensor is the
    output again, the QUANTIZE feeds only the CONCATENATION, and no op is left without a reader."""
    source = tmp_path / "concat.tflite"
    source.write_bytes(output_into_concat(signed=signed))
    calib = calibration(tmp_path / "c.npz", "x", (1, 16), 1, count=32)
    out = tmp_path / "q.tflite"
    report = rewrite.run(source, out, rewrite.Options(quantize="full-int8", calibration=str(calib)))
    model = io.read(out)
    assert [(t.type, t.shape) for t in model.main.outputs] == [(T.FLOAT32, [1, 10]), (T.FLOAT32, [1, 32])]
    if signed:
        assert {n: t.type for n, t in model.signature_defs[0].outputs} == {"a": T.FLOAT32, "logits": T.FLOAT32}
    else:  # read by tensor name
        assert [t.name for t in model.main.outputs] == ["logits", "a"]
    outputs = {id(t) for t in model.main.outputs}
    assert all(any(id(t) in outputs or t.consumers for t in op.outputs) for op in model.main.operators)  # no dead op
    a = model.main.outputs[1]
    assert a.producer.builtin == OP.DEQUANTIZE and a.producer.inputs[0].producer.builtin == OP.FULLY_CONNECTED
    concat, = [o for o in model.main.operators if o.builtin == OP.CONCATENATION]
    assert all(t.type == T.INT8 for t in concat.inputs)
    assert report["calibration"]["full_int8"]["float_outputs_restored"] == 1 and not report["notes"]
    assert report["output_error"]["worst"] < 0.1
    assert_runs_alike(out, (1, 16), 2)


def test_a_dynamic_batch_output_stays_dynamic(tmp_path):
    """ai-edge-quantizer writes its QUANTIZE / DEQUANTIZE tensors without a shape signature: the output [-1, 10]
    of a dynamic-batch model came out [1, 10] (the interface check refused the result). They get their input's."""
    rng = np.random.default_rng(11)
    sg = Subgraph(name="main")
    x = sg.add_tensor(Tensor("x", T.FLOAT32, [1, 16], shape_signature=[-1, 16]))
    h, y = sg.add_activation("h", T.FLOAT32, [1, 32], like=x), sg.add_activation("y", T.FLOAT32, [1, 10], like=x)
    sg.operators = [
        ops.fully_connected(x, sg.add_constant("h/w", (rng.standard_normal((32, 16)) / 4).astype(np.float32)), None,
                            h, activation=B.ACT["RELU"]),
        ops.fully_connected(h, sg.add_constant("y/w", (rng.standard_normal((10, 32)) / 6).astype(np.float32)), None, y)]
    sg.inputs, sg.outputs = [x], [y]
    source = tmp_path / "dyn.tflite"
    source.write_bytes(with_signature(sg))
    calib = calibration(tmp_path / "c.npz", "x", (1, 16), 12, count=32)
    out = tmp_path / "q.tflite"
    report = rewrite.run(source, out, rewrite.Options(quantize="full-int8", calibration=str(calib)))
    assert not report["notes"] and report["output_error"]["worst"] < 0.05
    model = io.read(out)
    assert [t.shape_signature for t in model.main.outputs] == [[-1, 10]]
    assert [t.shape_signature for _, t in model.signature_defs[0].outputs] == [[-1, 10]]
    it = verify.interpreter(out)
    it.resize_tensor_input(it.get_input_details()[0]["index"], [3, 16])
    it.allocate_tensors()
    assert list(it.get_output_details()[0]["shape"]) == [3, 10]


def test_an_output_whose_type_changes_is_refused_whatever_made_it(tmp_path, monkeypatch, capsys):
    """The final check compares every input's and output's type, shape signature and name with the input
    model's: a changed one is the rewrite's fault, and the input is written unchanged with the reason (also with
    --force). The output-error check alone measured dequantized values and passed an int8 output."""
    from tfrewrite.passes import full_int8
    source = tmp_path / "concat.tflite"
    source.write_bytes(output_into_concat())
    calib = calibration(tmp_path / "c.npz", "x", (1, 16), 1, count=32)
    monkeypatch.setattr(full_int8, "float_outputs", lambda model, types: 0)  # the quantizer's wiring as it was
    out = tmp_path / "q.tflite"
    for force in (False, True):
        report = rewrite.run(source, out, rewrite.Options(quantize="full-int8", calibration=str(calib), force=force))
        assert out.read_bytes() == source.read_bytes()
        note, = report["notes"]
        assert "changed the model's inputs or outputs" in note
        assert "signature 'serving_default' output 'a': float32 [1, 32] became int8 [1, 32]" in note
        assert report["calibration"]["full_int8"]["skipped"].startswith("undone: ")
        assert "output_error" not in report
    monkeypatch.undo()

    # Any pass: a low-rank rewrite whose output lost its dynamic batch dimension.
    def fixed_batch(model, options, *args, **kwargs):
        entries = real(model, options, *args, **kwargs)
        model.main.outputs[0].shape_signature = [1, 10]
        return entries
    real = rewrite.rewrite_model
    signed = io.read_buffer(output_into_concat(seed=3))
    signed.main.outputs[0].shape_signature = [-1, 10]
    source.write_bytes(io.to_bytes(signed))
    monkeypatch.setattr(rewrite, "rewrite_model", fixed_batch)
    assert cli.main([str(source), str(out), "--rank", "4"]) == 0
    printed = capsys.readouterr()
    assert out.read_bytes() == source.read_bytes()
    assert "output 'logits': float32 [-1, 10] became float32 [1, 10]" in printed.out


def test_activation_ranges_are_the_min_and_max_over_all_calibration_samples(tmp_path):
    """ai-edge-quantizer's calibration keeps a moving average of each sample's min / max (smoothing 0.95): on
    standard normal features the input's range was about ±2.1, the typical sample's extremes, where the samples
    span about ±3 — clipped, output error 0.30 (the TF converter's: about 0.01). The ranges are now the min and
    max over every calibration sample (the held-out ones excepted), as the converter measures them."""
    source = tmp_path / "emb.tflite"
    source.write_bytes(output_also_read(seed=4))
    calib = calibration(tmp_path / "c.npz", "x", (1, 16), 4, count=32)
    out = tmp_path / "q.tflite"
    report = rewrite.run(source, out, rewrite.Options(quantize="full-int8", calibration=str(calib)))
    x = np.load(calib)["x"][:32 - rewrite.held_out_count(32)]
    quantize = io.read(out).main.operators[0]
    assert quantize.builtin == OP.QUANTIZE and quantize.inputs[0].name == "x"
    q = quantize.outputs[0].quantization  # int8 over [min, max]: 255 steps
    np.testing.assert_allclose(q.scale, [(x.max() - x.min()) / 255], rtol=1e-5)
    assert report["output_error"]["worst"] < 0.03


def test_a_quantizer_result_that_does_not_run_is_exit_2(tmp_path, capsys, monkeypatch):
    """Whatever else ai-edge-quantizer writes that LiteRT refuses is one error line naming its output and the op,
    never an internal error."""
    from tfrewrite.passes import full_int8
    source = tmp_path / "emb.tflite"
    source.write_bytes(output_also_read())
    calib = calibration(tmp_path / "c.npz", "x", (1, 16), 1)
    monkeypatch.setattr(full_int8, "read_integer_outputs", lambda model: 0)  # the quantizer's wiring as it is
    code = cli.main([str(source), str(tmp_path / "q.tflite"), "--quantize", "full-int8", "--calibration", str(calib)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("tfrewrite: error: ai-edge-quantizer's ")
    assert "does not run in LiteRT" in err and "FULLY_CONNECTED" in err
    assert not (tmp_path / "q.tflite").exists()


def sparse_conv_model(seed=0) -> bytes:
    """x[1, 9, 9, 8] → CONV_2D 16 whose weight (80 % zeros) is stored sparse behind a DENSIFY, as the converter's
    sparsity option writes it; tfrewrite's own encoder makes the same form."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 3, 3, 8))
    w = np.where(np.abs(w) > np.quantile(np.abs(w), 0.8), w, 0) / 4
    m = io.read_buffer(B.conv_model(w, np.linspace(-0.5, 0.5, 16)))
    rewrite.rewrite_model(m, rewrite.Options(sparse_encode=True))
    assert [op.builtin for op in m.main.operators] == [OP.DENSIFY, OP.CONV_2D]
    return with_signature(m.main)


def test_a_sparse_weight_behind_densify_is_quantized_as_a_weight(tmp_path):
    """The densified float weight was handed to ai-edge-quantizer as an activation (asymmetric, zero point -128:
    LiteRT's int8 conv refused it). It now gets its dense float values first, like float16 / int8 weights behind
    a DEQUANTIZE."""
    source = tmp_path / "sparse.tflite"
    source.write_bytes(sparse_conv_model())
    calib = calibration(tmp_path / "c.npz", "input", (1, 9, 9, 8), 3)
    out = tmp_path / "q.tflite"
    # Its dense int8 weight makes the file larger than the sparse input: kept only with --force.
    report = rewrite.run(source, out, rewrite.Options(quantize="full-int8", calibration=str(calib)))
    assert out.read_bytes() == source.read_bytes() and any("--force" in n for n in report["notes"])
    report = rewrite.run(source, out, rewrite.Options(quantize="full-int8", calibration=str(calib), force=True))
    assert report["calibration"]["full_int8"]["float_weights_restored"] == 1
    model = io.read(out)
    conv, = [op for _, op in model.operators() if op.builtin == OP.CONV_2D]
    w = conv.inputs[1]
    assert w.is_constant and w.type == T.INT8 and not np.any(w.quantization.zero_point)
    assert not any(op.builtin == OP.DENSIFY for _, op in model.operators())
    assert report["output_error"]["worst"] < 0.05
    assert_runs_alike(out, (1, 9, 9, 8), 4)


def float_island_model(seed=0) -> bytes:
    """x[1, 16] → FC 24 → NEG → FC 10: ai-edge-quantizer 0.10 leaves the NEG float, between a DEQUANTIZE and a
    QUANTIZE (as the NEG of a LayerNorm, a CONV_3D or a REDUCE_MAX)."""
    rng = np.random.default_rng(seed)
    sg = Subgraph(name="main")
    x = sg.add_tensor(Tensor("x", T.FLOAT32, [1, 16]))
    h, n, y = (sg.add_activation(name, T.FLOAT32, shape) for name, shape in
               (("h", [1, 24]), ("neg", [1, 24]), ("y", [1, 10])))
    w1 = sg.add_constant("h/weight", (rng.standard_normal((24, 16)) / 4).astype(np.float32))
    w2 = sg.add_constant("y/weight", (rng.standard_normal((10, 24)) / 5).astype(np.float32))
    sg.operators = [ops.fully_connected(x, w1, None, h), op(OP.NEG, [h], [n]), ops.fully_connected(n, w2, None, y)]
    sg.inputs, sg.outputs = [x], [y]
    return with_signature(sg)


def test_ops_left_float_are_named_and_the_result_is_not_quantized_again(tmp_path, capsys):
    """full-int8 that leaves an op float says so (a warning line and the report's float_ops with their share of
    the MACs); its own output fed back is left as it is (it was quantized again), with the same warning."""
    source = tmp_path / "neg.tflite"
    source.write_bytes(float_island_model())
    calib = calibration(tmp_path / "c.npz", "x", (1, 16), 5)
    out, again = tmp_path / "q.tflite", tmp_path / "q2.tflite"
    report = rewrite.run(source, out, rewrite.Options(quantize="full-int8", calibration=str(calib)))
    info = report["calibration"]["full_int8"]
    assert info["float_ops"] == [{"op": "NEG", "count": 1, "macs": 0}] and info["float_macs_share"] == 0.0
    warning, = [w for w in report["warnings"] if "full-int8" in w]
    assert "1x NEG" in warning and "not integer-only" in warning
    model = io.read(out)
    assert [op.builtin for op in model.main.operators if op.inputs[0].type == T.INT8 and op.builtin != OP.DEQUANTIZE
            ] == [OP.FULLY_CONNECTED, OP.FULLY_CONNECTED]
    assert_runs_alike(out, (1, 16), 6)
    assert cli.main([str(out), str(again), "--quantize", "full-int8", "--calibration", str(calib)]) == 0
    printed = capsys.readouterr()
    assert "already statically quantized" in printed.out and "1x NEG" in printed.err
    assert again.read_bytes() == out.read_bytes()


def op(builtin, inputs, outputs, options=None, options_type=0):
    from tfrewrite.graph import Operator
    return Operator(opcode=ops.opcode_for(builtin, 1), inputs=inputs, outputs=outputs, builtin_options=options,
                    builtin_options_type=options_type)


def test_an_integer_only_result_has_no_float_ops(tmp_path):
    """A flatten's SHAPE read the DEQUANTIZE'd tensor (a float op and a DEQUANTIZE for nothing): it reads the
    int8 tensor, and the model is integer-only, without a warning."""
    sg = Subgraph(name="main")
    x = sg.add_tensor(Tensor("x", T.FLOAT32, [1, 4, 4, 3]))
    c, flat, y = (sg.add_activation(n, T.FLOAT32, s) for n, s in (("c", [1, 4, 4, 8]), ("flat", [1, 128]),
                                                                     ("y", [1, 10])))
    shape = sg.add_activation("shape", T.INT32, [4])
    rng = np.random.default_rng(7)
    conv = ops.conv2d(x, sg.add_constant("k", (rng.standard_normal((8, 3, 3, 3)) / 3).astype(np.float32)),
                      sg.add_constant("b", np.zeros(8, np.float32)), c, padding=schema.Padding.SAME)
    # A flatten as the converter writes it: RESHAPE to [SHAPE(c)[0], 128] (SHAPE → STRIDED_SLICE → joined).
    shape_options, slice_options, concat_options = schema.ShapeOptionsT(), schema.StridedSliceOptionsT(), \
        schema.ConcatenationOptionsT()
    shape_options.outType = T.INT32
    batch = sg.add_activation("batch", T.INT32, [1])
    new_shape = sg.add_activation("new_shape", T.INT32, [2])
    one = sg.add_constant("one", np.array([1], np.int32))
    sg.operators = [
        conv,
        op(OP.SHAPE, [c], [shape], shape_options, schema.BuiltinOptions.ShapeOptions),
        op(OP.STRIDED_SLICE, [shape, sg.add_constant("zero", np.array([0], np.int32)), one, one], [batch],
           slice_options, schema.BuiltinOptions.StridedSliceOptions),
        op(OP.CONCATENATION, [batch, sg.add_constant("cols", np.array([128], np.int32))], [new_shape],
           concat_options, schema.BuiltinOptions.ConcatenationOptions),
        op(OP.RESHAPE, [c, new_shape], [flat]),
        ops.fully_connected(flat, sg.add_constant("w", (rng.standard_normal((10, 128)) / 8).astype(np.float32)),
                            None, y)]
    sg.inputs, sg.outputs = [x], [y]
    source = tmp_path / "flatten.tflite"
    source.write_bytes(with_signature(sg))
    calib = calibration(tmp_path / "c.npz", "x", (1, 4, 4, 3), 8)
    out = tmp_path / "q.tflite"
    report = rewrite.run(source, out, rewrite.Options(quantize="full-int8", calibration=str(calib)))
    assert report["calibration"]["full_int8"]["float_ops"] == []
    assert report["calibration"]["full_int8"]["integer_inputs_rewired"] == 1  # the SHAPE
    assert not [w for w in report["warnings"] if "full-int8" in w]
    from tfrewrite.passes import full_int8
    assert full_int8.integer_only(io.read(out))
    assert_runs_alike(out, (1, 4, 4, 3), 9)


# ----------------------------------------------------------------------- XNNPACK against the builtin kernels
@pytest.mark.parametrize("gap,input_gap,verdict", [
    (0.0837, 0.0226, "refuse"),  # int8 model, channel budget + rank auto: 11 steps where the input has 3
    (0.0377, 0.0114, "warn"),    # its uint8-in/out twin: 5 steps where the input has 1 (no warning before)
    (0.09, 0.05, "warn"),        # above the absolute threshold, but less than twice the input's own
    (0.05, 0.04, None), (0.015, 0.0, None)])
def test_delegate_gap_is_judged_against_the_inputs_own(gap, input_gap, verdict):
    assert rewrite.delegate_gap_verdict({"steps": 1.0, "rel_l2": gap, "input_rel_l2": input_gap}) == verdict


def test_a_rewrite_whose_delegates_disagree_is_left_as_it_is(tmp_path, monkeypatch, capsys):
    """Far more XNNPACK-vs-builtin disagreement than the input's own: the input is written unchanged with the
    reason (--force keeps the rewrite, with a warning); a smaller but still own gap gets the warning."""
    source = tmp_path / "emb.tflite"
    source.write_bytes(output_also_read())
    calib = calibration(tmp_path / "c.npz", "x", (1, 16), 1)
    out = tmp_path / "q.tflite"
    args = [str(source), str(out), "--quantize", "full-int8", "--calibration", str(calib),
            "--report", str(tmp_path / "r.json")]
    import json
    for measured, expect in ((0.12, "refuse"), (0.03, "warn")):
        monkeypatch.setattr(verify, "delegate_disagreement", lambda *a, measured=measured, **k: {
            "steps": 9.0, "rel_l2": measured})
        for force in ([], ["--force"]):
            assert cli.main(args + force) == 0
            printed = capsys.readouterr()
            report = json.loads((tmp_path / "r.json").read_text())
            if expect == "refuse" and not force:
                assert out.read_bytes() == source.read_bytes()
                assert "written unchanged" in report["notes"][0] and "0.12 apart" in report["notes"][0]
                assert report["calibration"]["full_int8"]["skipped"].startswith("undone: XNNPACK")
                assert "output_error" not in report and not report["warnings"]
            else:
                assert out.read_bytes() != source.read_bytes() and not report["notes"]
                assert "tfrewrite: warning: XNNPACK and the builtin kernels" in printed.err
                assert report["output_error"]["xnnpack"]["input_rel_l2"] == 0.0  # a float input


def test_a_model_without_a_signature_is_quantized_and_stays_without_one(tmp_path):
    """MediaPipe's models have no SignatureDef; ai-edge-quantizer calibrates by signature. The model gets one for
    the run (named after its input and output tensors) and the output has none again, its outputs read by the
    same tensor names (the quantizer named them '<name>_dequant')."""
    sg = io.read_buffer(output_also_read(seed=2)).main
    source = tmp_path / "unsigned.tflite"
    source.write_bytes(io.to_bytes(Model(subgraphs=[sg])))
    calib = calibration(tmp_path / "c.npz", "x", (1, 16), 3)
    out = tmp_path / "q.tflite"
    report = rewrite.run(source, out, rewrite.Options(quantize="full-int8", calibration=str(calib)))
    assert report["calibration"]["full_int8"]["recipe"] == "static_wi8_ai8"
    model = io.read(out)
    assert model.signature_defs == []
    assert [t.name for t in model.main.inputs] == ["x"] and [t.name for t in model.main.outputs] == ["emb", "logits"]
    assert [t.type for t in model.main.outputs] == [T.FLOAT32, T.FLOAT32]
    assert all(op.inputs[0].type == T.INT8 for _, op in model.operators() if op.builtin == OP.FULLY_CONNECTED)
    signed = tmp_path / "signed.tflite"
    signed.write_bytes(output_also_read(seed=2))
    same = rewrite.run(signed, tmp_path / "qs.tflite", rewrite.Options(quantize="full-int8", calibration=str(calib)))
    assert report["output_error"]["worst"] == same["output_error"]["worst"]  # the same quantization
    assert_runs_alike(out, (1, 16), 4)


@pytest.mark.parametrize("count, held_out", [(32, 4), (16, 2), (7, 0)])
def test_the_output_error_checks_samples_are_not_calibrated_on(count, held_out, tmp_path, monkeypatch):
    """The output-error check measures on the calibration file's last min(4, n // 8) samples, which no fit may
    see: ai-edge-quantizer got every sample, the held-out ones too, and measured the activation ranges on the
    check's own inputs. It now gets the others, in the file's order (all of them below 8 samples)."""
    from ai_edge_quantizer import calibrator
    source = tmp_path / "m.tflite"
    source.write_bytes(output_also_read(seed=5))
    calib = calibration(tmp_path / "c.npz", "x", (1, 16), 6, count=count)
    fed = []
    calibrate = calibrator.Calibrator.calibrate  # what the quantizer's Calibrator measures the ranges on

    def recorded(self, data, *args, **kwargs):
        fed.extend(row["x"] for rows in data.values() for row in rows)
        return calibrate(self, data, *args, **kwargs)
    monkeypatch.setattr(calibrator.Calibrator, "calibrate", recorded)
    report = rewrite.run(source, tmp_path / "q.tflite", rewrite.Options(quantize="full-int8",
                                                                         calibration=str(calib), force=True))
    assert rewrite.held_out_count(count) == held_out
    assert report["calibration"]["full_int8"]["samples"] == count - held_out
    np.testing.assert_array_equal(np.concatenate(fed), np.load(calib)["x"][:count - held_out])
    assert report["output_error"]["samples"] == (held_out or 4)


def test_a_layer_without_a_bias_is_pruned_only_where_its_corrected_bias_pays(tmp_path):
    """The data-aware prune gives a bias-free layer a corrected bias: in a full-integer model an int32 with a scale
    and a zero point per channel (16 bytes each), more than the zeros of a 64x16 FC free in 1x16 blocks (R6-7: the
    file grew and only accuracy was lost). Such a layer is not pruned; a wider float layer, whose zeros free more
    than its float bias takes, still is, its bias corrected."""
    rng = np.random.default_rng(3)
    narrow = tmp_path / "narrow.tflite"
    narrow.write_bytes(B.fc_model(rng.standard_normal((64, 16)), None, (1, 16)))
    calib = calibration(tmp_path / "c.npz", "input", (1, 16), 4, count=32)
    alone, pruned = tmp_path / "alone.tflite", tmp_path / "pruned.tflite"
    rewrite.run(narrow, alone, rewrite.Options(quantize="full-int8", calibration=str(calib)))
    report = rewrite.run(narrow, pruned, rewrite.Options(quantize="full-int8", calibration=str(calib), prune=0.7))
    (layer,) = [e for e in report["layers"] if e["kind"] == "prune"]
    assert layer["action"] == "skipped" and layer["reason"].startswith("does not pay: the corrected bias"), layer
    assert pruned.stat().st_size <= alone.stat().st_size
    wide = tmp_path / "wide.tflite"
    wide.write_bytes(B.fc_model(rng.standard_normal((64, 128)), None, (1, 128)))
    mix = np.random.default_rng(5)  # inputs on a 24-dimensional subspace: what the update can compensate
    calib = tmp_path / "w.npz"
    np.savez(calib, input=(mix.standard_normal((64, 24)) @ mix.standard_normal((24, 128))).astype(np.float32))
    report = rewrite.run(wide, pruned, rewrite.Options(calibration=str(calib), prune=0.7))
    (layer,) = [e for e in report["layers"] if e["kind"] == "prune"]
    assert layer["action"] == "pruned" and layer.get("bias_corrected"), layer
    assert pruned.stat().st_size < wide.stat().st_size


def test_the_kernel_gap_is_measured_on_more_inputs_than_the_output_error(tmp_path, monkeypatch):
    """On the output error's 4 held-out inputs one borderline one decided the XNNPACK-vs-builtin verdict (an int8
    low-rank VGG: 0.125 apart on a 1-vs-8 digit, 0.004 on the others, 0.030 over 100 samples); it is measured on
    the first 16 calibration samples (the kernels, not the fit, are judged)."""
    from tfrewrite import rewrite as rw
    source = tmp_path / "emb.tflite"
    source.write_bytes(output_also_read())
    calib = calibration(tmp_path / "c.npz", "x", (1, 16), 1, count=40)
    seen = []
    real = verify.delegate_disagreement

    def counting(model, inputs=None, *args, **kwargs):
        seen.append(len(inputs))
        return real(model, inputs, *args, **kwargs)
    monkeypatch.setattr(verify, "delegate_disagreement", counting)
    rewrite.run(source, tmp_path / "q.tflite", rewrite.Options(quantize="full-int8", calibration=str(calib)))
    assert seen and all(n == rw.XNNPACK_GAP_SAMPLES == 16 for n in seen), seen
