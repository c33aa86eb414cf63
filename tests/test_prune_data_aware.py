"""Data-aware pruning (--prune S --calibration): per-layer output error against magnitude pruning, accuracy on
the trained VGG-style fixture (calibration split distinct from the held-out test split), every storage form,
sequential pruning, and the rewritten models run alike with XNNPACK on and off with a valid sparse encoding."""
import numpy as np
import pytest

from conftest import FIXTURES, digits_calibration
from digits import load_split
from test_sparse_encode import check_rules
from tfrewrite import io, rewrite, verify

VGG = FIXTURES / "vgg_digits.tflite"
TEST_IMAGES = 120


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return digits_calibration(tmp_path_factory, 40)  # few images: the conv layers still get thousands of rows


def rewritten(src, calib, **options):
    model = io.read(src)
    options = rewrite.Options(calibration=str(calib) if calib else None, **options)
    entries = rewrite.rewrite_model(model, options, source=src)
    return model, [e for e in entries if e["kind"] == "prune"]


def accuracy(model_bytes, xnnpack=True) -> float:
    x, y = load_split("test", 32)
    it = verify.interpreter(model_bytes, xnnpack=xnnpack)
    pred = [verify.invoke(it, [x[i:i + 1]])[0].argmax() for i in range(TEST_IMAGES)]
    return float(np.mean(np.array(pred) == y[:TEST_IMAGES]))


@pytest.fixture(scope="module")
def vgg_08(calib):
    model, entries = rewritten(VGG, calib, prune=0.8)
    return io.to_bytes(model), entries


def test_data_aware_layers_beat_magnitude(vgg_08):
    _, entries = vgg_08
    assert len(entries) == 9 and all(e["action"] == "pruned" for e in entries)
    for e in entries:
        assert e["method"].startswith("sparsegpt") and e["bias_corrected"]
        assert abs(e["sparsity_after"] - 0.8) < 0.002
        assert e["output_error"] < 0.5 * e["output_error_magnitude"], e["output"]


def test_vgg_at_80_percent_keeps_its_accuracy_where_magnitude_collapses(vgg_08):
    data, _ = vgg_08
    base = accuracy(VGG.read_bytes())
    magnitude, _ = rewritten(VGG, None, prune=0.8)
    assert accuracy(data) >= base - 0.05  # bench/RESULTS.md: within a point on all 360 test digits
    assert accuracy(io.to_bytes(magnitude)) < base - 0.4


def test_xnnpack_on_and_off_agree_and_the_encoding_is_valid(vgg_08):
    data, _ = vgg_08
    check_rules(io.read_buffer(data))
    assert any(t.sparsity is not None for sg in io.read_buffer(data).subgraphs for t in sg.tensors)
    x, _ = load_split("test", 32)
    on, off = verify.interpreter(data, xnnpack=True), verify.interpreter(data, xnnpack=False)
    for i in range(4):
        a, b = verify.invoke(on, [x[i:i + 1]])[0], verify.invoke(off, [x[i:i + 1]])[0]
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("fixture,dtype", [("vgg_digits_fp16.tflite", "float16"),
                                           ("vgg_digits_dynint8.tflite", "int8")])
def test_float16_and_dynamic_range_int8_weights(calib, fixture, dtype):
    model, entries = rewritten(FIXTURES / fixture, calib, prune=0.7, only="fc|conv3")
    pruned = [e for e in entries if e["action"] == "pruned"]
    assert len(pruned) == 4 and all(e["weight_dtype"].startswith(dtype) for e in pruned)
    for e in pruned:
        assert e["method"].startswith("sparsegpt") and e["output_error"] < e["output_error_magnitude"]
    data = io.to_bytes(model)
    check_rules(io.read_buffer(data))
    assert accuracy(data) >= accuracy((FIXTURES / fixture).read_bytes()) - 0.05


def test_fc_blocks_and_sequential(calib):
    model, entries = rewritten(VGG, calib, prune=0.8, prune_block="1x4", sequential=True, only="fc|predictions")
    entries = [e for e in entries if e["action"] == "pruned"]
    assert [e["method"] for e in entries] == ["sparsegpt+refit block1x4"] * 3
    m = io.read_buffer(io.to_bytes(model))
    fcs = [op for op in m.main.operators if op.builtin == rewrite.schema.BuiltinOperator.FULLY_CONNECTED]
    assert any(op.inputs[1].sparsity is not None and op.opcode.version == 8 for op in fcs)  # read block-sparse
    # Later layers are fitted to the original outputs from the already pruned layers' activations.
    assert all(e["output_error"] < e["output_error_magnitude"] for e in entries)
    assert accuracy(io.to_bytes(model)) >= accuracy(VGG.read_bytes()) - 0.05


def test_command_line_sequential_pruning(calib, tmp_path, capsys):
    from tfrewrite import cli
    out = tmp_path / "out.tflite"
    code = cli.main([str(VGG), str(out), "--prune", "0.5", "--calibration", str(calib), "--sequential",
                     "--only", "predictions", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and out.exists(), err
    assert "no layer is fitted" not in err  # pruning is fitted to the calibration data
