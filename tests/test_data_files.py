"""Inputs for --verify, compare and --calibration: generated in the range the model reads them in, or read from
data files (any signature's names, batches of a fixed batch size); unreadable or out-of-range files are exit 2."""
import json

import numpy as np
import pytest

import builders as B
import odd_models as M
from tfrewrite import cli, verify


def _fc(tmp, seed=0):
    rng = np.random.default_rng(seed)
    path = tmp / "fc.tflite"
    path.write_bytes(B.fc_model(rng.standard_normal((24, 16)).astype(np.float32)))
    return path


def _truncated(path):
    np.savez(path, input=np.zeros((4, 16), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "truncated npz": _truncated,
    "float64 beyond float32": lambda p: np.savez(p, input=np.full((4, 16), 1e300)),
    "a plain .npy": lambda p: np.save(open(p, "wb"), np.zeros((4, 16), np.float32)),
    "not a zip": lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 64),
}


@pytest.mark.parametrize("what", sorted(BAD_FILES))
def test_bad_data_files_are_exit_2(tmp, capsys, what):
    model = _fc(tmp)
    data = tmp / "d.npz"
    BAD_FILES[what](data)
    for argv in (["--rank", "4", "--calibration", str(data)], ["--verify", "--data", str(data), "--runs", "1"]):
        out = tmp / "o.tflite"
        code = cli.main([str(model), str(out), *argv])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("tfrewrite: error: ") and err.count("\n") == 1, (what, err)
        assert not out.exists()
    code = cli.main(["compare", str(model), str(model), "--data", str(data), "--runs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tfrewrite: error: ") and err.count("\n") == 1, (what, err)


# ------------------------------------------------------------------------- inputs the model reads as indices
@pytest.mark.parametrize("kind", ["GATHER", "EMBEDDING_LOOKUP", "GATHER_ND", "SLICE"])
def test_index_inputs_get_valid_indices(tmp, capsys, kind):
    """--verify and compare generate index inputs within what they index (random int8-range values would read
    out of bounds and fail in the runtime); compare --data uses the given indices for the timing runs too."""
    model = tmp / "m.tflite"
    model.write_bytes(M.index_model(kind))
    out = tmp / "o.tflite"
    code = cli.main([str(model), str(out), "--rank", "4", "--force", "--verify", "--runs", "2", "--samples", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert cli.main(["compare", str(model), str(out), "--runs", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples"] == 8 and r["outputs"][0]["rel_l2"] < 1e6 and r["a"]["latency_ms"] > 0


def test_compare_data_feeds_the_timing_runs(tmp, capsys, monkeypatch):
    model = tmp / "m.tflite"
    model.write_bytes(M.index_model("GATHER"))
    data = tmp / "ids.npz"
    np.savez(data, ids=np.array([[0, 9, 9], [1, 2, 3]], np.int32))  # whole inputs, one per sample
    fed = []
    real_call = verify.Runner.__call__
    monkeypatch.setattr(verify.Runner, "__call__", lambda self, x: fed.append(x[0].tolist()) or real_call(self, x))
    assert cli.main(["compare", str(model), str(model), "--data", str(data), "--runs", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples"] == 2 and r["outputs"][0]["rel_l2"] == 0
    assert fed and all(x in ([0, 9, 9], [1, 2, 3]) for x in fed)


# ------------------------------------------------------------------------- a batch fixed above 1
def test_fixed_batch_of_3_calibrates_and_compares(tmp, capsys):
    """Input [3, 4, 4, 1]: data files are fed in batches of 3 (the last padded), never resized."""
    rng = np.random.default_rng(3)
    model = tmp / "b3.tflite"
    model.write_bytes(B.conv_model(rng.standard_normal((8, 3, 3, 1)).astype(np.float32), input_hw=(4, 4), batch=3))
    data = tmp / "d.npz"
    x = rng.standard_normal((7, 4, 4, 1)).astype(np.float32)
    np.savez(data, input=x)
    out = tmp / "o.tflite"
    code = cli.main([str(model), str(out), "--conv-rank", "2", "--force", "--calibration", str(data), "--verify",
                     "--data", str(data), "--runs", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["compare", str(model), str(out), "--data", str(data), "--runs", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples"] == 7
    # The per-sample outputs are those of the model run on each sample in a batch of three.
    runner, batches, _, count = verify.open_data(model, data)
    assert runner.batch == 3 and len(batches) == 3 and count == 7
    assert all(b[0].shape == (3, 4, 4, 1) for b in batches)
    np.testing.assert_array_equal(batches[2][0][1:], np.repeat(x[6:7], 2, axis=0))
    outs = runner.per_sample(batches, count)
    assert len(outs) == 7 and outs[0][0].shape == (1, 4, 4, 8)
    expected = B.conv2d(x[4:7].astype(np.float64), verify.Runner(model).model.main.operators[0].inputs[1].data)
    np.testing.assert_allclose(np.concatenate([o[0] for o in outs[4:7]]), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- signatures
def test_data_files_may_name_any_signature(tmp, capsys):
    model = tmp / "sigs.tflite"
    model.write_bytes(M.two_signature_fc())
    encode, decode = tmp / "encode.npz", tmp / "decode.npz"
    np.savez(encode, features=np.ones((4, 24), np.float32))
    np.savez(decode, code=np.ones((4, 12), np.float32))
    out = tmp / "o.tflite"
    for data in (encode, decode):  # the signature is the one the names fit
        code = cli.main([str(model), str(out), "--rank", "2", "--force", "--verify", "--data", str(data),
                         "--runs", "1"])
        assert code == 0, capsys.readouterr().err
        capsys.readouterr()
    code = cli.main([str(model), str(out), "--rank", "2", "--force", "--verify", "--data", str(decode),
                     "--signature", "encode", "--runs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "'code' matches no model input" in err
    code = cli.main([str(model), str(out), "--rank", "2", "--force", "--signature", "nope"])
    assert code == 2 and "nope" in capsys.readouterr().err
    # Calibration fits the main subgraph's layers: data of the main subgraph's signature is accepted, data of
    # another subgraph's signature is refused with the reason.
    code = cli.main([str(model), str(out), "--rank", "2", "--force", "--calibration", str(encode), "--signature",
                     "encode", "--quiet"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    code = cli.main([str(model), str(out), "--rank", "2", "--force", "--calibration", str(decode)])
    err = capsys.readouterr().err
    assert code == 2 and "main subgraph" in err and err.count("\n") == 1


def test_compare_models_with_different_inputs(tmp, capsys):
    a, b = tmp / "a.tflite", tmp / "b.tflite"
    a.write_bytes(M.index_model("GATHER"))
    b.write_bytes(B.fc_model(np.ones((24, 16), np.float32)))
    assert cli.main(["compare", str(a), str(b), "--runs", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["outputs"] == [] and "fidelity left out" in r["note"]
    assert r["a"]["latency_ms"] > 0 and r["b"]["latency_ms"] > 0 and r["b"]["params"] == 24 * 16
    assert cli.main(["compare", str(a), str(b), "--runs", "2"]) == 0
    assert "fidelity left out" in capsys.readouterr().out


def test_index_ranges_of_the_other_index_readers():
    """DYNAMIC_UPDATE_SLICE start indices keep the update inside the operand; STRIDED_SLICE begin/end/strides
    take the whole tensor; ONE_HOT indices stay below the depth; a CAST in between passes the range on."""
    from tfrewrite import analysis, schema
    from tfrewrite.graph import OpCode, Operator, Subgraph, Tensor
    T, OP = schema.TensorType, schema.BuiltinOperator
    sg = Subgraph()
    operand = sg.add_constant("operand", np.zeros((8, 4), np.float32))
    update = sg.add_constant("update", np.ones((2, 3), np.float32))
    start = sg.add_tensor(Tensor("start", T.INT64, [2]))
    start32 = sg.add_tensor(Tensor("start32", T.INT32, [2]))
    updated = sg.add_tensor(Tensor("updated", T.FLOAT32, [8, 4]))
    end = sg.add_tensor(Tensor("end", T.INT32, [2]))
    begin, strides = sg.add_constant("begin", np.zeros(2, np.int32)), sg.add_constant("strides", np.ones(2, np.int32))
    sliced = sg.add_tensor(Tensor("sliced", T.FLOAT32, [8, 4]))
    ids = sg.add_tensor(Tensor("ids", T.INT32, [5]))
    depth = sg.add_constant("depth", np.array([6], np.int32))
    on, off = sg.add_constant("on", np.ones(1, np.float32)), sg.add_constant("off", np.zeros(1, np.float32))
    hot = sg.add_tensor(Tensor("hot", T.FLOAT32, [5, 6]))
    sg.operators = [Operator(OpCode(OP.CAST), [start], [start32]),
                    Operator(OpCode(OP.DYNAMIC_UPDATE_SLICE), [operand, update, start32], [updated]),
                    Operator(OpCode(OP.STRIDED_SLICE), [updated, begin, end, strides], [sliced]),
                    Operator(OpCode(OP.ONE_HOT), [ids, depth, on, off], [hot])]
    sg.inputs, sg.outputs = [start, end, ids], [sliced, hot]
    dus, strided, one_hot = analysis.input_ranges(sg, sg.inputs)
    assert dus["kind"] == "index" and dus["low"] == 0 and dus["high"] == 1  # components collapse after CAST
    assert strided["kind"] == "index" and list(strided["low"]) == [8, 4] and list(strided["high"]) == [8, 4]
    assert one_hot == {"kind": "index", "low": 0, "high": 5}
    rng = np.random.default_rng(0)
    x = verify._plausible_array([2], np.int32, strided, rng)
    assert x.tolist() == [8, 4]


def test_integer_data_outside_the_input_dtype_is_refused():
    with pytest.raises(verify.DataError, match=r"outside the int8 range"):
        verify._cast(np.array([[1, 300]]), np.dtype(np.int8), "d.npz: array 'x'")
    assert verify._cast(np.array([[1, 127]]), np.dtype(np.int8), "x").dtype == np.int8


def test_calibration_values_that_overflow_the_model_are_exit_2(tmp, capsys):
    """Finite float32 inputs (3e38) that drive a later layer's inputs to infinity: one error line, not a failed
    eigen-decomposition."""
    from conftest import FIXTURES
    data = tmp / "huge.npz"
    np.savez(data, image=np.full((2, 32, 32, 3), 3e38, np.float32))
    out = tmp / "o.tflite"
    code = cli.main([str(FIXTURES / "vgg_digits.tflite"), str(out), "--rank", "8", "--calibration", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tfrewrite: error: ") and err.count("\n") == 1, err
    assert "NaN or infinite" in err and not out.exists()


def test_a_budget_needs_two_calibration_samples(tmp, capsys):
    """A budget judges each option on samples its fit did not see: with one sample the held-out half was empty
    (numpy warnings on stderr and a 'reached 6.33x' for a 2x target)."""
    from conftest import FIXTURES
    data = tmp / "one.npz"
    np.savez(data, image=np.random.default_rng(0).random((1, 32, 32, 3), np.float32))
    out = tmp / "o.tflite"
    for argv in (["--target-size", "2"], ["--prune-channels", "auto", "--target-macs", "1.5"]):
        code = cli.main([str(FIXTURES / "vgg_digits.tflite"), str(out), *argv, "--calibration", str(data)])
        err = capsys.readouterr().err
        assert code == 2 and "needs 2 at least" in err and err.count("\n") == 1, err
        assert not out.exists()
