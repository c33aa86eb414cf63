"""What every rewrite pass shares: reading a layer's weight in whatever form it is stored, emitting new
weights in the same form, choosing which ops to consider, and the report entry."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from .. import io, ops, schema
from ..analysis import is_subgraph_output, numel, static_shape, stored, weight_uses
from ..graph import Model, Operator, Quantization, Subgraph, Tensor
from ..report import Entry

OP = schema.BuiltinOperator
T = schema.TensorType


@dataclass
class LayerWeight:
    """A layer's weight as float32 values, plus how it is stored: 'float32', 'float16' (behind DEQUANTIZE) or
    'int8' (an int8 constant read directly: by a hybrid kernel, or by the integer kernels of a full-integer
    layer, `full_integer`)."""
    kind: str
    values: np.ndarray
    stored: Tensor
    per_channel: bool = False
    full_integer: bool = False


class SparsityOption(NamedTuple):
    """One sparsity the prune pass could give a layer (`--prune auto`): the nonzero weights it keeps, the bytes
    the runtime's sparse format really stores for it (values, index vectors, tables, a DENSIFY), the MACs (the
    runtime still runs the layer dense) and the damage (the layer's relative output error after the data-aware
    prune)."""
    sparsity: float
    params: int
    nbytes: int
    macs: int
    damage: float


class RankOption(NamedTuple):
    """One rank a low-rank pass could give a layer, what it would cost, and the damage it would do (the layer's
    relative output error: on calibration rows when there are any, else relative to its weights)."""
    ratio: float
    rank: int | tuple[int, int]
    params: int
    macs: int
    damage: float
    channels: tuple = ()        # output channels of each op the rewrite emits, the layer's own last
    nbytes: float | None = None  # file bytes of those ops as they will be stored (the budget fills it in)


class Skip(Exception):
    """This op is left as it is; the message is the reason the report gives."""


# Floors below which a rank chosen by a ratio (`--ratio`, or the budget) is a degenerate rewrite that breaks the
# model rather than compresses it; measured on the three trained fixtures (README, "Degenerate rewrites").
MIN_RANK = 3
MIN_RANK_SHARE = 1 / 16        # of the layer's smaller dimension
MIN_CONV_INPUT_CHANNELS = 5    # a k×k conv on fewer channels (a stem on an RGB/gray image) holds few weights
MAX_WEIGHT_ERROR = 0.8         # relative weight error of a rewrite fitted to the weights alone (a shared weight)
# `--ratio` only: the fitted layer's relative output error around the mean (`output_variation_error`) on its
# sample inputs (calibration rows, or without data the model's response to generated images). Each layer of the
# three fixtures alone at --ratio 2 and 5: every layer that alone cost more than 1 point was at 0.176 or above (a
# 64x96 FC at rank 7: -11 points; 10-way output layers 0.38-0.41: -30 to -37); MobileNetV2's 1x1 convs at 0.2-0.7
# cost little alone but together collapse it to 11 %. At 0.2 the residual fixture fell to 86.7 % at --ratio 5 (that FC);
# at 0.15 no fixture falls below 95.8 % at --ratio 2, 3, 4.36 or 5 (bench/results/nodata_floors.md).
MAX_OUTPUT_ERROR = 0.15


def degenerate_reason(rank, dims: tuple[int, int], in_channels: int | None = None) -> str | None:
    """Why a rank chosen by a ratio is degenerate for a layer whose matrix is `dims` (None if it is not).
    `in_channels`: for a k×k conv, its input channels."""
    r = min(rank) if isinstance(rank, tuple) else rank
    if in_channels is not None and in_channels < MIN_CONV_INPUT_CHANNELS:
        return f"only {in_channels} input channels (a stem conv; fewer than {MIN_CONV_INPUT_CHANNELS})"
    if r < MIN_RANK:
        return f"rank {r} is degenerate (below {MIN_RANK})"
    if r < MIN_RANK_SHARE * min(dims):
        return f"rank {r} is below 1/{round(1 / MIN_RANK_SHARE)} of the layer's smaller dimension {min(dims)}"
    return None


def refuse_degenerate(policy: "RankPolicy", rank, dims: tuple[int, int], in_channels: int | None = None,
                      weight_error: float | None = None, output_error=None) -> None:
    """Raise Skip when a ratio-chosen rank is degenerate (see the floors above), unless --force.
    `output_error`: a callable giving the fitted layer's relative output error on its sample inputs (calibration
    rows, or the model's response to generated images), called only when it decides."""
    if policy.force or policy.ratio is None:
        return
    reason = degenerate_reason(rank, dims, in_channels)
    if reason is None and layer_metric(policy) is None:
        if weight_error is not None and weight_error > MAX_WEIGHT_ERROR:
            reason = f"weight error {weight_error:.2f} is near 1 (above {MAX_WEIGHT_ERROR})"
    elif reason is None and output_error is not None and not policy.budgeted:
        error = output_error()
        if error > MAX_OUTPUT_ERROR:
            inputs = "generated" if policy.extra.get("generated") else "calibration"
            reason = f"output error {error:.3g} on the {inputs} inputs is above {MAX_OUTPUT_ERROR}"
    if reason:
        raise Skip(f"{reason}; --force rewrites it anyway")


# A CP fit that `--ratio`'s floor will judge is first run for this many ALS sweeps (of 25): when its output error
# is already above the floor by CLEAR_MARGIN the layer is refused without the full fit. At --ratio 5 on generated
# inputs 5 sweeps landed within 4 % of 25 on VGG16's random-init convs (0.206 / 0.205 / 0.208 against 0.199 /
# 0.199 / 0.201) and within 3-13 % on the residual fixture's trained convs (0.437 against 0.387), at a fifth of
# the cost (bench/results/nodata.md).
QUICK_SWEEPS = 5
CLEAR_MARGIN = 1.2


def refuse_clearly_degenerate(policy: "RankPolicy", quick_error) -> None:
    """Raise Skip, before the full fit, when `quick_error()` (the output error around the mean of a cheaper fit
    that the full fit improves on only a little) is already above the --ratio floor by CLEAR_MARGIN. Only where
    `refuse_degenerate` would measure an output error."""
    if policy.force or policy.ratio is None or policy.budgeted or layer_metric(policy) is None:
        return
    error = quick_error()
    if error > MAX_OUTPUT_ERROR * CLEAR_MARGIN:
        inputs = "generated" if policy.extra.get("generated") else "calibration"
        raise Skip(f"output error {error:.3g} on the {inputs} inputs (a {QUICK_SWEEPS}-sweep fit) is above "
                   f"{MAX_OUTPUT_ERROR}; --force rewrites it anyway")


def usable_option(option: "RankOption", dims: tuple[int, int], in_channels: int | None, data_aware: bool) -> bool:
    """Whether the budget may offer this option: the same floors as `refuse_degenerate`."""
    if degenerate_reason(option.rank, dims, in_channels) is not None:
        return False
    return data_aware or option.damage <= MAX_WEIGHT_ERROR


def chained_weight_reason(src) -> str | None:
    """Why a weight stored behind a chain of carriers is left as it is (a sparse float16 weight: DENSIFY →
    DEQUANTIZE, as MediaPipe's *_sparse models store it; no pass rewrites or re-encodes one), None for a plain
    constant or one carrier. `src`: `analysis.stored` of the weight."""
    if src is None or len(src.carriers) < 2:
        return None
    t = src.tensor
    form = ("sparse " if t.sparsity is not None else "") + t.type_name
    return f"{form} weight ({' → '.join(op.name for op in reversed(src.carriers))}): left as it is"


def nonfinite_reason(values) -> str | None:
    """Why a float weight holding NaN or infinite values is left as it is (no fit, mask or scale means anything
    there), None for a finite one."""
    values = np.asarray(values)
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        return "its weight holds NaN or infinite values: left as it is"
    return None


OUTPUT_WEIGHT = "its weight is also a model output: left as it is"


def _weight_source(op: Operator, index: int):
    """(input `index` of `op`, `analysis.stored` of it): what both weight readers start from; Skip for a missing
    weight, one that is also a model output, or one behind a chain of carriers."""
    w = op.inputs[index] if len(op.inputs) > index else None
    if w is None:
        raise Skip("no weight input")
    src = stored(w)
    if is_subgraph_output(w) or (src is not None and is_subgraph_output(src.tensor)):
        raise Skip(OUTPUT_WEIGHT)
    reason = chained_weight_reason(src)
    if reason:
        raise Skip(reason)
    return w, src


def read_weight(op: Operator, index: int = 1) -> LayerWeight:
    w, src = _weight_source(op, index)
    carrier = src.carrier if src is not None else w.producer
    if carrier is not None and carrier.builtin == OP.DENSIFY:
        raise Skip("sparse weight (behind DENSIFY)")
    if src is None or len(src.carriers) > 1:
        behind_dequantize = carrier is not None and carrier.builtin == OP.DEQUANTIZE
        raise Skip("weight behind DEQUANTIZE is not float16" if behind_dequantize else "weight is not a constant")
    c = src.tensor
    if c.sparsity is not None:
        raise Skip("sparse weight")
    if carrier is not None:
        if c.type != T.FLOAT16:
            raise Skip("weight behind DEQUANTIZE is not float16")
    if carrier is not None or c.type == T.FLOAT32:
        values = src.values()
        reason = nonfinite_reason(values)
        if reason:
            raise Skip(reason)
        return LayerWeight("float16" if carrier is not None else "float32", values, c)
    if c.type == T.INT8 and c.quantization is not None and c.quantization.scale is not None:
        if op.inputs[0] is not None and op.inputs[0].type == T.INT16:
            raise Skip("int16 activations (a 16x8 layer): left as it is")
        if op.inputs[0] is None or op.inputs[0].type not in (T.FLOAT32, T.INT8):
            raise Skip(f"{op.inputs[0].type_name if op.inputs[0] is not None else 'missing'} input")
        return LayerWeight("int8", src.values(), c, per_channel=c.quantization.channels > 1,
                           full_integer=op.inputs[0].type == T.INT8)
    raise Skip(f"{c.type_name} weights are not supported")


class StoredWeight:
    """The constant that really holds a layer's weight, and how to read its magnitudes."""

    def __init__(self, tensor: Tensor, kind: str, carrier: Operator | None = None):
        self.tensor, self.kind, self.carrier = tensor, kind, carrier

    @property
    def raw(self) -> np.ndarray:
        return self.tensor.data

    def magnitudes(self) -> np.ndarray:
        """|real value| of every weight (int8: |q - zero point| · scale, per channel when so quantized)."""
        raw = np.asarray(self.raw)
        if raw.dtype.kind == "f":  # |w| of a float32 or float16 value is exact in float32
            return np.abs(raw if raw.dtype == np.float32 else raw.astype(np.float32))
        q = self.tensor.quantization
        scale = np.asarray(q.scale, np.float64).reshape(-1)
        if len(scale) > 1:
            shape = [1] * raw.ndim
            shape[q.axis] = -1
            scale = scale.reshape(shape)
        else:
            scale = scale[0]
        return np.abs(raw.astype(np.float64)) * scale


def find_stored_weight(op: Operator) -> StoredWeight:
    """The stored constant of input 1, following one DEQUANTIZE; Skip when it cannot be pruned."""
    w, src = _weight_source(op, 1)
    carrier = src.carrier if src is not None else w.producer
    if not w.is_constant:
        if carrier is None:
            raise Skip("weight is not a constant")
        if carrier.builtin == OP.DENSIFY:
            raise Skip("weight is already sparse (behind DENSIFY)")
        if carrier.builtin != OP.DEQUANTIZE or src is None or len(src.carriers) > 1:
            raise Skip("weight is not a constant")
        w = src.tensor
    if w.sparsity is not None:
        raise Skip("weight is already sparse")
    if w.type in (T.FLOAT32, T.FLOAT16):
        reason = nonfinite_reason(w.data)
        if reason:
            raise Skip(reason)
        return StoredWeight(w, "float32" if w.type == T.FLOAT32 else "float16", carrier)
    if w.type == T.INT8:
        q = w.quantization
        if q is None or q.scale is None or len(q.scale) == 0:
            raise Skip("int8 weight without a scale")
        zp = np.asarray(q.zero_point if q.zero_point is not None else [0])
        if np.any(zp != 0):
            raise Skip("int8 weight with a nonzero zero point")
        if carrier is not None:
            return StoredWeight(w, "int8 (dequantized)", carrier)
        x = op.inputs[0]
        return StoredWeight(w, "int8" if x is not None and x.type == T.FLOAT32 else "int8 (full-integer)")
    raise Skip(f"{w.type_name} weights are not supported")


def emit_weight(sg: Subgraph, name: str, values: np.ndarray, like: LayerWeight, quant_axis: int = 0,
                hybrid: bool = True) -> tuple[Tensor, list[Operator]]:
    """A new weight holding `values`, stored as `like` is; returns the tensor the op reads and any ops
    (a DEQUANTIZE) that must run before it. `hybrid=False`: an int8 weight is read through a DEQUANTIZE, for
    ops whose hybrid kernel XNNPACK and the builtin kernels compute differently (1x1 CONV_2D)."""
    from ..linalg import quant
    values = np.ascontiguousarray(values, np.float32)
    if like.kind == "float32":
        return sg.add_constant(name, values), []
    if like.kind == "float16":
        stored = sg.add_constant(name + "_fp16", quant.to_float16(values))
        out = sg.add_activation(name, T.FLOAT32, values.shape)
        return out, [ops.dequantize(stored, out)]
    if like.kind == "int8":
        axis = quant_axis if like.per_channel else None
        q, scales = quant.quantize_symmetric_int8(values, axis=axis)
        qp = Quantization.symmetric(scales, axis)
        if hybrid:
            return sg.add_constant(name, q, quantization=qp), []
        stored = sg.add_constant(name + "_int8", q, quantization=qp)
        out = sg.add_activation(name, T.FLOAT32, values.shape)
        return out, [dequantize_int8(stored, out)]
    raise ValueError(like.kind)


def dequantize_int8(stored: Tensor, out: Tensor) -> Operator:
    """DEQUANTIZE of an int8 constant, at the version its (per-channel or per-tensor) scales need."""
    from ..ops import versions
    q = stored.quantization
    per_channel = versions.dequantize_is_per_channel(len(q.scale), stored.shape, q.axis)
    op = ops.dequantize(stored, out)
    op.opcode = ops.opcode_for(OP.DEQUANTIZE, versions.dequantize_version(T.INT8, per_channel))
    return op


def hybrid_reads_alike(builtin: int, weight_shape) -> bool:
    """Whether XNNPACK and the builtin kernels compute this hybrid op (float input, int8 weight) alike. A 1x1
    CONV_2D does not: ~0.5-1 % relative output difference where a 3x3 one agrees to 1e-7 (tests/test_quantize.py);
    nor does DEPTHWISE_CONV_2D inside a model (0.4-0.8 % on the MobileNetV2 fixture and on CP chains of the
    dynamic-range VGG, exact alone; tests/test_sweep.py). FULLY_CONNECTED agrees with asymmetric_quantize_inputs,
    which we always set."""
    if builtin == OP.DEPTHWISE_CONV_2D:
        return False
    return not (builtin == OP.CONV_2D and len(weight_shape) == 4 and weight_shape[1] == weight_shape[2] == 1)


def layer_metric(policy: "RankPolicy"):
    """The damped input metric of this layer's calibration rows, or None without calibration data."""
    rows = policy.extra.get("rows")
    if rows is None:
        return None
    if "metric" not in policy.extra:
        from ..linalg import fit
        policy.extra["metric"] = fit.input_metric(rows, policy.extra.get("damping", fit.DEFAULT_DAMPING))
    return policy.extra["metric"]


def fit_metric(policy: "RankPolicy"):
    """The metric a rewrite fits the layer to: `layer_metric`, tempered (Σ^p, `InputMetric.tempered`) when a
    budget chose the rank on the model's response to generated inputs (`temper` p, set with those rows). Real
    rows are trusted; generated rows are a guess at the real inputs' metric, so the fit goes only part way from
    the weights' own (I) to theirs. `--ratio` keeps Σ: its floor judges the fit it keeps on these rows, and the
    floors were measured so. Sequential fitting keeps Σ too: its cross term is stated in it."""
    metric = layer_metric(policy)
    power = policy.extra.get("temper") if metric is not None else None
    if power is None or not policy.budgeted or policy.extra.get("target_rows") is not None:
        return metric
    if "fit_metric" not in policy.extra:
        policy.extra["fit_metric"] = metric.tempered(power)
    return policy.extra["fit_metric"]


def output_variation_error(policy: "RankPolicy", weight: np.ndarray, approx=None, factors=None) -> float:
    """The fitted layer's relative output error on its sample rows around their mean: ‖(W − Ŵ)C^½‖ / ‖W·C^½‖ with
    C the rows' damped covariance. Bias correction restores the mean output, so this is the error that remains;
    relative to the uncentered signal (`layer_metric`) it looks small wherever the inputs' mean dominates (a
    ReLU network's later layers). `approx`: Ŵ; or `factors`: (L, R) with Ŵ = L·R."""
    from ..linalg import fit
    metric = layer_metric(policy)
    if factors is not None:
        return fit.lowrank_output_error(weight, *factors, metric, centered=True)
    return fit.centered_output_error(weight, approx, metric)


def layer_cross(policy: "RankPolicy", weight_matrix: np.ndarray):
    """For sequential fitting (inputs changed by earlier rewrites): the cross term B, else None."""
    if policy.extra.get("target_rows") is None:
        return None
    from ..linalg import fit
    return fit.cross_term(weight_matrix, layer_metric(policy), policy.extra["rows"], policy.extra["target_rows"])


def bias_values(bias: Tensor | None, channels: int) -> np.ndarray:
    """The bias as float32 values (zeros when there is none), also when stored float16 behind DEQUANTIZE."""
    if bias is None:
        return np.zeros(channels, np.float32)
    if bias.is_constant and bias.data is not None:
        return np.asarray(bias.data, np.float32)
    producer = bias.producer
    if producer is not None and producer.builtin == OP.DEQUANTIZE and producer.inputs[0].data is not None:
        return np.asarray(producer.inputs[0].data, np.float32)
    raise Skip("bias is not a constant")


def finish_data_aware(sg: Subgraph, entry: Entry, policy: "RankPolicy", weight: np.ndarray, approx,
                      bias: Tensor | None, name: str) -> Tensor | None:
    """With calibration data: report the layer's output error and return a bias shifted so that the mean
    output on the samples matches the original's (bias correction). Without: the bias unchanged.
    `approx` is the stored approximation of `weight` as a (left, right) pair of factors, or a callable that
    forms it (only called when needed)."""
    metric = layer_metric(policy)
    if metric is None:
        return bias
    from ..linalg import fit
    mean, target_mean = policy.extra.get("mean"), policy.extra.get("target_mean")
    if not corrects_bias(policy):  # a shared weight's pooled rows (`shared_layer_data`): the error only, the bias kept
        entry.output_error = fit.lowrank_output_error(weight, *approx, metric) if isinstance(approx, tuple) \
            else fit.output_error(weight, approx(), metric)
        return bias
    if isinstance(approx, tuple):  # never form L·R: FC weights can be 25088×4096
        left, right = (np.asarray(a, np.float64) for a in approx)
        entry.output_error = fit.lowrank_output_error(weight, left, right, metric)
        t = mean if target_mean is None else target_mean
        shift = np.asarray(weight @ np.asarray(t, weight.dtype), np.float64) - left @ (right @ np.asarray(mean, np.float64))
    else:
        approx = approx()
        entry.output_error = fit.output_error(weight, approx, metric)
        shift = fit.bias_shift(weight, approx, mean, target_mean)
    values = bias_values(bias, weight.shape[0]) + shift.astype(np.float32)
    entry.bias_corrected = True
    return sg.add_constant(name, values.astype(np.float32))


def corrects_bias(policy: "RankPolicy") -> bool:
    """Whether `finish_data_aware` gives the rewritten layer a new, corrected bias: it has sample rows (calibration
    or generated) and their mean (a shared weight's pooled rows have none: its readers keep their biases)."""
    return policy.extra.get("rows") is not None and policy.extra.get("mean") is not None


def chain_bias(sg: Subgraph, policy: "RankPolicy", bias: Tensor | None, channels: int, name: str) -> Tensor | None:
    """The bias a rewrite's last op will read, with placeholder values (for counting its bytes before the fit):
    a new float32 one where `finish_data_aware` corrects it (`corrects_bias`), else the layer's own."""
    return sg.add_constant(name, np.zeros(channels, np.float32)) if corrects_bias(policy) else bias


def size_changes(model: Model, sg: Subgraph, edits: list) -> list[int]:
    """The file bytes each of `edits` adds to `model` (negative: frees), by `io.estimated_size`, the measure the
    does-not-pay check of `rewrite_one` uses; the model is put back as it was after each. The budget asks this
    of each option of a layer (`option_bytes` of the low-rank passes: each edit puts the rewrite's own ops and
    tensors, with placeholder values, in place of one op of `sg`), so that it never chooses a rank the rewrite
    then refuses and its estimate is the size the rewrite writes. Every edit of one op frees the same op and
    tensors, so only the first is measured on the whole model; the others differ from it by what they add
    (`io.added_size`: per option a few tables, not the whole model)."""
    out, freed = [], None
    for edit in edits:
        operators, tensors = list(sg.operators), list(sg.tensors)
        snapshot, before = (model.snapshot(), io.estimated_size(model)) if freed is None else (None, 0)
        try:
            edit()
            old = {id(op) for op in operators}
            added = io.added_size([op for op in sg.operators if id(op) not in old], sg.tensors[len(tensors):])
            if freed is None:
                freed = added - (io.estimated_size(model) - before)
            out.append(added - freed)
        finally:
            if snapshot is not None:
                snapshot.restore()
            else:  # the edits only add tensors to `sg` and replace one of its ops: its two lists put it back
                sg.operators, sg.tensors = operators, tensors
    return out


def zero_bias(sg: Subgraph, name: str, channels: int) -> Tensor:
    """The builtin CONV_2D and DEPTHWISE_CONV_2D kernels insist on a bias input; float32 like the activations."""
    return sg.add_constant(name, np.zeros(channels, np.float32))


def stored_weight_values(tensor_values: np.ndarray, like: LayerWeight, quant_axis: int = 0) -> np.ndarray:
    """The float values a weight will really have after storage (for numpy references and error reports)."""
    from ..linalg import quant
    if like.kind == "float16":
        return quant.to_float16(tensor_values).astype(np.float32)
    if like.kind == "int8":
        axis = quant_axis if like.per_channel else None
        q, scales = quant.quantize_symmetric_int8(tensor_values, axis=axis)
        return quant.dequantize_int8(q, scales, axis=axis).astype(np.float32)
    return tensor_values.astype(np.float32)


def new_entry(model: Model, sg: Subgraph, op: Operator, kind: str, ctx) -> Entry:
    """The report entry of `op`, at the input model's position of the op it is or came from."""
    si, oi = ctx.positions.get(id(op)) or ctx.positions.get(id(op.origin)) or (
        next(i for i, s in enumerate(model.subgraphs) if s is sg), next(i for i, o in enumerate(sg.operators) if o is op))
    return Entry(subgraph=si, index=oi, op=op.name, output=op.outputs[0].name if op.outputs else "", kind=kind)


def lowrank_rel_error(weight: np.ndarray, left: np.ndarray, right: np.ndarray) -> float:
    """‖W − L·R‖ / ‖W‖ without forming L·R: ‖W‖² − 2⟨L, W·Rᵀ⟩ + ⟨LᵀL, R·Rᵀ⟩ (float64 sums)."""
    if weight.size < 1_000_000:
        return rel_error(weight, left @ right)
    left, right = left.astype(np.float64), right.astype(np.float64)
    from ..linalg.svd import squared_norm
    norm2 = squared_norm(weight)
    # float64 products where affordable; for the largest layers float32 (error floor ~3e-4 relative).
    wr = weight.astype(np.float64) @ right.T if weight.size < 20_000_000 else \
        (weight @ right.T.astype(np.float32)).astype(np.float64)
    cross = float(np.sum(left * wr))
    own = float(np.sum((left.T @ left) * (right @ right.T)))
    return float(np.sqrt(max(norm2 - 2 * cross + own, 0.0) / norm2)) if norm2 > 0 else 0.0


def rel_error(original: np.ndarray, approx: np.ndarray) -> float:
    n = float(np.linalg.norm(original))
    return float(np.linalg.norm(original - approx)) / n if n > 0 else 0.0


def pixels(t: Tensor) -> int:
    """Batch × height × width of an NHWC activation."""
    return numel(static_shape(t)[:-1])


@dataclass
class RankPolicy:
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    force: bool = False
    method: str = "cp"
    extra: dict = field(default_factory=dict)
    budgeted: bool = False  # the ratio was chosen by the whole-model budget (its damage level judged it)

    @property
    def active(self) -> bool:
        return self.rank is not None or self.ratio is not None or self.energy is not None


def rewrite_one(model: Model, sg: Subgraph, op: Operator, ctx, kind: str, rewrite) -> Entry:
    """Run `rewrite(sg, op, weight, policy, ctx, entry)` on one op; a Skip becomes the entry's
    reason. Returns the op's report entry."""
    entry = new_entry(model, sg, op, kind, ctx)
    policy = ctx.rank_policy(op, kind)
    try:
        weight = read_weight(op)
        uses = weight_uses(model, weight.stored)
        if uses.shared or any(k[0] == id(weight.stored.buffer) for k in ctx.shared_factors):
            # One set of factors serves every reader (a weight stored once stays stored once), so it is fitted on
            # the rows of all its readers (FCs), or to the weight, never to the inputs of one of its readers.
            reason = shared_refusal(ctx, op, kind, weight, uses)
            if reason:
                raise Skip(reason)
            policy = replace(policy, extra=(shared_layer_data(ctx, uses.ops) if kind == "fc" else None) or {})
            entry.shared = True
        snapshot, size_before, shared_before = model.snapshot(), io.estimated_size(model), len(ctx.shared_factors)
        from ..linalg.svd import blas_threads_for
        with blas_threads_for(weight.values.size):
            rewrite(sg, op, weight, policy, ctx, entry)
        if not policy.force:
            _keep_if_smaller(model, weight, ctx, entry, snapshot, size_before, shared_before, len(uses.ops))
    except Skip as e:
        entry.reason = str(e)
    _release_layer_data(ctx, op, entry)
    return entry


def _release_layer_data(ctx, op: Operator, entry: Entry) -> None:
    """Let go of what only this op's fit needed, before the next layer's: its input metric (VGG16's 3x3x512
    convs: ~100 MB each), and all its calibration data once the op is replaced (later passes read rows only of
    ops still in the model)."""
    data = ctx.layer_data.get(id(op))
    if data is None:
        return
    if entry.action == "rewritten":
        del ctx.layer_data[id(op)]
    else:
        data.pop("metric", None)


def _keep_if_smaller(model, weight: LayerWeight, ctx, entry: Entry, snapshot, size_before: int, shared_before: int,
                     readers: int = 1):
    """Undo a rewrite whose new tensors, buffers and ops take more file bytes than it frees (tiny layers).
    A shared weight is judged once, at its first reader, for all `readers`: the weight's bytes are freed once,
    its one set of factors is stored once, and every reader adds the ops and tensors this one added beside the
    factors (an unrolled RNN step reading a recurrent weight: 12 readers' new ops can cost more than the
    factors save). Later readers only reuse those factors and are kept."""
    made = [emitted for _, emitted, _ in list(ctx.shared_factors.values())[shared_before:]]
    if entry.shared and not made:
        return  # reuses factors the first reader already paid for
    size_after = io.estimated_size(model)
    if entry.shared and weight.stored.buffer is not None:
        factors = sum(_new_weight_bytes(tensor, pre) for emitted in made for tensor, pre in emitted)
        per_reader = size_after - size_before - factors
        freed = io.BUFFER_BYTES + weight.stored.buffer.nbytes + io.tensor_bytes(weight.stored)
        size_after += (readers - 1) * per_reader - freed
    if size_after < size_before:
        return
    snapshot.restore()
    for key in list(ctx.shared_factors)[shared_before:]:
        del ctx.shared_factors[key]
    entry.drop("output_error", "bias_corrected", "factors", "init", "degeneracy", "n_iter")
    entry.set(action="skipped", method=None, rank=None, rel_error=None,
              params_after=entry.params_before, macs_after=entry.macs_before)
    readers_note = f" (a weight shared by {readers} ops: each gets the new ops)" if entry.shared and readers > 1 else ""
    raise Skip(f"does not pay: the new weights, tensors and ops take {size_after - size_before} bytes more than "
               f"what they replace{readers_note} (file about {size_before} -> {size_after} bytes)")


def _new_weight_bytes(tensor: Tensor, pre: list[Operator]) -> int:
    """File bytes of one new weight: its stored constant (table and buffer), and when it is read through a
    DEQUANTIZE that op and the tensor it fills."""
    stored_tensor = pre[0].inputs[0] if pre else tensor
    n = io.tensor_bytes(stored_tensor) + io.BUFFER_BYTES + (stored_tensor.buffer.nbytes if stored_tensor.buffer else 0)
    return n + (sum(io.operator_bytes(op) for op in pre) + io.tensor_bytes(tensor) if pre else 0)


def shared_refusal(ctx, op: Operator, kind: str, weight: LayerWeight, uses, eligible: set | None = None) -> str | None:
    """Why the low-rank passes cannot give the weight `uses` lists (read by `op` and others) one set of factors
    for all its readers (None: they can): every reader must be a layer of `op`'s kind reading it as its weight
    and asking for the same rank (the IR's shared-weight policy). The rewrite and the budget both ask this; the
    budget, which chooses the rank itself, passes `eligible` (ids of its candidates: each reader must be one)."""
    n = weight.values.size
    if eligible is None:
        def leave(o):
            return _reason_to_leave(ctx, o, kind, n)
        ask = dict(ask=lambda u: _rank_asked(ctx, u.op, kind), differ="its readers ask for different ranks")
    else:
        def leave(o):
            return None if id(o) in eligible else (_reason_to_leave(ctx, o, kind, n, asked=False) or
                                                   "the pass cannot rewrite it")
        ask = {}
    return leave(op) or uses.refusal(lambda u: u.op.builtin == op.builtin and u.index == 1 and (leave(u.op) or True),
                                     **ask)


def shared_layer_data(ctx, readers: list) -> dict | None:
    """The calibration rows a weight several FCs read is fitted on: every reader's rows (an equal share of each
    when they are more than `calibrate.MAX_ROWS` together), so that one set of factors keeps the outputs of all
    of them; None unless every reader has rows. No mean: each reader keeps its bias (one fit serves readers whose
    means differ; a bias per reader would cost its bytes per reader). An unrolled 12-step LSTM/GRU at rank 16:
    each shared weight's worst reader at output error 0.23-0.29 on its rows, 0.52-0.68 fitted to the weights;
    the whole model on inputs it was not fitted on 0.58 against 0.64 (rank 20: 0.13 against 0.52)."""
    parts = [ctx.layer_data.get(id(r)) for r in readers]
    if not parts or any(p is None for p in parts):
        return None
    from ..calibrate import MAX_ROWS
    step = max(1, -(-sum(len(p["rows"]) for p in parts) // MAX_ROWS))
    pooled = {k: v for k, v in parts[0].items()
              if k not in ("rows", "mean", "target_rows", "target_mean", "metric", "fit_metric")}
    pooled["rows"] = np.concatenate([p["rows"][k % step::step] for k, p in enumerate(parts)])
    return pooled


def _reason_to_leave(ctx, op: Operator, kind: str, n: int, asked: bool = True) -> str | None:
    """Why a low-rank pass leaves a layer as it is, whatever its weight (None: it rewrites it). `asked`: a
    layer no rank is asked for is left too."""
    if not ctx.is_input_op(op):
        return "made by an earlier pass"
    return ctx.reason_to_skip(op, n) or (None if not asked or ctx.rank_policy(op, kind).active else "no rank asked")


def _rank_asked(ctx, op: Operator, kind: str) -> tuple:
    p = ctx.settings(op).rank_policy(kind)
    return p.rank, p.ratio, p.energy, p.method


def shared_key(weight: LayerWeight, *choice) -> tuple:
    """Key of the new weights made for `weight` with this choice (method, rank): readers of one stored weight
    that make the same choice get the same new weights."""
    return (id(weight.stored.buffer), *choice)


def emit_shared(ctx, sg: Subgraph, key: tuple, make) -> tuple[list[tuple[Tensor, list[Operator]]], object]:
    """The new weights of a layer and what was computed with them: `make()` returns ([(tensor, ops to run
    first), ...], payload) and is called once per key; a later reader of the same stored weight gets the same
    buffers, as tensors of its own subgraph (behind a DEQUANTIZE of its own when stored float16)."""
    cached = ctx.shared_factors.get(key)
    if cached is None:
        emitted, payload = make()
        ctx.shared_factors[key] = (sg, emitted, payload)
        return emitted, payload
    home, emitted, payload = cached
    return [_weight_in(sg, home, tensor, pre) for tensor, pre in emitted], payload


def _weight_in(sg: Subgraph, home: Subgraph, tensor: Tensor, pre: list[Operator]) -> tuple[Tensor, list[Operator]]:
    if sg is home:
        return tensor, []  # its DEQUANTIZE, if any, already runs before the first reader
    if not pre:
        return sg.own_tensor(tensor), []
    out = sg.add_activation(tensor.name, tensor.type, tensor.shape)
    return out, [ops.dequantize(sg.own_tensor(pre[0].inputs[0]), out)]


def rewrite_all(model: Model, ctx, builtin: int, rewrite_op, progress=None, done=()) -> list[Entry]:
    """`rewrite_op` on every op of one builtin kind that the input model had (never on an op a pass created,
    e.g. the factor layers of an earlier low-rank rewrite), in every subgraph, in execution order; ops in
    `done` (ids) were already handled."""
    entries = []
    for sg in model.subgraphs:
        for op in [op for op in sg.operators if op.builtin == builtin and ctx.is_input_op(op)
                   and id(op) not in done]:
            entries.append(rewrite_op(model, sg, op, ctx))
            if progress:
                progress(entries[-1])
    return entries


def eligible_ops(model: Model, ctx, builtin: int, check) -> list[Operator]:
    """The input model's ops of one builtin kind that pass `check(op, weight, ctx)` (a pass's eligibility
    check, which raises Skip), in every subgraph, in execution order."""
    out = []
    for sg in model.subgraphs:
        for op in sg.operators:
            if op.builtin != builtin or not ctx.is_input_op(op):
                continue
            try:
                check(op, read_weight(op), ctx)
            except Skip:
                continue
            out.append(op)
    return out
