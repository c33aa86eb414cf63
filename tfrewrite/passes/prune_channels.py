"""Structured channel pruning: remove whole channels, so that every runtime runs a smaller dense model.

Channels that must go together form a group. The walk gives every activation tensor's channel axis (the last,
NHWC) a range of nodes in a union-find and joins the nodes an op ties together, following the op-semantics
table (`ops/semantics.py`): channel-wise ops join channel c of their input and output, a residual ADD joins
both operands, CONCATENATION maps with offsets, SPLIT the inverse, a flatten into FULLY_CONNECTED gives
channel c the columns c, c+C, c+2C, …, DEPTHWISE_CONV_2D maps input c to outputs [c·m, (c+1)·m). A connected
set of nodes is one removable channel (a unit); units that touch the same tensors form a group, pruned to the
same share. Any op the table does not know, a subgraph input or output, or a weight not stored as a plain
constant freezes the tensors it touches: groups touching them stay as they are. A constant other ops also read
(a shared weight) is sliced on a copy of its own (`analysis.private_weight`): the other readers keep theirs.

A removed channel does not output zero: after batch-norm folding it outputs act(bias), carried through the
channel-wise ops to the next layers, whose biases absorb it (exact for 1×1, FULLY_CONNECTED and VALID
padding; at SAME borders it is the interior value). Removing is physical: weights, biases, per-channel
quantization, PRELU alphas, constant operands, every tensor's shape and shape signature, RESHAPE targets and
SPLIT_V sizes are sliced; nothing gathers at run time. Kept counts are multiples of `--channel-multiple`.

Without data, a group keeps the channels with the largest summed normalized weight norms (output rows of the
layers that write them, input columns of the layers that read them). With calibration data the choice and
the refit are in `linalg/channels.py`: channels are removed greedily where the next layers' outputs change
least (ThiNet / He et al. 2017), then each reading layer is refitted by least squares with a bias term.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .. import schema
from ..analysis import Stored, macs, numel, private_weight, stored
from ..graph import Model, Operator, Subgraph, Tensor
from ..linalg.svd import single_threaded_lapack
from ..ops import semantics
from ..report import Entry
from .common import new_entry

OP = schema.BuiltinOperator
T = schema.TensorType
ACT = schema.ActivationFunctionType
DEFAULT_MULTIPLE = 8
AUTO = "auto"  # `--prune-channels auto`: the budget (`budget.plan_channels`) chooses each group's share
# The shares of a group's channels the budget may remove (each rounded to the channel multiple).
BUDGET_SHARES = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


class Barrier(Exception):
    """The op cannot be followed channel by channel; the message says why."""


@dataclass(eq=False)
class Layer:
    """A CONV_2D / FULLY_CONNECTED / DEPTHWISE_CONV_2D whose weight (and bias) can be sliced. Its constants are
    looked up through the op's inputs each time (a private copy or a new bias is seen at once)."""
    op: Operator
    layout: semantics.WeightLayout

    @property
    def stored(self) -> Stored:
        """The weight: float32, float16 behind DEQUANTIZE, or int8."""
        return _constant(self.op.inputs[self.layout.weight])

    @property
    def weight(self) -> Tensor:
        return self.stored.tensor

    @property
    def bias_stored(self) -> Stored | None:
        """The bias: float32, int32, or float16 behind DEQUANTIZE; None when the layer has none."""
        ins = self.op.inputs
        return _constant(ins[self.layout.bias]) if len(ins) > self.layout.bias else None

    @property
    def bias(self) -> Tensor | None:
        b = self.bias_stored
        return b.tensor if b is not None else None

    @property
    def out_channels(self) -> int:
        return self.weight.shape[self.layout.out_axis]


@dataclass(eq=False)
class ChannelGroup:
    """Units (each a set of union-find nodes that go together) touching the same tensors."""
    units: list[np.ndarray]
    tensors: list[Tensor]
    members: list[Operator]
    producers: list[Layer]   # layers writing the channels (their output rows)
    readers: list[Layer]     # layers reading them (their input columns); depthwise layers are members only
    reason: str | None = None
    keep: int | None = None
    chosen: np.ndarray | None = None  # indices into `units` that stay
    selection: str | None = None

    @property
    def channels(self) -> int:
        return len(self.units)


@dataclass(eq=False)
class ChannelGraph:
    sg: Subgraph
    parent: list[int] = field(default_factory=list)
    start: dict = field(default_factory=dict)     # id(tensor) → first node
    tensors: dict = field(default_factory=dict)   # id(tensor) → Tensor
    frozen: dict = field(default_factory=dict)    # id(tensor) → reason
    layers: dict = field(default_factory=dict)    # id(op) → Layer
    edges: list = field(default_factory=list)     # (op, src tensor, src idx, dst tensor, dst idx)
    members: dict = field(default_factory=dict)   # id(tensor) → ops touching it

    # --- union-find -----------------------------------------------------------------------------------
    def space(self, t: Tensor) -> int:
        if id(t) not in self.start:
            c = channels_of(t)
            self.start[id(t)] = len(self.parent)
            self.tensors[id(t)] = t
            self.parent.extend(range(len(self.parent), len(self.parent) + c))
        return self.start[id(t)]

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def join(self, op, src: Tensor, src_idx, dst: Tensor, dst_idx, flows: bool = True) -> None:
        """Channel src[src_idx[k]] and dst[dst_idx[k]] go together; `flows`: the op computes the second from
        the first (an edge that removed channels' constants follow)."""
        src_idx, dst_idx = np.asarray(src_idx, np.int64), np.asarray(dst_idx, np.int64)
        a0, b0 = self.space(src), self.space(dst)
        for a, b in zip((src_idx + a0).tolist(), (dst_idx + b0).tolist()):
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self.parent[ra] = rb
        if flows:
            self.edges.append((op, src, src_idx, dst, dst_idx))

    def touch(self, op, *tensors) -> None:
        for t in tensors:
            self.space(t)
            self.members.setdefault(id(t), []).append(op)

    def freeze(self, t: Tensor, reason: str) -> None:
        if channels_of(t) is None:
            return
        self.space(t)
        self.frozen.setdefault(id(t), reason)


def channels_of(t: Tensor | None) -> int | None:
    if t is None or t.is_constant or not t.shape or t.shape[-1] <= 0:
        return None
    return int(t.shape[-1])


def _constant(t: Tensor | None) -> Stored | None:
    """The constant behind `t` as the walk follows it: read directly or through one DEQUANTIZE."""
    s = stored(t)
    if s is None or len(s.carriers) > 1 or (s.carrier is not None and s.carrier.builtin != OP.DEQUANTIZE):
        return None
    return s


def _own_constants(op: Operator) -> None:
    """Before `op`'s constants change: give it copies of those other ops also read (a shared weight, read
    directly or through one DEQUANTIZE), over the same bytes until they change."""
    for i in range(len(op.inputs)):
        if _constant(op.inputs[i]) is not None:
            private_weight(op, i)


def _axis(value: int, rank: int) -> int:
    return value + rank if value < 0 else value


def _int_values(t: Tensor | None) -> list[int] | None:
    c = _constant(t)
    if c is None or c.tensor.data is None:
        return None
    return [int(v) for v in np.asarray(c.tensor.data).reshape(-1)]


# ------------------------------------------------------------------------------------------------ the walk
def build_graph(sg: Subgraph) -> ChannelGraph:
    """Link the channel spaces of one subgraph; freeze what the table cannot follow."""
    g = ChannelGraph(sg)
    carriers = {id(op.outputs[0]) for op in sg.operators
                if op.builtin == OP.DEQUANTIZE and op.inputs[0] is not None and op.inputs[0].is_constant}
    for op in sg.operators:
        if op.outputs and id(op.outputs[0]) in carriers:
            continue  # a weight carrier, handled with its reader
        layout = semantics.LAYERS.get(op.builtin)
        if layout is not None:  # a layer ties only its activation input and output (not its shape operand)
            acts = [op.inputs[layout.data] if len(op.inputs) > layout.data else None, op.outputs[0]]
        else:
            acts = list(op.inputs) + list(op.outputs)
        acts = [t for t in acts if channels_of(t) is not None and id(t) not in carriers]
        try:
            _link(g, op)
            g.touch(op, *acts)
        except Barrier as e:
            for t in acts:
                g.freeze(t, f"{op.name}: {e}")
    for t in sg.inputs:
        g.freeze(t, "a subgraph input")
    for t in sg.outputs:
        g.freeze(t, "a subgraph output")
    for t in list(g.tensors.values()):
        q = t.quantization
        if q is not None and q.scale is not None and len(q.scale) > 1:
            g.freeze(t, "per-channel quantized activation")
    return g


def _link(g: ChannelGraph, op: Operator) -> None:
    b = op.builtin
    ins = op.inputs
    if semantics.is_barrier(b):
        raise Barrier("op not known to the channel table")
    if b in semantics.LAYERS:
        if b not in semantics.LAYER_OPS:
            raise Barrier("not pruned by channels yet")
        layout = semantics.LAYERS[b]
        x, y = ins[0], op.outputs[0]
        w = _constant(ins[layout.weight] if len(ins) > layout.weight else None)
        weight = w.tensor if w is not None else None
        if weight is None or weight.data is None:
            raise Barrier("weight is not a dense constant")
        if weight.type not in (T.FLOAT32, T.FLOAT16, T.INT8):
            raise Barrier(f"{weight.type_name} weight")
        if w.values() is None:
            raise Barrier("int8 weight without a scale")
        bias_input = ins[layout.bias] if len(ins) > layout.bias else None
        bias = _constant(bias_input)
        if bias_input is not None and (bias is None or bias.tensor.data is None):
            raise Barrier("bias is not a constant")
        if channels_of(x) is None or channels_of(y) is None:
            raise Barrier("activation without a known channel count")
        wshape = weight.shape
        if y.shape[-1] != wshape[layout.out_axis]:
            raise Barrier("output channels do not match the weight")
        if layout.coupled:
            m = wshape[3] // x.shape[-1] if x.shape[-1] else 0
            if m < 1 or m * x.shape[-1] != wshape[3]:
                raise Barrier("depth multiplier does not match")
            c = np.arange(x.shape[-1])
            g.join(op, x, np.repeat(c, m), y, np.arange(wshape[3]))
        elif x.shape[-1] != wshape[layout.in_axis]:
            grouped = op.builtin == OP.CONV_2D and wshape[layout.in_axis] and x.shape[-1] % wshape[layout.in_axis] == 0
            raise Barrier(f"grouped convolution ({x.shape[-1] // wshape[layout.in_axis]} groups)" if grouped
                          else "input is flattened implicitly")
        g.space(x), g.space(y)
        g.layers[id(op)] = Layer(op, layout)
        return
    if b in semantics.CHANNELWISE_UNARY or b in semantics.PER_CHANNEL_PARAMETER:
        x, y = ins[0], op.outputs[0]
        if channels_of(x) is None or channels_of(y) != channels_of(x):
            raise Barrier("channel counts differ")
        if b in semantics.PER_CHANNEL_PARAMETER:
            _check_channel_constant(ins[semantics.PER_CHANNEL_PARAMETER[b]], y)
        if b == OP.QUANTIZE and (y.quantization is None or len(y.quantization.scale or []) != 1):
            raise Barrier("not per-tensor quantization")
        c = np.arange(y.shape[-1])
        g.join(op, x, c, y, c)
        return
    if b in semantics.CHANNELWISE_BINARY:
        y = op.outputs[0]
        if channels_of(y) is None:
            raise Barrier("output without a known channel count")
        c = np.arange(y.shape[-1])
        for t in ins[:2]:
            if t is None:
                raise Barrier("missing operand")
            if _constant(t) is not None:
                _check_channel_constant(t, y)
            elif t.shape and t.shape[-1] == y.shape[-1]:
                g.join(op, t, c, y, c)
            elif not t.shape or t.shape[-1] != 1:
                raise Barrier("operand broadcasts over channels in a way not followed")
        return
    if b in semantics.CHANNEL_REDUCTIONS or b == OP.SQUEEZE:
        x, y = ins[0], op.outputs[0]
        if channels_of(x) is None:
            raise Barrier("input without a known channel count")
        rank = len(x.shape)
        if b == OP.SQUEEZE:
            axes = list(getattr(op.builtin_options, "squeezeDims", None) or [])
            if not axes and x.shape[-1] == 1:
                raise Barrier("squeezes the channel axis")
        else:
            axes = _int_values(ins[1])
            if axes is None:
                raise Barrier("reduction axes are not constant")
        if rank - 1 in {_axis(a, rank) for a in axes} or channels_of(y) != x.shape[-1]:
            raise Barrier("reduces the channel axis")
        c = np.arange(x.shape[-1])
        g.join(op, x, c, y, c)
        return
    if b in semantics.PADS:
        x, y = ins[0], op.outputs[0]
        pads = _int_values(ins[1])
        if channels_of(x) is None or pads is None or pads[-2:] != [0, 0] or channels_of(y) != x.shape[-1]:
            raise Barrier("pads the channel axis (or paddings not constant)")
        c = np.arange(x.shape[-1])
        g.join(op, x, c, y, c)
        return
    if b == OP.RESHAPE:
        x, y = ins[0], op.outputs[0]
        if channels_of(x) is None or channels_of(y) is None:
            raise Barrier("unknown shapes")
        if len(ins) > 1 and ins[1] is not None and _constant(ins[1]) is None:
            raise Barrier("shape is computed at run time")
        cx = x.shape[-1]
        if y.shape[-1] == cx and numel(y.shape[:-1]) == numel(x.shape[:-1]):
            c = np.arange(cx)
            g.join(op, x, c, y, c)
            return
        if len(x.shape) == 4 and len(y.shape) == 2 and y.shape[0] == x.shape[0] and y.shape[1] == numel(x.shape[1:]):
            pixels = numel(x.shape[1:3])  # flatten: column (h·W + w)·C + c belongs to channel c
            g.join(op, x, np.tile(np.arange(cx), pixels), y, np.arange(pixels * cx))
            return
        raise Barrier("reshape mixes channels")
    if b == OP.CONCATENATION:
        y = op.outputs[0]
        if channels_of(y) is None or any(channels_of(t) is None for t in ins):
            raise Barrier("constant or shapeless operand")
        axis = _axis(int(op.builtin_options.axis), len(y.shape))
        offset = 0
        for t in ins:
            c = np.arange(t.shape[-1])
            g.join(op, t, c, y, c + (offset if axis == len(y.shape) - 1 else 0))
            offset += t.shape[-1]
        return
    if b in (OP.SPLIT, OP.SPLIT_V):
        x = ins[1] if b == OP.SPLIT else ins[0]
        axis_t = ins[0] if b == OP.SPLIT else ins[2]
        axes = _int_values(axis_t)
        if channels_of(x) is None or axes is None or any(channels_of(t) is None for t in op.outputs):
            raise Barrier("unknown shapes or axis")
        if b == OP.SPLIT_V and _constant(ins[1]) is None:
            raise Barrier("sizes are not a constant")
        last = _axis(axes[0], len(x.shape)) == len(x.shape) - 1
        offset = 0
        for t in op.outputs:
            c = np.arange(t.shape[-1])
            g.join(op, x, c + (offset if last else 0), t, c)
            if b == OP.SPLIT and last:  # SPLIT cuts equal pieces: channel c of every piece goes together
                g.join(op, op.outputs[0], c, t, c, flows=False)
            offset += t.shape[-1]
        return
    raise Barrier("op not known to the channel table")


def _check_channel_constant(t: Tensor | None, y: Tensor) -> None:
    if t is None or not t.is_constant or t.data is None:
        raise Barrier("operand is not a constant")
    if t.shape and t.shape[-1] != y.shape[-1] and t.shape[-1] != 1:
        raise Barrier("constant broadcasts over channels in a way not followed")


# ------------------------------------------------------------------------------------------------ groups
def find_groups(g: ChannelGraph) -> list[ChannelGroup]:
    """Units (connected node sets) grouped by the tensors they touch, in order of the first tensor's node."""
    n = len(g.parent)
    roots = np.fromiter((g.find(i) for i in range(n)), np.int64, n)
    owner = np.empty(n, np.int64)  # node → index into `order`
    order = list(g.start.items())
    for k, (tid, s) in enumerate(order):
        owner[s:s + channels_of(g.tensors[tid])] = k
    units_by_root: dict[int, list[int]] = {}
    for i, r in enumerate(roots.tolist()):
        units_by_root.setdefault(r, []).append(i)
    by_key: dict[tuple, list[np.ndarray]] = {}
    for nodes in units_by_root.values():
        nodes = np.asarray(nodes, np.int64)
        key = tuple(sorted(set(owner[nodes].tolist())))
        by_key.setdefault(key, []).append(nodes)
    groups = []
    for key, units in sorted(by_key.items(), key=lambda kv: kv[1][0].min()):
        units.sort(key=lambda u: u.min())
        tensors = [g.tensors[order[k][0]] for k in key]
        members = []
        for t in tensors:
            for op in g.members.get(id(t), []):
                if all(op is not m for m in members):
                    members.append(op)
        op_rank = {id(op): i for i, op in enumerate(g.sg.operators)}
        members.sort(key=lambda op: op_rank[id(op)])
        tids = {id(t) for t in tensors}
        producers = [g.layers[id(op)] for op in members if id(op) in g.layers and not g.layers[id(op)].layout.coupled
                     and id(op.outputs[0]) in tids]
        readers = [g.layers[id(op)] for op in members if id(op) in g.layers and not g.layers[id(op)].layout.coupled
                   and id(op.inputs[0]) in tids]
        group = ChannelGroup(units=units, tensors=tensors, members=members, producers=producers, readers=readers)
        frozen = [g.frozen[id(t)] for t in tensors if id(t) in g.frozen]
        if frozen:
            group.reason = frozen[0]
        elif not producers:
            group.reason = "no layer writes these channels"
        groups.append(group)
    return groups


def candidates(model: Model, ctx) -> list[tuple[Subgraph, ChannelGraph, list[ChannelGroup]]]:
    """Every subgraph's channel groups; a group's `reason` says why it cannot be pruned, else None."""
    out = []
    for sg in model.subgraphs:
        g = build_graph(sg)
        groups = find_groups(g)
        for group in groups:
            if group.reason is None:
                lead = group.producers[0].op
                group.reason = ctx.reason_to_skip(lead, numel(group.producers[0].weight.shape))
            if group.reason is None and not ctx.settings(group.producers[0].op).prune_channels:
                group.reason = "no channel pruning asked for"
        out.append((sg, g, groups))
    return out


def asked(groups: list[ChannelGroup], ctx):
    """(group, its share or AUTO, its channel multiple) for every group that may be pruned."""
    for group in groups:
        if group.reason is None:
            settings = ctx.settings(group.producers[0].op)
            share = settings.prune_channels
            yield group, share if share == AUTO else float(share), settings.channel_multiple or DEFAULT_MULTIPLE


def kept_count(n: int, fraction: float, multiple: int) -> int:
    """Channels kept when `fraction` of `n` go, rounded up to a multiple (never more than n)."""
    keep = math.ceil(n * (1 - fraction) - 1e-9)
    keep = max(multiple, -(-keep // multiple) * multiple)
    return min(n, keep)


# ------------------------------------------------------------------------------------------- choosing
def _unit_positions(g: ChannelGraph, group: ChannelGroup, t: Tensor) -> list[np.ndarray]:
    """For each unit, the indices it owns on tensor t's channel axis."""
    s = g.start[id(t)]
    c = channels_of(t)
    return [u[(u >= s) & (u < s + c)] - s for u in group.units]


def norm_scores(g: ChannelGraph, group: ChannelGroup) -> np.ndarray:
    """Per unit: the summed, per-layer normalized norms of the weight slices that read or write it."""
    score = np.zeros(group.channels)
    for layer, tensor, axis in ([(p, p.op.outputs[0], p.layout.out_axis) for p in group.producers]
                                + [(r, r.op.inputs[0], r.layout.in_axis) for r in group.readers]):
        w = layer.stored.values()
        w = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        sq = np.einsum("ij,ij->i", w, w, dtype=np.float64)
        norms = np.array([math.sqrt(sq[idx].sum()) for idx in _unit_positions(g, group, tensor)])
        mean = norms.mean()
        if mean > 0:
            score += norms / mean
    return score


# ------------------------------------------------------------------------------------------- removed values
_UNARY = {
    OP.RELU: lambda v, op: np.maximum(v, 0), OP.RELU6: lambda v, op: np.clip(v, 0, 6),
    OP.RELU_N1_TO_1: lambda v, op: np.clip(v, -1, 1), OP.RELU_0_TO_1: lambda v, op: np.clip(v, 0, 1),
    OP.LEAKY_RELU: lambda v, op: np.where(v >= 0, v, v * op.builtin_options.alpha),
    OP.HARD_SWISH: lambda v, op: v * np.clip(v + 3, 0, 6) / 6, OP.LOGISTIC: lambda v, op: 1 / (1 + np.exp(-v)),
    OP.TANH: lambda v, op: np.tanh(v), OP.ABS: lambda v, op: np.abs(v), OP.NEG: lambda v, op: -v,
    OP.SQUARE: lambda v, op: v * v, OP.EXP: lambda v, op: np.exp(v),
    OP.ELU: lambda v, op: np.where(v >= 0, v, np.expm1(np.minimum(v, 0))),
}
# A constant input gives a constant output (per channel, away from SAME borders).
_PASS_THROUGH = {OP.MAX_POOL_2D, OP.AVERAGE_POOL_2D, OP.RESIZE_BILINEAR, OP.RESIZE_NEAREST_NEIGHBOR, OP.QUANTIZE,
                 OP.DEQUANTIZE, OP.MEAN, OP.REDUCE_MAX, OP.SQUEEZE, OP.PAD, OP.PADV2, OP.MIRROR_PAD, OP.RESHAPE,
                 OP.CONCATENATION, OP.SPLIT, OP.SPLIT_V}
_BINARY = {OP.ADD: np.add, OP.SUB: np.subtract, OP.MUL: np.multiply, OP.DIV: np.divide, OP.MAXIMUM: np.maximum,
           OP.MINIMUM: np.minimum, OP.SQUARED_DIFFERENCE: lambda a, b: (a - b) ** 2}


def fused(v: np.ndarray, op: Operator) -> np.ndarray:
    act = getattr(op.builtin_options, "fusedActivationFunction", ACT.NONE) if op.builtin_options is not None else ACT.NONE
    if act == ACT.RELU:
        return np.maximum(v, 0)
    if act == ACT.RELU6:
        return np.clip(v, 0, 6)
    if act == ACT.RELU_N1_TO_1:
        return np.clip(v, -1, 1)
    if act == ACT.NONE:
        return v
    return np.full_like(v, np.nan)  # TANH / SIGN_BIT: not followed


def bias_real(layer: Layer, channels: int) -> np.ndarray:
    """The bias in real units (an int32 bias is at s_in · s_w)."""
    if layer.bias is None:
        return np.zeros(channels)
    b = np.asarray(layer.bias.data, np.float64)
    if layer.bias.type == T.INT32:
        q = layer.bias.quantization
        b = b * np.asarray(q.scale, np.float64).reshape(-1)
    return b


def removed_values(g: ChannelGraph, removed: dict) -> dict:
    """id(tensor) → {channel index: the constant a removed channel carries there (NaN when not constant)}.

    `removed`: id(tensor) → array of removed channel indices. Producers output act(bias); channel-wise ops
    are applied to the constants; a depthwise conv scales by the summed kernel and adds its bias."""
    values: dict[int, dict[int, float]] = {}
    edges_by_op: dict[int, list] = {}
    for e in g.edges:
        edges_by_op.setdefault(id(e[0]), []).append(e)
    for op in g.sg.operators:
        for y in op.outputs:
            if id(y) not in removed:
                continue
            idx = removed[id(y)]
            out = values.setdefault(id(y), {})
            layer = g.layers.get(id(op))
            if layer is not None and not layer.layout.coupled:
                v = fused(bias_real(layer, y.shape[-1])[idx], op)
                out.update(zip(idx.tolist(), v.tolist()))
                continue
            if layer is not None:  # depthwise
                w = layer.stored.values().reshape(-1, y.shape[-1]).sum(axis=0)
                b = bias_real(layer, y.shape[-1])
                src = _gather(values, edges_by_op.get(id(op), []), y, idx)[0]
                out.update(zip(idx.tolist(), fused(src * w[idx] + b[idx], op).tolist()))
                continue
            operands = _gather(values, edges_by_op.get(id(op), []), y, idx)
            if op.builtin in _BINARY:
                terms = []
                for t in op.inputs[:2]:
                    c = _constant(t)
                    if c is not None:
                        d = np.asarray(c.tensor.data, np.float64).reshape(-1) if c.tensor.data.size else np.zeros(1)
                        terms.append(d[idx] if d.size == y.shape[-1] and y.shape[-1] > 1 else np.full(len(idx), d[0]))
                    elif t.shape and t.shape[-1] == y.shape[-1]:
                        terms.append(operands.pop(0) if operands else np.full(len(idx), np.nan))
                    else:
                        terms.append(np.full(len(idx), np.nan))  # a broadcast activation (an SE gate)
                v = fused(_BINARY[op.builtin](terms[0], terms[1]), op)
            elif op.builtin == OP.PRELU:
                alpha = np.asarray(op.inputs[1].data, np.float64).reshape(-1)
                a = alpha[idx] if alpha.size > 1 else np.full(len(idx), alpha[0])
                v = np.where(operands[0] >= 0, operands[0], operands[0] * a)
            elif op.builtin in _UNARY:
                v = _UNARY[op.builtin](operands[0], op)
            elif op.builtin in _PASS_THROUGH:
                v = operands[0]
                for other in operands[1:]:  # CONCATENATION: each input covers its own range
                    v = np.where(np.isnan(v), other, v)
                if op.builtin == OP.SUM:
                    v = v * numel(op.inputs[0].shape) / numel(y.shape)
            else:
                v = np.full(len(idx), np.nan)
            out.update(zip(idx.tolist(), np.asarray(v, np.float64).tolist()))
    return values


def _gather(values: dict, edges: list, y: Tensor, idx: np.ndarray) -> list[np.ndarray]:
    """The source values of output channels `idx` of y, one array per edge into y (operand order)."""
    out = []
    for _, src, s_idx, dst, d_idx in edges:
        if dst is not y:
            continue
        where = {int(d): int(s) for s, d in zip(s_idx, d_idx)}
        vals = values.get(id(src), {})
        out.append(np.array([vals.get(where.get(int(i), -1), np.nan) for i in idx], np.float64))
    return out or [np.full(len(idx), np.nan)]


# ------------------------------------------------------------------------------------------- slicing
def _slice_constant(c: Stored, keep: np.ndarray, axis: int) -> None:
    """Keep entries `keep` along `axis` of a constant (and its per-channel quantization); the tensors its
    carriers write take the new shape."""
    c.tensor.take(keep, axis)
    for carrier in c.carriers:
        carrier.outputs[0].shape = list(c.tensor.shape)
        carrier.outputs[0].shape_signature = None


def _set_channels(t: Tensor, count: int) -> None:
    t.shape = list(t.shape[:-1]) + [count]
    if t.shape_signature is not None and len(t.shape_signature) and t.shape_signature[-1] >= 0:
        t.shape_signature = list(t.shape_signature[:-1]) + [count]


def apply(g: ChannelGraph, removed: dict, fold: bool = True, skip_fold: set = frozenset()) -> None:
    """Slice every op and tensor of g's subgraph that touches a removed channel; with `fold`, removed
    channels' constants move into the biases of the layers that read them (except the layers in
    `skip_fold`, already refitted with the mean of what they lose)."""
    sg = g.sg
    keeps = {tid: np.setdiff1d(np.arange(channels_of(g.tensors[tid])), idx) for tid, idx in removed.items()}
    values = removed_values(g, removed) if fold else {}
    for op in list(sg.operators):
        if any(t is not None and id(t) in keeps for t in list(op.inputs) + list(op.outputs)):
            _own_constants(op)
    for op in sg.operators:
        layer = g.layers.get(id(op))
        if layer is not None:
            _slice_layer(sg, layer, keeps, removed, {} if id(op) in skip_fold else values)
            continue
        y = op.outputs[0] if op.outputs else None
        if op.builtin in semantics.CHANNELWISE_BINARY or op.builtin in semantics.PER_CHANNEL_PARAMETER:
            if y is not None and id(y) in keeps:
                for t in op.inputs[:2]:
                    c = _constant(t)
                    if c is not None and c.tensor.shape and c.tensor.shape[-1] == channels_of(y) and channels_of(y) > 1:
                        _slice_constant(c, keeps[id(y)], -1)
        elif op.builtin == OP.RESHAPE and y is not None and id(y) in keeps:
            new_last = len(keeps[id(y)])
            opts = op.builtin_options
            if opts is not None and getattr(opts, "newShape", None) is not None and len(opts.newShape):
                shape = list(opts.newShape)
                if shape[-1] != -1:
                    shape[-1] = new_last
                opts.newShape = shape
            if len(op.inputs) > 1 and op.inputs[1] is not None:
                c = _constant(op.inputs[1]).tensor
                shape = np.asarray(c.data).copy()
                if shape[-1] != -1:
                    shape[-1] = new_last
                c.set_data(shape)
        elif op.builtin == OP.SPLIT_V and any(id(t) in keeps for t in op.outputs):
            c = _constant(op.inputs[1]).tensor
            sizes = np.array([len(keeps[id(t)]) if id(t) in keeps else channels_of(t) for t in op.outputs],
                             np.asarray(c.data).dtype)
            c.set_data(sizes)
    for tid, keep in keeps.items():
        _set_channels(g.tensors[tid], len(keep))


def _slice_layer(sg: Subgraph, layer: Layer, keeps: dict, removed: dict, values: dict) -> None:
    op, lay = layer.op, layer.layout
    x, y = op.inputs[0], op.outputs[0]
    if id(x) in keeps and not lay.coupled:
        idx = removed[id(x)]
        vals = np.array([values.get(id(x), {}).get(int(i), 0.0) for i in idx], np.float64)
        vals = np.nan_to_num(vals)  # a channel that is not constant downstream (an SE gate) is dropped
        if np.any(vals):
            cols = np.take(layer.stored.values().astype(np.float64), idx, axis=lay.in_axis)
            cols = np.moveaxis(cols, lay.in_axis, -1).reshape(cols.shape[lay.out_axis], -1, len(idx)).sum(axis=1)
            _add_to_bias(sg, layer, cols @ vals)
        _slice_constant(layer.stored, keeps[id(x)], lay.in_axis)
    if id(y) in keeps:
        keep = keeps[id(y)]
        _slice_constant(layer.stored, keep, lay.out_axis)
        if layer.bias_stored is not None:
            _slice_constant(layer.bias_stored, keep, 0)


def _add_to_bias(sg: Subgraph, layer: Layer, shift: np.ndarray) -> None:
    """bias += shift (real units); an int32 bias moves in its own scale, a missing one is created."""
    op = layer.op
    if layer.bias is None:
        if op.inputs[0].type != T.FLOAT32:
            return  # an integer layer without a bias: nothing to hold the constant
        bias = sg.add_constant(op.outputs[0].name + "/bias", shift.astype(np.float32))
        while len(op.inputs) <= layer.layout.bias:
            op.inputs.append(None)
        op.inputs[layer.layout.bias] = bias
        return
    b = layer.bias
    if b.type == T.INT32:
        scale = np.asarray(b.quantization.scale, np.float64).reshape(-1)
        new = np.asarray(b.data, np.int64) + np.round(shift / scale).astype(np.int64)
        q = b.quantization
        b.set_data(np.clip(new, -2**31, 2**31 - 1).astype(np.int32))
        b.quantization = q
    else:
        q = b.quantization
        b.set_data((np.asarray(b.data, np.float64) + shift).astype(b.dtype))
        b.quantization = q


# ------------------------------------------------------------------------------------------------ the pass
def layer_cost(layer: Layer) -> tuple[int, int]:
    """(params, MACs) of a layer as it stands."""
    params = numel(layer.weight.shape) + (numel(layer.bias.shape) if layer.bias is not None else 0)
    return params, macs(layer.op, layer.weight)


@dataclass(eq=False)
class ReaderData:
    """A reading layer's calibration rows (real values), their mean and, when affordable, covariance."""
    rows: np.ndarray
    mean: np.ndarray
    cov: np.ndarray | None
    halves: tuple | None = None  # covariances of the first and second half of the rows (for the budget)

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """The two halves' covariances. Rows come in sample order, so the halves hold different samples."""
        from ..linalg import channels as ch
        if self.halves is None:
            mid = len(self.rows) // 2
            self.halves = (ch.moments(self.rows[:mid])[1], ch.moments(self.rows[mid:])[1])
        return self.halves


def reader_columns(layer: Layer, channels: np.ndarray) -> np.ndarray:
    """The layer's input columns (rows as calibrate samples them: FC inputs, or k·k·C patches in kernel
    order [kh, kw, C]) that belong to the given input channels."""
    if layer.op.builtin == OP.FULLY_CONNECTED:
        return np.asarray(channels, np.int64)
    _, kh, kw, c = layer.weight.shape
    return (np.arange(kh * kw)[:, None] * c + np.asarray(channels, np.int64)[None, :]).reshape(-1)


def weight_matrix(layer: Layer) -> np.ndarray:
    w = layer.stored.values()
    return w.reshape(w.shape[0], -1)


def collect_reader_data(model: Model, readers: list[Layer], samples, moments: bool = True) -> dict:
    """id(op) → ReaderData for layers of the main subgraph, on the model as it is now."""
    from .. import calibrate
    from ..linalg import channels as ch
    ops_ = [r.op for r in readers if r.op in model.main.operators]
    collected = calibrate.collect(model, samples, ops_)
    out = {}
    for r in readers:
        if id(r.op) not in collected:
            continue
        rows = collected[id(r.op)].rows.astype(np.float64)  # real values, also for int8 inputs
        mean, cov = ch.moments(rows, full=moments and rows.shape[1] <= ch.FULL_COLUMNS)
        out[id(r.op)] = ReaderData(rows, mean, cov)
    return out


def reader_grams(g: ChannelGraph, group: ChannelGroup, data: dict) -> list[tuple[Layer, np.ndarray]] | None:
    """Per reading layer, its unit Gram matrix divided by its output variance (`linalg.channels`): removing
    units R changes that layer's output by a relative √(Σ_{u,v ∈ R} G[u, v]) before any refit. None without
    data for every reader."""
    from ..linalg import channels as ch
    readers = [r for r in group.readers if id(r.op) in data]
    if not readers or len(readers) < len(group.readers):
        return None
    out = []
    for r in readers:
        d = data[id(r.op)]
        w = weight_matrix(r)
        units = [reader_columns(r, idx) for idx in _unit_positions(g, group, r.op.inputs[0])]
        var = ch.output_variance(w, d.cov, d.rows)
        gram = ch.unit_gram(w, units, d.cov, d.rows) / var if var > 0 else np.zeros((group.channels,) * 2)
        out.append((r, gram))
    return out


def reader_data(model: Model, ctx, readers: list[Layer], samples) -> dict:
    """`collect_reader_data`, kept in `ctx.layer_data` for the refit: the budget and the choice share one
    collection."""
    have = {id(r.op) for r in readers if ("channels", id(r.op)) in ctx.layer_data}
    fresh = collect_reader_data(model, [r for r in readers if id(r.op) not in have], samples)
    ctx.layer_data.update({("channels", k): v for k, v in fresh.items()})
    return {id(r.op): ctx.layer_data[("channels", id(r.op))] for r in readers
            if ("channels", id(r.op)) in ctx.layer_data}


def reconstruction_removal(g: ChannelGraph, group: ChannelGroup, data: dict, remove: int) -> np.ndarray | None:
    """Units to remove so that the reading layers' outputs change least (None without data for them)."""
    from ..linalg import channels as ch
    grams = reader_grams(g, group, data)
    if grams is None:
        return None
    return ch.greedy_removal(sum(gram for _, gram in grams), remove)


def choose(model: Model, ctx, samples=None) -> list[tuple[Subgraph, ChannelGraph, list[ChannelGroup], dict]]:
    """Per subgraph: its channel graph, groups (with the kept units chosen) and the removed channels
    (id(tensor) → sorted indices). Nothing is changed yet. With `samples` (calibration inputs) the choice
    follows the reading layers' outputs, whose data is kept in `ctx.layer_data` for the refit."""
    out = []
    for sg, g, groups in candidates(model, ctx):
        removed: set[int] = set()
        todo = []
        for group, share, multiple in asked(groups, ctx):
            if share == AUTO:
                keep = ctx.channel_budget.get(id(group.producers[0].op), "not considered by the budget")
                if isinstance(keep, str):
                    group.reason = keep
                    continue
                group.keep = keep
            else:
                group.keep = kept_count(group.channels, share, multiple)
            if group.keep >= group.channels:
                group.reason = f"{group.channels} channels: nothing to remove at multiples of {multiple}"
                continue
            todo.append(group)
        data = {}
        if samples and sg is model.main and todo:
            readers = list({id(r.op): r for group in todo for r in group.readers}.values())
            data = reader_data(model, ctx, readers, samples)
        for group in todo:
            drop = reconstruction_removal(g, group, data, group.channels - group.keep) if data else None
            if drop is None:
                scores = norm_scores(g, group)
                group.chosen = np.sort(np.argsort(-scores, kind="stable")[:group.keep])
                group.selection = "norm"
            else:
                group.chosen = np.setdiff1d(np.arange(group.channels), drop)
                group.selection = "reconstruction"
            for u in np.setdiff1d(np.arange(group.channels), group.chosen):
                removed.update(group.units[u].tolist())
        out.append((sg, g, groups, _removed_by_tensor(g, removed)))
    return out


# ------------------------------------------------------------------------------------------- the budget's options
class ChannelOption(NamedTuple):
    """One share of a group's channels the budget could remove: the params, MACs and file bytes of the group's
    layers with this group alone cut, and its damage: the worst reading layer's relative output error after its
    refit."""
    share: float
    keep: int
    params: int
    macs: int
    damage: float
    nbytes: float | None = None


@dataclass(eq=False)
class BudgetGroup:
    group: ChannelGroup
    options: list[ChannelOption]
    params: int       # the group's layers as they stand
    macs: int
    nbytes: float     # their weights', biases' and per-channel quantization parameters' bytes


@dataclass(eq=False)
class ChannelSpace:
    """The main subgraph's groups seen by the budget: those open to it (`auto`) with their options, those with
    a share of their own (counted as they will be cut), and the cost of every layer as a function of the
    channels each tensor loses (a layer reading and writing pruned groups shrinks by both shares)."""
    g: ChannelGraph
    open: list[BudgetGroup]
    fixed: list[tuple[ChannelGroup, int]]   # (group, kept units)
    closed: dict                            # id(lead op) → why the budget leaves an `auto` group whole
    units_on: dict = field(default_factory=dict)  # id(group) → `per_unit`
    full_int8: bool = False                 # --quantize full-int8 follows: float layers count as full-integer

    def per_unit(self, group: ChannelGroup) -> list[tuple[int, float]]:
        """(id(tensor), channels one unit of the group owns there) for each tensor the group touches."""
        if id(group) not in self.units_on:
            self.units_on[id(group)] = [(id(t), sum(len(p) for p in _unit_positions(self.g, group, t)) / group.channels)
                                        for t in group.tensors]
        return self.units_on[id(group)]

    def kept(self, keeps: list[tuple[ChannelGroup, int]], layers=None) -> dict:
        """id(op) → (share of input channels kept, share of output channels kept) of `layers` (default: every
        layer) when each group keeps the given number of units, on top of the fixed groups."""
        lost: dict[int, float] = {}
        for group, keep in list(self.fixed) + list(keeps):
            cut = group.channels - keep
            for tid, per_unit in self.per_unit(group):
                lost[tid] = lost.get(tid, 0.0) + cut * per_unit
        out = {}
        for layer in (self.g.layers.values() if layers is None else layers):
            x, y = layer.op.inputs[0], layer.op.outputs[0]
            o = 1 - lost.get(id(y), 0.0) / channels_of(y)
            out[id(layer.op)] = (1.0 if layer.layout.coupled else 1 - lost.get(id(x), 0.0) / channels_of(x), o)
        return out

    def saving(self, keeps: list[tuple[ChannelGroup, int]], by_macs: bool, layers=None) -> tuple[float, int, int]:
        """(file bytes or MACs saved, params after, MACs after) of `layers` (default: every layer) when each
        group keeps the given number of units, on top of the fixed groups."""
        kept = self.kept(keeps, layers)
        saved, params_after, macs_after = 0.0, 0, 0
        for layer in (self.g.layers.values() if layers is None else layers):
            inp, out = kept[id(layer.op)]
            w, b = numel(layer.weight.shape), numel(layer.bias.shape) if layer.bias is not None else 0
            m = macs(layer.op, layer.weight)
            params_after += round(w * inp * out + b * out)
            macs_after += round(m * inp * out)
            if by_macs:
                saved += m * (1 - inp * out)
            else:
                per_weight, per_channel = byte_rates(layer, self.full_int8)
                saved += w * (1 - inp * out) * per_weight + layer.out_channels * (1 - out) * per_channel
        return saved, params_after, macs_after

    def dense_bytes(self, layers) -> float:
        """The file bytes of `layers`' weights, biases and per-channel quantization parameters as they stand
        (as full-integer layers with `full_int8`)."""
        return sum(numel(layer.weight.shape) * per_weight + layer.out_channels * per_channel
                   for layer in layers for per_weight, per_channel in [byte_rates(layer, self.full_int8)])


def byte_rates(layer: Layer, full_int8: bool = False) -> tuple[float, float]:
    """(bytes per weight, bytes per output channel) of a layer in the file: the weight's itemsize; per output
    channel its bias and each per-channel quantization parameter (a float32 scale and an int64 zero point, 12
    bytes, for the weight and again for an int32 bias: a full-integer layer's 28 bytes per channel beside its
    1-byte weights). With `full_int8` (--quantize full-int8 follows) a float layer counts as it will be stored:
    int8 weights, an int32 bias, both per channel (`budget.stored_bytes`)."""
    from ..io import CHANNEL_QUANTIZATION_BYTES, FULL_INT8_CHANNEL_BYTES
    w, b = layer.weight, layer.bias
    if full_int8 and w.type in (T.FLOAT32, T.FLOAT16):
        return 1.0, float(FULL_INT8_CHANNEL_BYTES)

    def per_channel_params(t: Tensor | None) -> float:
        q = t.quantization if t is not None else None
        per_channel = q is not None and q.scale is not None and len(q.scale) > 1
        return float(CHANNEL_QUANTIZATION_BYTES) if per_channel else 0.0
    bias = b.dtype.itemsize + per_channel_params(b) if b is not None else 0.0
    return float(w.dtype.itemsize), bias + per_channel_params(w)


def _group_layers(g: ChannelGraph, group: ChannelGroup) -> list[Layer]:
    return [g.layers[id(op)] for op in group.members if id(op) in g.layers]


def group_options(g: ChannelGraph, group: ChannelGroup, data: dict, multiple: int, space: ChannelSpace,
                  layers: list[Layer], dense: float) -> list[ChannelOption]:
    """The group's options at BUDGET_SHARES: channels removed in the greedy order (the removal for a larger
    share extends the one for a smaller), the damage measured after the refit each reading layer will get, on
    rows the fit did not see (two-fold, from the halves' covariances: a FULLY_CONNECTED reader has one row per
    sample, often fewer than its columns, and a fit on them reproduces them exactly); beyond FULL_COLUMNS
    columns, where the refit only moves the mean, the error before refit. No options without data for every
    reader. `layers`: the group's layers (`_group_layers`); `dense`: their bytes as they stand (`dense_bytes`)."""
    from ..linalg import channels as ch
    grams = reader_grams(g, group, data)
    n = group.channels
    keeps = sorted({kept_count(n, f, multiple) for f in BUDGET_SHARES} - {n}, reverse=True)
    if grams is None or not keeps:
        return []
    order = ch.removal_order(sum(gram for _, gram in grams), n - keeps[-1])
    options = []
    with single_threaded_lapack():  # hundreds of mid-sized solves: OpenBLAS's thread hand-offs would dominate
        for keep in keeps:
            options.append(_option(g, group, grams, data, order[:n - keep], keep, space, layers, dense))
    return options


def _option(g, group, grams, data, cut, keep, space, layers, dense) -> ChannelOption:
    from ..linalg import channels as ch
    n = group.channels
    worst = 0.0
    for reader, gram in grams:
        d = data[id(reader.op)]
        if d.cov is None:
            err = math.sqrt(max(float(gram[np.ix_(cut, cut)].sum()), 0.0))
        else:
            positions = _unit_positions(g, group, reader.op.inputs[0])
            gone = reader_columns(reader, np.concatenate([positions[u] for u in cut]))
            kept_cols = np.setdiff1d(np.arange(d.cov.shape[0]), gone)
            err = ch.held_out_error(weight_matrix(reader), d.split(), kept_cols)
        worst = max(worst, err)
    saved, params, macs_ = space.saving([(group, keep)], False, layers)
    return ChannelOption(round((n - keep) / n, 6), keep, params, macs_, worst, dense - saved)


def budget_space(model: Model, ctx, samples, stage=None, full_int8: bool = False) -> ChannelSpace:
    """The budget's view of the main subgraph (`ChannelSpace`), reader data collected on `samples` (kept in
    `ctx.layer_data` for the choice and the refit that follow). `stage(count)`: a progress step, or None.
    `full_int8`: --quantize full-int8 follows (float layers count their bytes as full-integer layers)."""
    sg, g, groups = next(c for c in candidates(model, ctx) if c[0] is model.main)
    space = ChannelSpace(g, [], [], {}, full_int8=full_int8)
    auto = []
    for group, share, multiple in asked(groups, ctx):
        if share == AUTO:
            auto.append((group, multiple))
        else:
            space.fixed.append((group, kept_count(group.channels, share, multiple)))
    readers = list({id(r.op): r for group, _ in auto for r in group.readers}.values())
    data = reader_data(model, ctx, readers, samples) if samples and readers else {}
    progress = stage(len(auto)) if stage else None
    for group, multiple in auto:
        layers = _group_layers(g, group)
        dense = space.dense_bytes(layers)
        options = group_options(g, group, data, multiple, space, layers, dense)
        lead = group.producers[0].op
        if not options:
            space.closed[id(lead)] = (f"{group.channels} channels: nothing to remove at multiples of {multiple}"
                                      if data else "no calibration rows for the layers reading these channels")
            continue
        params = sum(layer_cost(layer)[0] for layer in layers)
        space.open.append(BudgetGroup(group, options, params, sum(layer_cost(layer)[1] for layer in layers), dense))
        if progress:
            progress(lead)
    return space


def refit_readers(model: Model, g: ChannelGraph, removed: dict, data: dict, samples) -> dict:
    """Refit, in execution order, every layer with calibration data whose input loses channels, on its
    inputs in the model as already refitted before it (so errors do not compound), against its original
    outputs; id(op) → relative output error. A refitted weight keeps its full width (zeros in the removed
    columns, which `apply` then slices): until then the model computes what the pruned one will."""
    from ..linalg import channels as ch
    errors = {}
    for op in list(g.sg.operators):
        layer = g.layers.get(id(op))
        x = op.inputs[0]
        d = data.get(id(op))
        if layer is None or layer.layout.coupled or d is None or id(x) not in removed:
            continue
        now = collect_reader_data(model, [layer], samples, moments=False).get(id(op)) if errors else None
        keep = np.setdiff1d(np.arange(channels_of(x)), removed[id(x)])
        _own_constants(op)
        w = weight_matrix(layer)
        with single_threaded_lapack():
            new_w, new_b, err = ch.refit(w, bias_real(layer, w.shape[0]), np.sort(reader_columns(layer, keep)),
                                         now.rows if now is not None else d.rows, d.rows)
        store_layer(g.sg, layer, new_w.reshape(layer.weight.shape), new_b)
        errors[id(op)] = err
    return errors


def store_layer(sg: Subgraph, layer: Layer, weight: np.ndarray, bias: np.ndarray) -> None:
    """Give the layer new weight and bias values (real units), stored as before: float32, float16, or int8
    symmetric (per channel when it was) with an int32 bias at s_in · s_w for full-integer layers."""
    from ..linalg import quant
    w = layer.weight
    if w.type == T.INT8:
        q = copy.copy(w.quantization)
        axis = layer.layout.out_axis if q.scale is not None and len(q.scale) > 1 else None
        values, scales = quant.quantize_symmetric_int8(weight, axis=axis)
        q.scale = np.asarray(scales, np.float32).reshape(-1)
        q.zero_point = np.zeros(len(q.scale), np.int64)
        w.set_data(values)
        w.quantization = q
    else:
        w.set_data(np.asarray(weight, w.dtype))
    b = layer.bias
    if b is None:
        if layer.op.inputs[0].type == T.FLOAT32:
            _add_to_bias(sg, layer, np.asarray(bias, np.float64))
        return
    if b.type == T.INT32:
        s_in = float(layer.op.inputs[0].quantization.scale[0])
        # One bias scale per weight scale: a per-tensor weight keeps a per-tensor bias (XNNPACK refuses to
        # delegate a conv whose bias has more scales than its weight).
        s_b = s_in * np.asarray(w.quantization.scale, np.float64).reshape(-1)
        q = copy.copy(b.quantization)
        q.scale = s_b.astype(np.float32)
        q.zero_point = np.zeros(len(s_b), np.int64)
        b.set_data(np.clip(np.round(np.asarray(bias) / s_b), -2**31, 2**31 - 1).astype(np.int32))
        b.quantization = q
    else:
        q = b.quantization
        b.set_data(np.asarray(bias, b.dtype))
        b.quantization = q


def run(model: Model, ctx, progress=None, samples=None) -> list[Entry]:
    entries = []
    for sg, g, groups, removed in choose(model, ctx, samples):
        before = {k: layer_cost(layer) for k, layer in g.layers.items()}
        shapes = {id(op): list(op.inputs[1].shape) for op in sg.operators
                  if op.builtin in semantics.LAYERS and len(op.inputs) > 1 and op.inputs[1] is not None}
        data = {k: ctx.layer_data.pop(("channels", k)) for k in list(g.layers) if ("channels", k) in ctx.layer_data}
        errors = refit_readers(model, g, removed, data, samples) if removed and data else {}
        if removed:
            apply(g, removed, skip_fold=set(errors))
        for group in groups:
            if _lead(group) is None:
                continue  # channels no layer writes (model inputs, outputs of other ops): nothing to report
            entries.append(_entry(model, sg, g, group, ctx, before, errors, shapes))
            if progress:
                progress(entries[-1])
    return entries


def _removed_by_tensor(g: ChannelGraph, removed_nodes: set) -> dict:
    out: dict[int, list[int]] = {}
    if not removed_nodes:
        return {}
    nodes = np.array(sorted(removed_nodes), np.int64)
    for tid, s in g.start.items():
        c = channels_of(g.tensors[tid])
        sel = nodes[(nodes >= s) & (nodes < s + c)] - s
        if len(sel):
            out[tid] = sel
    return out


def _lead(group: ChannelGroup) -> Operator | None:
    """The first layer writing the group's channels (also one that a barrier keeps out of `producers`)."""
    if group.producers:
        return group.producers[0].op
    tids = {id(t) for t in group.tensors}
    return next((op for op in group.members if op.builtin in semantics.LAYERS and id(op.outputs[0]) in tids), None)


def _entry(model, sg, g: ChannelGraph, group: ChannelGroup, ctx, before: dict, errors: dict, shapes: dict) -> Entry:
    lead = _lead(group)
    entry = new_entry(model, sg, lead, "channels", ctx)
    layers = [g.layers[id(op)] for op in group.members if id(op) in g.layers]
    pruned = group.chosen is not None
    pb = sum(before[id(layer.op)][0] for layer in layers)
    mb = sum(before[id(layer.op)][1] for layer in layers)
    after = [layer_cost(layer) for layer in layers]
    weight = lead.inputs[1] if len(lead.inputs) > 1 else None
    entry.set(
        weight_shape=shapes.get(id(lead)), weight_dtype=weight.type_name if weight is not None else None,
        action="pruned" if pruned else "skipped", reason=None if pruned else group.reason,
        members=[op.outputs[0].name if op.outputs else op.name for op in group.members],
        channels_before=group.channels, channels_after=len(group.chosen) if pruned else group.channels,
        selection=group.selection, params_before=pb, params_after=sum(p for p, _ in after),
        macs_before=mb, macs_after=sum(m for _, m in after))
    measured = [errors[id(r.op)] for r in group.readers if errors.get(id(r.op)) is not None]
    if pruned and measured:
        entry.output_error = round(max(measured), 6)  # the worst reading layer's relative output error
    return entry
