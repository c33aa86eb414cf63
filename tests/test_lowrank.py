"""Low-rank FC and CP / Tucker-2 conv rewrites: run in LiteRT (XNNPACK on and off), equal a numpy reference built
from the same factors, and equal the original at full rank."""
import itertools
import json

import numpy as np
import pytest

import builders as B
from conftest import FIXTURES
from tfrewrite import io, rewrite, schema, verify

OP = schema.BuiltinOperator
T = schema.TensorType


def _rewrite(model_bytes, **options):
    model = io.read_buffer(model_bytes)
    entries = rewrite.rewrite_model(model, rewrite.Options(**options))
    return io.to_bytes(model), entries, model


def _run(model_bytes, x, xnnpack):
    it = verify.interpreter(model_bytes, xnnpack=xnnpack)
    return verify.invoke(it, [x.astype(np.float32)])[0].astype(np.float64)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


# Hybrid int8 kernels quantize the activations on the fly: compare with the reference loosely.
TOL = {"float32": 1e-5, "float16": 1e-5, "int8": 3e-2}


# ---------------------------------------------------------------------------------------------------- FC
FC_CASES = list(itertools.product(
    ["float32", "float16", "int8"], ["NONE", "RELU", "RELU6"], [True, False],  # form, activation, bias
    [((1, 48), False), ((3, 48), False), ((2, 3, 48), True), ((2, 3, 48), False)]))  # input shape, keep_num_dims


@pytest.mark.parametrize("form,act,with_bias,shape", FC_CASES)
def test_fc_rewrite_matches_factors_and_runs(form, act, with_bias, shape):
    rng = np.random.default_rng(0)
    input_shape, keep = shape
    w = rng.standard_normal((40, 48)) * 0.2
    b = rng.standard_normal(40) if with_bias else None
    model = B.fc_model(w, b, input_shape, keep, act, form)
    out, entries, _ = _rewrite(model, fc_rank=6)
    (e,) = entries
    assert e["action"] == "rewritten" and e["rank"] == 6 and e["method"] == "svd"
    assert e["params_after"] < e["params_before"] and e["macs_after"] < e["macs_before"]
    left, right = e["factors"]["left"].astype(np.float64), e["factors"]["right"].astype(np.float64)
    x = rng.standard_normal(input_shape)
    ref = (x.reshape(-1, 48) @ right.T) @ left.T + (b if b is not None else 0)
    ref = B.activation(ref, act).reshape(list(input_shape[:-1]) + [40] if keep else [-1, 40])
    for xnn in (True, False):
        got = _run(out, x, xnn)
        assert got.shape == ref.shape
        assert _rel(ref, got) < TOL[form], (xnn, _rel(ref, got))
    # Two FULLY_CONNECTED now, the first without bias or activation, the second with the original ones.
    m = io.read_buffer(out)
    fcs = [op for op in m.main.operators if op.builtin == OP.FULLY_CONNECTED]
    assert len(fcs) == 2 and fcs[0].inputs[2] is None
    assert fcs[0].builtin_options.fusedActivationFunction == 0
    assert fcs[1].builtin_options.fusedActivationFunction == B.ACT[act]
    assert all(op.builtin_options.keepNumDims == keep for op in fcs)


@pytest.mark.parametrize("form", ["float32", "float16"])
def test_fc_full_rank_reproduces_original(form):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 32))
    b = rng.standard_normal(24)
    model = B.fc_model(w, b, (2, 32), act="RELU", form=form)
    out, entries, _ = _rewrite(model, fc_rank=24, force=True)
    assert entries[0]["action"] == "rewritten"
    x = rng.standard_normal((2, 32))
    for xnn in (True, False):
        a, c = _run(model, x, xnn), _run(out, x, xnn)
        assert _rel(a, c) < (1e-5 if form == "float32" else 2e-3)


# -------------------------------------------------------------------------------------------------- conv
CONV_CASES = list(itertools.product(
    ["cp", "tucker2"], [1, 2], ["SAME", "VALID"], [1, 2], ["NONE", "RELU", "RELU6"], [True, False]))


def _chain_reference(e, x, stride, padding, dilation, b, act, kh=3, kw=3):
    f = e["factors"]
    first, middle, last = (f["first"].astype(np.float64), f["middle"].astype(np.float64),
                           f["last"].astype(np.float64))
    z = B.conv2d(x, first)
    if e["method"] == "cp":
        z = B.depthwise2d(z, middle, stride, padding, dilation)
    else:
        z = B.conv2d(z, middle, None, stride, padding, dilation)
    return B.activation(B.conv2d(z, last, b), act)


@pytest.mark.parametrize("method,stride,padding,dilation,act,with_bias", CONV_CASES)
def test_conv_kxk_rewrite_matches_factors(method, stride, padding, dilation, act, with_bias):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 3, 3, 10)) * 0.3
    b = rng.standard_normal(12) if with_bias else None
    model = B.conv_model(w, b, (11, 10), 1, stride, padding, dilation, act)
    out, entries, m = _rewrite(model, conv_rank=6, conv_method=method)
    (e,) = entries
    assert e["action"] == "rewritten", e["reason"]
    x = rng.standard_normal((1, 11, 10, 10))
    ref = _chain_reference(e, x, stride, padding, dilation, b, act)
    for xnn in (True, False):
        got = _run(out, x, xnn)
        assert got.shape == ref.shape and _rel(ref, got) < 1e-5, (xnn, _rel(ref, got))
    kinds = [op.builtin for op in m.main.operators]
    assert kinds == ([OP.CONV_2D, OP.DEPTHWISE_CONV_2D, OP.CONV_2D] if method == "cp" else [OP.CONV_2D] * 3)
    mid = m.main.operators[1].builtin_options
    assert (mid.strideH, mid.dilationHFactor, mid.padding) == (stride, dilation, B.PAD[padding])
    assert m.main.operators[2].builtin_options.fusedActivationFunction == B.ACT[act]
    # The version each op got is the one TFLite's rules give its options (dilated depthwise: 2).
    if method == "cp":
        assert m.main.operators[1].opcode.version == (2 if dilation > 1 else 1)


@pytest.mark.parametrize("form", ["float16", "int8"])
@pytest.mark.parametrize("method", ["cp", "tucker2"])
def test_conv_kxk_quantized_weights_keep_their_form(form, method):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 3, 3, 10)) * 0.3
    b = rng.standard_normal(12)
    model = B.conv_model(w, b, (9, 9), 1, 2, "SAME", 1, "RELU", form)
    out, entries, m = _rewrite(model, conv_rank=6, conv_method=method, force=True)  # tiny: would not pay
    assert entries[0]["action"] == "rewritten" and entries[0]["weight_dtype"] == form
    types = {t.type for t in m.main.tensors if t.is_constant and "bias" not in t.name}
    assert types == {schema.TensorType.FLOAT16 if form == "float16" else schema.TensorType.INT8}
    if form == "float16":
        assert sum(op.builtin == OP.DEQUANTIZE for op in m.main.operators) == 3
    x = rng.standard_normal((1, 9, 9, 10))
    ref = _chain_reference(entries[0], x, 2, "SAME", 1, b, "RELU")
    for xnn in (True, False):
        assert _rel(ref, _run(out, x, xnn)) < TOL[form]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("form", ["float32", "float16", "int8"])
def test_conv_1x1_svd(stride, form):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 1, 1, 16))
    b = rng.standard_normal(20)
    model = B.conv_model(w, b, (7, 7), 2, stride, "SAME", 1, "RELU6", form)
    out, entries, m = _rewrite(model, conv_rank=4, force=True)  # 20x16: the new ops cost more than they save
    (e,) = entries
    assert e["kind"] == "conv1x1" and e["method"] == "svd" and e["rank"] == 4
    left, right = e["factors"]["left"].astype(np.float64), e["factors"]["right"].astype(np.float64)
    x = rng.standard_normal((2, 7, 7, 16))
    ref = B.activation(B.conv2d(B.conv2d(x, right, None, stride), left, b), "RELU6")
    for xnn in (True, False):
        assert _rel(ref, _run(out, x, xnn)) < TOL[form]
    assert [op.builtin for op in m.main.operators if op.builtin != OP.DEQUANTIZE] == [OP.CONV_2D, OP.CONV_2D]


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("dilation", [1, 2])
def test_tucker2_full_rank_reproduces_original(padding, dilation):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 6))
    b = rng.standard_normal(8)
    model = B.conv_model(w, b, (10, 10), 1, 2, padding, dilation, "RELU")
    out, entries, _ = _rewrite(model, conv_rank=8, conv_method="tucker2", force=True)
    assert entries[0]["rank"] == [8, 6]
    x = rng.standard_normal((1, 10, 10, 6))
    for xnn in (True, False):
        assert _rel(_run(model, x, xnn), _run(out, x, xnn)) < 1e-5


def test_cp_at_the_kernels_cp_rank_reproduces_original():
    rng = np.random.default_rng(0)
    from tfrewrite.linalg.cp import cp_reconstruct
    r = 5
    a, bm, c = rng.standard_normal((16, r)), rng.standard_normal((9, r)), rng.standard_normal((12, r))
    w = cp_reconstruct(a, bm, c).reshape(16, 3, 3, 12)
    model = B.conv_model(w, rng.standard_normal(16), (8, 8), 1, 1, "SAME", 1, "NONE")
    out, entries, _ = _rewrite(model, conv_rank=r)
    assert entries[0]["rel_error"] < 1e-4
    x = rng.standard_normal((1, 8, 8, 12))
    for xnn in (True, False):
        assert _rel(_run(model, x, xnn), _run(out, x, xnn)) < 1e-4


# ------------------------------------------------------------------------------------------ what is skipped
def test_unprofitable_rank_is_skipped_with_reason():
    rng = np.random.default_rng(0)
    model = B.fc_model(rng.standard_normal((10, 12)), None, (1, 12))
    out, entries, _ = _rewrite(model, fc_rank=8)
    assert entries[0]["action"] == "skipped" and "does not reduce" in entries[0]["reason"]
    model = B.conv_model(rng.standard_normal((4, 3, 3, 4)), None, (6, 6))
    _, entries, _ = _rewrite(model, conv_rank=30)
    assert entries[0]["action"] == "skipped" and "does not reduce" in entries[0]["reason"]


def test_grouped_conv_full_int8_and_non_constant_are_skipped():
    # Grouped: the filter sees 4 input channels, the input has 8.
    rng = np.random.default_rng(0)
    from tfrewrite.graph import Model, Subgraph, Tensor
    from tfrewrite import ops
    sg = Subgraph()
    x = sg.add_tensor(Tensor("in", 0, [1, 6, 6, 8]))
    y = sg.add_tensor(Tensor("out", 0, [1, 6, 6, 8]))
    w = sg.add_constant("w", rng.standard_normal((8, 3, 3, 4)).astype(np.float32))
    sg.operators = [ops.conv2d(x, w, sg.add_constant("b", np.zeros(8, np.float32)), y, padding=1)]
    sg.inputs, sg.outputs = [x], [y]
    model = Model(subgraphs=[sg])
    entries = rewrite.rewrite_model(model, rewrite.Options(conv_rank=2))
    assert entries[0]["reason"] == "grouped convolution"
    # Non-constant weight: FC whose weight is a second model input.
    sg = Subgraph()
    x = sg.add_tensor(Tensor("in", 0, [1, 8]))
    wt = sg.add_tensor(Tensor("w", 0, [8, 8]))
    y = sg.add_tensor(Tensor("out", 0, [1, 8]))
    sg.operators = [ops.fully_connected(x, wt, None, y)]
    sg.inputs, sg.outputs = [x, wt], [y]
    entries = rewrite.rewrite_model(Model(subgraphs=[sg]), rewrite.Options(fc_rank=2))
    assert entries[0]["reason"] == "weight is not a constant"
    # A Dense on a 3-D tensor behind a dynamic RESHAPE: the file stores the FC input as [1, 1] (signature
    # [-1, -1]); factors would get intermediate shapes that do not fit, so the layer is left with the reason.
    sg = Subgraph()
    x = sg.add_tensor(Tensor("in", 0, [1, 1], shape_signature=[-1, -1]))
    y = sg.add_tensor(Tensor("out", 0, [1, 1], shape_signature=[-1, -1]))
    w = sg.add_constant("w", rng.standard_normal((16, 32)).astype(np.float32))
    sg.operators = [ops.fully_connected(x, w, None, y)]
    sg.inputs, sg.outputs = [x], [y]
    model = Model(subgraphs=[sg])
    entries = rewrite.rewrite_model(model, rewrite.Options(fc_rank=2))
    assert entries[0]["reason"] == "input shape [1, 1] is only known at run time (shape signature [-1, -1])"
    assert model.main.operators[0].inputs[1] is w
    # Full-integer int8 fixture: every candidate is left alone.
    model = io.read(FIXTURES / "vgg_digits_int8.tflite")
    entries = rewrite.rewrite_model(model, rewrite.Options(rank=8))
    assert entries and all(e["action"] == "skipped" for e in entries)
    assert all("full-integer" in e["reason"] for e in entries)


def test_depthwise_and_others_are_untouched():
    model = io.read(FIXTURES / "mobilenetv2_digits.tflite") if (FIXTURES / "mobilenetv2_digits.tflite").exists() \
        else io.read(FIXTURES / "vgg_digits.tflite")
    before = [op for op in model.main.operators if op.builtin == OP.DEPTHWISE_CONV_2D]
    rewrite.rewrite_model(model, rewrite.Options(rank=4))
    after = [op for op in model.main.operators if op.builtin == OP.DEPTHWISE_CONV_2D]
    assert all(op in after for op in before)


def test_only_skip_and_min_params(tmp):
    src = FIXTURES / "vgg_digits.tflite"
    model = io.read(src)
    entries = rewrite.rewrite_model(model, rewrite.Options(rank=16, only="fc1"))
    done = [e for e in entries if e["action"] == "rewritten"]
    assert len(done) == 1 and "fc1" in done[0]["output"]
    model = io.read(src)
    entries = rewrite.rewrite_model(model, rewrite.Options(rank=16, skip="conv|fc2"))
    assert {e["output"].split("/")[1] for e in entries if e["action"] == "rewritten"} == {"fc1_1"}
    model = io.read(src)
    entries = rewrite.rewrite_model(model, rewrite.Options(rank=16, min_params=100_000))
    assert all(e["params_before"] >= 100_000 for e in entries if e["action"] == "rewritten")
    assert any("min-params" in (e["reason"] or "") for e in entries)


def test_ratio_and_energy_choose_ranks():
    rng = np.random.default_rng(0)
    # A spectrum that decays fast enough for rank 9 to keep the layer's outputs (a flat one is refused at this ratio:
    # its fitted output error is above the floor).
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((96, 64)))
    model = B.fc_model((u / (1 + np.arange(64)) ** 2) @ v.T, None, (1, 96))
    _, entries, _ = _rewrite(model, ratio=4)
    e = entries[0]
    assert e["rank"] == (64 * 96) // (4 * (64 + 96))
    # Energy: a matrix with a known spectrum.
    s = np.array([10.0] * 5 + [0.1] * 59)
    model = B.fc_model((u * s) @ v.T, None, (1, 96))
    _, entries, _ = _rewrite(model, energy=0.99)
    assert entries[0]["rank"] == 5


def test_cli_report_and_table(tmp, capsys):
    from tfrewrite import cli
    out, report = tmp / "o.tflite", tmp / "r.json"
    # Rank 16 fitted to the weights breaks this model (output error above 0.5): --force keeps it, to be reported.
    code = cli.main([str(FIXTURES / "vgg_digits.tflite"), str(out), "--rank", "16", "--force", "--report",
                     str(report)])
    assert code == 0
    text = capsys.readouterr().out
    assert "rewritten" in text and "total: file" in text
    rep = json.loads(report.read_text())
    assert rep["totals"]["file_bytes_after"] == out.stat().st_size
    for e in rep["layers"]:
        for key in ("kind", "weight_shape", "action", "rank", "params_before", "params_after", "macs_before",
                    "macs_after", "rel_error", "reason"):
            assert key in e
        if e["action"] == "skipped":
            assert e["reason"]


def test_min_runtime_version_is_raised_when_needed():
    model = io.read(FIXTURES / "vgg_digits.tflite")
    before = bytes(model.get_metadata("min_runtime_version").data).rstrip(b"\0").decode()
    rewrite.rewrite_model(model, rewrite.Options(rank=8))
    from tfrewrite.ops import versions
    needed = versions.min_runtime_version((op.opcode.builtin, op.opcode.version) for _, op in model.operators())
    after = bytes(model.get_metadata("min_runtime_version").data).rstrip(b"\0").decode()
    assert versions.compare_runtime_versions(after, needed) >= 0
    assert versions.compare_runtime_versions(after, before) >= 0


def _accuracy(model) -> float:
    from digits import load_split
    x, y = load_split("test", 32)
    it = verify.interpreter(model)
    return float(np.mean([verify.invoke(it, [x[i:i + 1]])[0].argmax() == y[i] for i in range(len(x))]))


def test_vgg_fixture_accuracy_falls_with_rank_and_stays_useful(tmp):
    """The weight-fitted rewrite (no calibration data) of the trained VGG-style fixture: relations, not recorded
    numbers. More rank keeps at least as much accuracy; at rank 48 (about 5x smaller) the loss stays within 12
    points of the original and at rank 24 (about 9x) within 25 (seen 2026-12-01: 97.5 %, 90.3 %, 80.6 %). Their
    output error on generated images is above the 0.5 that calls a result broken: --force keeps them."""
    from tfrewrite import cli
    src = FIXTURES / "vgg_digits.tflite"
    base = _accuracy(src)
    acc = {}
    for rank, smaller in ((48, 4.8), (24, 9.0)):
        out = tmp / f"r{rank}.tflite"
        assert cli.main([str(src), str(out), "--rank", str(rank), "--quiet", "--force"]) == 0
        assert src.stat().st_size / out.stat().st_size >= smaller
        acc[rank] = _accuracy(out)
    assert acc[48] >= acc[24] - 0.01
    assert base - acc[48] <= 0.12 and base - acc[24] <= 0.25, (base, acc)


def test_a_shared_weight_gets_shared_factors():
    rng = np.random.default_rng(0)
    src = FIXTURES / "shared_weight.tflite"
    model = io.read(src)
    entries = rewrite.rewrite_model(model, rewrite.Options(fc_rank=16, force=True))
    assert [e["action"] for e in entries] == ["rewritten", "rewritten"]
    fcs = [op for op in model.main.operators if op.builtin == OP.FULLY_CONNECTED]
    assert len(fcs) == 4
    assert fcs[0].inputs[1] is fcs[2].inputs[1] and fcs[1].inputs[1] is fcs[3].inputs[1]
    data = io.to_bytes(model)
    x = rng.standard_normal(verify.interpreter(src).get_input_details()[0]["shape"])
    for xnn in (True, False):
        assert _rel(_run(src.read_bytes(), x, xnn), _run(data, x, xnn)) < 1e-5


def test_rank_one_factors_of_a_dynamic_int8_model_get_the_per_channel_op_versions(tmp):
    """A rank-1 factor quantized per channel has a single scale, which TFLite's version rule still counts as
    per-channel (one scale per output channel): the emitted ops must carry that version (it was an internal
    error: 'version 9 is below the 12 its tensors need')."""
    from tfrewrite import cli
    src = FIXTURES / "vgg_digits_dynint8.tflite"
    for n, args in enumerate((["--conv-rank", "1"], ["--fc-rank", "1", "--force"])):
        out = tmp / f"o{n}.tflite"
        assert cli.main([str(src), str(out), *args, "--quiet"]) == 0
        model = io.read(out)
        assert not model.problems()
        hybrid_single_scale = [op for _, op in model.operators() if op.builtin == OP.FULLY_CONNECTED
                               and op.inputs[0].type == T.FLOAT32 and op.inputs[1].type == T.INT8
                               and len(op.inputs[1].quantization.scale) == 1 == op.inputs[1].shape[0]]
        assert all(op.opcode.version >= 12 for op in hybrid_single_scale)
        x = verify.random_inputs(verify.interpreter(out), 1, 0)[0][0]
        assert _rel(_run(out.read_bytes(), x, True), _run(out.read_bytes(), x, False)) < 1e-5
