"""Broken, truncated and hostile files: one error line, exit status 2, no output file, never a traceback."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import builders as B
from conftest import FIXTURES, ROOT
from tfrewrite import cli, io, schema

SMALL = FIXTURES / "two_signatures.tflite"
CONTROL_FLOW = FIXTURES / "control_flow.tflite"


def _run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_rejected(capsys, tmp, data: bytes, label: str):
    bad = tmp / "bad.tflite"
    bad.write_bytes(data)
    out = tmp / "out.tflite"
    start = time.monotonic()
    code, _, err = _run_cli(capsys, bad, out)
    assert time.monotonic() - start < 10, f"{label}: took too long"
    assert code == 2, f"{label}: exit {code}, stderr {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tfrewrite: error: "), f"{label}: {err!r}"
    assert not out.exists(), f"{label}: an output file was written"
    assert [p.name for p in tmp.iterdir()] == ["bad.tflite"], f"{label}: temp files left behind"
    code, _, err = _run_cli(capsys, "inspect", bad)
    assert code == 2 and err.startswith("tfrewrite: error: ") and err.count("\n") == 1, f"{label}: inspect {err!r}"


def test_empty_file(capsys, tmp):
    _assert_rejected(capsys, tmp, b"", "empty")


def test_not_a_tflite_file(capsys, tmp):
    _assert_rejected(capsys, tmp, b"PK\x03\x04 this is a zip file, not a model" * 10, "zip")
    _assert_rejected(capsys, tmp, os.urandom(0) + bytes(range(256)) * 40, "noise")


def test_wrong_identifier(capsys, tmp):
    data = bytearray(SMALL.read_bytes())
    data[4:8] = b"XXXX"
    _assert_rejected(capsys, tmp, bytes(data), "identifier")


def test_truncations_at_many_offsets(capsys, tmp):
    data = SMALL.read_bytes()
    cuts = sorted(set([1, 4, 7, 8, 12, 16, 64, 100] + list(np.linspace(20, len(data) - 1, 40).astype(int))))
    for cut in cuts:
        _assert_rejected(capsys, tmp, data[:cut], f"truncated at {cut}")


def test_directory_and_missing_file(capsys, tmp):
    code, _, err = _run_cli(capsys, tmp, tmp / "o.tflite")
    assert code == 2 and err.startswith("tfrewrite: error:") and "directory" in err
    code, _, err = _run_cli(capsys, tmp / "missing.tflite", tmp / "o.tflite")
    assert code == 2 and err.startswith("tfrewrite: error:")
    assert not (tmp / "o.tflite").exists()


def test_flipped_bytes_never_crash(capsys, tmp):
    data = CONTROL_FLOW.read_bytes()
    rng = np.random.default_rng(1)
    for trial in range(120):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), size=rng.integers(1, 6)):
            mutated[pos] = int(rng.integers(0, 256))
        bad, out = tmp / "bad.tflite", tmp / "out.tflite"
        bad.write_bytes(bytes(mutated))
        start = time.monotonic()
        code, _, err = _run_cli(capsys, bad, out)
        assert time.monotonic() - start < 10
        assert code in (0, 2), f"trial {trial}: exit {code}: {err}"
        if code == 2:
            assert err.startswith("tfrewrite: error: ") and err.count("\n") == 1
            assert not out.exists()
        out.unlink(missing_ok=True)


def _mutated(edit):
    m = schema.ModelT.InitFromPackedBuf(bytearray(CONTROL_FLOW.read_bytes()), 0)
    edit(m)
    import flatbuffers
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _first_op_with(m, builtin):
    for sg in m.subgraphs:
        for op in sg.operators:
            code = m.operatorCodes[op.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                return op
    raise AssertionError("fixture lacks the op")


OUT_OF_RANGE = {
    "tensor buffer index": lambda m: setattr(m.subgraphs[0].tensors[0], "buffer", 10_000),
    "operator input": lambda m: m.subgraphs[0].operators[0].inputs.__setitem__(0, 10_000),
    "operator output": lambda m: m.subgraphs[0].operators[0].outputs.__setitem__(0, -5),
    "operator code index": lambda m: setattr(m.subgraphs[0].operators[0], "opcodeIndex", 77),
    "subgraph input": lambda m: setattr(m.subgraphs[0], "inputs", [99_999]),
    "metadata buffer": lambda m: setattr(m.metadata[0], "buffer", 5_000),
    "signature subgraph": lambda m: setattr(m.signatureDefs[0], "subgraphIndex", 9),
    "signature tensor": lambda m: setattr(m.signatureDefs[0].inputs[0], "tensorIndex", 4_000),
    "while body subgraph": lambda m: setattr(_first_op_with(m, schema.BuiltinOperator.WHILE).builtinOptions,
                                             "bodySubgraphIndex", 42),
    "if branch subgraph": lambda m: setattr(_first_op_with(m, schema.BuiltinOperator.IF).builtinOptions,
                                            "thenSubgraphIndex", -3),
    "large buffer offset": lambda m: [setattr(m.buffers[-1], "offset", 10**9), setattr(m.buffers[-1], "size", 10)],
    "weight size": lambda m: setattr(next(t for sg in m.subgraphs for t in sg.tensors
                                          if m.buffers[t.buffer].data is not None and len(m.buffers[t.buffer].data) > 4),
                                     "shape", np.array([10_000, 10_000], np.int32)),
    # Graphs LiteRT refuses, which reached an internal error under --rank (R6-15).
    "operator writing its own input": lambda m: setattr(m.subgraphs[0].operators[1], "outputs",
                                                        [m.subgraphs[0].operators[1].inputs[0]]),
    "two operators writing one tensor": lambda m: setattr(m.subgraphs[0].operators[1], "outputs",
                                                          list(m.subgraphs[0].operators[0].outputs)),
    # A layer's options of another op type: the conv pass read strideH off FullyConnectedOptions (internal error).
    "options of another op type": lambda m: [
        setattr(_first_op_with(m, schema.BuiltinOperator.FULLY_CONNECTED), "builtinOptionsType",
                schema.BuiltinOptions.Conv2DOptions),
        setattr(_first_op_with(m, schema.BuiltinOperator.FULLY_CONNECTED), "builtinOptions", schema.Conv2DOptionsT())],
    # A negative dimension skipped the size check and reached a reshape (R6-10: an internal error, and `inspect`
    # printed negative parameter counts).
    "weight negative dimension": lambda m: setattr(next(t for sg in m.subgraphs for t in sg.tensors
                                                        if m.buffers[t.buffer].data is not None),
                                                   "shape", np.array([-722, 16777216], np.int32)),
}


@pytest.mark.parametrize("what", sorted(OUT_OF_RANGE))
def test_out_of_range_indices(capsys, tmp, what):
    model_t = schema.ModelT.InitFromPackedBuf(bytearray(CONTROL_FLOW.read_bytes()), 0)
    if what.startswith("signature") and not model_t.signatureDefs:
        pytest.skip("fixture has no signature")
    _assert_rejected(capsys, tmp, _mutated(OUT_OF_RANGE[what]), what)


def test_aliased_vectors_do_not_hang(capsys, tmp):
    """Many subgraph entries pointing at one big subgraph: the work budget stops it quickly."""
    m = schema.ModelT.InitFromPackedBuf(bytearray(CONTROL_FLOW.read_bytes()), 0)
    import flatbuffers
    b = flatbuffers.Builder(1024)
    sg = m.subgraphs[0].Pack(b)
    n = 200_000
    schema.ModelStartSubgraphsVector(b, n)
    for _ in range(n):
        b.PrependUOffsetTRelative(sg)
    vec = b.EndVector()
    schema.ModelStart(b)
    schema.ModelAddVersion(b, 3)
    schema.ModelAddSubgraphs(b, vec)
    b.Finish(schema.ModelEnd(b), file_identifier=b"TFL3")
    _assert_rejected(capsys, tmp, bytes(b.Output()), "aliased subgraphs")


def test_output_over_input_is_refused(capsys, tmp):
    target = tmp / "m.tflite"
    target.write_bytes(SMALL.read_bytes())
    before = target.read_bytes()
    code, _, err = _run_cli(capsys, target, target)
    assert code == 2 and "overwrite the input" in err
    assert target.read_bytes() == before


def test_bad_usage_is_exit_2(capsys, tmp):
    code, _, err = _run_cli(capsys, SMALL, tmp / "o.tflite", "--rank", "0")
    assert code == 2 and err.startswith("tfrewrite: error:")
    code, _, err = _run_cli(capsys, SMALL, tmp / "o.tflite", "--rank", "4", "--ratio", "3")
    assert code == 2 and err.startswith("tfrewrite: error:")
    code, _, err = _run_cli(capsys, SMALL, tmp / "o.tflite", "--only", "([")
    assert code == 2 and "regular expression" in err
    code, _, err = _run_cli(capsys)
    assert code == 2 and err.startswith("tfrewrite: error:")
    assert not (tmp / "o.tflite").exists()


def test_console_script_end_to_end(tmp):
    """The installed command: one line on stderr and exit 2 for a bad file, no traceback."""
    bad = tmp / "bad.tflite"
    bad.write_bytes(b"\x00" * 100)
    r = subprocess.run([sys.executable, "-m", "tfrewrite.cli", str(bad), str(tmp / "o.tflite")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("tfrewrite: error:")
    r = subprocess.run([sys.executable, "-m", "tfrewrite.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--rank" in r.stdout


def test_an_operand_without_dimensions_is_no_internal_error(capsys, tmp):
    """A byte flipped in a shape can leave a BATCH_MATMUL operand with no dimensions: counting its MACs must not
    index into the empty shape (inspect and every rewrite ended in an IndexError)."""
    def empty_shape(m):
        op = _first_op_with(m, schema.BuiltinOperator.BATCH_MATMUL)
        sg = next(sg for sg in m.subgraphs if op in sg.operators)
        sg.tensors[op.inputs[0]].shape = np.array([], np.int32)
    bad = tmp / "bad.tflite"
    bad.write_bytes(_mutated(empty_shape))
    for argv in (["inspect", bad], [bad, tmp / "out.tflite", "--prune", "0.5"]):
        code, _, err = _run_cli(capsys, *argv)
        assert code in (0, 2), (argv, code, err)
        assert "internal error" not in err and "Traceback" not in err, err


def test_a_pipe_as_input_is_refused_at_once(capsys, tmp):
    """Opening a FIFO blocks until someone writes to it: every read path must be a regular file."""
    fifo = tmp / "fifo.tflite"
    os.mkfifo(fifo)
    model = tmp / "m.tflite"
    model.write_bytes(CONTROL_FLOW.read_bytes())
    for argv in ([fifo, tmp / "out.tflite", "--prune", "0.5"], ["inspect", fifo], ["compare", model, fifo],
                 [model, tmp / "out.tflite", "--prune", "0.5", "--calibration", fifo]):
        start = time.monotonic()
        code, _, err = _run_cli(capsys, *argv)
        assert time.monotonic() - start < 10
        assert code == 2 and err.count("\n") == 1 and "not a regular file" in err, (argv, err)
    assert not (tmp / "out.tflite").exists()


def test_an_ascii_only_terminal_gets_escapes_not_an_error(tmp):
    """Layer names and the table's own '…' cannot be encoded for an ASCII-only stdout."""
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    done = subprocess.run([sys.executable, "-m", "tfrewrite.cli", "inspect", str(FIXTURES / "vgg_digits.tflite")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\\u2026" in done.stdout


def test_a_weight_holding_nan_or_inf_is_left_as_it_is_and_named_when_the_model_must_run(tmp, capsys):
    """A model whose weight holds NaN / inf (a broken export): weight-only rewrites leave that layer as it is with
    the reason, the others go on (no internal error from the CP / SVD fit, no numpy warning from the int8 cast);
    a mode that runs the model to fit or measure its layers is one error line naming the constant, exit 2."""
    import warnings
    rng = np.random.default_rng(0)
    first = rng.standard_normal((48, 32))
    first[3, 5], first[7, 1] = np.nan, np.inf
    src = tmp / "nan.tflite"
    src.write_bytes(B.fc_chain([first, rng.standard_normal((48, 48)), rng.standard_normal((10, 48))]))
    before = src.read_bytes()
    out = tmp / "o.tflite"
    for argv in (["--rank", "4"], ["--quantize", "int8", "--min-params", "1"], ["--prune", "0.5"],
                 ["--quantize", "float16"]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cli.main([str(src), str(out), *argv, "--report", str(tmp / "r.json")]) == 0, argv
        layers = json.loads((tmp / "r.json").read_text())["layers"]
        nan_layer = [e for e in layers if e["output"] == "fc0/out"]
        assert nan_layer and all(e["action"] == "skipped" and "NaN or infinite" in e["reason"] for e in nan_layer), \
            (argv, nan_layer)
        io.read(out).validate()
    assert any(e["action"] != "skipped" for e in layers)  # the finite layers still rewritten (float16)
    capsys.readouterr()
    for argv in (["--ratio", "2"], ["--target-size", "2"]):
        assert cli.main([str(src), str(out), *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tfrewrite: error: ") and "'fc0/weight'" in err[0] \
            and "NaN or infinite" in err[0] and "calibration samples" not in err[0], err
    assert src.read_bytes() == before


def test_a_layer_missing_its_weight_input_is_refused_by_the_runtime_without_a_crash(tmp):
    """A FULLY_CONNECTED whose weight input is -1: XNNPACK's failure path crashed the process (SIGSEGV, exit 139,
    no message) while the tool captured stderr (R6-13). The builtin kernels now prepare the model first and say
    why it does not run; the layer is left as it is."""
    rng = np.random.default_rng(0)
    m = io.read_buffer(B.fc_chain([rng.standard_normal((32, 16)), rng.standard_normal((10, 32))]))
    m.main.operators[0].inputs[1] = None
    src = tmp / "no_weight.tflite"
    src.write_bytes(io.to_bytes(m))
    for argv in (["--quantize", "float16"], ["--rank", "4", "--force"]):
        done = subprocess.run([sys.executable, "-m", "tfrewrite.cli", str(src), str(tmp / "o.tflite"), *argv],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode in (0, 2), (argv, done.returncode, done.stderr)
        assert "does not run in LiteRT" in done.stdout + done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "tfrewrite.cli", "compare", str(src), str(src)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("tfrewrite: error: "), (done.returncode, done.stderr)


def test_a_weight_that_is_also_a_model_output_is_never_changed(tmp):
    """A model that returns one of its weights (R6-14: --prune-channels was an internal error, --prune --force
    rewrote that output): every pass leaves that weight as it is, with the reason, and the output stays exact."""
    rng = np.random.default_rng(1)
    m = io.read_buffer(B.fc_chain([rng.standard_normal((64, 32)), rng.standard_normal((48, 64)),
                                   rng.standard_normal((10, 48))]))
    weight = m.main.operators[1].inputs[1]
    m.main.outputs = list(m.main.outputs) + [weight]
    m.signature_defs = []
    src = tmp / "returns_weight.tflite"
    src.write_bytes(io.to_bytes(m))
    calib = tmp / "c.npz"
    np.savez(calib, x=rng.standard_normal((32, 32)).astype(np.float32))
    expected = np.asarray(weight.data).copy()
    for argv in (["--prune", "0.5", "--force"], ["--rank", "4", "--force"], ["--prune-channels", "0.5",
                 "--calibration", str(calib)], ["--quantize", "int8"], ["--prune", "0.6", "--calibration", str(calib)]):
        out = tmp / "o.tflite"
        assert cli.main([str(src), str(out), *argv, "--report", str(tmp / "r.json")]) == 0, argv
        layers = json.loads((tmp / "r.json").read_text())["layers"]
        said = [e for e in layers if "output" in (e["reason"] or "")]
        assert said and all(e["action"] == "skipped" for e in said), (argv, layers)
        assert all(e["action"] == "skipped" for e in layers if e["output"] == "fc1/out"), argv
        written = io.read(out)
        (returned,) = [t for t in written.main.outputs if t.name == weight.name]
        np.testing.assert_array_equal(np.asarray(returned.data), expected)


def test_a_malformed_graph_a_pass_cannot_go_through_is_named_not_an_internal_error(tmp, capsys):
    """An op reading a tensor nothing writes (LiteRT: "lacks data"): the graph invariants find it in the input
    already; a pass that then fails on it answers with that problem, exit 2 (it was an internal error, R6-15)."""
    rng = np.random.default_rng(0)
    m = io.read_buffer(B.fc_chain([rng.standard_normal((32, 16)), rng.standard_normal((24, 32)),
                                   rng.standard_normal((10, 24))]))
    m.main.operators[2].inputs[0] = m.main.add_activation("orphan", schema.TensorType.FLOAT32, [1, 24])
    src = tmp / "orphan.tflite"
    src.write_bytes(io.to_bytes(m))
    code, _, err = _run_cli(capsys, src, tmp / "o.tflite", "--rank", "4")
    assert code == 2 and err.count("\n") == 1 and "malformed graph" in err and "'orphan'" in err, err
    assert not (tmp / "o.tflite").exists()
