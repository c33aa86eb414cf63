"""Tests for tfrewrite.ops.versions (builtin op versions / min runtime versions).

Unit tests pin every branch of the GetBuiltinOperatorVersion rules (see the module docstring for
the source files).  The empirical test re-derives the version of every CONV_2D,
DEPTHWISE_CONV_2D, FULLY_CONNECTED, DEQUANTIZE and DENSIFY operator of each converter-written
.tflite in fixtures/ (plus any directories listed in $TFREWRITE_VERSION_MODELS, os.pathsep
separated) and compares it with the version the converter wrote.  No TensorFlow import.
"""
from __future__ import annotations

import ast
import os
import pathlib

import pytest

from tfrewrite.ops import versions as V
from tfrewrite.ops.versions import (
    CONV_2D, DENSIFY, DEPTHWISE_CONV_2D, DEQUANTIZE, FLOAT16, FLOAT32, FULLY_CONNECTED, INT4,
    INT8, INT16, INT32, INT64, UINT8,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


# ---------------------------------------------------------------------------------------------
# constants agree with the schema LiteRT ships
# ---------------------------------------------------------------------------------------------
def test_constants_match_schema():
    s = pytest.importorskip("ai_edge_litert.schema_py_generated")
    assert (V.CONV_2D, V.DEPTHWISE_CONV_2D, V.FULLY_CONNECTED, V.DEQUANTIZE, V.DENSIFY) == (
        s.BuiltinOperator.CONV_2D, s.BuiltinOperator.DEPTHWISE_CONV_2D,
        s.BuiltinOperator.FULLY_CONNECTED, s.BuiltinOperator.DEQUANTIZE, s.BuiltinOperator.DENSIFY)
    T = s.TensorType
    assert (FLOAT32, FLOAT16, INT32, UINT8, INT64, INT16, INT8, INT4) == (
        T.FLOAT32, T.FLOAT16, T.INT32, T.UINT8, T.INT64, T.INT16, T.INT8, T.INT4)
    W = s.FullyConnectedOptionsWeightsFormat
    assert (V.FC_WEIGHTS_DEFAULT, V.FC_WEIGHTS_SHUFFLED4x16INT8) == (W.DEFAULT, W.SHUFFLED4x16INT8)


def test_module_imports_only_stdlib_and_numpy():
    tree = ast.parse(pathlib.Path(V.__file__).read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add((node.module or "").split(".")[0])
    assert mods <= {"__future__", "typing", "numpy", "collections", "dataclasses"}, mods


# ---------------------------------------------------------------------------------------------
# CONV_2D
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, expected", [
    (dict(input_type=FLOAT32, filter_type=FLOAT32), 1),
    (dict(input_type=FLOAT32, filter_type=FLOAT32, dilated=True), 1),    # dilation is ignored
    (dict(input_type=UINT8, filter_type=UINT8), 1),
    (dict(input_type=FLOAT32, filter_type=INT8), 2),                     # hybrid per-tensor
    (dict(input_type=FLOAT32, filter_type=INT8, per_channel_hybrid=True), 5),
    (dict(input_type=FLOAT32, filter_type=INT8, per_channel_hybrid=True, dilated=True), 5),
    (dict(input_type=INT8, filter_type=INT8), 3),
    (dict(input_type=INT8, filter_type=INT8, dilated=True, per_channel_hybrid=True), 3),
    (dict(input_type=INT8, filter_type=INT4), 7),
    (dict(input_type=INT16, filter_type=INT16), 4),
    (dict(input_type=FLOAT32, filter_type=FLOAT32, grouped=True), 6),
    (dict(input_type=INT8, filter_type=INT8, grouped=True), 6),
    (dict(input_type=FLOAT32, filter_type=INT8, grouped=True, per_channel_hybrid=True), 6),
    # 16x8: quantized_bias_type is "set" whenever Conv2DOptions exists (FLOAT32 default -> 1)
    (dict(input_type=INT16, filter_type=INT8), 8),
    (dict(input_type=INT16, filter_type=INT8, bias_type=FLOAT32), 8),
    (dict(input_type=INT16, filter_type=INT8, bias_type=INT64), 8),
    (dict(input_type=INT16, filter_type=INT8, bias_type=INT32, grouped=True), 8),
    (dict(input_type=INT16, filter_type=INT8, has_options=False), 1),
    (dict(input_type=INT16, filter_type=INT8, has_options=False, grouped=True), 6),
    # output type participates
    (dict(input_type=INT8, filter_type=INT8, output_type=INT32), 1),
    (dict(input_type=FLOAT32, filter_type=INT8, output_type=FLOAT16), 1),
])
def test_conv2d_version(kw, expected):
    assert V.conv2d_version(**kw) == expected


def test_conv2d_positional_signature():
    assert V.conv2d_version(FLOAT32, INT8, True, False, False, None) == 5
    assert V.conv2d_version(FLOAT32, FLOAT32, False, True, True) == 6


# ---------------------------------------------------------------------------------------------
# DEPTHWISE_CONV_2D
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, kw, expected", [
    ((FLOAT32, FLOAT32, 1, False), {}, 1),
    ((FLOAT32, FLOAT32, 2, False), {}, 1),           # depth_multiplier is ignored
    ((FLOAT32, FLOAT32, 1, True), {}, 2),
    ((FLOAT32, FLOAT32, 4, True), {}, 2),
    ((UINT8, UINT8, 1, True), {}, 2),
    ((FLOAT32, INT8, 1, False), {}, 4),
    ((FLOAT32, INT8, 1, True), {}, 4),               # hybrid beats dilation
    ((FLOAT32, INT8, 1, False), dict(per_channel_hybrid=True), 6),
    ((INT8, INT8, 2, True), {}, 3),                  # int8 beats dilation
    ((INT8, INT4, 1, True), {}, 7),
    ((INT16, INT16, 1, False), {}, 5),
    ((INT16, INT8, 2, True), {}, 2),                 # 16x8 falls through to the dilation test
    ((INT16, INT8, 2, False), {}, 1),
])
def test_depthwise_conv2d_version(args, kw, expected):
    assert V.depthwise_conv2d_version(*args, **kw) == expected


# ---------------------------------------------------------------------------------------------
# FULLY_CONNECTED
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, expected", [
    (dict(input_type=FLOAT32, weight_type=FLOAT32, output_type=FLOAT32), 1),
    (dict(input_type=UINT8, weight_type=UINT8, output_type=UINT8), 1),
    (dict(input_type=FLOAT32, weight_type=FLOAT32, output_type=FLOAT32,
          weights_format_shuffled=True), 2),
    (dict(input_type=FLOAT32, weight_type=INT8, output_type=FLOAT32), 3),
    (dict(input_type=FLOAT32, weight_type=INT8, output_type=FLOAT32,
          weights_format_shuffled=True), 3),
    (dict(input_type=INT8, weight_type=INT8, output_type=INT8), 4),
    (dict(input_type=INT8, weight_type=INT8, output_type=INT8, weights_format_shuffled=True), 4),
    (dict(input_type=FLOAT32, weight_type=FLOAT32, output_type=FLOAT32, keep_num_dims=True), 5),
    (dict(input_type=INT8, weight_type=INT8, output_type=INT8, keep_num_dims=True), 5),
    (dict(input_type=FLOAT32, weight_type=INT8, output_type=FLOAT32, keep_num_dims=True,
          asymmetric_quantize_inputs=True), 5),
    (dict(input_type=FLOAT32, weight_type=FLOAT32, output_type=FLOAT32, num_inputs=2), 6),
    (dict(input_type=FLOAT32, weight_type=FLOAT32, output_type=FLOAT32, num_inputs=2,
          keep_num_dims=True), 6),
    (dict(input_type=INT16, weight_type=INT16, output_type=INT16), 7),
    (dict(input_type=FLOAT32, weight_type=FLOAT32, output_type=FLOAT32, sparse_weights=True), 8),
    (dict(input_type=INT8, weight_type=INT8, output_type=INT8, sparse_weights=True,
          keep_num_dims=True), 8),
    (dict(input_type=FLOAT32, weight_type=INT8, output_type=FLOAT32,
          asymmetric_quantize_inputs=True), 9),
    (dict(input_type=INT8, weight_type=INT4, output_type=INT8), 10),
    (dict(input_type=INT16, weight_type=INT8, output_type=INT16), 11),
    (dict(input_type=INT16, weight_type=INT8, output_type=INT16, bias_type=INT64), 11),
    (dict(input_type=INT16, weight_type=INT8, output_type=INT16, has_options=False), 1),
    (dict(input_type=FLOAT32, weight_type=INT8, output_type=FLOAT32, per_channel_hybrid=True), 12),
    (dict(input_type=FLOAT32, weight_type=INT8, output_type=FLOAT32, per_channel_hybrid=True,
          asymmetric_quantize_inputs=True, sparse_weights=True, keep_num_dims=True), 12),
    (dict(input_type=INT8, weight_type=INT8, output_type=INT8, per_channel_hybrid=True), 4),
    (dict(input_type=INT16, weight_type=INT4, output_type=INT16), 13),
])
def test_fully_connected_version(kw, expected):
    kw.setdefault("keep_num_dims", False)
    kw.setdefault("sparse_weights", False)
    assert V.fully_connected_version(**kw) == expected


# ---------------------------------------------------------------------------------------------
# DEQUANTIZE / DENSIFY
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    ((UINT8,), 1),
    ((INT8,), 2),
    ((INT8, True), 5),
    ((FLOAT16,), 3),
    ((INT16,), 3),
    ((INT16, True), 3),
    ((INT4,), 6),
    ((INT4, True), 6),
])
def test_dequantize_version(args, expected):
    assert V.dequantize_version(*args) == expected


def test_densify_version():
    assert V.densify_version() == 1


# ---------------------------------------------------------------------------------------------
# op_signature.cc helpers
# ---------------------------------------------------------------------------------------------
def test_signature_helpers():
    assert V.conv2d_is_per_channel(16, [16, 3, 3, 8])
    assert not V.conv2d_is_per_channel(1, [16, 3, 3, 8])
    assert V.conv2d_is_per_channel(1, [1, 3, 3, 8])        # one filter: looks per-channel
    assert V.conv2d_is_grouped([1, 8, 8, 8], [8, 3, 3, 4])
    assert not V.conv2d_is_grouped([1, 8, 8, 8], [8, 3, 3, 8])
    assert not V.conv2d_is_grouped([], [8, 3, 3, 4])
    assert V.depthwise_conv2d_is_per_channel(32, [1, 3, 3, 32])
    assert not V.depthwise_conv2d_is_per_channel(1, [1, 3, 3, 32])
    assert V.fully_connected_is_per_channel(48, [48, 64])
    assert not V.fully_connected_is_per_channel(1, [48, 64])
    assert not V.fully_connected_is_per_channel(0, [48, 64])
    assert V.dequantize_is_per_channel(16, [16, 3, 3, 8], 0)
    assert V.dequantize_is_per_channel(8, [16, 3, 3, 8], 3)
    assert not V.dequantize_is_per_channel(1, [1, 3, 3, 8], 0)   # needs > 1 scale
    assert not V.dequantize_is_per_channel(8, [16, 3, 3, 8], 0)


# ---------------------------------------------------------------------------------------------
# runtime versions
# ---------------------------------------------------------------------------------------------
def test_min_runtime_table_covers_every_version():
    for code, top in [(CONV_2D, 8), (DEPTHWISE_CONV_2D, 7), (FULLY_CONNECTED, 13),
                      (DEQUANTIZE, 6), (DENSIFY, 1)]:
        versions = sorted(v for (c, v) in V.MIN_RUNTIME_VERSIONS if c == code)
        assert versions == list(range(1, top + 1))
        rts = [V.MIN_RUNTIME_VERSIONS[(code, v)] for v in versions]
        for a, b in zip(rts, rts[1:]):       # monotone in the op version
            assert V.compare_runtime_versions(a, b) <= 0
    assert V.MIN_RUNTIME_VERSIONS[(CONV_2D, 6)] == "2.9.0"
    assert V.MIN_RUNTIME_VERSIONS[(FULLY_CONNECTED, 12)] == "2.17.0"
    assert V.MIN_RUNTIME_VERSIONS[(DEQUANTIZE, 3)] == "1.15.0"
    assert V.MIN_RUNTIME_VERSIONS[(DENSIFY, 1)] == "2.2.0"


@pytest.mark.parametrize("a, b, expected", [
    ("1.14.0", "1.5.0", 1),          # numeric, not lexicographic
    ("1.5.0", "1.14.0", -1),
    ("2.3.0", "2.3.0", 0),
    ("2.10.0", "2.9.0", 1),
    ("1.13.1", "1.13.0", 1),
    ("1.5", "1.5.0", -1),            # shorter prefix precedes
    ("", "1.5.0", -1),
    ("", "", 0),
])
def test_compare_runtime_versions(a, b, expected):
    assert V.compare_runtime_versions(a, b) == expected
    assert V.compare_runtime_versions(b, a) == -expected


def test_min_runtime_version():
    assert V.min_runtime_version([]) == ""
    assert V.min_runtime_version([(CONV_2D, 99), (12345, 1)]) == ""          # unknown ignored
    assert V.min_runtime_version([(CONV_2D, 1), (DEPTHWISE_CONV_2D, 2)]) == "1.12.0"
    assert V.min_runtime_version([(DEPTHWISE_CONV_2D, 2), (CONV_2D, 3)]) == "1.14.0"
    assert V.min_runtime_version([(FULLY_CONNECTED, 5), (DEQUANTIZE, 3), (CONV_2D, 99)]) == "2.0.0"
    assert V.min_runtime_version([(CONV_2D, 6), (FULLY_CONNECTED, 10)]) == "2.11.0"
    assert V.min_runtime_version(iter([(DENSIFY, 1), (FULLY_CONNECTED, 12)])) == "2.17.0"


# ---------------------------------------------------------------------------------------------
# Empirical: versions the converter wrote == versions recomputed from the flatbuffer
# ---------------------------------------------------------------------------------------------
CHECKED = {CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, DEQUANTIZE, DENSIFY}


def _model_files():
    dirs = [FIXTURES] + [pathlib.Path(p) for p in
                         os.environ.get("TFREWRITE_VERSION_MODELS", "").split(os.pathsep) if p]
    files = []
    for d in dirs:
        if d.is_dir():
            files += sorted(d.glob("*.tflite"))
    return files


def _tensor_facts(sg, idx):
    t = sg.tensors[idx]
    q = t.quantization
    nscales = len(q.scale) if q is not None and q.scale is not None else 0
    qdim = q.quantizedDimension if q is not None else 0
    shape = [int(x) for x in t.shape] if t.shape is not None else []
    return t.type, shape, nscales, qdim, t.sparsity is not None


def _recompute(sg, op, code, as_float=False):
    """Version by the GetBuiltinOperatorVersion rules for one operator.

    ``as_float``: pretend every tensor type is FLOAT32 -- the op as the float conversion wrote
    it before the legacy 16x8 quantizer ran (that quantizer keeps the options).
    """
    opts = op.builtinOptions
    in0 = _tensor_facts(sg, op.inputs[0])
    out_type = sg.tensors[op.outputs[0]].type
    if code == DEQUANTIZE:
        t, shape, ns, qdim, _ = in0
        return V.dequantize_version(t, V.dequantize_is_per_channel(ns, shape, qdim))
    if code == DENSIFY:
        return V.densify_version()
    w = _tensor_facts(sg, op.inputs[1])
    in_t, w_t = in0[0], w[0]
    if as_float:
        in_t = w_t = out_type = FLOAT32
    if code == CONV_2D:
        return V.conv2d_version(
            in_t, w_t, per_channel_hybrid=V.conv2d_is_per_channel(w[2], w[1]),
            dilated=bool(opts and (opts.dilationWFactor != 1 or opts.dilationHFactor != 1)),
            grouped=V.conv2d_is_grouped(in0[1], w[1]),
            bias_type=opts.quantizedBiasType if opts is not None else None,
            output_type=out_type, has_options=opts is not None)
    if code == DEPTHWISE_CONV_2D:
        return V.depthwise_conv2d_version(
            in_t, w_t, depth_multiplier=opts.depthMultiplier if opts else 1,
            dilated=bool(opts and (opts.dilationWFactor != 1 or opts.dilationHFactor != 1)),
            per_channel_hybrid=V.depthwise_conv2d_is_per_channel(w[2], w[1]),
            output_type=out_type)
    if code == FULLY_CONNECTED:
        return V.fully_connected_version(
            in_t, w_t, out_type,
            keep_num_dims=bool(opts and opts.keepNumDims),
            sparse_weights=w[4],
            asymmetric_quantize_inputs=bool(opts and opts.asymmetricQuantizeInputs),
            per_channel_hybrid=V.fully_connected_is_per_channel(w[2], w[1]),
            weights_format_shuffled=bool(opts and opts.weightsFormat
                                         == V.FC_WEIGHTS_SHUFFLED4x16INT8),
            bias_type=opts.quantizedBiasType if opts is not None else None,
            num_inputs=len(op.inputs), has_options=opts is not None)
    raise AssertionError(code)


def _legacy_16x8(sg, op, code):
    """Version the legacy quantizer (tensorflow/lite/tools/optimize, used by the TF converter for
    int16 activations) leaves: model_utils.cc SetOperatorCodeVersion raises the float model's
    version to operator_property.cc's ``property.version`` if lower; DEQUANTIZE ops it inserts
    are created at version 2 (MakeDequantizeOperator)."""
    if code == DEQUANTIZE:
        return V.LEGACY_16X8_QUANTIZER_VERSIONS[DEQUANTIZE]
    return max(_recompute(sg, op, code, as_float=True), V.LEGACY_16X8_QUANTIZER_VERSIONS[code])


def _metadata_string(model, name):
    for md in model.metadata or []:
        n = md.name.decode() if isinstance(md.name, bytes) else md.name
        if n == name:
            data = model.buffers[md.buffer].data
            return bytes(bytearray(data if data is not None else [])).rstrip(b"\0").decode()
    return None


_FILES = _model_files()


@pytest.mark.parametrize("path", _FILES or [None], ids=[p.name for p in _FILES] or ["none"])
def test_versions_match_converter_output(path):
    if path is None:
        pytest.skip(f"no .tflite files in {FIXTURES} (or $TFREWRITE_VERSION_MODELS)")
    s = pytest.importorskip("ai_edge_litert.schema_py_generated")
    model = s.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)

    rules: dict[int, int] = {}     # opcode index -> max over its operators (UpdateOpVersion)
    legacy: dict[int, int] = {}    # same, if int16-activation ops went through the 16x8 quantizer
    has_int16 = False
    all_codes = set()
    for sg in model.subgraphs or []:
        for op in sg.operators or []:
            oc = model.operatorCodes[op.opcodeIndex]
            code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
            all_codes.add(code)
            if code not in CHECKED:
                continue
            v = _recompute(sg, op, code)
            lv = v
            if code != DENSIFY and sg.tensors[op.inputs[0]].type == INT16:
                has_int16 = True
                lv = _legacy_16x8(sg, op, code)
            rules[op.opcodeIndex] = max(rules.get(op.opcodeIndex, 1), v)
            legacy[op.opcodeIndex] = max(legacy.get(op.opcodeIndex, 1), lv)

    if not rules:
        pytest.skip(f"{path.name}: no CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED/DEQUANTIZE/DENSIFY")
    got = {i: model.operatorCodes[i].version for i in rules}
    if has_int16 and got != rules:
        # TF converter 16x8 output: versions come from the legacy quantizer, not op_version.cc
        assert got == legacy, (f"{path.name}: written {got} != legacy-16x8 {legacy} "
                               f"(GetBuiltinOperatorVersion would give {rules})")
        return     # its min_runtime_version metadata is stale (not recomputed after quantizing)
    assert got == rules, f"{path.name}: written {got} != recomputed {rules}"

    written_rt = _metadata_string(model, "min_runtime_version")
    if written_rt:
        pairs = [(max(model.operatorCodes[i].builtinCode, model.operatorCodes[i].deprecatedBuiltinCode),
                  model.operatorCodes[i].version) for i in rules]
        ours = V.min_runtime_version(pairs)
        if all_codes <= CHECKED:
            assert written_rt == ours
        else:   # other ops may push the model's runtime higher, never lower
            assert V.compare_runtime_versions(written_rt, ours) >= 0
