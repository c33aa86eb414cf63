"""compare, --verify and the report schema."""
import json

import numpy as np
import pytest

from conftest import FIXTURES, ROOT
from digits import load_split
import builders as B
from tfrewrite import cli, verify

VGG = FIXTURES / "vgg_digits.tflite"


def _schema():
    return json.loads((ROOT / "schemas" / "report.schema.json").read_text())


def _validate(report):
    import jsonschema
    jsonschema.validate(report, _schema())


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    x, y = load_split("test", 32)
    path = tmp_path_factory.mktemp("data") / "test32.npz"
    np.savez(path, image=x[:60], labels=y[:60])
    return path


def test_compare_a_model_with_itself_is_exact():
    r = verify.compare(VGG, VGG, samples=3, runs=3)
    (o,) = r["outputs"]
    assert o["rel_l2"] == 0 and o["max_abs"] == 0 and o["cosine"] == pytest.approx(1.0)
    assert o["top1_agree"] == 1.0 and o["top5_agree"] == 1.0
    assert r["a"]["file_bytes"] == VGG.stat().st_size and r["a"]["params"] > 800_000
    assert r["a"]["latency_ms"] > 0 and r["speedup"] > 0


def test_compare_cli_json_with_labels(tmp, capsys, labelled):
    small = tmp / "small.tflite"
    assert cli.main([str(VGG), str(small), "--rank", "32", "--quiet", "--force"]) == 0  # error ~0.5 on generated
    capsys.readouterr()
    assert cli.main(["compare", str(VGG), str(small), "--data", str(labelled), "--runs", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) >= {"a", "b", "speedup", "outputs", "accuracy"}
    for key in ("a", "b"):
        assert set(r[key]) == {"file_bytes", "params", "macs", "latency_ms"}
    assert r["b"]["params"] < r["a"]["params"] and r["b"]["macs"] < r["a"]["macs"]
    assert set(r["outputs"][0]) == {"name", "rel_l2", "max_abs", "cosine", "top1_agree", "top5_agree"}
    assert r["accuracy"]["a"]["top1"] >= 0.95
    assert r["samples"] == 60
    _validate({"input": "a", "output": "b", "options": {}, "layers": [], "notes": [],
               "totals": {k: 0 for k in ("file_bytes_before", "file_bytes_after", "params_before", "params_after",
                                         "macs_before", "macs_after", "weight_bytes_before", "weight_bytes_after")},
               "verify": r})
    # The table form prints the same facts.
    assert cli.main(["compare", str(VGG), str(small), "--samples", "2", "--runs", "3", "--no-xnnpack"]) == 0
    text = capsys.readouterr().out
    assert "speed-up" in text and "top-5 agree" in text


def test_verify_passes_writes_output_and_report(tmp, capsys, labelled):
    out, rep = tmp / "o.tflite", tmp / "r.json"
    code = cli.main([str(VGG), str(out), "--rank", "32", "--verify", "--data", str(labelled),
                     "--min-top5-agree", "0.9", "--max-error", "0.9", "--report", str(rep), "--runs", "3"])
    assert code == 0 and out.exists()
    report = json.loads(rep.read_text())
    _validate(report)
    assert report["verify"]["passed"] and "accuracy" in report["verify"]
    assert [p.name for p in tmp.iterdir()] == sorted(["o.tflite", "r.json"]) or set(p.name for p in tmp.iterdir()) == {"o.tflite", "r.json"}


def test_verify_failure_exits_3_and_leaves_no_output(tmp, capsys):
    out, rep = tmp / "o.tflite", tmp / "r.json"
    # --force: rank 8 breaks this model (output error above 0.5), and the verify bound is what is tested.
    code = cli.main([str(VGG), str(out), "--rank", "8", "--force", "--verify", "--max-error", "0.01", "--report",
                     str(rep), "--runs", "2", "--samples", "2"])
    err = capsys.readouterr().err
    assert code == 3
    assert "exceeds --max-error" in err and "no output written" in err
    assert not out.exists()
    assert {p.name for p in tmp.iterdir()} == {"r.json"}, "no temp file may stay behind"
    report = json.loads(rep.read_text())
    _validate(report)
    assert report["verify"]["passed"] is False and report["verify"]["failures"]
    # The report is the one file written: it says the model it names was not (R6-8).
    assert f"verification failed, so {out} was not written" in report["notes"]


def test_verify_top5_bound(tmp, capsys, labelled):
    out = tmp / "o.tflite"
    code = cli.main([str(VGG), str(out), "--rank", "2", "--force", "--verify", "--data", str(labelled),
                     "--min-top5-agree", "1.0", "--runs", "2"])
    assert code == 3 and not out.exists()
    assert "top-5 agreement" in capsys.readouterr().err


def test_reports_of_every_kind_validate(tmp, capsys):
    for args in (["--rank", "16"], ["--conv-rank", "8", "--conv-method", "tucker2", "--skip", "fc1"], []):
        rep = tmp / "r.json"
        assert cli.main([str(VGG), str(tmp / "o.tflite"), *args, "--report", str(rep), "--quiet"]) == 0
        _validate(json.loads(rep.read_text()))


def test_signatures(capsys):
    model = FIXTURES / "two_signatures.tflite"
    for key in ("encode", "decode"):
        r = verify.compare(model, model, signature=key, samples=2, runs=2)
        assert r["outputs"] and all(o["rel_l2"] == 0 for o in r["outputs"])
    code = cli.main(["compare", str(model), str(model), "--signature", "nope", "--runs", "1"])
    assert code == 2 and "no signature" in capsys.readouterr().err


BAD_DATA = {
    "wrong name": lambda x, y: {"pixels": x},
    "wrong shape": lambda x, y: {"image": x[:, :16]},
    "wrong dtype": lambda x, y: {"image": (x * 255).astype(np.int32)},
    "empty": lambda x, y: {"image": x[:0]},
    "nan": lambda x, y: {"image": np.where(x > 0.5, np.nan, x)},
    "bad labels": lambda x, y: {"image": x, "labels": y[:3]},
}


@pytest.mark.parametrize("what", sorted(BAD_DATA))
def test_bad_data_files_get_one_error_line(tmp, capsys, what):
    x, y = load_split("test", 32)
    path = tmp / "d.npz"
    np.savez(path, **BAD_DATA[what](x[:5], y[:5]))
    code = cli.main(["compare", str(VGG), str(VGG), "--data", str(path), "--runs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tfrewrite: error:") and err.count("\n") == 1, err
    out = tmp / "o.tflite"
    code = cli.main([str(VGG), str(out), "--rank", "16", "--verify", "--data", str(path)])
    assert code == 2 and not out.exists()
    (tmp / "junk.npz").write_bytes(b"not a zip")
    code = cli.main(["compare", str(VGG), str(VGG), "--data", str(tmp / "junk.npz")])
    assert code == 2


def _int8_fc(weight, s_in=1 / 64, s_out=1 / 256, zero_out=-128):
    """input int8 → FULLY_CONNECTED (int8 weights per channel, int32 bias) → int8 output with zero point -128,
    as the converter writes a full-integer classifier's last layer."""
    from builders import T
    from tfrewrite import io, ops
    from tfrewrite.graph import Model, Quantization, Subgraph, Tensor
    from tfrewrite.linalg import quant
    out, width = weight.shape
    sg = Subgraph()
    x = sg.add_tensor(Tensor("input", T.INT8, [1, width], quantization=Quantization.affine([s_in], [0], 0)))
    q, scales = quant.quantize_symmetric_int8(weight, axis=0)
    w = sg.add_constant("fc/weight", q, quantization=Quantization.symmetric(scales, 0))
    b = sg.add_constant("fc/bias", np.zeros(out, np.int32),
                        quantization=Quantization.symmetric(s_in * np.asarray(scales, np.float64).reshape(-1), 0))
    y = sg.add_tensor(Tensor("fc", T.INT8, [1, out], quantization=Quantization.affine([s_out], [zero_out], 0)))
    sg.operators = [ops.fully_connected(x, w, b, y)]
    sg.inputs, sg.outputs = [x], [y]
    return io.to_bytes(Model(subgraphs=[sg]))


def test_quantized_outputs_are_compared_as_real_values():
    # Codes with zero point -128 carry a constant offset that inflates the reference's norm: the error must be
    # measured on (code - zero point) * scale, the values the model means.
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 32)) * 0.05
    reference = _int8_fc(weight)
    candidate = _int8_fc(weight + rng.standard_normal(weight.shape) * 0.02)
    inputs = [[rng.integers(-128, 128, (1, 32)).astype(np.int8)] for _ in range(4)]
    codes = [np.concatenate([verify.run(m, [x])[0][0].reshape(-1) for x in inputs]).astype(np.float64)
             for m in (reference, candidate)]
    real = [(c + 128) / 256 for c in codes]
    expected = verify.fidelity(real[0], real[1])["rel_l2"]
    assert expected > 1.5 * verify.fidelity(codes[0], codes[1])["rel_l2"]  # the case is one codes would miss
    result = verify.output_error(reference, candidate, inputs)
    assert result["worst"] == pytest.approx(expected, rel=1e-9)
    row = verify.compare(reference, candidate, samples=4, timing=False)["outputs"][0]
    assert row["max_abs"] < 1.0  # real units (at most 256 codes of 1/256), not codes


def test_dynamic_spatial_inputs_get_generated_images_of_a_real_size():
    from builders import conv_model
    from tfrewrite import io
    model = io.read_buffer(conv_model(np.random.default_rng(1).standard_normal((4, 3, 3, 3)), input_hw=(1, 1)))
    sg = model.main
    sg.inputs[0].shape_signature = [-1, -1, -1, 3]
    sg.outputs[0].shape_signature = [-1, -1, -1, 4]
    runner = verify.Runner(io.to_bytes(model))
    side = verify.GENERATED_IMAGE_SIDE
    assert runner.image_sizes() == [(side, side)]
    samples = runner.generated_samples(2)
    assert samples[0][0].shape == (1, side, side, 3) and np.ptp(samples[0][0]) > 0
    assert runner(samples[0])[0].shape == (1, side, side, 4)  # the interpreter is resized to the images
    assert "dynamic spatial size" in runner.generated_note()
    assert verify.output_error(io.to_bytes(model), io.to_bytes(model))["note"] == runner.generated_note()


def test_output_error_covers_every_signature(tmp, capsys):
    # A rewrite changes the subgraphs of every signature; the error line must cover them all, not only the one
    # the calibration data (or subgraph 0) feeds.
    from builders import shared_across_signatures
    rng = np.random.default_rng(2)
    source = tmp / "two.tflite"
    source.write_bytes(shared_across_signatures(rng.standard_normal((24, 32)) @ np.diag(np.linspace(1, .01, 32))))
    out, report = tmp / "out.tflite", tmp / "report.json"
    assert cli.main([str(source), str(out), "--rank", "2", "--force", "--report", str(report)]) == 0
    error = json.loads(report.read_text())["output_error"]
    assert error["generated_signatures"] == ["second"]
    assert {r["name"].split("/")[0] for r in error["outputs"]} >= {"second"}
    assert error["worst"] == max(r["rel_l2"] for r in error["outputs"])
    assert "signatures second on generated inputs" in capsys.readouterr().out
    _validate(json.loads(report.read_text()))


def test_delegate_disagreement_counts_int8_steps(monkeypatch):
    rng = np.random.default_rng(4)
    model = _int8_fc(rng.standard_normal((16, 32)) * 0.05)
    inputs = [[rng.integers(-128, 128, (1, 32)).astype(np.int8)] for _ in range(3)]
    assert verify.delegate_disagreement(model, inputs)["steps"] <= 1
    # Outputs 3 codes apart on one kernel path are 3 steps; a float model has no integer step.
    real_call = verify.Runner.__call__

    def shifted(self, arrays):
        outs = real_call(self, arrays)
        return outs if self.xnnpack else [np.clip(o.astype(np.int16) - 3, -128, 127).astype(np.int8) for o in outs]
    monkeypatch.setattr(verify.Runner, "__call__", shifted)
    gap = verify.delegate_disagreement(model, inputs)
    assert gap["steps"] == 3 and 0 < gap["rel_l2"] < 1
    assert verify.delegate_disagreement(VGG, None, samples=1) is None


def test_top5_agreement_needs_more_than_5_classes(tmp_path, capsys):
    """With 5 classes or fewer every class is in the top 5: no agreement figure, and --min-top5-agree is a usage
    error there (exit 2, nothing written) rather than a bound that always holds."""
    rng = np.random.default_rng(0)
    model = tmp_path / "fc.tflite"
    model.write_bytes(B.fc_model(rng.standard_normal((5, 16)).astype(np.float32)))
    out = tmp_path / "o.tflite"
    code = cli.main([str(model), str(out), "--rank", "2", "--force", "--verify", "--min-top5-agree", "0.99"])
    err = capsys.readouterr().err
    assert code == 2 and "more than 5 classes" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_failing_tool_made_file_is_not_named(tmp_path):
    """The rewritten model and the calibration copy live in temporary files the user never gave: a runtime
    failure says what failed in the tool's terms, never the temporary path."""
    from tfrewrite import calibrate, io
    candidate = tmp_path / ".out.tflite.abc123.tmp"
    candidate.write_bytes((FIXTURES / "custom_op.tflite").read_bytes())
    with pytest.raises(verify.CandidateFailed) as e:
        verify.output_error(FIXTURES / "shared_weight.tflite", candidate)
    assert str(candidate) not in str(e.value) and "does not run" not in str(e.value)
    model = io.read(FIXTURES / "custom_op.tflite")  # FULLY_CONNECTED → … → a custom op without a kernel
    with pytest.raises(verify.NotRunnable) as e:
        calibrate.collect(model, [[np.zeros(model.main.inputs[0].shape, np.float32)]], model.main.operators[:1])
    assert "tfrewrite-calib" not in str(e.value) and "the tool's copy of the model" in str(e.value)


def test_output_error_is_measured_on_inputs_no_fit_used(tmp_path, capsys):
    """The printed output error must not come from the samples the layers were fitted on: fitted on 14 samples
    of a 64-wide input, a data-aware low rank is nearly exact on them and far off on others."""
    from tfrewrite import rewrite
    rng = np.random.default_rng(5)
    model = tmp_path / "fc.tflite"
    model.write_bytes(B.fc_model(rng.standard_normal((48, 64)).astype(np.float32), input_shape=(1, 64)))
    data = tmp_path / "calib.npz"
    np.savez(data, input=rng.standard_normal((16, 1, 64)).astype(np.float32))
    out, report = tmp_path / "o.tflite", tmp_path / "r.json"
    assert cli.main([str(model), str(out), "--fc-rank", "12", "--calibration", str(data), "--force",
                     "--report", str(report)]) == 0
    result = json.loads(report.read_text())
    error = result["output_error"]
    # 16 samples: the last 2 are kept out of every fit and measured; the fit saw 14.
    assert (error["samples"], error["held_out"], result["calibration"]["samples"]) == (2, True, 14)
    assert "on 2 held-out calibration inputs" in capsys.readouterr().out
    runner, batches, _, _ = verify.open_data(str(model), str(data))
    assert error["worst"] == pytest.approx(verify.output_error(str(model), str(out), batches[14:])["worst"])
    in_sample = verify.output_error(str(model), str(out), batches[:4])["worst"]
    assert error["worst"] > 3 * in_sample  # what the check printed before
    _validate(result)
    # Fewer than 8 samples: all go to the fit, and the summary says the check is in-sample.
    np.savez(data, input=rng.standard_normal((6, 1, 64)).astype(np.float32))
    assert cli.main([str(model), str(out), "--fc-rank", "12", "--calibration", str(data), "--force",
                     "--report", str(report)]) == 0
    error = json.loads(report.read_text())["output_error"]
    assert (error["samples"], error["held_out"]) == (4, False)
    assert "calibration inputs the fit also used" in capsys.readouterr().out
    assert rewrite.held_out_count(100) == 4 and rewrite.held_out_count(7) == 0


def test_checks_draw_other_generated_inputs_than_the_data_free_fits():
    # The data-free fits use FIT_SEED's generated inputs; the output-error check, --verify and compare another seed.
    first_fit = verify.generated_samples(str(VGG), 1)[0][0]
    first_check = verify.generated_samples(str(VGG), 1, seed=verify.CHECK_SEED)[0][0]
    assert verify.CHECK_SEED != verify.FIT_SEED and not np.array_equal(first_fit, first_check)
    assert cli._compare_parser().parse_args(["a", "b"]).seed == verify.CHECK_SEED
    import inspect
    for function in (verify.output_error, verify.compare):
        assert inspect.signature(function).parameters["seed"].default == verify.CHECK_SEED


def test_the_output_error_on_generated_inputs_says_when_they_are_noise(tmp):
    """A float input that is no image and states no range gets standard-normal noise: the error measured on it can
    be far from the error on real inputs (R6-9: 0.09 printed, 0.76 on non-negative inputs), and the result says so;
    image inputs get dead-leaves images and no note."""
    rng = np.random.default_rng(0)
    vector, image = tmp / "vector.tflite", tmp / "image.tflite"
    vector.write_bytes(B.fc_model(rng.standard_normal((8, 16)), None, (1, 16)))
    image.write_bytes(B.conv_model(rng.standard_normal((4, 3, 3, 3)), None, (9, 9)))
    said = verify.output_error(vector, vector)
    assert said["worst"] == 0 and "standard-normal noise" in said["note"] and "real inputs" in said["note"]
    assert "note" not in verify.output_error(image, image)


def test_an_output_whose_shape_changed_is_named_not_a_numpy_error(tmp):
    """No pass may change what a model returns; if one did, the output-error check says which output changed shape
    (it was a numpy broadcast error, R6-14)."""
    rng = np.random.default_rng(0)
    a, b = tmp / "a.tflite", tmp / "b.tflite"
    a.write_bytes(B.fc_model(rng.standard_normal((8, 16)), None, (1, 16)))
    b.write_bytes(B.fc_model(rng.standard_normal((6, 16)), None, (1, 16)))
    with pytest.raises(verify.CandidateFailed, match=r"has shape \[1, 6\] where the input model's has \[1, 8\]"):
        verify.output_error(a, b)
