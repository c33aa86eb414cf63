"""Sanity checks of the committed fixtures (fixtures/*.tflite, digits.npz, manifest.json).

Fast and TensorFlow-free: parses with the `tflite` package, runs with ai_edge_litert.
Regenerate the fixtures with `python fixtures/make_fixtures.py`.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest
import tflite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
sys.path.insert(0, FIX)
import digits  # noqa: E402

with open(os.path.join(FIX, "manifest.json")) as _f:
    MANIFEST = json.load(_f)

TFLITE_FILES = sorted(glob.glob(os.path.join(FIX, "*.tflite")))
CLASSIFIERS = {k: v for k, v in MANIFEST.items() if v.get("test_accuracy") is not None}
OP_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}


def load(name: str) -> tflite.Model:
    with open(os.path.join(FIX, name), "rb") as f:
        buf = f.read()
    return tflite.Model.GetRootAs(buf, 0)


def opcode_name(oc) -> str:
    # builtin codes >= 127 live only in BuiltinCode(); older ones in DeprecatedBuiltinCode()
    return OP_NAMES[max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())]


def ops(model: tflite.Model, subgraph: int | None = None) -> list[str]:
    sgs = range(model.SubgraphsLength()) if subgraph is None else [subgraph]
    out = []
    for s in sgs:
        sg = model.Subgraphs(s)
        for i in range(sg.OperatorsLength()):
            out.append(opcode_name(model.OperatorCodes(sg.Operators(i).OpcodeIndex())))
    return out


# ----------------------------------------------------------------------------- files / data
def test_expected_fixtures_present():
    expected = {
        "vgg_digits", "vgg_digits_fp16", "vgg_digits_dynint8", "vgg_digits_int8", "vgg_digits_sparse",
        "mobilenetv2_digits", "mobilenetv2_digits_sparse",
        "control_flow", "two_signatures", "shared_weight", "custom_op",
    }
    assert expected <= set(MANIFEST)
    listed = {v["file"] for v in MANIFEST.values()}
    assert {os.path.basename(p) for p in TFLITE_FILES} == listed
    for v in MANIFEST.values():
        assert os.path.getsize(os.path.join(FIX, v["file"])) < 5_000_000, v["file"]


def test_digits_splits():
    with np.load(digits.NPZ) as z:
        x8, y, tr, ca, te = z["x8"], z["y"], z["train"], z["calib"], z["test"]
    assert x8.shape == (1797, 8, 8) and x8.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= x8.min() and x8.max() <= 1.0
    assert len(ca) == 100 and len(te) == 360 and len(tr) == 1797 - 460
    assert not (set(tr) & set(ca) or set(tr) & set(te) or set(ca) & set(te))
    x, yy = digits.load_split("test", 32)
    assert x.shape == (360, 32, 32, 3) and x.dtype == np.float32 and yy.dtype == np.int64
    # exact nearest-neighbour upsampling, identical channels
    np.testing.assert_array_equal(x[:, ::4, ::4, 0], x8[te])
    np.testing.assert_array_equal(x[:, 3::4, 1::4, 2], x8[te])
    assert digits.load_split("calib", 96)[0].shape == (100, 96, 96, 3)


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("path", TFLITE_FILES, ids=os.path.basename)
def test_parses_with_tflite_package(path):
    m = load(os.path.basename(path))
    assert m.Version() == 3
    assert m.SubgraphsLength() >= 1 and m.OperatorCodesLength() >= 1
    for s in range(m.SubgraphsLength()):
        sg = m.Subgraphs(s)
        nt = sg.TensorsLength()
        assert sg.OperatorsLength() >= 1
        for i in range(nt):
            t = sg.Tensors(i)
            assert 0 <= t.Buffer() < m.BuffersLength()
        for i in range(sg.OperatorsLength()):
            op = sg.Operators(i)
            assert 0 <= op.OpcodeIndex() < m.OperatorCodesLength()
            for j in list(op.InputsAsNumpy()) + list(op.OutputsAsNumpy()):
                assert -1 <= j < nt
        for j in list(sg.InputsAsNumpy()) + list(sg.OutputsAsNumpy()):
            assert 0 <= j < nt
    assert all(opcode_name(m.OperatorCodes(i)) for i in range(m.OperatorCodesLength()))


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_accuracy_reproduced(name):
    v = CLASSIFIERS[name]
    acc = digits.tflite_accuracy(os.path.join(FIX, v["file"]), "test", v["input_size"])
    assert abs(acc - v["test_accuracy"]) <= 0.005, (acc, v["test_accuracy"])
    assert acc > 0.5  # all committed classifiers are far better than chance (0.1)


def test_classifier_inputs():
    for name, v in CLASSIFIERS.items():
        sg = load(v["file"]).Subgraphs(0)
        t = sg.Tensors(sg.Inputs(0))
        assert list(t.ShapeAsNumpy()) == [1, v["input_size"], v["input_size"], 3], name
        assert t.Type() == tflite.TensorType.FLOAT32, name  # int8 model keeps float io too


# ----------------------------------------------------------------------------- structure
def test_vgg_structure():
    m = load("vgg_digits.tflite")
    o = ops(m)
    assert o.count("CONV_2D") == 6 and o.count("FULLY_CONNECTED") == 3 and "DEQUANTIZE" not in o
    sg = m.Subgraphs(0)
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        name = opcode_name(m.OperatorCodes(op.OpcodeIndex()))
        if name in ("CONV_2D", "FULLY_CONNECTED"):
            assert op.InputsLength() == 3 and op.Inputs(2) >= 0  # fused bias
    assert "DEQUANTIZE" in ops(load("vgg_digits_fp16.tflite"))
    int8 = ops(load("vgg_digits_int8.tflite"))
    assert int8[0] == "QUANTIZE" and int8[-1] == "DEQUANTIZE"


def test_int8_weights():
    m = load("vgg_digits_int8.tflite")
    sg = m.Subgraphs(0)
    types = set()
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        if opcode_name(m.OperatorCodes(op.OpcodeIndex())) in ("CONV_2D", "FULLY_CONNECTED"):
            types.add(sg.Tensors(op.Inputs(1)).Type())
    assert types == {tflite.TensorType.INT8}


def test_control_flow_has_while_and_if():
    m = load("control_flow.tflite")
    o = ops(m)
    assert "WHILE" in o and "IF" in o
    assert m.SubgraphsLength() >= 5  # main + while cond/body + if then/else


def test_control_flow_runs():
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=os.path.join(FIX, "control_flow.tflite"))
    it.allocate_tensors()
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    assert list(inp["shape"]) == [1, 8]
    it.set_tensor(inp["index"], np.linspace(-1, 1, 8, dtype=np.float32)[None])
    it.invoke()
    assert np.all(np.isfinite(it.get_tensor(out["index"])))


def test_two_signatures():
    m = load("two_signatures.tflite")
    assert m.SignatureDefsLength() == 2
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=os.path.join(FIX, "two_signatures.tflite"))
    sigs = it.get_signature_list()
    assert set(sigs) == {"encode", "decode"}
    code = it.get_signature_runner("encode")(x=np.ones((1, 16), np.float32))["code"]
    assert code.shape == (1, 4)
    assert it.get_signature_runner("decode")(code=code)["recon"].shape == (1, 16)


@pytest.mark.parametrize("name", ["vgg_digits_sparse.tflite", "mobilenetv2_digits_sparse.tflite"])
def test_sparse_has_densify(name):
    m = load(name)
    assert "DENSIFY" in ops(m)
    sg = m.Subgraphs(0)
    assert any(sg.Tensors(i).Sparsity() is not None for i in range(sg.TensorsLength()))


def test_shared_weight():
    m = load("shared_weight.tflite")
    sg = m.Subgraphs(0)
    uses: dict = {}
    for i in range(sg.OperatorsLength()):
        for t in sg.Operators(i).InputsAsNumpy():
            if t >= 0:
                uses.setdefault(int(t), set()).add(i)
    const_users = [len(u) for t, u in uses.items() if m.Buffers(sg.Tensors(t).Buffer()).DataLength() > 0]
    assert max(const_users) >= 2


def test_custom_op():
    m = load("custom_op.tflite")
    customs = [m.OperatorCodes(i) for i in range(m.OperatorCodesLength())
               if opcode_name(m.OperatorCodes(i)) == "CUSTOM"]
    assert customs and all(oc.CustomCode() for oc in customs)
    assert "CUSTOM" in ops(m)


def test_no_tensorflow_imported():
    assert "tensorflow" not in sys.modules
