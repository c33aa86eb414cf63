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
    report = rewrite.run(source, out, rewrite.Options(quantize="full-int8", calibration=str(calib)))
    assert report["calibration"]["full_int8"]["float_weights_restored"] == 1
    model = io.read(out)
    conv, = [op for _, op in model.operators() if op.builtin == OP.CONV_2D]
    w = conv.inputs[1]
    assert w.is_constant and w.type == T.INT8 and not np.any(w.quantization.zero_point)
    assert not any(op.builtin == OP.DENSIFY for _, op in model.operators())
    assert report["output_error"]["worst"] < 0.05
    assert_runs_alike(out, (1, 9, 9, 8), 4)
