"""The budget's bytes of a low-rank option are what its rewrite writes: for float16 weights (behind DEQUANTIZE),
dynamic-range int8 weights (hybrid kernels, or behind DEQUANTIZE in k×k and 1×1 chains) and full-integer layers,
each option's new factors with their scales and zero points, DEQUANTIZE ops and their float tensors, zero
biases, intermediate tensors and op tables. Counted from the weights alone, the budget chose ranks the rewrite
then refused as "does not pay" and missed its target by up to 25 % (R6-3)."""
import json

import numpy as np
import pytest

import builders as B
from tfrewrite import cli, io, rewrite
from tfrewrite.budget import CANDIDATE_RATIOS
from tfrewrite.passes import cp_conv, lowrank_fc
from tfrewrite.passes.common import RankPolicy, read_weight


def _layers(rng, form):
    """(name, model bytes, pass, conv method) of one FC, one 1×1 conv and one 3×3 conv stored as `form`."""
    def w(*shape):
        return rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    return [("fc", B.fc_model(w(48, 96), rng.standard_normal(48), (1, 96), form=form), lowrank_fc, "cp"),
            ("conv1x1", B.conv_model(w(48, 1, 1, 64), rng.standard_normal(48), (6, 6), form=form), cp_conv, "cp"),
            ("conv3x3 cp", B.conv_model(w(48, 3, 3, 32), rng.standard_normal(48), (6, 6), form=form), cp_conv, "cp"),
            ("conv3x3 tucker2", B.conv_model(w(40, 3, 3, 40), None, (6, 6), form=form), cp_conv, "tucker2")]


def _size(model) -> int:
    """`io.estimated_size` without the metadata (a rewrite adds min_runtime_version once per model)."""
    return io.estimated_size(model) - sum(io.BUFFER_BYTES + buf.nbytes for _, buf in model.metadata)


@pytest.mark.parametrize("form", ["float16", "int8", "float32"])
def test_an_options_bytes_are_what_its_rewrite_adds(form):
    """Every rank option a low-rank pass offers the budget: the bytes the pass says it adds (`option_bytes`) are
    exactly what the rewrite at that rank changes the file's size by (the measure of its does-not-pay check)."""
    rng = np.random.default_rng(63)
    for name, data, pass_, method in _layers(rng, form):
        model = io.read_buffer(data)
        op = model.main.operators[-1]  # after the DEQUANTIZE of a float16 weight
        weight = read_weight(op)
        policy = RankPolicy(method=method)
        options = pass_.rank_options(op, weight, policy, CANDIDATE_RATIOS)
        assert options, name
        added = pass_.option_bytes(model, op, weight, options, policy)
        assert io.to_bytes(model) == data  # measured on the model itself, and put back
        for option, nbytes in zip(options, added):
            # A fixed rank (square Tucker-2 ranks for a square kernel) is fitted without generated inputs, so the
            # layer keeps its bias as `option_bytes` counts it with this policy (no rows: no corrected bias).
            rank = option.rank[0] if method == "tucker2" else option.rank
            assert option.rank == ((rank, rank) if method == "tucker2" else rank)
            rewritten = io.read_buffer(data)
            before = _size(rewritten)
            (entry,) = rewrite.rewrite_model(rewritten, rewrite.Options(rank=rank, conv_method=method, force=True))
            assert entry["action"] == "rewritten", (name, option)
            assert _size(rewritten) - before == nbytes, (name, form, option.rank)


@pytest.mark.parametrize("form", ["float16", "int8"])
def test_the_budget_writes_the_size_it_estimates_on_float16_and_dynamic_range_models(tmp_path, form):
    """--target-size on a model of float16 / hybrid int8 weights: no layer the budget gives a rank is refused as
    "does not pay", and the written file is as much smaller as the budget estimated (within 2 %). Before, the
    int8 model's first conv and its FC were refused (written 1.70x against 2.29x estimated), and the float16
    model came out 2.29x against 2.57x estimated."""
    src, out, rep = tmp_path / f"{form}.tflite", tmp_path / "o.tflite", tmp_path / "r.json"
    src.write_bytes(B.layer_stack(form))
    assert cli.main([str(src), str(out), "--target-size", "2", "--report", str(rep), "--quiet"]) == 0
    report = json.loads(rep.read_text())
    budget = report["budget"]
    assert not [e["output"] for e in report["layers"] if "does not pay" in (e.get("reason") or "")]
    chosen = {layer["output"] for layer in budget["layers"] if layer.get("rank") is not None}
    assert chosen and all(e["action"] == "rewritten" for e in report["layers"] if e["output"] in chosen)
    assert abs(budget["achieved"] - budget["estimate"]) <= 0.02 * budget["estimate"], budget
    assert report["output_error"]["worst"] < 0.2


@pytest.mark.parametrize("bias", [False, True])
def test_full_integer_options_count_the_chain_the_rewrite_writes(tmp_path, bias):
    """Full-integer FCs with and without a bias of their own (the TF converter writes none for a Dense without
    one, and the chain gains int32 biases with per-channel scales): the budget counts what the int8 chain
    writes, so no layer it gives a rank is refused as "does not pay" and the written file is the size it
    estimated (before, without biases: 28 bytes per output channel counted on both sides, the layers looked
    cheaper to rewrite than they are; the converter's multi-output int8 model came out 1.77x against 2.00x)."""
    rng = np.random.default_rng(64)
    src, cal, rep = tmp_path / "int8.tflite", tmp_path / "cal.npz", tmp_path / "r.json"
    src.write_bytes(B.int8_fc_chain(bias=bias))
    np.savez(cal, input=rng.integers(-128, 128, (64, 64)).astype(np.int8))
    assert cli.main([str(src), str(tmp_path / "o.tflite"), "--target-size", "2", "--calibration", str(cal),
                     "--report", str(rep), "--quiet"]) == 0
    report = json.loads(rep.read_text())
    budget = report["budget"]
    assert not [e["output"] for e in report["layers"] if "does not pay" in (e.get("reason") or "")]
    assert any(layer.get("rank") is not None for layer in budget["layers"])
    assert abs(budget["achieved"] - budget["estimate"]) <= 0.02 * budget["estimate"], budget
