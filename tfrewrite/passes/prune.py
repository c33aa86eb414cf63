"""Magnitude pruning of CONV_2D, DEPTHWISE_CONV_2D (with --prune-depthwise) and FULLY_CONNECTED weights.

Per layer, the weights of smallest magnitude are set to zero until the layer holds the requested share of
zeros (weights that are already zero count). FULLY_CONNECTED weights can be pruned in whole 1×k blocks
(--prune-block 1x4) so that the block-sparse kernel can read them; a full-integer int8 FULLY_CONNECTED is
pruned in 1×16 blocks instead, the only block its sparse kernel reads.

The weight keeps its storage form: float32, float16 behind a DEQUANTIZE, or int8 (dynamic-range or
full-integer, pruned in the integer domain: a zeroed value is exactly the zero point 0). Only the zeros are
written here; `sparse_encode` stores them in TFLite's sparse format. A weight whose zeros no kernel would read
sparse (`sparse_encode.storage_refusal`: every int8 weight but a full-integer int8 FC's) is not pruned: "does not
pay". A weight shared by several ops (in any subgraph: one Buffer) is pruned once, at its first reader, and stays
one shared Buffer, when every reader is a layer reading it as its weight that asks for the same pruning (the IR's
shared-weight policy, `analysis`).

With calibration rows for the layer (`--calibration`), pruning is data-aware instead (`linalg.obs`): the mask
and the kept weights minimise the change of the layer's outputs on the samples (SparseGPT's mask, then the
exact least-squares update of the kept weights), with the same block shapes; the bias is then corrected so that
the mean output on the samples is unchanged, and an int8 weight is requantized (new per-channel scales) after
the update. A full-integer layer is pruned on its quantized inputs captured from the int8 model, its kept
weights requantized and its int32 bias recomputed at s_in·s_w[c] with the bias correction
(`_requantize_full_integer`). A float weight several FULLY_CONNECTED (or several CONV_2D) ops read is pruned
once on the rows of all its readers together (`shared_rows`: H summed over them), each reader's bias corrected on
its own inputs; other shared weights are pruned by magnitude, the reason in the method.
"""
from __future__ import annotations

import numpy as np

from .. import io, schema
from ..ops import semantics
from ..analysis import macs, numel, weight_uses
from ..graph import Model, Operator, Quantization, Subgraph, Tensor
from ..linalg import sparse
from ..report import Entry
from .common import Skip, SparsityOption, StoredWeight, bias_values, find_stored_weight, new_entry
from .int8_chain import bias_real, per_tensor
from .sparse_encode import (INT8_FC_BLOCK, fc_direct_kind, planned_int8_fc_nbytes, planned_nbytes, planned_refusal,
                            storage_refusal)

OP = schema.BuiltinOperator
T = schema.TensorType
TARGETS = semantics.LAYER_OPS


def fc_block(op: Operator, weight: StoredWeight, block):
    """The block a FULLY_CONNECTED weight is pruned in: a full-integer one always in 1×16 (the only sparse form
    its kernel reads: other zeros would cost accuracy and save no byte), others in `block` (None: elements)."""
    if op.builtin != OP.FULLY_CONNECTED:
        return None
    return INT8_FC_BLOCK if weight.kind == "int8 (full-integer)" else block


def replaced_block_note(asked, used) -> str:
    """What the method says when `--prune-block` was not the block used (a full-integer FC's is always 1×16)."""
    if asked is None or used is None or tuple(asked) == tuple(used):
        return ""
    return (f" (--prune-block {asked[0]}x{asked[1]} not used: an int8 FULLY_CONNECTED is read sparse in "
            f"{used[0]}x{used[1]} blocks only)")


def keep_mask(op: Operator, weight: StoredWeight, sparsity: float, block) -> tuple[np.ndarray, str]:
    """(keep mask, method) for one layer."""
    mags = weight.magnitudes()
    asked, block = block, fc_block(op, weight, block)
    if block is not None:
        bh, bw = block
        rows, cols = mags.shape
        if rows % bh == 0 and cols % bw == 0:
            return (sparse.prune_blocks(mags, sparsity, block, norm="l2"),
                    f"block{bh}x{bw}" + replaced_block_note(asked, block))
        return sparse.prune_magnitude(mags, sparsity), f"magnitude (block {bh}x{bw} does not divide {rows}x{cols})"
    return sparse.prune_magnitude(mags, sparsity), "magnitude"


def dense_zeros_refusal(model: Model, weight: StoredWeight, keep: np.ndarray, settings,
                        full_int8: bool = False) -> str | None:
    """Why a float32 / float16 weight pruned to `keep` would still be stored dense (`sparse_encode.decide` on
    the values as that pass will see them: float16 after --quantize float16), None when it will be stored sparse.
    Asked before anything is zeroed, on the magnitude mask: the data-aware one removes as many weights (to the
    rounding of its column blocks), and the CSR bytes depend on their count only. Full-integer and int8 weights:
    `storage_refusal`."""
    if weight.kind not in ("float32", "float16") or full_int8:
        return None
    raw = np.asarray(weight.raw)
    planned = np.where(keep, raw, np.zeros((), raw.dtype))
    if weight.kind == "float32" and settings.quantize == "float16":
        planned = planned.astype(np.float16)
    return planned_refusal(model, weight, planned)


def _storage(op: Operator, weight: StoredWeight, settings, min_params: int, full_int8: bool) -> tuple[str, int, bool]:
    """How a prunable weight will be stored once the later passes ran: (form, its dense bytes, whether a float32
    FULLY_CONNECTED reads it directly, so that `sparse_encode` may drop DENSIFY)."""
    from .quantize import stored_itemsize
    n = numel(weight.tensor.shape)
    if weight.kind.startswith("int8") or full_int8:  # what storage_refusal lets through: a full-integer FC
        return "int8 (full-integer)", n, False
    store_as = {4: "float32", 2: "float16"}[stored_itemsize(weight.kind, n, settings.quantize, min_params)]
    direct_fc = store_as == "float32" and weight.carrier is None and fc_direct_kind(op, weight.tensor) == "float32"
    return store_as, n * (2 if store_as == "float16" else 4), direct_fc


def _planned_bytes(values: np.ndarray, store_as: str, direct_fc: bool) -> int:
    """Bytes `sparse_encode` will store `values` (zeros included) in, as `store_as`."""
    if store_as.startswith("int8"):
        return planned_int8_fc_nbytes(values)
    return planned_nbytes(np.asarray(values, np.float16) if store_as == "float16" else values, direct_fc)


def new_bias_bytes(op: Operator, weight: StoredWeight, full_int8: bool) -> int:
    """Bytes a data-aware prune adds to the file by giving a layer without a bias its corrected bias (0 for a layer
    with one: its new values replace the old): the values, and in a full-integer model the int32 bias's per-channel
    scales and zero points, its tensor and its buffer."""
    if _bias(op) is not None:
        return 0
    channels = weight.tensor.shape[-1] if op.builtin == OP.DEPTHWISE_CONV_2D else weight.tensor.shape[0]
    integer = full_int8 or weight.kind == "int8 (full-integer)"
    bias = Tensor(f"{op.outputs[0].name}/pruned_bias", T.INT32 if integer else T.FLOAT32, [channels],
                  quantization=Quantization.symmetric(np.ones(channels)) if integer else None)
    return 4 * channels + io.tensor_bytes(bias) + io.BUFFER_BYTES


def data_aware_reason(op: Operator, weight: StoredWeight) -> str | None:
    """Why this layer is pruned by magnitude although calibration rows exist, or None (a shared weight: see
    `shared_rows`)."""
    if op.builtin == OP.DEPTHWISE_CONV_2D and weight.kind.startswith("int8"):
        return "int8 depthwise weight: stored dense (int8 through DENSIFY makes XNNPACK fail to prepare)"
    if op.builtin not in (OP.FULLY_CONNECTED, OP.CONV_2D, OP.DEPTHWISE_CONV_2D):
        return "no data-aware pruning for this op"
    return None


def shared_rows(ops: list[Operator], weight: StoredWeight, layer_data: dict) -> tuple[dict | None, str | None]:
    """(pooled data, None) for a float weight read by several FULLY_CONNECTED or CONV_2D ops of one kind: the
    rows of all readers together (H summed over them), so one mask and update serve every reader; each reader's
    own `mean` / `target_mean` are kept under "readers" for its bias correction. (None, why) otherwise."""
    if weight.kind not in ("float32", "float16"):
        return None, "a shared int8 weight is pruned by magnitude"
    kinds = {op.builtin for op in ops}
    if len(kinds) > 1 or kinds - {OP.FULLY_CONNECTED, OP.CONV_2D}:
        return None, "its readers are not all FULLY_CONNECTED or all CONV_2D"
    missing = [op for op in ops if id(op) not in layer_data]
    if missing:
        return None, f"no calibration rows for the reader {missing[0].name} {missing[0].outputs[0].name!r}"
    parts = [layer_data[id(op)] for op in ops]
    pooled = {k: v for k, v in parts[0].items() if k not in ("rows", "mean", "target_rows", "target_mean")}
    pooled["rows"] = np.concatenate([d["rows"] for d in parts])
    pooled["mean"] = pooled["rows"].mean(axis=0, dtype=np.float64)
    if any(d.get("target_rows") is not None for d in parts):
        pooled["target_rows"] = np.concatenate([d.get("target_rows", d["rows"]) for d in parts])
        pooled["target_mean"] = pooled["target_rows"].mean(axis=0, dtype=np.float64)
    pooled["readers"] = [(op, d["mean"], d.get("target_mean")) for op, d in zip(ops, parts)]
    return pooled, None


class DataAwarePrune:
    """One layer pruned on its calibration rows: the weight as it will be stored, its float32 values, the
    keep mask and the method; `matrix` is the original weight as [out, in] real values."""

    def __init__(self, stored, values, keep, method, matrix, scales=None):
        self.stored, self.values, self.keep, self.method, self.matrix = stored, values, keep, method, matrix
        self.scales = scales  # new int8 scales (int8 weights only)


# Output channels quantized at a time: per-channel int8 quantization is separable along the channels, and its
# float64 temporaries for a whole 4096 x 25088 FC (VGG16's fc1) took 3 GB beside the weights.
CHANNEL_CHUNK = 256


def by_channels(fn, channels: int, axis: int | None) -> tuple:
    """fn(slice) over chunks of the output channels (axis 0), its arrays joined; one call unless per channel
    along axis 0."""
    if axis != 0 or channels <= CHANNEL_CHUNK:
        return fn(slice(None))
    parts = [fn(slice(a, a + CHANNEL_CHUNK)) for a in range(0, channels, CHANNEL_CHUNK)]
    return tuple(np.concatenate([part[i] for part in parts]) for i in range(len(parts[0])))


def data_aware_weights(op: Operator, weight: StoredWeight, sparsity: float, block, data: dict,
                       store_as: str | None = None, cache: dict | None = None) -> DataAwarePrune:
    """OBS/SparseGPT pruning on the layer's calibration rows, the kept weights updated, stored in the weight's own
    form (or as `store_as`: 'float16', the form --quantize float16 gives it later). Changes nothing in the graph.
    `cache`: kept between calls on the same rows (`obs.prune`)."""
    from ..linalg import obs, quant
    raw = np.asarray(weight.raw)
    shape = raw.shape
    real = weight.tensor.quantization.dequantize(raw) if raw.dtype.kind != "f" else np.asarray(raw, np.float32)
    matrix = real.reshape(shape[0], -1)  # [out, in]; conv inputs in patch order kh, kw, C
    width, suffix = 1, ""
    asked, block = block, fc_block(op, weight, block)
    if block is not None:
        bh, bw = block
        if bh == 1 and matrix.shape[1] % bw == 0:
            width, suffix = bw, f" block1x{bw}" + replaced_block_note(asked, block)
        else:
            suffix = f" (block {bh}x{bw} does not fit {matrix.shape[0]}x{matrix.shape[1]})"
    new, keep, method = obs.prune(matrix, data["rows"], sparsity, width=width, target_rows=data.get("target_rows"),
                                  damping=data.get("damping", obs.DEFAULT_DAMPING), cache=cache)
    scales = None
    if weight.kind == "float16" or store_as == "float16":
        stored = quant.to_float16(new.reshape(shape))
        values = stored.astype(np.float32)
    elif raw.dtype.kind == "i":
        q = weight.tensor.quantization
        axis = q.axis if len(np.asarray(q.scale).reshape(-1)) > 1 else None
        stored, scales = by_channels(lambda c: quant.quantize_symmetric_int8(new.reshape(shape)[c], axis=axis),
                                     shape[0], axis)
        values = Quantization.symmetric(scales, axis).dequantize(stored)
    else:
        stored = values = new.reshape(shape)  # float32 already
    return DataAwarePrune(stored, values.reshape(matrix.shape), keep, method + suffix, matrix, scales)


def prune_data_aware(sg: Subgraph, op: Operator, weight: StoredWeight, sparsity: float, block, data: dict,
                     entry: Entry) -> tuple[np.ndarray, str]:
    """(new stored weight, method): `data_aware_weights`, an int8 weight requantized (new per-channel scales),
    and the bias corrected (a new bias constant)."""
    from ..linalg import fit, obs
    full_integer = weight.kind == "int8 (full-integer)"
    channels = weight.tensor.shape[0]
    # Each reader's bias corrected on its own inputs' mean: `op`, or every reader of a shared weight whose rows
    # were pooled (`shared_rows`). A Skip here leaves the layers untouched.
    readers = data.get("readers") or [(op, data["mean"], data.get("target_mean"))]
    biases_before = [bias_real(op, channels) if full_integer else bias_values(_bias(reader), channels)
                     for reader, _, _ in readers]
    rows, target_rows = data["rows"], data.get("target_rows")
    result = data_aware_weights(op, weight, sparsity, block, data)
    matrix = result.matrix
    if full_integer:
        result, new_bias = _requantize_full_integer(sg, op, weight, result, biases_before[0], data)
    else:
        for (reader, mean, target_mean), before in zip(readers, biases_before):
            shift = fit.bias_shift(matrix, result.values, mean, target_mean)
            corrected = sg.add_constant(f"{reader.outputs[0].name}/pruned_bias",
                                        (before + shift.astype(np.float32)).astype(np.float32))
            if reader is op:
                new_bias = corrected
            else:
                _set_corrected_bias(reader, corrected, None)
    entry.output_error = obs.output_error(matrix, result.values, rows, target_rows)
    entry.output_error_magnitude = obs.output_error(
        matrix, matrix * keep_mask(op, weight, sparsity, block)[0].reshape(matrix.shape), rows, target_rows)
    _set_corrected_bias(op, new_bias, entry)
    return result.stored, result.method


def _bias(op: Operator) -> Tensor | None:
    return op.inputs[2] if len(op.inputs) > 2 else None


def _set_corrected_bias(op: Operator, bias: Tensor, entry: Entry | None) -> None:
    if len(op.inputs) > 2:
        op.inputs[2] = bias
    else:
        op.inputs.append(bias)
    if entry is not None:
        entry.bias_corrected = True


def prune_depthwise_data_aware(sg: Subgraph, op: Operator, weight: StoredWeight, sparsity: float, data: dict,
                               entry: Entry) -> tuple[np.ndarray, str]:
    """(new stored weight, method) of a float32 / float16 DEPTHWISE_CONV_2D pruned by exact OBS per channel on
    its calibration patches (`obs.prune_depthwise`), the bias corrected (a new bias constant)."""
    from ..linalg import obs, quant, sparse as sp
    raw = np.asarray(weight.raw)
    _, kh, kw, channels = raw.shape
    bias_before = bias_values(op.inputs[2] if len(op.inputs) > 2 else None, channels)
    taps = kh * kw
    matrix = np.asarray(raw, np.float32).reshape(taps, channels)
    # Output channel c reads input channel c // multiplier.
    source = np.arange(channels) // (channels // (data["rows"].shape[1] // taps))

    def per_channel(a):
        return None if a is None else np.asarray(a).reshape(*np.shape(a)[:-1], taps, -1)[..., source]
    rows, target_rows = per_channel(data["rows"]), per_channel(data.get("target_rows"))
    new, keep, method = obs.prune_depthwise(matrix, rows, sparsity, data.get("damping", obs.DEFAULT_DAMPING),
                                            target_rows)
    stored = quant.to_float16(new.reshape(raw.shape)) if weight.kind == "float16" else new.reshape(raw.shape)
    values = np.asarray(stored, np.float32).reshape(taps, channels)
    entry.output_error = obs.depthwise_output_error(matrix, values, rows, target_rows)
    magnitude = matrix * sp.prune_magnitude(np.abs(matrix), sparsity)
    entry.output_error_magnitude = obs.depthwise_output_error(matrix, magnitude, rows, target_rows)
    mean = per_channel(data["mean"])
    target_mean = mean if data.get("target_mean") is None else per_channel(data["target_mean"])
    shift = np.einsum("kc,kc->c", target_mean, matrix) - np.einsum("kc,kc->c", mean, values)
    new_bias = sg.add_constant(f"{op.outputs[0].name}/pruned_bias", (bias_before + shift).astype(np.float32))
    _set_corrected_bias(op, new_bias, entry)
    return stored, method


class RefusedByXnnpack(Exception):
    """The data-aware update would give an int8 op XNNPACK refuses: the layer is pruned by magnitude instead."""


def _requantize_full_integer(sg: Subgraph, op: Operator, weight: StoredWeight, result: DataAwarePrune,
                             bias_before: np.ndarray, data: dict) -> tuple[DataAwarePrune, Tensor]:
    """The updated real weights of a full-integer layer stored as its kernels read them: int8 symmetric (per
    channel when the weight was; zero point 0; scales recomputed, an all-zero channel keeping its old one), the
    bias int32 at s_in·s_w[c] (scales grown where it would overflow) and corrected so that the mean output on the
    samples is unchanged, computed with the weights as stored. Sets the weight's quantization; returns the stored
    result and the new bias tensor. RefusedByXnnpack when a requantization scale s_in·s_w/s_out would reach
    XNNPACK's limit (nothing changed then)."""
    from ..linalg import int8
    q_old = weight.tensor.quantization
    scales_old = np.asarray(q_old.scale, np.float32).reshape(-1)
    axis = q_old.axis if len(scales_old) > 1 else None
    shape = np.asarray(weight.raw).shape
    new = result.values.reshape(shape)  # SparseGPT's real values (float32), quantized below
    in_scale, out_scale = per_tensor(op.inputs[0])[0], per_tensor(op.outputs[0])[0]
    matrix = result.matrix
    mean = np.asarray(data["mean"], np.float64)
    target = mean if data.get("target_mean") is None else np.asarray(data["target_mean"], np.float64)

    def stored_values(q, scales):
        return Quantization.symmetric(scales, axis).dequantize(q).reshape(len(q), -1)

    def quantize(c):
        """(q, scales, stored real values [out, in]) of channels `c`."""
        q, scales = int8.weights(new[c], axis, zero_channel_scales=scales_old[c] if axis is not None else None)
        return q, scales, stored_values(q, scales)
    q, scales, values = by_channels(quantize, shape[0], axis)
    # W·E[t] − Ŵ·E[x] (`fit.bias_shift`) with the weights as stored, by chunks of channels in float64.
    corrected = bias_before + by_channels(
        lambda c: (matrix[c].astype(np.float64) @ target - values[c].astype(np.float64) @ mean,), shape[0], 0)[0]

    def with_bias(c):
        """(q, scales, int32 bias, bias scales) of channels `c`: the int32 bias at the weights' scales, a scale
        grown for it (|b| near 2^31, not seen in practice) requantizing the weights, the correction computed
        with the first ones."""
        return int8.weights_and_bias(new[c], corrected[c] if axis is not None else corrected, in_scale, axis,
                                     quantized=(q[c], scales[c]))
    grown_q, grown_scales, b, b_scales = by_channels(with_bias, shape[0], axis)
    if not np.array_equal(grown_scales, scales):
        q, scales = grown_q, grown_scales
        values = by_channels(lambda c: (stored_values(q[c], scales[c]),), shape[0], axis)[0]
    ratio = in_scale * float(np.max(scales)) / out_scale
    if not ratio < int8.MAX_REQUANTIZATION_SCALE:
        raise RefusedByXnnpack(f"the update's requantization scale s_in*s_w/s_out would be {ratio:.3g} (XNNPACK "
                               f"accepts below {int8.MAX_REQUANTIZATION_SCALE:g})")
    weight.tensor.quantization = Quantization.symmetric(scales, axis)
    new_bias = sg.add_constant(f"{op.outputs[0].name}/pruned_bias", b, quantization=Quantization.symmetric(b_scales))
    return DataAwarePrune(q, values, result.keep, result.method, result.matrix, scales), new_bias


def prune_op(model: Model, sg: Subgraph, op: Operator, ctx, done: dict) -> Entry:
    entry = new_entry(model, sg, op, "prune", ctx)
    w = op.inputs[1] if len(op.inputs) > 1 else None
    entry.weight_shape = list(w.shape) if w is not None else []
    entry.macs_before = entry.macs_after = macs(op, w) if w is not None else 0
    try:
        settings = ctx.settings(op)
        weight = find_stored_weight(op)
        n = numel(weight.tensor.shape)
        nonzero = int(np.count_nonzero(weight.raw))
        sparsity = round(1 - nonzero / max(n, 1), 6)
        entry.set(weight_dtype=weight.kind, params_before=nonzero, params_after=nonzero,
                  sparsity_before=sparsity, sparsity_after=sparsity)
        if id(weight.tensor.buffer) in done:
            raise Skip(f"shares its weight with {done[id(weight.tensor.buffer)]}, pruned once there")
        reason = _reason_to_leave(op, ctx, n)
        if reason:
            raise Skip(reason)
        reason = storage_refusal(op, weight, settings, ctx.plan.min_params, ctx.plan.full_int8)
        if reason:
            ctx.layer_data.pop(id(op), None)  # its rows are not needed: free them
            raise Skip(f"does not pay: {reason}; zeros would stay dense, so it is not pruned")
        uses = weight_uses(model, weight.tensor)
        if uses.shared:
            # Pruned once for every reader, in any subgraph: each must be a layer reading it as its weight and
            # asking for the same pruning.
            reason = uses.refusal(
                lambda u: u.op.builtin in TARGETS and u.index == 1 and (_reason_to_leave(u.op, ctx, n) or True),
                ask=lambda u: _asked(ctx.settings(u.op)), differ="its readers ask for different pruning")
            if reason:
                raise Skip(reason)
        magnitude = keep_mask(op, weight, float(settings.prune), settings.prune_block)
        reason = dense_zeros_refusal(model, weight, magnitude[0], settings, ctx.plan.full_int8)
        if reason:
            ctx.layer_data.pop(id(op), None)
            raise Skip(f"does not pay: {reason}; zeros would stay dense, so it is not pruned")
        data = ctx.layer_data.get(id(op))
        reason = None
        if data is not None and uses.shared:
            # One mask and update for every reader, fitted on all their rows.
            pool, reason = shared_rows(uses.ops, weight, ctx.layer_data)
            data = pool if pool is not None else data
        if data is not None:
            reason = reason or data_aware_reason(op, weight)
            if reason is None:
                refusal = _bias_refusal(op, weight, magnitude[0], settings, ctx.plan.min_params, ctx.plan.full_int8)
                if refusal:
                    ctx.layer_data.pop(id(op), None)
                    raise Skip(f"does not pay: {refusal}, so it is not pruned")
        pruned = None
        if data is not None and reason is None:
            try:
                if op.builtin == OP.DEPTHWISE_CONV_2D:
                    pruned, method = prune_depthwise_data_aware(sg, op, weight, float(settings.prune), data, entry)
                else:
                    pruned, method = prune_data_aware(sg, op, weight, float(settings.prune), settings.prune_block,
                                                      data, entry)
                    if "readers" in data:
                        method += f" (shared: on the rows of its {len(data['readers'])} readers)"
            except RefusedByXnnpack as e:
                reason = str(e)
            for reader in uses.ops if uses.shared else [op]:  # rows not needed again: free them
                ctx.layer_data.pop(id(reader), None)
        if pruned is None:
            keep, method = magnitude
            if reason is not None:
                method += f" ({reason})"
            raw = np.asarray(weight.raw)
            pruned = np.where(keep, raw, np.zeros((), raw.dtype)).astype(raw.dtype)
        # A new buffer (the input file's map is never written), still shared by every tensor that shared it.
        model.set_shared_data(weight.tensor, pruned)
        done[id(weight.tensor.buffer)] = f"{op.name} {op.outputs[0].name!r}"
        after = int(np.count_nonzero(pruned))
        entry.set(action="pruned", method=method, params_after=after, sparsity_after=round(1 - after / max(n, 1), 6))
    except Skip as e:
        entry.reason = str(e)
    return entry


def _bias_refusal(op: Operator, weight: StoredWeight, keep: np.ndarray, settings, min_params: int,
                  full_int8: bool) -> str | None:
    """Why a layer without a bias is not pruned data-aware: the corrected bias that prune gives it would take more
    bytes than its zeros free (`keep`: the magnitude mask; the data-aware one removes as many weights). Pruned by
    magnitude instead it would free the bytes but lose the update, and at a sparsity worth storing that breaks
    small layers (0.85 output error against 0.04). None when it pays, or the layer has a bias."""
    added = new_bias_bytes(op, weight, full_int8)
    if not added:
        return None
    store_as, dense_bytes, direct_fc = _storage(op, weight, settings, min_params, full_int8)
    raw = np.asarray(weight.raw)
    freed = dense_bytes - _planned_bytes(np.where(keep, raw, np.zeros((), raw.dtype)), store_as, direct_fc)
    if freed > added:
        return None
    return f"the corrected bias it needs would take {added} bytes, its zeros free {freed}"


def _reason_to_leave(op: Operator, ctx, n: int) -> str | None:
    """Why this layer is not pruned, whatever its weight (None: it is)."""
    settings = ctx.settings(op)
    reason = ctx.reason_to_skip(op, n)
    if reason:
        return reason
    if not settings.prune:
        return "no sparsity given"
    if op.builtin == OP.DEPTHWISE_CONV_2D and not settings.prune_depthwise:
        return "depthwise conv (use --prune-depthwise)"
    return None


def _asked(settings) -> tuple:
    return settings.prune, settings.prune_block


def run(model: Model, ctx, progress=None, skip=frozenset()) -> list[Entry]:
    """Prune every target op except those whose id is in `skip` (already pruned one by one, sequentially)."""
    entries = []
    done: dict = {}  # id(new Buffer) of weights pruned already → their first reader
    for sg in model.subgraphs:
        for op in [op for op in sg.operators if op.builtin in TARGETS and id(op) not in skip]:
            entries.append(prune_op(model, sg, op, ctx, done))
            if progress:
                progress(entries[-1])
    return entries


# Sparsities the budget (`--prune auto --target-size X`) may give a layer; below 30 % zeros nothing is stored sparse.
SPARSITY_OPTIONS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def sparsity_options(model: Model, op: Operator, settings, data: dict, sparsities=SPARSITY_OPTIONS,
                     min_params: int = 0, full_int8: bool = False) -> list:
    """The budget's options for pruning one layer (`--prune auto`; data-aware, on its calibration rows): per
    sparsity the bytes `sparse_encode` will really store (after --quantize float16 when asked) and the layer's
    relative output error. Skip when the layer cannot be pruned data-aware, when its zeros would not be stored
    sparse (`sparse_encode.storage_refusal`: of int8 weights, only a full-integer FC's are, in 1×16 blocks — of
    an int8 model, or any with `full_int8`: --quantize full-int8 follows; the budget adds its per-channel
    parameters, as for the dense layer: `budget._budget_layer`), or when no sparsity would save bytes."""
    from ..linalg import obs
    weight = find_stored_weight(op)
    reason = data_aware_reason(op, weight)
    if reason:
        raise Skip(reason)
    if weight_uses(model, weight.tensor).shared:
        raise Skip("weight shared with another op: no data-aware update")
    if op.builtin not in (OP.FULLY_CONNECTED, OP.CONV_2D):
        raise Skip("no data-aware pruning for this op")
    reason = storage_refusal(op, weight, settings, min_params, full_int8)
    if reason:
        raise Skip(reason)
    store_as, dense_bytes, direct_fc = _storage(op, weight, settings, min_params, full_int8)
    block = INT8_FC_BLOCK if store_as.startswith("int8") else settings.prune_block
    added = new_bias_bytes(op, weight, full_int8)  # the corrected bias a bias-free layer gets
    macs_ = macs(op, op.inputs[1])
    # Damage is judged on rows the prune did not see: fitted on the first half of the samples, measured on the
    # second. With fewer rows than inputs (an FC layer gets one row per image) the update reproduces the rows it
    # was fitted on almost exactly, whatever the sparsity (VGG fixture, 16 images: damage 0.000 at 85 %).
    rows = data["rows"]
    half = len(rows) // 2
    fit_data = {**data, "rows": rows[:half]}
    cache: dict = {}  # H and its factor, once for all sparsities
    options = []
    for s in sparsities:
        result = data_aware_weights(op, weight, s, block, fit_data,
                                    store_as=store_as if store_as == "float16" else None, cache=cache)
        nbytes = _planned_bytes(result.stored, store_as, direct_fc) + added
        if nbytes < dense_bytes:
            options.append(SparsityOption(s, int(np.count_nonzero(result.stored)), nbytes, macs_,
                                          obs.output_error(result.matrix, result.values, rows[half:])))
    if not options:
        raise Skip("no sparsity saves bytes")
    return options
