"""Builtin-operator versions and minimum runtime versions for the ops tfrewrite emits.

Pure Python (stdlib only).  Everything here is transcribed from the TensorFlow sources the
TF 2.21 converter links, not guessed:

* ``tensorflow/compiler/mlir/lite/tools/versioning/op_version.cc`` -- ``GetBuiltinOperatorVersion``
  (identical rules for these five ops in ``tensorflow/lite/tools/versioning/op_version.cc``).
* ``tensorflow/compiler/mlir/lite/tools/versioning/op_signature.cc`` -- ``GetOpSignature``: how
  the ``ext_options`` flags (per-channel, grouped, sparse weight) are derived from the flatbuffer.
  The ``*_is_per_channel`` / ``conv2d_is_grouped`` helpers below reproduce it.
* ``tensorflow/compiler/mlir/lite/tools/versioning/runtime_version.cc`` --
  ``FindMinimumRuntimeVersionForOp`` (the table), ``CompareRuntimeVersion`` and
  ``UpdateMinimumRuntimeVersionForModel``.
* ``tensorflow/compiler/mlir/lite/flatbuffer_export.cc`` calls ``tflite::UpdateOpVersion`` and then
  ``UpdateMinimumRuntimeVersionForModel`` on the finished buffer.  ``UpdateOpVersion`` walks every
  operator, computes ``GetBuiltinOperatorVersion`` and only ever *raises* the version stored in the
  operator's ``OperatorCode``.  An ``OperatorCode`` is shared by all operators using it, so the
  version written for a code is the max over its operators.

Quirks of the source that are reproduced on purpose (and were checked against converter output,
see ``tests/test_ops_versions.py``):

* ``quantized_bias_type`` (CONV_2D v8, FULLY_CONNECTED v11): ``op_version.cc`` tests the C param
  ``quantized_bias_type`` for truthiness.  ``ParseOpData`` fills it with
  ``ConvertTensorType(options.quantized_bias_type)``, which maps the schema default ``FLOAT32``
  (0) to ``kTfLiteFloat32`` (1, non-zero).  So whenever the builtin options table is present, *any*
  int16-activation / int8-weight CONV_2D is version 8 and such a FULLY_CONNECTED is version 11,
  even with ``quantized_bias_type == FLOAT32``.  Only a missing options table gives "false".
  (Confirmed: re-exporting a 16x8 model through the MLIR exporter gives CONV_2D v8 with
  ``quantizedBiasType == 0``.)
* CONV_2D v4 / DEPTHWISE_CONV_2D v5 (int16 input *and* int16 filter) read
  ``op_sig.outputs.at(1)`` -- an out-of-range index for these single-output ops (it would throw /
  abort in C++).  We return the documented intent (4 / 5) and treat the output type as the only
  output's type.
* The TF converter's 16x8 path (``EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8``)
  does NOT go through these rules: ``lite.py`` routes ``activations_type == int16`` to the legacy
  ``tensorflow/lite/tools/optimize/quantize_model.cc`` quantizer.  Its
  ``model_utils.cc::SetOperatorCodeVersion`` raises the float model's version to
  ``operator_property.cc``'s ``property.version`` (CONV_2D 3, DEPTHWISE_CONV_2D 3,
  FULLY_CONNECTED 4) only if lower -- so a keep_num_dims FC stays 5 --, inserted DEQUANTIZE ops get
  version 2 (``MakeDequantizeOperator``), and the ``min_runtime_version`` metadata is left stale.
  See ``LEGACY_16X8_QUANTIZER_VERSIONS``.

TensorType ints are the TFLite schema's (``schema.fbs``): FLOAT32=0, FLOAT16=1, INT32=2,
UINT8=3, INT64=4, INT16=7, INT8=9, INT4=17 ...
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

__all__ = [
    "FLOAT32", "FLOAT16", "INT32", "UINT8", "INT64", "INT16", "INT8", "INT4",
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "DEQUANTIZE", "DENSIFY",
    "FC_WEIGHTS_DEFAULT", "FC_WEIGHTS_SHUFFLED4x16INT8",
    "conv2d_version", "depthwise_conv2d_version", "fully_connected_version",
    "dequantize_version", "densify_version",
    "conv2d_is_per_channel", "conv2d_is_grouped", "depthwise_conv2d_is_per_channel",
    "fully_connected_is_per_channel", "dequantize_is_per_channel",
    "MIN_RUNTIME_VERSIONS", "LEGACY_16X8_QUANTIZER_VERSIONS",
    "min_runtime_version", "compare_runtime_versions",
]

# --- schema.fbs TensorType -------------------------------------------------------------------
FLOAT32 = 0
FLOAT16 = 1
INT32 = 2
UINT8 = 3
INT64 = 4
INT16 = 7
INT8 = 9
INT4 = 17

# --- schema.fbs BuiltinOperator --------------------------------------------------------------
CONV_2D = 3
DEPTHWISE_CONV_2D = 4
FULLY_CONNECTED = 9
DEQUANTIZE = 6
DENSIFY = 124

# --- schema.fbs FullyConnectedOptionsWeightsFormat -------------------------------------------
FC_WEIGHTS_DEFAULT = 0
FC_WEIGHTS_SHUFFLED4x16INT8 = 1


def _bias_type_set(bias_type: Optional[int], has_options: bool) -> bool:
    """Truthiness of the C ``quantized_bias_type`` param (see module docstring).

    ``bias_type`` is the schema value of ``*Options.quantized_bias_type``; None means the schema
    default (FLOAT32).  Every schema TensorType converts to a non-zero TfLiteType, so the flag is
    true whenever the options table exists.
    """
    del bias_type  # any value (incl. the FLOAT32 default) converts to a non-NoType TfLiteType
    return bool(has_options)


# ============================================================================================
# CONV_2D  (op_version.cc, case BuiltinOperator_CONV_2D), first match wins:
#   8  input INT16, filter INT8, output INT16, and quantized_bias_type "set" (always, if the
#      Conv2DOptions table exists -- see module docstring)
#   6  grouped convolution (op_signature.cc: input.shape[3] != filter.shape[3], input rank > 0)
#   4  input INT16, filter INT16, output INT16
#   3  input INT8, filter INT8, output INT8
#   7  input INT8, filter INT4, output INT8
#   5  input FLOAT32, filter INT8, output FLOAT32 (hybrid), per-channel filter
#   2  same hybrid, per-tensor filter
#   1  otherwise (float, float16-dequantized weights, uint8, ...)
# Dilation does NOT affect the CONV_2D version: the CONV_2D case never reads
# dilation_{width,height}_factor (only DEPTHWISE_CONV_2D does).  Checked: a dilation-2 float
# conv is written as v1 by the TF 2.21 converter.
# ============================================================================================
def conv2d_version(input_type: int, filter_type: int, per_channel_hybrid: bool = False,
                   dilated: bool = False, grouped: bool = False, bias_type=None, *,
                   output_type: Optional[int] = None, has_options: bool = True) -> int:
    """CONV_2D version.  ``dilated`` is accepted for symmetry and ignored (the source ignores it).

    ``output_type`` defaults to ``input_type``.  ``per_channel_hybrid`` is op_signature's
    ``is_per_channel_quantized`` (filter scale count == filter.shape[0]); it only matters for the
    float32/int8/float32 hybrid case.
    """
    del dilated  # not part of the CONV_2D rules
    out = input_type if output_type is None else output_type
    i, f = input_type, filter_type
    if i == INT16 and f == INT8 and out == INT16 and _bias_type_set(bias_type, has_options):
        return 8
    if grouped:
        return 6
    if i == INT16 and f == INT16 and out == INT16:
        return 4
    if i == INT8 and f == INT8 and out == INT8:
        return 3
    if i == INT8 and f == INT4 and out == INT8:
        return 7
    if i == FLOAT32 and f == INT8 and out == FLOAT32:
        return 5 if per_channel_hybrid else 2
    return 1


# ============================================================================================
# DEPTHWISE_CONV_2D  (op_version.cc, case BuiltinOperator_DEPTHWISE_CONV_2D), first match wins:
#   5  input INT16, filter INT16, output INT16
#   6  input FLOAT32, filter INT8, output FLOAT32 (hybrid), per-channel filter
#      (op_signature.cc: filter scale count == filter.shape[3] > 0)
#   4  same hybrid, per-tensor
#   3  input INT8, filter INT8, output INT8
#   7  input INT8, filter INT4, output INT8
#   2  dilation_width_factor != 1 or dilation_height_factor != 1
#   1  otherwise
# depth_multiplier does not affect the version.  Note the order: an int8 (or hybrid) dilated
# depthwise conv is 3 (or 4/6), not 2; and int16-activation/int8-filter (16x8) falls through to
# the dilation test (2 or 1).
# ============================================================================================
def depthwise_conv2d_version(input_type: int, filter_type: int, depth_multiplier: int = 1,
                             dilated: bool = False, per_channel_hybrid: bool = False, *,
                             output_type: Optional[int] = None) -> int:
    """DEPTHWISE_CONV_2D version.  ``depth_multiplier`` is accepted and ignored (as in the source)."""
    del depth_multiplier
    out = input_type if output_type is None else output_type
    i, f = input_type, filter_type
    if i == INT16 and f == INT16 and out == INT16:
        return 5
    if i == FLOAT32 and f == INT8 and out == FLOAT32:
        return 6 if per_channel_hybrid else 4
    if i == INT8 and f == INT8 and out == INT8:
        return 3
    if i == INT8 and f == INT4 and out == INT8:
        return 7
    if dilated:
        return 2
    return 1


# ============================================================================================
# FULLY_CONNECTED  (op_version.cc, case BuiltinOperator_FULLY_CONNECTED), first match wins:
#   13 input INT16, weights INT4, output INT16
#   12 input FLOAT32, weights INT8, output FLOAT32 (hybrid) and per-channel weights
#      (op_signature.cc: scale count == weights.shape[0]; NOTE a per-tensor scale on a
#      1-row weight also counts)
#   11 input INT16, weights INT8, output INT16 and quantized_bias_type "set" (always, if the
#      options table exists -- see module docstring)
#   8  sparse weights (the weights tensor itself carries `sparsity`; a DENSIFY'd weight is not)
#   7  input INT16, weights INT16, output INT16
#   6  the operator lists exactly 2 inputs.  op_signature counts optional (-1) inputs, and the
#      MLIR exporter writes a missing bias as -1, so converter output has 3 inputs and never
#      hits this rule by omission of the bias.
#   5  keep_num_dims
#   4  input INT8, weights INT8, output INT8
#   10 input INT8, weights INT4, output INT8
#   9  hybrid (FLOAT32/INT8/FLOAT32) with asymmetric_quantize_inputs
#   3  hybrid without it
#   2  weights_format == SHUFFLED4x16INT8
#   1  otherwise
# ============================================================================================
def fully_connected_version(input_type: int, weight_type: int, output_type: int,
                            keep_num_dims: bool = False, sparse_weights: bool = False,
                            asymmetric_quantize_inputs: bool = False,
                            per_channel_hybrid: bool = False,
                            weights_format_shuffled: bool = False, bias_type=None, *,
                            num_inputs: int = 3, has_options: bool = True) -> int:
    """FULLY_CONNECTED version.  ``num_inputs`` is ``len(op.inputs)`` including -1 slots."""
    i, w, out = input_type, weight_type, output_type
    if i == INT16 and w == INT4 and out == INT16:
        return 13
    if i == FLOAT32 and w == INT8 and out == FLOAT32 and per_channel_hybrid:
        return 12
    if i == INT16 and w == INT8 and out == INT16 and _bias_type_set(bias_type, has_options):
        return 11
    if sparse_weights:
        return 8
    if i == INT16 and w == INT16 and out == INT16:
        return 7
    if num_inputs == 2:
        return 6
    if keep_num_dims:
        return 5
    if i == INT8 and w == INT8 and out == INT8:
        return 4
    if i == INT8 and w == INT4 and out == INT8:
        return 10
    if i == FLOAT32 and w == INT8 and out == FLOAT32:
        return 9 if asymmetric_quantize_inputs else 3
    if weights_format_shuffled:
        return 2
    return 1


# ============================================================================================
# DEQUANTIZE  (op_version.cc, case BuiltinOperator_DEQUANTIZE), first match wins:
#   6  input INT4
#   3  input INT16 or FLOAT16
#   5  input INT8, per-channel (op_signature.cc: scale count > 1 and
#      == input.shape[quantized_dimension])
#   2  input INT8, per-tensor
#   1  otherwise (UINT8)
# Version 4 exists in runtime_version.cc ("2.2.0") but no current rule produces it.
# ============================================================================================
def dequantize_version(input_type: int, per_channel: bool = False) -> int:
    if input_type == INT4:
        return 6
    if input_type in (INT16, FLOAT16):
        return 3
    if input_type == INT8:
        return 5 if per_channel else 2
    return 1


def densify_version() -> int:
    """DENSIFY has no case in GetBuiltinOperatorVersion: ``default: return 1``."""
    return 1


# --- op_signature.cc ext_options, from plain tensor facts ------------------------------------
def conv2d_is_per_channel(num_scales: int, filter_shape: Sequence[int]) -> bool:
    """CONV_2D: ``num_filters = filter.shape[0] > 0 and len(scale) == num_filters``."""
    return len(filter_shape) > 0 and filter_shape[0] > 0 and num_scales == filter_shape[0]


def conv2d_is_grouped(input_shape: Sequence[int], filter_shape: Sequence[int]) -> bool:
    """CONV_2D: ``input.shape[3] != filter.shape[3]`` if the input has a (non-empty) shape."""
    if not input_shape:
        return False
    return input_shape[3] != filter_shape[3]


def depthwise_conv2d_is_per_channel(num_scales: int, filter_shape: Sequence[int]) -> bool:
    """DEPTHWISE_CONV_2D: ``num_channels = filter.shape[3] > 0 and len(scale) == num_channels``."""
    return len(filter_shape) > 3 and filter_shape[3] > 0 and num_scales == filter_shape[3]


def fully_connected_is_per_channel(num_scales: int, weight_shape: Sequence[int]) -> bool:
    """FULLY_CONNECTED: ``len(scale) > 0``, weights have a shape, ``len(scale) == shape[0]``."""
    return num_scales > 0 and len(weight_shape) > 0 and weight_shape[0] >= 0 \
        and num_scales == weight_shape[0]


def dequantize_is_per_channel(num_scales: int, input_shape: Sequence[int],
                              quantized_dimension: int = 0) -> bool:
    """DEQUANTIZE: ``len(scale) > 1 and len(scale) == shape[quantized_dimension]``."""
    if num_scales <= 1 or not (0 <= quantized_dimension < len(input_shape)):
        return False
    return input_shape[quantized_dimension] >= 0 and num_scales == input_shape[quantized_dimension]


# ============================================================================================
# Minimum runtime versions: the entries of FindMinimumRuntimeVersionForOp's op_version_map
# (tensorflow/compiler/mlir/lite/tools/versioning/runtime_version.cc) for the five ops, all
# versions listed there.
# ============================================================================================
MIN_RUNTIME_VERSIONS: dict[Tuple[int, int], str] = {
    (CONV_2D, 1): "1.5.0",
    (CONV_2D, 2): "1.14.0",
    (CONV_2D, 3): "1.14.0",
    (CONV_2D, 4): "2.3.0",
    (CONV_2D, 5): "2.4.0",
    (CONV_2D, 6): "2.9.0",
    (CONV_2D, 7): "2.11.0",
    (CONV_2D, 8): "2.15.0",
    (DEPTHWISE_CONV_2D, 1): "1.5.0",
    (DEPTHWISE_CONV_2D, 2): "1.12.0",
    (DEPTHWISE_CONV_2D, 3): "1.14.0",
    (DEPTHWISE_CONV_2D, 4): "2.2.0",
    (DEPTHWISE_CONV_2D, 5): "2.3.0",
    (DEPTHWISE_CONV_2D, 6): "2.3.0",
    (DEPTHWISE_CONV_2D, 7): "2.11.0",
    (FULLY_CONNECTED, 1): "1.5.0",
    (FULLY_CONNECTED, 2): "1.10.0",
    (FULLY_CONNECTED, 3): "1.14.0",
    (FULLY_CONNECTED, 4): "1.14.0",
    (FULLY_CONNECTED, 5): "2.0.0",
    (FULLY_CONNECTED, 6): "2.1.0",
    (FULLY_CONNECTED, 7): "2.3.0",
    (FULLY_CONNECTED, 8): "2.3.0",
    (FULLY_CONNECTED, 9): "2.3.0",
    (FULLY_CONNECTED, 10): "2.11.0",
    (FULLY_CONNECTED, 11): "2.15.0",
    (FULLY_CONNECTED, 12): "2.17.0",
    (FULLY_CONNECTED, 13): "2.18.0",
    (DEQUANTIZE, 1): "1.13.1",
    (DEQUANTIZE, 2): "1.14.0",
    (DEQUANTIZE, 3): "1.15.0",
    (DEQUANTIZE, 4): "2.2.0",
    (DEQUANTIZE, 5): "2.7.0",
    (DEQUANTIZE, 6): "2.18.0",
    (DENSIFY, 1): "2.2.0",
}

# Versions written by the legacy (non-MLIR) quantizer that the TF converter still uses for
# int16-activation ("16x8") quantization: tensorflow/lite/tools/optimize/operator_property.cc
# (`property.version`) and model_utils.cc MakeDequantizeOperator (DEQUANTIZE 2).  These are
# what converter output contains for such ops; GetBuiltinOperatorVersion would give
# CONV_2D 8, DEPTHWISE_CONV_2D 1/2, FULLY_CONNECTED 11, DEQUANTIZE 3 (what the MLIR exporter
# writes if such a model is re-exported, e.g. via the sparsifier).
LEGACY_16X8_QUANTIZER_VERSIONS: dict[int, int] = {
    CONV_2D: 3,
    DEPTHWISE_CONV_2D: 3,
    FULLY_CONNECTED: 4,
    DEQUANTIZE: 2,
}


def _runtime_less(v1: str, v2: str) -> bool:
    """``CompareRuntimeVersion(v1, v2)``: true iff v1 precedes v2.

    Split on '.', compare the common prefix numerically (components that are not both integers
    are skipped, like ``absl::SimpleAtoi`` failing); if equal so far, v1 precedes v2 iff v2 has
    more components.
    """
    a, b = v1.split("."), v2.split(".")
    n = min(len(a), len(b))
    for x, y in zip(a[:n], b[:n]):
        try:
            xi, yi = int(x), int(y)
        except ValueError:
            continue
        if xi != yi:
            return xi < yi
    return n < len(b)


def compare_runtime_versions(a: str, b: str) -> int:
    """-1 if a < b, 1 if a > b, 0 otherwise, numerically per component ("1.14.0" > "1.5.0")."""
    if _runtime_less(a, b):
        return -1
    if _runtime_less(b, a):
        return 1
    return 0


def min_runtime_version(pairs: Iterable[Tuple[int, int]]) -> str:
    """Max runtime string over ``(builtin_code, version)`` pairs, as in
    ``UpdateMinimumRuntimeVersionForModel``: unknown pairs are skipped; "" if none is known."""
    best = ""
    for code, version in pairs:
        rt = MIN_RUNTIME_VERSIONS.get((int(code), int(version)))
        if not rt:
            continue
        if _runtime_less(best, rt):
            best = rt
    return best
