"""The whole-model budget as a planner: its search on a synthetic damage table, the candidates it may touch
(the passes' own), and the honesty of its "reached"."""
import json

import numpy as np
import pytest

import builders as B
from conftest import FIXTURES, digits_calibration
from tfrewrite import cli, io, rewrite
from tfrewrite.budget import BudgetLayer, allocate, cost
from tfrewrite.passes.common import RankOption

VGG = FIXTURES / "vgg_digits.tflite"


def _layer(name, dense, table):
    """A layer of `dense` weights whose options cut it by each ratio in `table` (ratio → damage)."""
    return BudgetLayer(name, [RankOption(r, int(dense / r), int(dense / r), int(dense / r), d)
                              for r, d in table.items()], dense, dense)


def test_allocate_spends_the_budget_where_damage_is_least():
    big_tolerant = _layer("big", 1000, {2: 0.01, 4: 0.05, 8: 0.2})
    big_fragile = _layer("fragile", 1000, {2: 0.3, 4: 0.6, 8: 0.9})
    small = _layer("small", 100, {2: 0.5, 4: 0.8})
    layers = [big_tolerant, big_fragile, small]
    total = 400 + 4 * 2100  # bytes outside the layers + the layers' dense float32 bytes
    result = allocate(layers, total, total / 2)
    assert result.reached and result.estimate <= total / 2
    # The tolerant layer goes furthest; no layer's damage exceeds the shared level, and that level is the least
    # that meets the goal: one step lower misses it.
    assert result.choice[0].ratio >= max((c.ratio for c in result.choice[1:] if c), default=0)
    assert all(c is None or c.damage <= result.level for c in result.choice)
    lower = [d for d in sorted({o.damage for layer in layers for o in layer.options}) if d < result.level]
    if lower:
        assert allocate(layers, total, total / 2).level == result.level
        fixed = total - sum(cost(layer, None, False) for layer in layers)
        spent = [min([o for o in layer.options if o.damage <= lower[-1]], default=None,
                     key=lambda o: cost(layer, o, False)) for layer in layers]
        assert fixed + sum(cost(layer, c, False) for layer, c in zip(layers, spent)) > total / 2


def test_allocate_says_when_the_goal_is_out_of_reach():
    layers = [_layer("a", 1000, {2: 0.1, 4: 0.3})]
    total = 4 * 1000 + 10_000  # mostly bytes the budget cannot touch
    result = allocate(layers, total, total / 5)
    assert not result.reached and result.choice[0].ratio == 4  # the cheapest option everywhere
    assert allocate([], 100, 50).reached is False


def test_options_of_several_kinds_share_one_list():
    """A sparsity option costs the bytes its encoding stores (index vectors included), a rank option its params at
    the layer's itemsize; in one list the budget picks whichever is cheapest under the level."""
    from tfrewrite.passes.common import SparsityOption
    dense = 1000
    layer = BudgetLayer("mixed", [RankOption(2, 10, 500, 500, 0.2), SparsityOption(0.8, 200, 1300, dense, 0.1),
                                  SparsityOption(0.9, 100, 700, dense, 0.3)], dense, dense)
    assert cost(layer, layer.options[1], False) == 1300 and cost(layer, layer.options[0], False) == 2000
    assert cost(layer, layer.options[1], True) == dense  # the runtime runs a sparse layer dense
    total = 4 * dense
    assert allocate([layer], total, 1500).choice[0] == layer.options[1]  # damage 0.1 suffices
    assert allocate([layer], total, 1000).choice[0] == layer.options[2]  # needs 700 B: level 0.3, cheapest there


def test_allocate_by_macs_keeps_layers_dense_when_the_goal_allows():
    layers = [_layer("a", 1000, {2: 0.1}), _layer("b", 1000, {2: 0.4})]
    result = allocate(layers, 2000, 1500, by_macs=True)
    assert result.reached and result.choice[0] is not None and result.choice[1] is None


def test_allocate_judges_each_level_by_the_measure_when_savings_interact():
    # a and b cut the input and the output side of one layer of 1000 MACs: it keeps 1000 · s_a · s_b, not the
    # sum of two separately counted savings. Counted additively (two layers of 1000) the goal 800 needs level 0.5;
    # measured on the model, halving both sides already leaves 250 at level 0.2.
    a, b = _layer("a", 1000, {2: 0.1}), _layer("b", 1000, {2: 0.2, 4: 0.5})

    def measure(choice):
        shrink = [1 / c.ratio if c else 1.0 for c in choice]
        return 1000 * shrink[0] * shrink[1]
    additive = allocate([a, b], 2000, 800, by_macs=True)
    assert additive.reached and additive.level == 0.5
    measured = allocate([a, b], 1000, 300, by_macs=True, measure=measure)
    assert measured.reached and measured.level == 0.2 and measured.estimate == 250


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return digits_calibration(tmp_path_factory, 16)


def test_budget_respects_min_params_and_reports_the_written_size(calib, tmp):
    rep = tmp / "r.json"
    out = tmp / "o.tflite"
    assert cli.main([str(VGG), str(out), "--target-size", "3", "--calibration", str(calib), "--min-params", "20000",
                     "--report", str(rep), "--quiet"]) == 0
    report = json.loads(rep.read_text())
    small = {e["output"] for e in report["layers"] if np.prod(e["weight_shape"]) < 20000}
    assert small and not small & {layer["output"] for layer in report["budget"]["layers"]}
    for e in report["layers"]:
        if e["output"] in small:
            assert e["action"] == "skipped" and "min-params" in e["reason"]
    budget, totals = report["budget"], report["totals"]
    achieved = totals["file_bytes_before"] / out.stat().st_size
    assert budget["achieved"] == pytest.approx(achieved, abs=1e-3)
    assert budget["reached"] == (achieved >= budget["goal"])


def test_sequential_never_rewrites_its_own_factor_layers(calib, tmp):
    rep = tmp / "r.json"
    out = tmp / "o.tflite"
    assert cli.main([str(VGG), str(out), "--ratio", "3", "--calibration", str(calib), "--sequential",
                     "--report", str(rep), "--quiet"]) == 0
    from tfrewrite import io
    names = [t.name for sg in io.read(out).subgraphs for t in sg.tensors]
    markers = ("/lowrank/", "/cp/", "/tucker2/")
    assert any("/lowrank/" in n for n in names)
    assert not [n for n in names if sum(n.count(m) for m in markers) > 1]
    report = json.loads(rep.read_text())
    assert len(report["layers"]) == 9  # the input's 6 CONV_2D and 3 FULLY_CONNECTED, each once
    rewritten = [e for e in report["layers"] if e["action"] == "rewritten"]
    assert rewritten and all(e["params_before"] / e["params_after"] < 3.5 for e in rewritten)


def _decaying(rng, m, n):
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    return (u / (1 + np.arange(min(m, n)))) @ v.T


def test_ratio_refuses_degenerate_layers_unless_forced():
    rng = np.random.default_rng(3)
    output_layer = B.fc_model(_decaying(rng, 10, 256), rng.standard_normal(10), (1, 256))  # 10-way: rank 1 at 5x
    stem = B.conv_model(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), None, (9, 9))  # 3 input channels
    for model_bytes, why in ((output_layer, "degenerate"), (stem, "input channels")):
        for force in (False, True):
            model = io.read_buffer(model_bytes)
            entry = rewrite.rewrite_model(model, rewrite.Options(ratio=2 if why == "input channels" else 5,
                                                                 force=force))[0]
            if force:
                assert entry["action"] == "rewritten"
            else:
                assert entry["action"] == "skipped" and why in entry["reason"] and "--force" in entry["reason"]


def test_ratio_without_data_fits_on_generated_inputs_and_refuses_a_large_output_error():
    """--ratio alone fits each layer to its outputs on the model's response to generated inputs (the fit changes
    the factors, and bias correction the bias), and leaves a layer as it is when the fitted layer's output error
    around its mean is above the floor: a weight with a flat spectrum loses most of its output at half rank."""
    rng = np.random.default_rng(5)
    flat = rng.standard_normal((48, 48)).astype(np.float32)
    u, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    decaying = ((u * 10 / (1 + np.arange(48)) ** 2) @ u.T).astype(np.float32)  # rank 12 keeps all but ~2 %
    bias = rng.standard_normal(48).astype(np.float32)
    for weight, rewritten in ((flat, False), (decaying, True)):
        entry = rewrite.rewrite_model(io.read_buffer(B.fc_model(weight, bias, (1, 48))), rewrite.Options(ratio=2))[0]
        if rewritten:
            assert entry["action"] == "rewritten" and entry["bias_corrected"] and entry["output_error"] < 0.15
        else:
            assert entry["action"] == "skipped" and "on the generated inputs is above 0.15" in entry["reason"]
    forced = rewrite.rewrite_model(io.read_buffer(B.fc_model(flat, bias, (1, 48))),
                                   rewrite.Options(ratio=2, force=True))[0]
    assert forced["action"] == "rewritten"


def test_calibration_and_budget_show_progress_on_a_terminal(tmp_path, capsys):
    """A long run never sits silent: calibration capture and the budget's candidate fits count on stderr when
    progress is on (a terminal), and nothing is printed when it is off."""
    rng = np.random.default_rng(5)
    src = tmp_path / "conv.tflite"
    src.write_bytes(B.conv_model(rng.standard_normal((48, 3, 3, 32)), rng.standard_normal(48), (8, 8)))
    rewrite.run(src, tmp_path / "quiet.tflite", rewrite.Options(target_size=2, force=True), progress=False)
    assert capsys.readouterr().err == ""
    rewrite.run(src, tmp_path / "shown.tflite", rewrite.Options(target_size=2, force=True), progress=True)
    err = capsys.readouterr().err
    assert "calibration: sample 64/64" in err and "budget: layer 1/1" in err


def test_give_back_undoes_the_most_damaging_steps_beyond_the_goal():
    from tfrewrite.budget import give_back
    layers = [_layer("a", 1000, {2: 0.1, 4: 0.3}), _layer("b", 1000, {2: 0.2, 4: 0.3})]

    def measure(choice):
        return sum(cost(layer, c, True) for layer, c in zip(layers, choice))
    result = allocate(layers, 2000, 900, by_macs=True, measure=measure)
    # Level 0.2 leaves 1000; the step to 0.3 moves both layers to 4x at once: 500, far below the goal.
    assert result.level == 0.3 and result.estimate == 500
    choice, estimate = give_back(layers, result.choice, 900, measure)
    # a steps back to 2x (750 still meets 900); b back to 2x (1000) or a to dense (1250) would not.
    assert [c.ratio for c in choice] == [2, 4] and estimate == 750


def test_full_int8_size_estimates_the_quantized_file():
    """What --target-size is relative to before --quantize full-int8: the input as a full-integer file. On the
    float VGG fixture the estimate is within 1 % of the TF converter's full-integer file of the same model."""
    from tfrewrite import budget
    estimate = budget.full_int8_size(io.read(VGG), VGG.stat().st_size)
    assert estimate == pytest.approx((FIXTURES / "vgg_digits_int8.tflite").stat().st_size, rel=0.01)
    # A full-integer layer pays 28 bytes per output channel beside its 1-byte weights (scales, int64 zero points,
    # int32 bias); the inner ops of its chain, quantized per tensor, 4 per rank channel (a zero int32 bias).
    size = budget.stored_bytes
    assert size(1000, (20,), "full-int8", 20) - size(1000, (10,), "full-int8", 20) == 280
    assert size(1000, (16, 10), "full-int8", 20) - size(1000, (8, 10), "full-int8", 20) == 32


def test_a_target_out_of_reach_rewrites_nothing_and_says_how_far_it_goes(tmp_path):
    """A target beyond what the layers' most compressed options reach is not met by spending them all (every
    layer at its smallest rank, a collapsed model): the input goes out as it is, and the report gives the limit."""
    rng = np.random.default_rng(9)
    src = tmp_path / "fc.tflite"
    src.write_bytes(B.fc_model(_decaying(rng, 64, 256).astype(np.float32), rng.standard_normal(64), (1, 256)))
    rep = tmp_path / "r.json"
    assert cli.main([str(src), str(tmp_path / "o.tflite"), "--target-size", "200", "--report", str(rep),
                     "--quiet"]) == 0
    report = json.loads(rep.read_text())
    budget = report["budget"]
    assert not budget["reached"] and budget["achieved"] == 1.0 and 1 < budget["estimate"] < 200
    assert f"cannot reach 200x with low rank: at most about {budget['estimate']:.2f}x" in budget["note"]
    # What else to try: the options not given (it said "add --prune auto or --quantize" when both were).
    assert budget["note"].endswith("ask for less, or add --prune auto or --quantize"), budget["note"]
    assert (tmp_path / "o.tflite").read_bytes() == src.read_bytes()
    assert cli.main([str(src), str(tmp_path / "o.tflite"), "--target-size", "200", "--quantize", "float16",
                     "--report", str(rep), "--quiet"]) == 0
    note = json.loads(rep.read_text())["budget"]["note"]
    assert "the model still quantized: ask for less, or add --prune auto" in note and "--quantize" not in note, note
    assert all(e["action"] == "skipped" and "cannot reach 200x" in e["reason"] for e in report["layers"])


def test_a_budget_that_would_break_the_model_leaves_it_as_it_is(tmp_path):
    """The budget meets a 3x target on a flat-spectrum weight only at an output error far above the level the
    output-error check calls broken (0.5): the input is written unchanged and the report says why; --force
    keeps the rewrite."""
    rng = np.random.default_rng(9)
    src = tmp_path / "fc.tflite"
    src.write_bytes(B.fc_model(rng.standard_normal((64, 256)).astype(np.float32), rng.standard_normal(64),
                               (1, 256)))
    for force in (False, True):
        rep, out = tmp_path / f"r{force}.json", tmp_path / f"o{force}.tflite"
        args = [str(src), str(out), "--target-size", "3", "--report", str(rep), "--quiet"]
        assert cli.main(args + (["--force"] if force else [])) == 0
        report = json.loads(rep.read_text())
        if force:
            assert report["budget"]["reached"] and report["output_error"]["worst"] > 0.5
            continue
        assert out.read_bytes() == src.read_bytes() and not report["budget"]["reached"]
        assert report["budget"]["refused_output_error"] > 0.5 and "output_error" not in report
        assert any("cannot reach 3x smaller file without breaking the model" in n for n in report["notes"])
        assert all(e["action"] == "skipped" and e["reason"].startswith("undone: the budget's choice")
                   for e in report["layers"])


def test_ratio_refuses_a_clearly_degenerate_conv_after_a_short_fit(monkeypatch):
    """A CP conv whose output error is far above the --ratio floor after a few ALS sweeps is refused without the
    full fit (VGG16's random-init convs: most of a data-free --ratio 5's time); forced, it gets the full fit."""
    from tfrewrite.linalg import cp
    from tfrewrite.passes import common
    rng = np.random.default_rng(4)
    model_bytes = B.conv_model(rng.standard_normal((24, 3, 3, 24)).astype(np.float32), None, (9, 9))
    sweeps = []
    real_cp3 = cp.cp3

    def counting_cp3(*args, **kwargs):
        sweeps.append(kwargs.get("n_iter_max"))
        return real_cp3(*args, **kwargs)
    monkeypatch.setattr(cp, "cp3", counting_cp3)
    entry = rewrite.rewrite_model(io.read_buffer(model_bytes), rewrite.Options(ratio=5))[0]
    assert entry["action"] == "skipped" and f"(a {common.QUICK_SWEEPS}-sweep fit)" in entry["reason"]
    assert sweeps == [common.QUICK_SWEEPS]
    sweeps.clear()
    forced = rewrite.rewrite_model(io.read_buffer(model_bytes), rewrite.Options(ratio=5, force=True))[0]
    assert forced["action"] == "rewritten" and sweeps == [None]


def test_a_budget_with_no_layer_to_rewrite_says_why(tmp_path):
    """A 16x8 model with --target-size and calibration data: the budget finds no layer to rewrite; its damage is
    "not measured" (not "estimated from the weights (no data)": data was given), and every layer's entry says why it
    is left as it is (not "the model has no layer that applies")."""
    src = tmp_path / "a16w8.tflite"
    src.write_bytes(B.int16_fc_model())
    cal = tmp_path / "cal.npz"
    x = np.random.default_rng(36).integers(-8000, 8000, (8, 1, 64)).astype(np.int16)
    np.savez(cal, input=x)
    report = rewrite.run(src, tmp_path / "out.tflite", rewrite.Options(target_size=2.0, calibration=str(cal)))
    assert report["budget"]["damage"].startswith("not measured") and not report["budget"]["reached"]
    (fc,) = [e for e in report["layers"] if e["kind"] == "fc"]
    assert fc["action"] == "skipped" and fc["reason"] == "int16 activations (a 16x8 layer): left as it is"
    assert "int16 activations" in " ".join(report["notes"]) and "no layer that applies" not in " ".join(report["notes"])


def test_a_weight_read_by_many_ops_is_one_layer_of_the_budget(tmp_path):
    """An unrolled RNN's recurrent weight (48x48, read by 8 FCs) is one budget layer: its bytes counted once,
    every reader's new op counted, and every reader given the same rank; so the written file is as much smaller
    as the budget estimated (counted per reader, the estimate was 2-3x what the file showed: R5-2)."""
    rng = np.random.default_rng(5)
    u = rng.standard_normal((48, 6)) @ rng.standard_normal((6, 48)) + 0.02 * rng.standard_normal((48, 48))
    src, out, rep = tmp_path / "rnn.tflite", tmp_path / "o.tflite", tmp_path / "r.json"
    src.write_bytes(B.unrolled_rnn(steps=8, width=8, hidden=48, recurrent=u))
    assert cli.main([str(src), str(out), "--target-size", "1.5", "--report", str(rep), "--quiet"]) == 0
    report = json.loads(rep.read_text())
    budget = report["budget"]
    (shared,) = [layer for layer in budget["layers"] if layer["output"] == "rnn/step1"]
    assert {layer["output"] for layer in budget["layers"]} <= {"rnn/step0", "rnn/step1", "y"}  # one per weight
    readers = [e for e in report["layers"] if e["weight_shape"] == [48, 48]]
    assert len(readers) == 8 and all(e["action"] == "rewritten" and e["rank"] == shared["rank"] for e in readers)
    assert budget["reached"] and abs(budget["achieved"] - budget["estimate"]) <= 0.03 * budget["estimate"]
    assert report["output_error"]["worst"] < 0.1


def test_the_full_int8_baseline_counts_a_shared_weight_once():
    """The file size `--quantize full-int8` alone would write (the baseline a target applies to) quantized a weight
    two ops read once per reader: a siamese model's estimate was negative (R6-6)."""
    from tfrewrite import budget
    shared = io.read_buffer(B.shared_in_one_subgraph(width=16, hidden=64))
    own = io.read_buffer(B.shared_in_one_subgraph(width=16, hidden=64))
    second = own.main.operators[2]
    second.inputs[1] = own.main.add_constant("own/weight", np.asarray(second.inputs[1].data).copy())
    sizes = {name: len(io.to_bytes(m)) for name, m in (("shared", shared), ("own", own))}
    estimates = {name: budget.full_int8_size(m, sizes[name]) for name, m in (("shared", shared), ("own", own))}
    assert 0 < estimates["shared"] < sizes["shared"]
    # The copy adds 64x64 float32 bytes to the file, and about a quarter of them to the quantized one.
    added = sizes["own"] - sizes["shared"]
    assert 0.2 * added < estimates["own"] - estimates["shared"] < 0.4 * added, (estimates, sizes)


def test_target_macs_is_refused_for_an_input_of_open_height_and_width(tmp_path, capsys):
    """MACs are counted on the file's shapes, 1x1 where the height and width are left open: the layers' shares at
    the size the model runs at differ, and a budget cut the wrong layers ("2.79x" that was 1.07x at 64x64, R6-16)."""
    rng = np.random.default_rng(2)
    m = io.read_buffer(B.conv_model(rng.standard_normal((16, 3, 3, 8)), rng.standard_normal(16), (1, 1)))
    m.main.inputs[0].shape_signature = [1, -1, -1, 8]
    src = tmp_path / "dynamic_hw.tflite"
    src.write_bytes(io.to_bytes(m))
    assert cli.main([str(src), str(tmp_path / "o.tflite"), "--target-macs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dynamic height or width" in err and "--target-size" in err
    assert not (tmp_path / "o.tflite").exists()
