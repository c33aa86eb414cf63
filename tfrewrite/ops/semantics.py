"""What each builtin operator means for the channels (the last axis, NHWC) of the tensors it reads and writes.

One table for every pass: which ops carry a weight and on which axes, which treat every channel on its own
(channel-wise), which map channels from their inputs to their outputs, and — by omission — which are barriers
that a channel-level rewrite must not cross. The conditions some entries carry (a MEAN that does not reduce the
channel axis, a RESHAPE that keeps it, a PAD that does not pad it) are checked by the pass that walks the graph,
on the op's constant operands.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import schema

OP = schema.BuiltinOperator


@dataclass(frozen=True)
class WeightLayout:
    """Where a layer keeps its weight and which weight axes hold its output and input channels.

    `coupled`: input channel c feeds only output channels [c·m, (c+1)·m) (depthwise, m = depth multiplier),
    so the two spaces are one; `in_axis` is then None. `data`: the input holding the activation the layer
    reads (TRANSPOSE_CONV's input 0 is its output shape, its activation is input 2)."""
    weight: int
    bias: int | None
    out_axis: int
    in_axis: int | None
    coupled: bool = False
    data: int = 0


# Layers whose input `weight` is "the weight": CONV_2D [O,kh,kw,I], FULLY_CONNECTED [O,I],
# DEPTHWISE_CONV_2D [1,kh,kw,C·m], TRANSPOSE_CONV [O,kh,kw,I] (bias is input 3; input 0 is the output shape).
LAYERS = {
    OP.CONV_2D: WeightLayout(weight=1, bias=2, out_axis=0, in_axis=3),
    OP.FULLY_CONNECTED: WeightLayout(weight=1, bias=2, out_axis=0, in_axis=1),
    OP.DEPTHWISE_CONV_2D: WeightLayout(weight=1, bias=2, out_axis=3, in_axis=None, coupled=True),
    OP.TRANSPOSE_CONV: WeightLayout(weight=1, bias=3, out_axis=0, in_axis=3, data=2),
}
# The layers the weight passes rewrite (prune, quantize, structured channel pruning).
LAYER_OPS = frozenset({OP.CONV_2D, OP.DEPTHWISE_CONV_2D, OP.FULLY_CONNECTED})
# Ops whose input 1 is a weight, for counting parameters and MACs.
WEIGHTED_OPS = frozenset(set(LAYERS) | {OP.BATCH_MATMUL, OP.CONV_3D, OP.EMBEDDING_LOOKUP})

# One input, one output, channel c of the output depends only on channel c of the input.
CHANNELWISE_UNARY = frozenset({
    OP.RELU, OP.RELU6, OP.RELU_N1_TO_1, OP.RELU_0_TO_1, OP.LEAKY_RELU, OP.HARD_SWISH, OP.LOGISTIC, OP.TANH,
    OP.ELU, OP.GELU, OP.ABS, OP.NEG, OP.SQUARE, OP.SQRT, OP.RSQRT, OP.EXP,
    OP.MAX_POOL_2D, OP.AVERAGE_POOL_2D, OP.L2_POOL_2D, OP.RESIZE_BILINEAR, OP.RESIZE_NEAREST_NEIGHBOR,
    OP.QUANTIZE, OP.DEQUANTIZE,
})
# Two operands broadcast against each other; a constant operand with a full last axis is per-channel.
CHANNELWISE_BINARY = frozenset({OP.ADD, OP.SUB, OP.MUL, OP.DIV, OP.MAXIMUM, OP.MINIMUM, OP.SQUARED_DIFFERENCE})
# PRELU: the alpha (input 1) is a per-channel constant.
PER_CHANNEL_PARAMETER = {OP.PRELU: 1}
# Channel-wise only under a condition on their constant operand (checked by the walker):
# MEAN / SUM / REDUCE_MAX over axes that exclude the last; PAD / PADV2 / MIRROR_PAD with no padding of the
# last axis; SQUEEZE of other axes; RESHAPE keeping the last dimension.
CHANNEL_REDUCTIONS = frozenset({OP.MEAN, OP.SUM, OP.REDUCE_MAX})  # axes: input 1
PADS = frozenset({OP.PAD, OP.PADV2, OP.MIRROR_PAD})  # paddings: input 1
CONDITIONAL_CHANNELWISE = CHANNEL_REDUCTIONS | PADS | {OP.SQUEEZE, OP.RESHAPE}
# Ops that map channels between their inputs and outputs: CONCATENATION (on the last axis: offsets), SPLIT /
# SPLIT_V (on the last axis: the inverse), RESHAPE flattening [.., H, W, C] → [.., H·W·C] (channel c owns
# columns c, c+C, c+2C, …).
CHANNEL_MAPPING = frozenset({OP.CONCATENATION, OP.SPLIT, OP.SPLIT_V, OP.RESHAPE})


def is_barrier(builtin: int) -> bool:
    """An op whose channel semantics the table does not know: channel rewrites stop at it."""
    return not (builtin in LAYERS or builtin in CHANNELWISE_UNARY or builtin in CHANNELWISE_BINARY
                or builtin in PER_CHANNEL_PARAMETER or builtin in CONDITIONAL_CHANNELWISE
                or builtin in CHANNEL_MAPPING)
