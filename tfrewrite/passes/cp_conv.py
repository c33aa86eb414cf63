"""CONV_2D rewrites.

- k×k, CP: CONV_2D 1×1 (in → R) → DEPTHWISE_CONV_2D k×k (R channels; stride, padding, dilation) →
  CONV_2D 1×1 (R → out; bias, activation), from the CP decomposition of the kernel viewed as [out, k·k, in].
- k×k, Tucker-2: CONV_2D 1×1 (in → R_in) → CONV_2D k×k (R_in → R_out) → CONV_2D 1×1 (R_out → out).
- 1×1: two 1×1 CONV_2D by truncated SVD (rank as for k×k convs); the stride goes to the first (cheaper, and
  exact for 1×1).

The first op of every chain has no bias, so zero padding of its output equals padding of the input.
"""
from __future__ import annotations

import numpy as np

from .. import ops, schema
from ..analysis import static_shape
from ..graph import Model, Operator, Subgraph
from . import int8_chain, lowrank_fc
from ..linalg import fit
from ..report import Entry
from .common import (QUICK_SWEEPS, LayerWeight, RankOption, RankPolicy, Skip, chain_bias, degenerate_reason,
                     eligible_ops, emit_shared, emit_weight, finish_data_aware, fit_metric, layer_cross, layer_metric,
                     lowrank_rel_error, output_variation_error, pixels, refuse_clearly_degenerate, refuse_degenerate,
                     rel_error, rewrite_all, rewrite_one, shared_key, size_changes, stored_weight_values, usable_option,
                     zero_bias)

OP = schema.BuiltinOperator
T = schema.TensorType
# Above this many kernel weights the budget does not fit each k×k candidate (a CP fit of a 512×3×3×512 kernel at
# rank 1500 takes tens of seconds): its damage is read off the (whitened) spectrum of the kernel's [out, k·k·in]
# matrix at the rank with the same number of parameters — the same measure the FC layers get.
EXACT_CONV_LIMIT = 300_000
# CP candidates whose ALS work (rank × kernel weights per sweep) exceeds this are not offered to the budget: a
# rank-1500 CP of a 512×3×3×512 kernel takes minutes to fit and saves only a third of the weights.
CP_WORK_LIMIT = 1.2e9


def choose_rank(kernel: np.ndarray, policy: RankPolicy):
    """CP: an int R; Tucker-2: (R_out, R_in). `kernel` is [out, k·k, in]."""
    from ..linalg import rank
    o, k, i = kernel.shape
    if policy.method == "tucker2":
        if policy.rank is not None:
            return min(policy.rank, o), min(policy.rank, i)
        if policy.ratio is not None:
            return rank.tucker2_ranks_for_ratio(o, k, i, policy.ratio)
        return rank.tucker2_ranks_for_energy(kernel, policy.energy)
    if policy.rank is not None:
        return max(1, policy.rank)
    if policy.ratio is not None:
        return rank.cp_rank_for_ratio(o, k, i, policy.ratio)
    return rank.cp_rank_for_energy(kernel, policy.energy)


def check(op: Operator, weight: LayerWeight, ctx) -> None:
    """Raise Skip (with the reason) when this pass must leave `op` as it is, whatever the rank: the one
    eligibility check that the rewrite, calibration and the budget share."""
    w = weight.values
    if w.ndim != 4:
        raise Skip("weight is not 4-D")
    reason = ctx.reason_to_skip(op, w.size)
    if reason:
        raise Skip(reason)
    x, out = op.inputs[0], op.outputs[0]
    if x is None or static_shape(x)[-1] != w.shape[3]:
        raise Skip("grouped convolution")
    if weight.full_integer:
        if not int8_chain.is_full_integer(op):
            raise Skip("mixed int8 / float activations")
    elif x.type != T.FLOAT32 or out.type != T.FLOAT32:
        raise Skip("input or output is not float32")


def candidates(model: Model, ctx) -> list[Operator]:
    """The CONV_2D ops of the input model this pass may rewrite."""
    return eligible_ops(model, ctx, OP.CONV_2D, check)


def chain_costs(method: str, o: int, k: int, i: int, in_pixels: int, out_pixels: int, rank) -> tuple[int, int]:
    """(params, MACs) of the k×k chain that replaces an [o, k, i] kernel: CP at rank R, Tucker-2 at (R_out, R_in)."""
    from ..linalg import rank as rk
    if method == "tucker2":
        r_out, r_in = rank
        return (rk.tucker2_params(o, k, i, r_out, r_in),
                in_pixels * i * r_in + out_pixels * k * r_in * r_out + out_pixels * r_out * o)
    return rk.cp_params(o, k, i, rank), in_pixels * i * rank + out_pixels * k * rank + out_pixels * rank * o


def chain_channels(method: str, o: int, rank) -> tuple[int, int, int]:
    """Output channels of the three ops of a k×k chain: CP (R, R, out), Tucker-2 (R_in, R_out, out)."""
    return (rank[1], rank[0], o) if method == "tucker2" else (rank, rank, o)


def fit_cp(kernel: np.ndarray, r: int, weight: LayerWeight, kh: int, kw: int, metric, cross=None, **als):
    """CP factors of an [o, k, i] kernel as they will be stored (first [r,1,1,i], middle [1,kh,kw,r], last
    [o,1,1,r]), the last fitted to the layer's outputs when there is a metric; plus the CP result and the
    stored approximation [o, k, i]."""
    from ..linalg import cp
    o, k, i = kernel.shape
    res = cp.cp3(kernel, r, **als)
    sf = stored_weight_values(res.in_factor.T.reshape(r, 1, 1, i), weight, 0)
    sm = stored_weight_values(res.mid_factor.reshape(1, kh, kw, r), weight, 3)
    out_factor = res.out_factor
    if metric is not None:
        # The pointwise → depthwise part maps a patch to z = Φᵀ·patch; fit the last 1×1 to the outputs.
        phi = (sm.reshape(k, 1, r) * sf.reshape(r, i).T[None, :, :]).reshape(k * i, r)
        out_factor = fit.refit_output_factor(kernel.reshape(o, -1), phi, metric, cross)
    sl = stored_weight_values(out_factor.reshape(o, 1, 1, r), weight, 0)
    approx = cp.cp_reconstruct(sl.reshape(o, r), sm.reshape(k, r), sf.reshape(r, i).T)
    return res, (sf, sm, sl), approx


def fit_tucker2(kernel: np.ndarray, ranks, weight: LayerWeight, kh: int, kw: int, metric, cross=None, **hooi):
    """Tucker-2 factors as they will be stored (in [r_in,1,1,i], core [r_out,kh,kw,r_in], out [o,1,1,r_out]),
    output factor and core fitted to the layer's outputs when there is a metric; plus the stored approximation."""
    from ..linalg import tucker
    o, k, i = kernel.shape
    r_out, r_in = ranks
    res = tucker.tucker2(kernel, r_out, r_in, **hooi)
    out_factor, core = res.out_factor, res.core
    if metric is not None:
        # Keep the input factor, fit output factor and core to the layer's outputs (reduced-rank regression).
        out_factor, core = fit.tucker2_output_fit(kernel, res.in_factor, r_out, metric, cross)
    sf, sm, sl = (stored_weight_values(a, weight, 0) for a in (
        res.in_factor.T.reshape(r_in, 1, 1, i), core.reshape(r_out, kh, kw, r_in), out_factor.reshape(o, 1, 1, r_out)))
    approx = tucker.tucker2_reconstruct(sl.reshape(o, r_out), sm.reshape(r_out, k, r_in), sf.reshape(r_in, i).T)
    return (sf, sm, sl), approx


def rank_options(op: Operator, weight: LayerWeight, policy: RankPolicy, ratios) -> list[RankOption]:
    """The profitable ranks at the given reduction ratios, with their costs and damage (for the budget).
    Damage: the layer's relative output error after the fit the rewrite will use (fewer ALS/HOOI sweeps: the
    ranking, not the last digit, matters), or for large kernels the spectrum estimate of EXACT_CONV_LIMIT."""
    from ..linalg import rank as rk, svd
    w = weight.values
    o, kh, kw, i = w.shape
    metric = layer_metric(policy)
    in_px, out_px = pixels(op.inputs[0]), pixels(op.outputs[0])
    if kh == kw == 1:
        picked = {}
        for ratio in ratios:
            r = min(svd.rank_for_ratio(o, i, ratio), o, i)
            _, params, _, macs = lowrank_fc.costs(out_px, o, i, r)
            if r not in picked and params < o * i:
                picked[r] = (ratio, params, macs)
        damages = lowrank_fc.spectrum_damages(w.reshape(o, i), metric, list(picked)) if picked else []
        options = [RankOption(ratio, r, p, m, d, (r, o)) for (r, (ratio, p, m)), d in zip(picked.items(), damages)]
        return [x for x in options if usable_option(x, (o, i), None, metric is not None)]
    k = kh * kw
    kernel = w.reshape(o, k, i)
    dense_macs = out_px * k * i * o
    picked = {}
    for ratio in ratios:
        if policy.method == "tucker2":
            key = rk.tucker2_ranks_for_ratio(o, k, i, ratio)
        else:
            key = rk.cp_rank_for_ratio(o, k, i, ratio)
            if key * w.size > CP_WORK_LIMIT:
                continue
        params, macs = chain_costs(policy.method, o, k, i, in_px, out_px, key)
        # Degenerate ranks are never offered: not fitted either.
        if key not in picked and params < w.size and macs < dense_macs \
                and degenerate_reason(key, (o, k * i), i) is None:
            picked[key] = (ratio, params, macs)
    exact = w.size <= EXACT_CONV_LIMIT
    if not exact and picked:
        equal_ranks = [max(1, int(params // (o + k * i))) for _, params, _ in picked.values()]
        damages = lowrank_fc.spectrum_damages(w.reshape(o, -1), metric, equal_ranks)
    else:
        fitter = fit_tucker2 if policy.method == "tucker2" else fit_cp
        # 12 CP sweeps (40 before: 45 % of the data-free budget's CPU time on the VGG-style fixture) chose the same
        # ranks without data at --target-size 2, 5 and 7.98; with calibration data one layer of nine differed at 5
        # (same top-1).
        sweeps = {"n_iter_max": 5, "tol": 1e-5} if policy.method == "tucker2" else {"n_iter_max": 12, "tol": 1e-4}
        damages = []
        for key in picked:
            approx = fitter(kernel, key, weight, kh, kw, metric, **sweeps)[-1]
            damages.append(fit.output_error(w.reshape(o, -1), approx.reshape(o, -1), metric) if metric is not None
                           else rel_error(kernel, approx))
    options = [RankOption(ratio, key, p, m, d, chain_channels(policy.method, o, key))
               for (key, (ratio, p, m)), d in zip(picked.items(), damages)]
    return [x for x in options if usable_option(x, (o, k * i), i, metric is not None)]


def rewrite_op(model: Model, sg: Subgraph, op: Operator, ctx) -> Entry:
    """Rewrite one CONV_2D as the plan says; returns its report entry (skipped ones say why)."""
    return rewrite_one(model, sg, op, ctx, "conv", _rewrite)


def _rewrite(sg, op, weight: LayerWeight, policy, ctx, entry):
    w = weight.values
    x, bias, out = op.inputs[0], (op.inputs[2] if len(op.inputs) > 2 else None), op.outputs[0]
    bias_params = int(np.prod(bias.shape)) if bias is not None and bias.is_constant else 0
    if w.ndim == 4:
        o, kh, kw, i = w.shape
        dense_macs = pixels(out) * kh * kw * i * o
        entry.set(kind="conv1x1" if kh == kw == 1 else "conv", weight_shape=[o, kh, kw, i],
                  weight_dtype=weight.kind, params_before=w.size + bias_params, params_after=w.size + bias_params,
                  macs_before=dense_macs, macs_after=dense_macs)
    check(op, weight, ctx)
    in_pixels, out_pixels = pixels(x), pixels(out)
    if weight.full_integer:
        int8_chain.check(op, weight, policy, entry)
    if kh == kw == 1:
        return _rewrite_1x1(sg, op, weight, policy, ctx, entry, bias, bias_params, out_pixels)
    if not policy.active:
        raise Skip("no rank given")

    kernel = w.reshape(o, kh * kw, i)
    base = out.name.split(";")[0]
    k = kh * kw
    metric = fit_metric(policy)
    cross = layer_cross(policy, w.reshape(o, -1)) if metric is not None else None
    rank = choose_rank(kernel, policy)
    params, macs = chain_costs(policy.method, o, k, i, in_pixels, out_pixels, rank)
    what = f"ranks {rank[0]}x{rank[1]}" if policy.method == "tucker2" else f"rank {rank}"
    _check_profit(policy, params, w.size, macs, dense_macs, what)
    refuse_degenerate(policy, rank, (o, k * i), in_channels=i)
    if policy.method == "tucker2":
        r_out, r_in = rank
        if weight.full_integer:
            from ..linalg import tucker
            res = tucker.tucker2(kernel, r_out, r_in)
            out_factor, core = fit.tucker2_output_fit(kernel, res.in_factor, r_out, metric,
                                                      layer_cross(policy, w.reshape(o, -1)))
            factors, approx = int8_chain.kxk(sg, op, weight, policy, entry, "tucker2", res.in_factor.T, core,
                                             out_factor, base)
            return _finish_int8(entry, factors, kernel, approx, "tucker2", [int(r_out), int(r_in)],
                                params + bias_params, macs, init="hosvd")

        def make():
            (sf, sm, sl), approx = fit_tucker2(kernel, rank, weight, kh, kw, metric, cross)
            weight_error = rel_error(kernel, approx)
            refuse_degenerate(policy, rank, (o, k * i), in_channels=i, weight_error=weight_error,
                              output_error=lambda: output_variation_error(policy, w.reshape(o, -1),
                                                                          approx.reshape(o, -1)))
            return _emit_factors(sg, base, "tucker2", (sf, sm, sl), weight), \
                (sf, sm, sl, approx, weight_error, {"init": "hosvd"})

        emitted = emit_shared(ctx, sg, shared_key(weight, "tucker2", r_out, r_in), make) if entry.shared \
            else make()
        factors, (sf, sm, sl, approx, weight_error, extra) = emitted
        bias = finish_data_aware(sg, entry, policy, w.reshape(o, -1), lambda: approx.reshape(o, -1), bias,
                                 f"{base}/tucker2/bias")
        _emit_kxk_chain(sg, op, "tucker2", factors, bias, rank)
        entry.set(method="tucker2", rank=[int(r_out), int(r_in)])
    else:
        r = rank
        if weight.full_integer:  # the int8 chain refits the last factor on its quantized intermediate itself
            from ..linalg import cp
            res = cp.cp3(kernel, r)
            factors, approx = int8_chain.kxk(sg, op, weight, policy, entry, "cp", res.in_factor.T, res.mid_factor,
                                             res.out_factor, base)
            return _finish_int8(entry, factors, kernel, approx, "cp", int(r), params + bias_params, macs,
                                init=res.init, degeneracy=round(float(res.degeneracy), 4), n_iter=int(res.n_iter))

        def make():
            refuse_clearly_degenerate(policy, lambda: output_variation_error(
                policy, w.reshape(o, -1), fit_cp(kernel, r, weight, kh, kw, metric, cross,
                                                 n_iter_max=QUICK_SWEEPS)[-1].reshape(o, -1)))
            res, (sf, sm, sl), approx = fit_cp(kernel, r, weight, kh, kw, metric, cross)
            weight_error = rel_error(kernel, approx)
            refuse_degenerate(policy, rank, (o, k * i), in_channels=i, weight_error=weight_error,
                              output_error=lambda: output_variation_error(policy, w.reshape(o, -1),
                                                                          approx.reshape(o, -1)))
            extra = {"init": res.init, "degeneracy": round(float(res.degeneracy), 4), "n_iter": int(res.n_iter)}
            return _emit_factors(sg, base, "cp", (sf, sm, sl), weight), (sf, sm, sl, approx, weight_error, extra)

        emitted = emit_shared(ctx, sg, shared_key(weight, "cp", r), make) if entry.shared else make()
        factors, (sf, sm, sl, approx, weight_error, extra) = emitted
        bias = finish_data_aware(sg, entry, policy, w.reshape(o, -1), lambda: approx.reshape(o, -1), bias,
                                 f"{base}/cp/bias")
        _emit_kxk_chain(sg, op, "cp", factors, bias, rank)
        entry.set(method="cp", rank=int(r))
    entry.set(action="rewritten", params_after=params + bias_params, macs_after=macs, rel_error=weight_error,
              **extra)
    entry.factors = {"first": sf, "middle": sm, "last": sl}


def _finish_int8(entry, factors, kernel, approx, method, rank, params, macs, **extra):
    entry.set(action="rewritten", method=method, rank=rank, params_after=params, macs_after=macs,
              rel_error=rel_error(kernel, approx), factors=factors, **extra)


def _check_profit(policy, params, dense_params, macs, dense_macs, what):
    if not policy.force and (params >= dense_params or macs >= dense_macs):
        raise Skip(f"{what} does not reduce parameters and MACs")


def _rewrite_1x1(sg, op, weight, policy, ctx, entry, bias, bias_params, out_pixels):
    if not policy.active:
        raise Skip("no rank given")
    o, _, _, i = weight.values.shape
    w = weight.values.reshape(o, i)
    r = lowrank_fc.choose_rank(w, policy)
    pb, pa, mb, ma = lowrank_fc.costs(out_pixels, o, i, r)
    _check_profit(policy, pa, pb, ma, mb, f"rank {r}")
    refuse_degenerate(policy, r, (o, i))
    x, out, opts = op.inputs[0], op.outputs[0], op.builtin_options
    base = out.name.split(";")[0]
    if weight.full_integer:
        left, right = lowrank_fc.factorize(w, r, policy)
        factors = int8_chain.svd(sg, op, weight, policy, entry, left, right, base)
        entry.set(action="rewritten", method="svd", rank=r, params_after=pa + bias_params, macs_after=ma,
                  rel_error=lowrank_rel_error(w, factors["left"], factors["right"]),
                  factors={"left": factors["left"].reshape(o, 1, 1, r), "right": factors["right"].reshape(r, 1, 1, i)})
        return

    def make():
        left, right = lowrank_fc.factorize(w, r, policy)
        sl = stored_weight_values(left.reshape(o, 1, 1, r), weight, 0)
        sr = stored_weight_values(right.reshape(r, 1, 1, i), weight, 0)
        weight_error = lowrank_rel_error(w, sl.reshape(o, r), sr.reshape(r, i))
        refuse_degenerate(policy, r, (o, i), weight_error=weight_error, output_error=lambda: output_variation_error(
            policy, w, factors=(sl.reshape(o, r), sr.reshape(r, i))))
        return _emit_1x1_factors(sg, base, left, right, weight), (sl, sr, weight_error)

    emitted = emit_shared(ctx, sg, shared_key(weight, "svd1x1", r), make) if entry.shared else make()
    factors, (sl, sr, weight_error) = emitted
    bias = finish_data_aware(sg, entry, policy, w, (sl.reshape(o, r), sr.reshape(r, i)), bias,
                             f"{base}/lowrank/bias")
    _emit_1x1_chain(sg, op, factors, bias, r)
    entry.set(action="rewritten", method="svd", rank=r, params_after=pa + bias_params, macs_after=ma,
              rel_error=weight_error)
    entry.factors = {"left": sl, "right": sr}


def _emit_factors(sg: Subgraph, base: str, method: str, factors: tuple, weight: LayerWeight) -> list:
    """The three factors of a k×k chain (as stored: `fit_cp` / `fit_tucker2`) as new weights stored as `weight`
    is: [(tensor, ops to run first), ...]."""
    sf, sm, sl = factors
    if method == "tucker2":
        return [emit_weight(sg, f"{base}/tucker2/in", sf, weight, 0, hybrid=False),
                emit_weight(sg, f"{base}/tucker2/core", sm, weight, 0),
                emit_weight(sg, f"{base}/tucker2/out", sl, weight, 0, hybrid=False)]
    return [emit_weight(sg, f"{base}/cp/in", sf, weight, 0, hybrid=False),
            emit_weight(sg, f"{base}/cp/depthwise", sm, weight, 3, hybrid=False),
            emit_weight(sg, f"{base}/cp/out", sl, weight, 0, hybrid=False)]


def _emit_kxk_chain(sg: Subgraph, op: Operator, method: str, factors: list, bias, rank) -> None:
    """Put the three ops of a k×k chain reading `factors` (`_emit_factors`) in `op`'s place."""
    ((w1, pre1), (w2, pre2), (w3, pre3)) = factors
    x, out, opts = op.inputs[0], op.outputs[0], op.builtin_options
    base = out.name.split(";")[0]
    stride, dilation = (opts.strideH, opts.strideW), (opts.dilationHFactor, opts.dilationWFactor)
    r_in, r_out, _ = chain_channels(method, 0, rank)
    z1 = sg.add_activation(f"{base}/{method}/z1", T.FLOAT32, static_shape(x)[:-1] + [r_in], like=x)
    z2 = sg.add_activation(f"{base}/{method}/z2", T.FLOAT32, static_shape(out)[:-1] + [r_out], like=out)
    if method == "tucker2":
        middle = ops.conv2d(z1, w2, zero_bias(sg, f"{base}/tucker2/core_bias", r_out), z2, stride=stride,
                            padding=opts.padding, dilation=dilation)
    else:
        middle = ops.depthwise_conv2d(z1, w2, zero_bias(sg, f"{base}/cp/depthwise_bias", r_out), z2, stride=stride,
                                      padding=opts.padding, dilation=dilation)
    chain = [ops.conv2d(x, w1, zero_bias(sg, f"{base}/{method}/in_bias", r_in), z1), middle,
             ops.conv2d(z2, w3, bias, out, activation=opts.fusedActivationFunction)]
    sg.replace_operator(op, pre1 + pre2 + pre3 + chain)


def _emit_1x1_factors(sg: Subgraph, base: str, left: np.ndarray, right: np.ndarray, weight: LayerWeight) -> list:
    """The two factors of a 1×1 conv (left [out, r], right [r, in]) as new 1×1 weights stored as `weight` is."""
    (o, r), i = left.shape, right.shape[1]
    return [emit_weight(sg, f"{base}/lowrank/right", right.reshape(r, 1, 1, i), weight, 0, hybrid=False),
            emit_weight(sg, f"{base}/lowrank/left", left.reshape(o, 1, 1, r), weight, 0, hybrid=False)]


def _emit_1x1_chain(sg: Subgraph, op: Operator, factors: list, bias, r: int) -> None:
    """Put the two 1×1 CONV_2D ops reading `factors` (`_emit_1x1_factors`) in `op`'s place."""
    (w1, pre1), (w2, pre2) = factors
    x, out, opts = op.inputs[0], op.outputs[0], op.builtin_options
    base = out.name.split(";")[0]
    mid = sg.add_activation(f"{base}/lowrank/mid", T.FLOAT32, static_shape(out)[:-1] + [r], like=out)
    chain = [ops.conv2d(x, w1, zero_bias(sg, f"{base}/lowrank/right_bias", r), mid, stride=(opts.strideH, opts.strideW),
                        padding=opts.padding),
             ops.conv2d(mid, w2, bias, out, activation=opts.fusedActivationFunction)]
    sg.replace_operator(op, pre1 + pre2 + chain)


def option_bytes(model: Model, op: Operator, weight: LayerWeight, options: list, policy: RankPolicy) -> list[int]:
    """The file bytes the rewrite at each option's rank adds (negative: frees), counted as its does-not-pay check
    counts them (`size_changes`): the same factors, ops and tensors, with placeholder values. Full-integer
    layers: `int8_chain.option_bytes`."""
    if weight.full_integer:
        return int8_chain.option_bytes(model, op, weight, options, policy, _chain_dry)
    o, kh, kw, i = weight.values.shape
    sg = op.subgraph
    base = op.outputs[0].name.split(";")[0]
    bias = op.inputs[2] if len(op.inputs) > 2 else None

    def emit(rank):
        if kh == kw == 1:
            factors = _emit_1x1_factors(sg, base, np.ones((o, rank), np.float32), np.ones((rank, i), np.float32),
                                        weight)
            _emit_1x1_chain(sg, op, factors, chain_bias(sg, policy, bias, o, f"{base}/lowrank/bias"), rank)
            return
        method = "tucker2" if isinstance(rank, tuple) else "cp"
        r_in, r_out, _ = chain_channels(method, o, rank)
        shapes = ((r_in, 1, 1, i), (r_out, kh, kw, r_in) if method == "tucker2" else (1, kh, kw, r_in), (o, 1, 1, r_out))
        factors = _emit_factors(sg, base, method, tuple(np.ones(s, np.float32) for s in shapes), weight)
        _emit_kxk_chain(sg, op, method, factors, chain_bias(sg, policy, bias, o, f"{base}/{method}/bias"), rank)
    return size_changes(model, sg, [lambda rank=x.rank: emit(rank) for x in options])


def _chain_dry(sg: Subgraph, op: Operator, weight: LayerWeight, policy: RankPolicy, option: RankOption,
               chain_type: type) -> None:
    """The full-integer chain of `option` with placeholder factors (`int8_chain.option_bytes`)."""
    o, kh, kw, i = weight.values.shape
    base, rank = op.outputs[0].name.split(";")[0], option.rank
    if kh == kw == 1:
        int8_chain.svd(sg, op, weight, policy, None, np.ones((o, rank)), np.ones((rank, i)), base, chain_type)
        return
    method = "tucker2" if isinstance(rank, tuple) else "cp"
    r_in, r_out, _ = chain_channels(method, o, rank)
    middle = np.ones((r_out, kh * kw, r_in)) if method == "tucker2" else np.ones((kh * kw, r_in))
    int8_chain.kxk(sg, op, weight, policy, None, method, np.ones((r_in, i)), middle, np.ones((o, r_out)), base,
                   chain_type)


def run(model: Model, ctx, progress=None, done=()) -> list[Entry]:
    return rewrite_all(model, ctx, OP.CONV_2D, rewrite_op, progress, done)
