"""Magnitude pruning: the right weights become zero, in every storage form, only where the plan says."""
import numpy as np
import pytest

import builders as B
from conftest import FIXTURES
from tfrewrite import io, rewrite, schema
from tfrewrite.linalg import sparse
from tfrewrite.passes import prune
from tfrewrite.plan import RunContext

OP = schema.BuiltinOperator


def run_prune(model, **options):
    m = io.read_buffer(model) if isinstance(model, bytes) else io.read(model)
    ctx = RunContext(rewrite.Options(**options).plan())
    return prune.run(m, ctx), m


def weight_values(m, op):
    w = op.inputs[1]
    if not w.is_constant:
        w = m.main.producer_of(w).inputs[0]
    return np.asarray(w.data), w


@pytest.mark.parametrize("s", [0.3, 0.5, 0.9])
def test_fc_magnitude_pruning_removes_the_smallest_weights(s):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 48))
    entries, m = run_prune(B.fc_model(w), prune=s)
    (e,) = entries
    got, _ = weight_values(m, m.main.operators[0])
    assert e["action"] == "pruned" and e["method"] == "magnitude"
    assert np.count_nonzero(got == 0) == round(s * w.size)
    kept = got != 0
    assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()
    np.testing.assert_array_equal(got[kept], w.astype(np.float32)[kept])
    assert e["params_after"] == np.count_nonzero(got) and abs(e["sparsity_after"] - s) < 0.01
    assert e["macs_before"] == e["macs_after"] > 0


def test_block_pruning_zeroes_whole_1x4_blocks():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64))
    entries, m = run_prune(B.fc_model(w), prune=0.75, prune_block="1x4")
    assert entries[0]["method"] == "block1x4"
    got, _ = weight_values(m, m.main.operators[0])
    blocks = got.reshape(32, 16, 4)
    zero_blocks = np.all(blocks == 0, axis=2)
    assert np.all(np.all(blocks != 0, axis=2) | zero_blocks)  # a block is kept whole or dropped whole
    assert zero_blocks.mean() == 0.75


def test_block_that_does_not_divide_falls_back_to_elements():
    rng = np.random.default_rng(0)
    entries, _ = run_prune(B.fc_model(rng.standard_normal((8, 30))), prune=0.5, prune_block="1x4")
    assert entries[0]["action"] == "pruned" and entries[0]["method"].startswith("magnitude (block 1x4")


def test_float16_weights_are_pruned_in_their_own_storage():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 3, 3, 8))
    model = B.conv_model(w, form="float16")
    before = io.read_buffer(model)
    entries, m = run_prune(model, prune=0.6)
    assert entries[0]["action"] == "pruned" and entries[0]["weight_dtype"] == "float16"
    got, stored = weight_values(m, m.main.operators[-1])
    assert stored.type == schema.TensorType.FLOAT16
    orig, _ = weight_values(before, before.main.operators[-1])
    assert np.count_nonzero(got == 0) == round(0.6 * w.size)
    np.testing.assert_array_equal(got[got != 0], orig[got != 0])


def test_depthwise_only_with_the_flag():
    m = FIXTURES / "mobilenetv2_digits.tflite"
    if not m.exists():
        pytest.skip("mobilenetv2_digits fixture missing")
    entries, _ = run_prune(m, prune=0.5)
    dw = [e for e in entries if e["op"] == "DEPTHWISE_CONV_2D"]
    assert dw and all(e["action"] == "skipped" and "--prune-depthwise" in e["reason"] for e in dw)
    entries, _ = run_prune(m, prune=0.5, prune_depthwise=True)
    dw = [e for e in entries if e["op"] == "DEPTHWISE_CONV_2D"]
    # The 3x3x16 one's sparse form would take more bytes than its dense weight: not pruned.
    assert sum(e["action"] == "pruned" for e in dw) == len(dw) - 1
    assert all(e["action"] == "pruned" or (e["weight_shape"] == [1, 3, 3, 16] and
                                           e["reason"].startswith("does not pay")) for e in dw)


def test_only_skip_and_min_params():
    path = FIXTURES / "vgg_digits.tflite"
    entries, _ = run_prune(path, prune=0.5, only="fc")
    assert {e["action"] for e in entries if "fc" in e["output"]} == {"pruned"}
    assert all(e["reason"] == "not matched by --only" for e in entries if "fc" not in e["output"])
    entries, _ = run_prune(path, prune=0.5, skip="conv1")
    assert all(e["reason"] == "matched by --skip" for e in entries if "conv1" in e["output"])
    entries, _ = run_prune(path, prune=0.5, min_params=10000)
    small = [e for e in entries if e["action"] == "skipped"]
    assert small and all("--min-params" in e["reason"] for e in small)


def test_full_integer_fc_blocks_are_1x16():
    entries, m = run_prune(FIXTURES / "vgg_digits_int8.tflite", prune=0.5, prune_block="1x4", only="fc|predictions")
    fc = [e for e in entries if e["action"] == "pruned"]
    # the --prune-block it cannot use is named, not dropped silently
    assert len(fc) == 3 and all(e["method"].startswith("block1x16 (--prune-block 1x4 not used") for e in fc)
    for op in m.main.operators:
        if op.builtin == OP.FULLY_CONNECTED:
            w = np.asarray(op.inputs[1].data)
            assert sparse.block_sparsity(w, (1, 16)) == pytest.approx(0.5, abs=0.01)


def test_shared_weight_pruned_once():
    entries, m = run_prune(FIXTURES / "shared_weight.tflite", prune=0.5)
    assert [e["action"] for e in entries] == ["pruned", "skipped"]
    assert "pruned once" in entries[1]["reason"]
    a, b = [op.inputs[1] for op in m.main.operators]
    assert a is b and np.count_nonzero(a.data == 0) == round(0.5 * a.data.size)


def test_input_file_is_not_written_and_sparse_weights_are_left_alone(tmp):
    src = FIXTURES / "vgg_digits.tflite"
    before = src.read_bytes()
    entries, m = run_prune(src, prune=0.8)
    io.write(m, tmp / "x.tflite")
    assert src.read_bytes() == before
    entries, _ = run_prune(FIXTURES / "vgg_digits_sparse.tflite", prune=0.5)
    assert all(e["action"] == "skipped" and "already sparse" in e["reason"] for e in entries)


def test_no_prune_setting_means_no_change():
    entries, m = run_prune(FIXTURES / "vgg_digits.tflite")
    assert all(e["action"] == "skipped" and e["reason"] == "no sparsity given" for e in entries)


def test_accuracy_after_pruning_held_out():
    """vgg_digits pruned to 50 % without retraining keeps most of its accuracy on held-out digits (bench
    records the full numbers)."""
    import digits
    _, m = run_prune(FIXTURES / "vgg_digits.tflite", prune=0.5)
    x, y = digits.load_split("test", 32)
    pred = digits.tflite_predict(io.to_bytes(m), x[:96]).argmax(1)
    assert (pred == y[:96]).mean() >= 0.85


def _weights_untouched(before, after):
    for a, b in zip(before.main.operators, after.main.operators):
        if len(a.inputs) > 1 and a.inputs[1] is not None and a.inputs[1].is_constant:
            np.testing.assert_array_equal(weight_values(before, a)[0], weight_values(after, b)[0])


@pytest.mark.parametrize("case", ["int16 activations", "dynamic-range conv", "hybrid fc", "full-integer conv",
                                  "float fc quantized to int8", "float conv under full-int8"])
def test_weights_that_cannot_be_stored_sparse_are_not_pruned(case):
    """Zeros the runtime would read dense save no byte and cost accuracy: such a weight is left as it is, with
    "does not pay" and the reason (16x8 and dynamic-range int8 weights, int8 convs, a float weight --quantize int8
    makes int8)."""
    rng = np.random.default_rng(31)
    options = {}
    if case == "int16 activations":
        model, why = B.int16_fc_model(width=64, out=32), "int16 activations"
    elif case == "dynamic-range conv":
        model, why = B.conv_model(rng.standard_normal((16, 3, 3, 8)), form="int8"), "DENSIFY"
    elif case == "hybrid fc":
        model, why = B.fc_model(rng.standard_normal((32, 64)), form="int8"), "hybrid FULLY_CONNECTED"
    elif case == "full-integer conv":
        from builders import int8_conv_chain
        model, why = int8_conv_chain(), "DENSIFY"
    elif case == "float fc quantized to int8":
        model, why = B.fc_model(rng.standard_normal((128, 256))), "--quantize int8"
        options = dict(quantize="int8")
    else:
        model, why = B.conv_model(rng.standard_normal((16, 3, 3, 8))), "--quantize full-int8"
        options = dict(quantize="full-int8")
    entries, m = run_prune(model, prune=0.5, **options)
    assert entries and all(e["action"] == "skipped" and e["reason"].startswith("does not pay") and why in e["reason"]
                           for e in entries)
    _weights_untouched(io.read_buffer(model), m)


def test_an_fc_under_full_int8_is_pruned_in_1x16_blocks():
    rng = np.random.default_rng(32)
    (e,), m = run_prune(B.fc_model(rng.standard_normal((32, 64))), prune=0.5, quantize="full-int8")
    assert e["action"] == "pruned" and e["method"] == "block1x16"


def test_a_16x8_model_is_left_as_it_is(tmp_path):
    """A whole rewrite of an int16-activation model: nothing pruned, one prune entry per layer saying why."""
    src, out = tmp_path / "a16w8.tflite", tmp_path / "out.tflite"
    src.write_bytes(B.int16_fc_model())
    report = rewrite.run(src, out, rewrite.Options(prune=0.3))
    pruning = [e for e in report["layers"] if e["kind"] == "prune"]
    assert len(pruning) == 1 and pruning[0]["action"] == "skipped" and "does not pay" in pruning[0]["reason"]
    assert report["totals"]["nonzero_params_after"] == report["totals"]["nonzero_params_before"]



@pytest.mark.parametrize("case", ["float32 1x1 conv", "float16 conv", "float32 conv --quantize float16"])
def test_float_weights_whose_sparse_form_saves_nothing_are_not_pruned(case):
    """A float weight whose pruned form `sparse_encode` would leave dense (index vectors and tables cost more than
    the zeros free) is not pruned: "does not pay" with that pass's own reason, the weight untouched."""
    rng = np.random.default_rng(33)
    options = dict(quantize="float16") if case.endswith("float16") else {}
    if case == "float32 1x1 conv":
        model = B.conv_model(rng.standard_normal((16, 1, 1, 8)))
    else:
        model = B.conv_model(rng.standard_normal((16, 3, 3, 4)), form="float16" if case == "float16 conv" else "float32")
    (e,), m = run_prune(model, prune=0.5, **options)
    assert e["action"] == "skipped" and e["reason"].startswith("does not pay: encoding does not save bytes")
    _weights_untouched(io.read_buffer(model), m)


def test_every_pruned_float_layer_is_stored_sparse(tmp_path):
    """The same conv weight pays stored float32 (pruned and encoded) but not as float16; a small 1x1 conv beside
    it is left dense and unpruned: no layer keeps zeros stored dense."""
    rng = np.random.default_rng(34)
    src = tmp_path / "in.tflite"
    src.write_bytes(B.conv_model(rng.standard_normal((16, 3, 3, 4))))
    report = rewrite.run(src, tmp_path / "out.tflite", rewrite.Options(prune=0.5))
    by_kind = {e["kind"]: e for e in report["layers"]}
    assert by_kind["prune"]["action"] == "pruned" and by_kind["sparse_encode"]["action"] == "encoded"
    report = rewrite.run(src, tmp_path / "out16.tflite", rewrite.Options(prune=0.5, quantize="float16"))
    by_kind = {e["kind"]: e for e in report["layers"]}
    assert by_kind["prune"]["action"] == "skipped" and by_kind["prune"]["reason"].startswith("does not pay")
    assert report["totals"]["nonzero_params_after"] == report["totals"]["nonzero_params_before"]
