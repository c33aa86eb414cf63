"""What users found surprising: options nothing would use are refused (one rule for command line and recipe),
the unchanged-model message says what was asked and why nothing qualified, every rewrite measures its output
error and warns when the model is probably broken, and the report table shows subgraphs and nonzero totals."""
import json

import numpy as np
import pytest

import builders as B
import odd_models as M
from conftest import FIXTURES, ROOT
from tfrewrite import cli, io, rewrite, verify


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _fc(tmp, seed=0, shape=(24, 16)):
    path = tmp / "fc.tflite"
    weight = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    path.write_bytes(B.fc_model(weight, input_shape=(1, shape[1])))
    return path


def _schema_check(report):
    import jsonschema
    jsonschema.validate(report, json.loads((ROOT / "schemas" / "report.schema.json").read_text()))


REFUSED = {
    "--prune-block without --prune": (["--prune-block", "1x4"], "--prune-block has no effect"),
    "--prune-depthwise without --prune": (["--prune-depthwise", "--quantize", "int8"], "--prune-depthwise"),
    "--conv-method without a rank": (["--conv-method", "tucker2", "--prune", "0.5"], "--conv-method"),
    "--force without a technique": (["--force", "--min-params", "3"], "--force has no effect"),
    "--sequential without a rank": (["--sequential", "--calibration", "CALIB"], "--sequential"),
    "--activation-percentile without a rank": (["--activation-percentile", "99.9", "--prune", "0.5"],
                                               "--activation-percentile"),
    "--activation-percentile 40": (["--rank", "2", "--activation-percentile", "40"], "--activation-percentile"),
    "--only X --skip X": (["--rank", "2", "--only", "fc", "--skip", "fc"], "same expression"),
    "recipe prune_block without prune": (["--quantize", "int8", "--recipe", "RECIPE:prune_block"], "'prune_block'"),
    "recipe conv_method without a rank": (["--prune", "0.5", "--recipe", "RECIPE:conv_method"], "'conv_method'"),
    "block 0x4": (["--prune", "0.5", "--prune-block", "0x4"], "--prune-block"),
    "block 1x1000000": (["--prune", "0.5", "--prune-block", "1x1000000"], "--prune-block"),
    "--target-size inf": (["--target-size", "inf", "--calibration", "CALIB"], "--target-size"),
    "--channel-multiple without --prune-channels": (["--channel-multiple", "4", "--rank", "2"],
                                                    "--channel-multiple has no effect"),
    "recipe channel_multiple without prune_channels": (["--rank", "2", "--recipe", "RECIPE:channel_multiple"],
                                                       "'channel_multiple'"),
    "--prune-channels auto without a target": (["--prune-channels", "auto"], "needs --target-macs"),
    "recipe prune_channels auto without a target": (["--rank", "2", "--recipe", "RECIPE:channels_auto"],
                                                     "needs --target-macs"),
    "--prune-channels neither a share nor auto": (["--prune-channels", "most"], "neither a number nor 'auto'"),
    "--prune-channels 1": (["--prune-channels", "1"], "share in [0, 1) or 'auto'"),
    "--rank auto without a target": (["--rank", "auto", "--prune-channels", "0.5"], "--rank auto needs"),
    "--per-tensor auto without a target": (["--per-tensor", "auto", "--calibration", "CALIB"],
                                           "--per-tensor auto needs --target-size"),
    "--per-tensor auto with --target-macs": (["--per-tensor", "auto", "--target-macs", "2", "--calibration", "CALIB"],
                                             "--per-tensor auto needs --target-size"),
    "--per-tensor auto without calibration": (["--per-tensor", "auto", "--target-size", "2"], "needs --calibration"),
}
RULES = {"prune_block": {"match": ".", "prune_block": "1x4"}, "conv_method": {"match": ".", "conv_method": "cp"},
         "channel_multiple": {"match": ".", "channel_multiple": 4},
         "channels_auto": {"match": ".", "prune_channels": "auto"}}


def _materialize(tmp, argv):
    calib = tmp / "calib.npz"
    np.savez(calib, input=np.ones((2, 16), np.float32))
    out = []
    for a in argv:
        if a == "CALIB":
            a = str(calib)
        elif a.startswith("RECIPE:"):
            recipe = tmp / "recipe.json"
            recipe.write_text(json.dumps({"rules": [RULES[a.split(":")[1]]]}))
            a = str(recipe)
        out.append(a)
    return out


@pytest.mark.parametrize("what", sorted(REFUSED))
def test_options_nothing_would_use_are_refused(tmp, capsys, what):
    model = _fc(tmp)
    argv, words = REFUSED[what]
    out = tmp / "o.tflite"
    code, _, err = _run(capsys, model, out, *_materialize(tmp, argv))
    assert code == 2 and err.count("\n") == 1 and err.startswith("tfrewrite: error: ") and words in err, err
    assert not out.exists()


def test_the_same_options_are_accepted_where_something_uses_them(tmp, capsys):
    model = _fc(tmp)
    recipe = tmp / "r.json"
    recipe.write_text(json.dumps({"rules": [{"match": ".", "prune": 0.5}]}))
    code, _, err = _run(capsys, model, tmp / "o.tflite", "--prune-block", "1x4", "--recipe", recipe)
    assert code == 0, err
    recipe.write_text(json.dumps({"rules": [{"match": ".", "rank": 2, "conv_method": "tucker2"}]}))
    code, _, err = _run(capsys, model, tmp / "o.tflite", "--force", "--recipe", recipe)
    assert code == 0, err
    recipe.write_text(json.dumps({"rules": [{"match": ".", "prune_channels": 0.5}]}))
    code, _, err = _run(capsys, model, tmp / "o.tflite", "--channel-multiple", "4", "--recipe", recipe)
    assert code == 0, err


def test_calibration_only_measuring_is_a_warning(tmp, capsys):
    model = _fc(tmp)
    calib = tmp / "c.npz"
    np.savez(calib, input=np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32))
    rep = tmp / "r.json"
    code, out, err = _run(capsys, model, tmp / "o.tflite", "--quantize", "float16", "--min-params", "0",
                          "--calibration", calib, "--report", rep)
    assert code == 0
    assert "tfrewrite: warning: --calibration: no layer is fitted to it" in err
    report = json.loads(rep.read_text())
    _schema_check(report)
    assert report["output_error"]["inputs"] == "calibration" and report["output_error"]["samples"] == 4
    assert report["output_error"]["worst"] < 1e-2
    assert "output error: " in out


def test_nothing_qualified_says_what_was_asked_and_why(tmp, capsys):
    model = _fc(tmp)
    code, out, _ = _run(capsys, model, tmp / "o.tflite", "--rank", "2", "--min-params", "100000")
    assert code == 0
    assert "nothing was rewritten: --rank 2 asked, but none of the 1 layers considered qualified: fewer than " \
           "100000 weights (--min-params) (1x)" in out
    code, out, _ = _run(capsys, model, tmp / "o.tflite")
    assert "no technique option given" in out
    emb = tmp / "emb.tflite"
    emb.write_bytes(M.index_model("GATHER"))
    code, out, _ = _run(capsys, emb, tmp / "o.tflite", "--rank", "2", "--only", "nothing-matches")
    assert code == 0 and "nothing was rewritten: --rank 2 asked" in out and "not matched by --only" in out


def test_a_probably_broken_rewrite_is_warned_about_loudly(tmp, capsys):
    model = _fc(tmp, shape=(48, 32))
    rep = tmp / "r.json"
    code, out, err = _run(capsys, model, tmp / "o.tflite", "--rank", "1", "--force", "--report", rep)
    assert code == 0
    report = json.loads(rep.read_text())
    _schema_check(report)
    error = report["output_error"]
    assert error["measured"] and error["inputs"] == "generated" and error["worst"] > rewrite.OUTPUT_ERROR_WARNING
    assert f"output error {error['worst']:.3g}" in err and "probably broken" in err
    assert any("probably broken" in w for w in report["warnings"])
    # A faithful rewrite measures a small error and warns of nothing.
    code, out, err = _run(capsys, model, tmp / "o.tflite", "--rank", "32", "--force")
    assert code == 0 and "warning" not in err and "output error: " in out


def test_a_rewritten_model_that_does_not_run_is_an_internal_fault_and_nothing_is_written(tmp, capsys, monkeypatch):
    model = _fc(tmp)

    def fails(*args, **kwargs):
        raise verify.CandidateFailed("Input tensor 3 lacks data")
    monkeypatch.setattr(verify, "output_error", fails)
    code, _, err = _run(capsys, model, tmp / "o.tflite", "--rank", "2", "--force", "--report", tmp / "r.json")
    assert code == 1 and "does not run in LiteRT" in err and "nothing written" in err
    assert sorted(p.name for p in tmp.iterdir()) == ["fc.tflite"]


def test_an_input_model_the_runtime_cannot_run_is_not_measured(tmp, capsys):
    code, out, _ = _run(capsys, FIXTURES / "custom_op.tflite", tmp / "o.tflite", "--quantize", "float16",
                        "--min-params", "0")
    assert code == 0 and "output error: not measured (the input model does not run in LiteRT" in out


def test_report_table_has_subgraphs_and_totals_count_nonzero_params(tmp, capsys):
    sigs = tmp / "sigs.tflite"
    sigs.write_bytes(M.two_signature_fc())
    code, out, _ = _run(capsys, sigs, tmp / "o.tflite", "--rank", "2", "--force")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:2] == ["sg", "#"]
    assert {line.split()[0] for line in lines[2:4]} == {"0", "1"}
    model = _fc(tmp, shape=(64, 64))
    rep = tmp / "r.json"
    code, out, _ = _run(capsys, model, tmp / "o.tflite", "--prune", "0.75", "--report", rep, "--force")
    totals = json.loads(rep.read_text())["totals"]
    assert totals["params_after"] == 64 * 64 and totals["nonzero_params_after"] == 64 * 64 // 4
    assert totals["nonzero_params_before"] == 64 * 64
    assert "nonzero params 4.10k → 1.02k" in out


HOSTILE = [
    (["compare", "CUSTOM", "CUSTOM"], "does not run in LiteRT"),
    (["compare", "FC", "CUSTOM", "--runs", "1"], "does not run in LiteRT"),
    (["CUSTOM", "OUT", "--verify", "--runs", "1"], "does not run in LiteRT"),
    (["compare", "FC", "FC", "--threads", "100000"], "--threads"),
    (["compare", "FC", "FC", "--seed", "-1"], "--seed"),
    (["compare", "FC", "FC", "--samples", "100000000000000000000"], "--samples"),
    (["FC", "OUT", "--verify", "--runs", "0"], "--runs"),
    (["FC", "OUT", "--rank", "2", "--calibration", "FC"], "not an .npz file"),
]


@pytest.mark.parametrize("argv,words", HOSTILE, ids=[" ".join(a) for a, _ in HOSTILE])
def test_hostile_command_lines_are_one_line_and_exit_2(tmp, capsys, argv, words):
    names = {"CUSTOM": str(FIXTURES / "custom_op.tflite"), "FC": str(_fc(tmp)), "OUT": str(tmp / "o.tflite")}
    code, _, err = _run(capsys, *[names.get(a, a) for a in argv])
    assert code == 2 and err.count("\n") == 1 and err.startswith("tfrewrite: error: ") and words in err, err
    assert not (tmp / "o.tflite").exists()


@pytest.mark.parametrize("bad", [dict(rank=-3), dict(fc_rank=0), dict(conv_rank=-2), dict(quantize="int4"),
                                 dict(prune="auto")])
def test_library_callers_get_the_same_checks_as_the_command_line(bad, tmp_path):
    """Options built in Python never went through the command line: rewrite_model and run check them too (a
    negative rank silently rewrote every layer at rank 1)."""
    with pytest.raises(ValueError):
        rewrite.rewrite_model(io.read(FIXTURES / "two_signatures.tflite"), rewrite.Options(**bad))
    with pytest.raises(ValueError):
        rewrite.run(FIXTURES / "two_signatures.tflite", tmp_path / "o.tflite", rewrite.Options(**bad))
    assert not (tmp_path / "o.tflite").exists()


def test_options_for_full_integer_layers_say_when_the_model_has_none(tmp, capsys):
    """--per-tensor and --activation-percentile act on the layers of a full-integer input model only: on a float
    model they silently changed nothing (R6-8); now a warning says so."""
    rng = np.random.default_rng(0)
    src, calib = tmp / "fc.tflite", tmp / "c.npz"
    src.write_bytes(B.fc_model(rng.standard_normal((64, 32)), rng.standard_normal(64), (1, 32)))
    np.savez(calib, input=rng.standard_normal((16, 32)).astype(np.float32))
    assert cli.main([str(src), str(tmp / "o.tflite"), "--rank", "8", "--activation-percentile", "99.9",
                     "--calibration", str(calib)]) == 0
    err = capsys.readouterr().err
    assert "--activation-percentile: the model has no full-integer layer, so it changes nothing" in err, err
