"""Global sparsity allocation (`--prune auto --target-size X`): per-layer sparsities at one shared damage level,
costed in the bytes the sparse format really stores, mixable with low rank (`--rank auto`) and --quantize."""
import json

import pytest

from conftest import FIXTURES, digits_calibration
from tfrewrite import cli

VGG = FIXTURES / "vgg_digits.tflite"


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return digits_calibration(tmp_path_factory, 16)


def _run(tmp, calib, *argv, model=VGG):
    out, rep = tmp / "o.tflite", tmp / "r.json"
    assert cli.main([str(model), str(out), "--calibration", str(calib), "--only", "fc", "--report", str(rep),
                     "--quiet", *argv]) == 0
    return json.loads(rep.read_text())


def _entries(report, kind):
    return {e["output"]: e for e in report["layers"] if e["kind"] == kind}


def test_sparsities_at_one_damage_level_cost_what_the_encoding_stores(calib, tmp):
    report = _run(tmp, calib, "--prune", "auto", "--target-size", "1.8")
    budget = report["budget"]
    assert budget["reached"] and budget["achieved"] >= 1.8
    pruned, encoded = _entries(report, "prune"), _entries(report, "sparse_encode")
    chosen = [layer for layer in budget["layers"] if layer.get("sparsity") is not None]
    assert chosen and all(layer["damage"] <= budget["damage_level"] for layer in budget["layers"])
    assert len({layer["sparsity"] for layer in chosen}) > 1  # not one sparsity everywhere
    for layer in chosen:
        e = pruned[layer["output"]]
        assert e["action"] == "pruned" and e["sparsity_after"] == pytest.approx(layer["sparsity"], abs=0.01)
        # The damage is judged on samples the trial prune was not fitted on: never ~0 for an FC layer that has
        # fewer rows than inputs (fitted on its own rows, any sparsity looks free).
        assert e["damage"] == layer["damage"] and all(c["damage"] > 1e-3 for c in layer["candidates"])
        assert e["output_error"] < e["output_error_magnitude"]
        # Its cost is the bytes the sparse encoding really stores.
        assert encoded[layer["output"]]["bytes_after"] == layer["bytes"]
        assert all("sparsity" in c and "bytes" in c for c in layer["candidates"])
    # Layers --only leaves out are not in the budget and not pruned.
    assert all(e["action"] == "skipped" for name, e in pruned.items() if "fc" not in name)


def test_mixed_with_low_rank_and_float16(calib, tmp):
    report = _run(tmp, calib, "--prune", "auto", "--rank", "auto", "--target-size", "2.5", "--quantize", "float16")
    budget = report["budget"]
    assert budget["reached"] and budget["achieved"] >= 2.5
    kinds = [{"rank" if "rank" in c else "sparsity" for c in layer["candidates"]} for layer in budget["layers"]]
    assert any(k == {"rank", "sparsity"} for k in kinds)
    # float16 costs: a sparsity option's bytes are 2-byte values plus indices, below the layer's float16 bytes.
    for layer in budget["layers"]:
        for c in layer["candidates"]:
            if "bytes" in c:
                assert c["bytes"] < 2 * {"fc1": 2048 * 256, "fc2": 256 * 256}.get(
                    next((k for k in ("fc1", "fc2") if k in layer["output"]), ""), 256 * 10)
    # The estimate counts float16 storage: it is close to what the written file achieves.
    assert budget["estimate"] == pytest.approx(budget["achieved"], rel=0.1)


@pytest.mark.parametrize("argv,words", [
    (["--prune", "auto"], "--prune auto needs --target-size"),
    (["--prune", "auto", "--target-macs", "2"], "--prune auto: sparse weights do not cut the MACs"),
    (["--prune", "0.5", "--target-size", "2"], "use --prune auto"),
    (["--rank", "auto"], "--rank auto needs"),
    (["--prune", "most"], "neither a number nor 'auto'"),
])
def test_refused_combinations(tmp, capsys, argv, words):
    out = tmp / "o.tflite"
    assert cli.main([str(VGG), str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not out.exists()


def test_full_integer_fc_sparsities_are_1x16_blocks_counted_with_their_per_channel_parameters(calib, tmp):
    from tfrewrite import budget, io, schema
    from tfrewrite.passes.common import SparsityOption, read_weight
    int8 = FIXTURES / "vgg_digits_int8.tflite"
    report = _run(tmp, calib, "--prune", "auto", "--target-size", "1.5", model=int8)
    b = report["budget"]
    assert b["reached"] and b["estimate"] == pytest.approx(b["achieved"], rel=0.01)  # costs what is written
    chosen = [layer for layer in b["layers"] if layer.get("sparsity") is not None]
    assert chosen
    pruned, encoded = _entries(report, "prune"), _entries(report, "sparse_encode")
    for layer in chosen:
        assert pruned[layer["output"]]["method"] == "sparsegpt+refit block1x16"
        assert encoded[layer["output"]]["method"] == "block1x16, FC v8"
    # A sparse option is charged the bias, scales, zero points and tables the dense layer is charged (it keeps
    # them): its cost is its encoded weight plus exactly that overhead.
    m = io.read(int8)
    op = next(op for op in m.main.operators if op.builtin == schema.BuiltinOperator.FULLY_CONNECTED
              and op.inputs[1].shape[0] == 256)
    weight = read_weight(op)
    layer = budget._budget_layer(op, weight, [SparsityOption(0.5, 100, 1000, 0, 0.1)], None)
    assert layer.options[0].nbytes == 1000 + layer.dense_bytes - weight.values.size
    assert layer.dense_bytes > weight.values.size + 28 * 256
