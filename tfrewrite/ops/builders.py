"""Operator builders. They create the Operator (not inserted anywhere) with options and version set.

Versions follow TFLite's op-version rules (see `versions`), computed from the tensors the op will read, so the
interpreter — with XNNPACK on or off — picks a kernel that supports exactly what we emit.
"""
from __future__ import annotations

from .. import schema
from ..graph import OpCode, Operator, Tensor
from . import versions

OP = schema.BuiltinOperator
Padding = schema.Padding
Activation = schema.ActivationFunctionType


def opcode_for(builtin: int, version: int) -> OpCode:
    return OpCode(builtin=builtin, version=max(1, int(version)))


def _num_scales(t: Tensor) -> int:
    q = t.quantization
    return len(q.scale) if q is not None and q.scale is not None else 0


def _per_channel_hybrid(x: Tensor, wtype: int, weight: Tensor, is_per_channel) -> bool:
    """A hybrid op (float input, int8 weight) whose weight counts as per-channel by TFLite's op-version rule
    (`is_per_channel` from ops.versions): one scale per output channel, which is also a single scale when the
    weight has a single output channel, as a rank-1 factor does."""
    return x.type == schema.TensorType.FLOAT32 and wtype == schema.TensorType.INT8 and \
        is_per_channel(_num_scales(weight), weight.shape)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor, out: Tensor, *, stride=(1, 1), padding=Padding.VALID,
           dilation=(1, 1), activation=Activation.NONE, weight_type: int | None = None) -> Operator:
    """CONV_2D. The builtin kernel requires a bias (conv.cc: has_bias), so callers pass a zero one if needed."""
    options = schema.Conv2DOptionsT()
    options.padding = padding
    options.strideH, options.strideW = int(stride[0]), int(stride[1])
    options.dilationHFactor, options.dilationWFactor = int(dilation[0]), int(dilation[1])
    options.fusedActivationFunction = activation
    wtype = weight.type if weight_type is None else weight_type
    version = versions.conv2d_version(x.type, wtype,
                                      per_channel_hybrid=_per_channel_hybrid(x, wtype, weight, versions.conv2d_is_per_channel),
                                      dilated=tuple(dilation) != (1, 1))
    return Operator(opcode=opcode_for(OP.CONV_2D, version), inputs=[x, weight, bias], outputs=[out],
                    builtin_options=options, builtin_options_type=schema.BuiltinOptions.Conv2DOptions)


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor, out: Tensor, *, stride=(1, 1),
                     padding=Padding.VALID, dilation=(1, 1), activation=Activation.NONE, depth_multiplier=1,
                     weight_type: int | None = None) -> Operator:
    options = schema.DepthwiseConv2DOptionsT()
    options.padding = padding
    options.strideH, options.strideW = int(stride[0]), int(stride[1])
    options.dilationHFactor, options.dilationWFactor = int(dilation[0]), int(dilation[1])
    options.fusedActivationFunction = activation
    options.depthMultiplier = int(depth_multiplier)
    wtype = weight.type if weight_type is None else weight_type
    version = versions.depthwise_conv2d_version(x.type, wtype, depth_multiplier=depth_multiplier,
                                                dilated=tuple(dilation) != (1, 1),
                                                per_channel_hybrid=_per_channel_hybrid(x, wtype, weight, versions.depthwise_conv2d_is_per_channel))
    return Operator(opcode=opcode_for(OP.DEPTHWISE_CONV_2D, version), inputs=[x, weight, bias], outputs=[out],
                    builtin_options=options, builtin_options_type=schema.BuiltinOptions.DepthwiseConv2DOptions)


def fully_connected(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, *, activation=Activation.NONE,
                    keep_num_dims=False, asymmetric_quantize_inputs=False, sparse_weights=False,
                    weight_type: int | None = None) -> Operator:
    options = schema.FullyConnectedOptionsT()
    options.fusedActivationFunction = activation
    options.keepNumDims = bool(keep_num_dims)
    options.asymmetricQuantizeInputs = bool(asymmetric_quantize_inputs)
    wtype = weight.type if weight_type is None else weight_type
    version = versions.fully_connected_version(
        x.type, wtype, out.type, keep_num_dims=keep_num_dims, sparse_weights=sparse_weights,
        asymmetric_quantize_inputs=asymmetric_quantize_inputs,
        per_channel_hybrid=_per_channel_hybrid(x, wtype, weight, versions.fully_connected_is_per_channel))
    return Operator(opcode=opcode_for(OP.FULLY_CONNECTED, version), inputs=[x, weight, bias], outputs=[out],
                    builtin_options=options, builtin_options_type=schema.BuiltinOptions.FullyConnectedOptions)


def dequantize(x: Tensor, out: Tensor) -> Operator:
    return Operator(opcode=opcode_for(OP.DEQUANTIZE, versions.dequantize_version(x.type)), inputs=[x], outputs=[out])


def densify(x: Tensor, out: Tensor) -> Operator:
    return Operator(opcode=opcode_for(OP.DENSIFY, versions.densify_version()), inputs=[x], outputs=[out],
                    builtin_options=schema.DensifyOptionsT(), builtin_options_type=schema.BuiltinOptions.DensifyOptions)
