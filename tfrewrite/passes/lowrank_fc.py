"""FULLY_CONNECTED [out, in] → FULLY_CONNECTED (in → r, no bias) → FULLY_CONNECTED (r → out, bias, activation).

Truncated SVD of the weight. The first op keeps `keep_num_dims` so inputs of rank > 2 flatten (or not)
exactly as before; the second carries the bias, the fused activation and the original output tensor.
"""
from __future__ import annotations

import numpy as np

from .. import ops, schema
from ..analysis import numel, static_shape
from ..graph import Model, Operator, Subgraph
from . import int8_chain
from ..report import Entry
from .common import (LayerWeight, RankOption, RankPolicy, Skip, chain_bias, eligible_ops, emit_shared,
                     emit_weight, finish_data_aware, fit_metric, layer_cross, layer_metric, lowrank_rel_error,
                     output_variation_error, refuse_degenerate, rewrite_all, rewrite_one, shared_key,
                     size_changes, stored_weight_values, usable_option)

OP = schema.BuiltinOperator
# The spectrum of a weight (whitened by the calibration metric when there is one) is computed up to the rank
# where m·n·r reaches this (VGG16's 4096×25088 fc1: rank 292, a truncated SVD). Beyond it the energy not yet
# captured is taken as spread evenly over the remaining singular values: a spectrum that decreases puts more of
# it in the next ones, so the damage of a larger rank is over-estimated, never under-estimated.
SPECTRUM_WORK_LIMIT = 3e10


def check(op: Operator, weight: LayerWeight, ctx) -> None:
    """Raise Skip (with the reason) when this pass must leave `op` as it is, whatever the rank: the one
    eligibility check that the rewrite, calibration and the budget share."""
    if weight.values.ndim != 2:
        raise Skip("weight is not 2-D")
    reason = ctx.reason_to_skip(op, weight.values.size)
    if reason:
        raise Skip(reason)
    options = op.builtin_options or schema.FullyConnectedOptionsT()
    if getattr(options, "weightsFormat", 0) != 0:
        raise Skip("shuffled weights format")
    x, out = op.inputs[0], op.outputs[0]
    if weight.full_integer:
        if not int8_chain.is_full_integer(op):
            raise Skip("mixed int8 / float activations")
    elif x is None or x.type != schema.TensorType.FLOAT32 or out.type != schema.TensorType.FLOAT32:
        raise Skip("input or output is not float32")
    columns = weight.values.shape[1]
    if x is not None and (not x.shape or any(d <= 0 for d in x.shape) or int(np.prod(x.shape)) % columns):
        # A Dense on a 3-D tensor behind a dynamic RESHAPE: the file stores [1, 1] (signature [-1, -1]), so the
        # factors' intermediate shape could not be written consistently.
        raise Skip(f"input shape {list(x.shape)} is only known at run time (shape signature "
                   f"{list(x.shape_signature) if x.shape_signature is not None else 'none'})")


def candidates(model: Model, ctx) -> list[Operator]:
    """The FULLY_CONNECTED ops of the input model this pass may rewrite."""
    return eligible_ops(model, ctx, OP.FULLY_CONNECTED, check)


def spectrum_damages(matrix: np.ndarray, metric, ranks: list[int]) -> list[float]:
    """For each rank r, the relative (output) error of the best rank-r approximation of `matrix`:
    √(Σ_{i>r} s_i² / Σ s_i²) over the singular values of W·Σ^½ (of W itself without a metric)."""
    from ..linalg import fit, svd
    m, n = matrix.shape
    r_cap = int(SPECTRUM_WORK_LIMIT // (m * n))
    whitened = matrix if metric is None else None
    if r_cap >= min(m, n) // 2:
        if metric is None:
            small = matrix.astype(np.float64)
            small = small @ small.T if m <= n else small.T @ small
            s = np.sqrt(np.maximum(np.linalg.eigvalsh(small)[::-1], 0.0))
        else:
            s = fit.whitened_singular_values(matrix, metric)
        total = float(np.sum(s.astype(np.float64) ** 2))
    else:
        if whitened is None:
            whitened = metric.sqrt_apply(matrix, 0.5).astype(np.float32)
        _, s, _ = svd.truncated_svd(whitened, r_cap)
        total = svd.squared_norm(whitened)
        del whitened
    captured = np.cumsum(s.astype(np.float64) ** 2)
    known, rest = len(s), min(m, n) - len(s)
    out = []
    for r in ranks:
        if r <= known:
            kept = captured[r - 1]
        else:  # beyond the computed spectrum: the remaining energy spread evenly (see SPECTRUM_WORK_LIMIT)
            tail = max(total - captured[-1], 0.0)
            kept = captured[-1] + tail * (r - known) / max(rest, 1)
        out.append(float(np.sqrt(max(total - kept, 0.0) / total)) if total > 0 else 0.0)
    return out


def shared_damages(matrix: np.ndarray, ranks: list[int], policy: RankPolicy, metrics: list) -> list[float]:
    """For each rank, the damage of the factors the rewrite gives a weight several FCs read (`factorize` with
    `policy`: on the readers' pooled rows): its relative output error on each reader's inputs (`metrics`), the
    worst of them."""
    from ..linalg import fit
    out = []
    for r in ranks:
        left, right = factorize(matrix, r, policy)
        out.append(max(fit.lowrank_output_error(matrix, left, right, metric) for metric in metrics))
    return out


def rank_options(op: Operator, weight: LayerWeight, policy: RankPolicy, ratios) -> list[RankOption]:
    """The profitable ranks at the given reduction ratios, with their costs and damage (for the budget)."""
    from ..linalg import svd
    w = weight.values
    m = w.shape[0]
    mat = w.reshape(m, -1)
    n = mat.shape[1]
    rows = numel(static_shape(op.outputs[0])) // m
    picked = {}
    for ratio in ratios:
        r = min(svd.rank_for_ratio(m, n, ratio), m, n)
        _, params, _, macs = costs(rows, m, n, r)
        if r not in picked and params < m * n:
            picked[r] = (ratio, params, macs)
    metric = layer_metric(policy)
    damages = spectrum_damages(mat, metric, list(picked)) if picked else []
    options = [RankOption(ratio, r, params, macs, d, (r, m))
               for (r, (ratio, params, macs)), d in zip(picked.items(), damages)]
    return [o for o in options if usable_option(o, (m, n), None, metric is not None)]


def choose_rank(weight: np.ndarray, policy: RankPolicy) -> int:
    from ..linalg import svd
    m, n = weight.shape
    if policy.rank is not None:
        return max(1, min(policy.rank, m, n))
    if policy.ratio is not None:
        return min(svd.rank_for_ratio(m, n, policy.ratio), m, n)
    return rank_for_energy(weight, policy.energy)


def rank_for_energy(weight: np.ndarray, energy: float) -> int:
    """Smallest rank keeping `energy` of ‖W‖²; grows a truncated SVD instead of computing the full one."""
    from ..linalg import svd
    total = svd.squared_norm(weight)
    if total == 0:
        return 1
    full = min(weight.shape)
    r = min(64, full)
    while True:
        _, s, _ = svd.truncated_svd(weight, r)
        kept = np.cumsum(s.astype(np.float64) ** 2) / total
        hit = np.nonzero(kept >= energy * (1 - 1e-12))[0]
        if len(hit):
            return int(hit[0]) + 1
        if r == full:
            return full
        r = min(full, 2 * r)


def factorize(weight: np.ndarray, rank: int, policy: RankPolicy) -> tuple[np.ndarray, np.ndarray]:
    """(left [out, r], right [r, in]): fitted to the layer's outputs on calibration rows when the policy has
    them, else to the weights (truncated SVD)."""
    from ..linalg import fit, svd
    metric = fit_metric(policy)
    if metric is not None:
        return fit.output_lowrank_factors(weight, metric, rank, layer_cross(policy, weight))
    return svd.lowrank_factors(weight, rank)


def costs(rows: int, m: int, n: int, r: int) -> tuple[int, int, int, int]:
    """(params before, after, MACs before, after) of an [m, n] layer applied to `rows` rows at rank r."""
    return m * n, r * (m + n), rows * m * n, rows * r * (m + n)


def rewrite_op(model: Model, sg: Subgraph, op: Operator, ctx) -> Entry:
    """Rewrite one FULLY_CONNECTED as the plan says; returns its report entry (skipped ones say why)."""
    return rewrite_one(model, sg, op, ctx, "fc", _rewrite)


def _rewrite(sg: Subgraph, op: Operator, weight: LayerWeight, policy: RankPolicy, ctx, entry: Entry):
    w = weight.values
    bias, out = (op.inputs[2] if len(op.inputs) > 2 else None), op.outputs[0]
    if w.ndim == 2:
        m, n = w.shape
        rows = numel(static_shape(out)) // m
        bias_params = numel(bias.shape) if bias is not None and bias.is_constant else 0
        entry.set(weight_shape=[m, n], weight_dtype=weight.kind, params_before=m * n + bias_params,
                  params_after=m * n + bias_params, macs_before=rows * m * n, macs_after=rows * m * n)
    check(op, weight, ctx)
    if weight.full_integer:
        int8_chain.check(op, weight, policy, entry)
    if not policy.active:
        raise Skip("no rank given")
    r = choose_rank(w, policy)
    pb, pa, mb, ma = costs(rows, m, n, r)
    if not policy.force and (pa >= pb or ma >= mb):
        raise Skip(f"rank {r} does not reduce parameters and MACs (break-even below {(m * n) // (m + n) + 1})")
    refuse_degenerate(policy, r, (m, n))

    base = out.name.split(";")[0]
    if weight.full_integer:
        left, right = factorize(w, r, policy)
        factors = int8_chain.svd(sg, op, weight, policy, entry, left, right, base)
        entry.set(action="rewritten", method="svd", rank=r, params_after=pa + bias_params, macs_after=ma,
                  rel_error=lowrank_rel_error(w, factors["left"], factors["right"]), factors=factors)
        return

    def make():
        left, right = factorize(w, r, policy)
        stored = stored_weight_values(left, weight), stored_weight_values(right, weight)
        weight_error = lowrank_rel_error(w, *stored)
        refuse_degenerate(policy, r, (m, n), weight_error=weight_error,
                          output_error=lambda: output_variation_error(policy, w, factors=stored))
        return _emit_factors(sg, base, left, right, weight), (*stored, weight_error)

    # A weight shared by several FCs (in any subgraph) gets one pair of factors, shared too.
    emitted = emit_shared(ctx, sg, shared_key(weight, "svd", r), make) if entry.shared else make()
    factors, (stored_left, stored_right, weight_error) = emitted
    bias = finish_data_aware(sg, entry, policy, w, (stored_left, stored_right), bias,
                             f"{base}/lowrank/bias")
    _emit_chain(sg, op, weight, factors, bias, r)

    entry.set(action="rewritten", method="svd", rank=r, params_after=pa + bias_params, macs_after=ma,
              rel_error=weight_error)
    entry.factors = {"left": stored_left, "right": stored_right}


def _emit_factors(sg: Subgraph, base: str, left: np.ndarray, right: np.ndarray, weight: LayerWeight) -> list:
    """The two factors as new weights stored as `weight` is (`emit_weight`): [(tensor, ops to run first), ...]."""
    return [emit_weight(sg, f"{base}/lowrank/right", right, weight),
            emit_weight(sg, f"{base}/lowrank/left", left, weight)]


def _emit_chain(sg: Subgraph, op: Operator, weight: LayerWeight, factors: list, bias, r: int) -> None:
    """Put the two FULLY_CONNECTED ops reading `factors` (`_emit_factors`) in `op`'s place."""
    (w1, pre1), (w2, pre2) = factors
    x, out = op.inputs[0], op.outputs[0]
    options = op.builtin_options or schema.FullyConnectedOptionsT()
    n = weight.values.shape[1]
    keep = bool(getattr(options, "keepNumDims", False))
    mid_shape = (static_shape(x)[:-1] if keep else [numel(static_shape(x)) // n]) + [r]
    mid = sg.add_activation(f"{out.name.split(';')[0]}/lowrank/mid", schema.TensorType.FLOAT32, mid_shape, like=x)
    if x.shape_signature is not None and not keep and any(d < 0 for d in x.shape_signature):
        mid.shape_signature = [-1, r]
    # Hybrid (float input, int8 weight): XNNPACK always quantizes the input asymmetrically, the builtin kernel only
    # with this flag; without it the two differ by ~0.5 % (tests/test_sweep.py), with it they agree to 1e-7.
    asym = bool(getattr(options, "asymmetricQuantizeInputs", False)) or weight.kind == "int8"
    fc1 = ops.fully_connected(x, w1, None, mid, keep_num_dims=keep, asymmetric_quantize_inputs=asym)
    fc2 = ops.fully_connected(mid, w2, bias, out, activation=options.fusedActivationFunction, keep_num_dims=keep,
                              asymmetric_quantize_inputs=asym)
    sg.replace_operator(op, pre1 + pre2 + [fc1, fc2])


def option_bytes(model: Model, op: Operator, weight: LayerWeight, options: list, policy: RankPolicy) -> list[int]:
    """The file bytes the rewrite at each option's rank adds (negative: frees), counted as its does-not-pay check
    counts them (`size_changes`): the same factors, ops and tensors, with placeholder values. Full-integer
    layers: `int8_chain.option_bytes`."""
    if weight.full_integer:
        return int8_chain.option_bytes(model, op, weight, options, policy, _chain_dry)
    m, n = weight.values.shape
    sg = op.subgraph
    base = op.outputs[0].name.split(";")[0]
    bias = op.inputs[2] if len(op.inputs) > 2 else None

    def emit(r):
        factors = _emit_factors(sg, base, np.ones((m, r), np.float32), np.ones((r, n), np.float32), weight)
        _emit_chain(sg, op, weight, factors, chain_bias(sg, policy, bias, m, f"{base}/lowrank/bias"), r)
    return size_changes(model, sg, [lambda r=o.rank: emit(r) for o in options])


def _chain_dry(sg: Subgraph, op: Operator, weight: LayerWeight, policy: RankPolicy, option: RankOption,
               chain_type: type) -> None:
    """The full-integer chain of `option` with placeholder factors (`int8_chain.option_bytes`)."""
    m, n = weight.values.shape
    r = option.rank
    int8_chain.svd(sg, op, weight, policy, None, np.ones((m, r)), np.ones((r, n)), op.outputs[0].name.split(";")[0],
                   chain_type)


def run(model: Model, ctx, progress=None, done=()) -> list[Entry]:
    return rewrite_all(model, ctx, OP.FULLY_CONNECTED, rewrite_op, progress, done)
