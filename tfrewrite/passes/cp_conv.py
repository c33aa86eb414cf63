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
from .common import (LayerWeight, RankPolicy, Skip, emit_weight, finish_data_aware, layer_cross, layer_metric,
                     lowrank_rel_error, pixels, rel_error, rewrite_all, rewrite_one, shared_key, emit_shared,
                     stored_weight_values, zero_bias)

OP = schema.BuiltinOperator
T = schema.TensorType


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


def rewrite_op(model: Model, sg: Subgraph, op: Operator, producers: dict, plan) -> dict:
    """Rewrite one CONV_2D as the plan says; returns its report entry (skipped ones say why)."""
    return rewrite_one(model, sg, op, producers, plan, "conv", _rewrite)


def _rewrite(sg, op, weight: LayerWeight, policy, plan, entry, producers):
    w = weight.values
    if w.ndim != 4:
        raise Skip("weight is not 4-D")
    o, kh, kw, i = w.shape
    x, bias, out = op.inputs[0], (op.inputs[2] if len(op.inputs) > 2 else None), op.outputs[0]
    opts = op.builtin_options
    in_pixels, out_pixels = pixels(x), pixels(out)
    bias_params = int(np.prod(bias.shape)) if bias is not None and bias.is_constant else 0
    dense_macs = out_pixels * kh * kw * i * o
    entry.update(kind="conv1x1" if kh == kw == 1 else "conv", weight_shape=[o, kh, kw, i], weight_dtype=weight.kind,
                 params_before=w.size + bias_params, params_after=w.size + bias_params,
                 macs_before=dense_macs, macs_after=dense_macs)
    reason = plan.reason_to_skip(op, w.size)
    if reason:
        raise Skip(reason)
    if static_shape(x)[-1] != i:
        raise Skip("grouped convolution")
    if weight.full_integer:
        int8_chain.check(op, weight, policy, entry)
    elif x.type != T.FLOAT32 or out.type != T.FLOAT32:
        raise Skip("input or output is not float32")
    if kh == kw == 1:
        return _rewrite_1x1(sg, op, weight, policy, plan, entry, bias, bias_params, out_pixels, producers)
    if not policy.active:
        raise Skip("no rank given")

    kernel = w.reshape(o, kh * kw, i)
    base = out.name.split(";")[0]
    stride = (opts.strideH, opts.strideW)
    dilation = (opts.dilationHFactor, opts.dilationWFactor)
    act = opts.fusedActivationFunction
    k = kh * kw
    metric = layer_metric(policy)
    if policy.method == "tucker2":
        from ..linalg import rank as rk
        r_out, r_in = choose_rank(kernel, policy)
        params = rk.tucker2_params(o, k, i, r_out, r_in)
        macs = in_pixels * i * r_in + out_pixels * k * r_in * r_out + out_pixels * r_out * o
        _check_profit(policy, params, w.size, macs, dense_macs, f"ranks {r_out}x{r_in}")
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
            from ..linalg import tucker
            res = tucker.tucker2(kernel, r_out, r_in)
            out_factor, core = res.out_factor, res.core
            if metric is not None:
                # Keep the input factor, fit output factor and core to the layer's outputs (reduced-rank regression).
                out_factor, core = fit.tucker2_output_fit(kernel, res.in_factor, r_out, metric,
                                                          layer_cross(policy, w.reshape(o, -1)))
            first = res.in_factor.T.reshape(r_in, 1, 1, i)
            middle = core.reshape(r_out, kh, kw, r_in)
            last = out_factor.reshape(o, 1, 1, r_out)
            sf, sm, sl = (stored_weight_values(a, weight, 0) for a in (first, middle, last))
            approx = np.einsum("tp,pkq,sq->tks", sl.reshape(o, r_out), sm.reshape(r_out, k, r_in),
                               sf.reshape(r_in, i).T)
            emitted = [emit_weight(sg, f"{base}/tucker2/in", first, weight, 0, hybrid=False),
                       emit_weight(sg, f"{base}/tucker2/core", middle, weight, 0),
                       emit_weight(sg, f"{base}/tucker2/out", last, weight, 0, hybrid=False)]
            return emitted, (sf, sm, sl, approx, {"init": "hosvd"})

        emitted = emit_shared(plan, sg, shared_key(weight, "tucker2", r_out, r_in), make) if entry.get("shared") \
            else make()
        ((w1, pre1), (w2, pre2), (w3, pre3)), (sf, sm, sl, approx, extra) = emitted
        bias = finish_data_aware(sg, entry, policy, w.reshape(o, -1), lambda: approx.reshape(o, -1), bias,
                                 producers, f"{base}/tucker2/bias")
        z1 = sg.add_activation(f"{base}/tucker2/z1", T.FLOAT32, static_shape(x)[:-1] + [r_in], like=x)
        z2 = sg.add_activation(f"{base}/tucker2/z2", T.FLOAT32, static_shape(out)[:-1] + [r_out], like=out)
        chain = [ops.conv2d(x, w1, zero_bias(sg, f"{base}/tucker2/in_bias", r_in), z1),
                 ops.conv2d(z1, w2, zero_bias(sg, f"{base}/tucker2/core_bias", r_out), z2, stride=stride,
                            padding=opts.padding, dilation=dilation),
                 ops.conv2d(z2, w3, bias, out, activation=act)]
        entry.update(method="tucker2", rank=[int(r_out), int(r_in)])
    else:
        from ..linalg import rank as rk
        r = choose_rank(kernel, policy)
        params = rk.cp_params(o, k, i, r)
        macs = in_pixels * i * r + out_pixels * k * r + out_pixels * r * o
        _check_profit(policy, params, w.size, macs, dense_macs, f"rank {r}")
        if weight.full_integer:  # the int8 chain refits the last factor on its quantized intermediate itself
            from ..linalg import cp
            res = cp.cp3(kernel, r)
            factors, approx = int8_chain.kxk(sg, op, weight, policy, entry, "cp", res.in_factor.T, res.mid_factor,
                                             res.out_factor, base)
            return _finish_int8(entry, factors, kernel, approx, "cp", int(r), params + bias_params, macs,
                                init=res.init, degeneracy=round(float(res.degeneracy), 4), n_iter=int(res.n_iter))

        def make():
            from ..linalg import cp
            from ..linalg.cp import cp_reconstruct
            res = cp.cp3(kernel, r)
            out_factor = res.out_factor
            first = res.in_factor.T.reshape(r, 1, 1, i)
            middle = res.mid_factor.reshape(1, kh, kw, r)
            sf, sm = stored_weight_values(first, weight, 0), stored_weight_values(middle, weight, 3)
            if metric is not None:
                # The pointwise → depthwise part maps a patch to z = Φᵀ·patch; fit the last 1×1 to the outputs.
                phi = (sm.reshape(k, 1, r) * sf.reshape(r, i).T[None, :, :]).reshape(k * i, r)
                out_factor = fit.refit_output_factor(w.reshape(o, -1), phi, metric,
                                                     layer_cross(policy, w.reshape(o, -1)))
            last = out_factor.reshape(o, 1, 1, r)
            sl = stored_weight_values(last, weight, 0)
            approx = cp_reconstruct(sl.reshape(o, r), sm.reshape(k, r), sf.reshape(r, i).T)
            emitted = [emit_weight(sg, f"{base}/cp/in", first, weight, 0, hybrid=False),
                       emit_weight(sg, f"{base}/cp/depthwise", middle, weight, 3),
                       emit_weight(sg, f"{base}/cp/out", last, weight, 0, hybrid=False)]
            extra = {"init": res.init, "degeneracy": round(float(res.degeneracy), 4), "n_iter": int(res.n_iter)}
            return emitted, (sf, sm, sl, approx, extra)

        emitted = emit_shared(plan, sg, shared_key(weight, "cp", r), make) if entry.get("shared") else make()
        ((w1, pre1), (w2, pre2), (w3, pre3)), (sf, sm, sl, approx, extra) = emitted
        bias = finish_data_aware(sg, entry, policy, w.reshape(o, -1), lambda: approx.reshape(o, -1), bias,
                                 producers, f"{base}/cp/bias")
        z1 = sg.add_activation(f"{base}/cp/z1", T.FLOAT32, static_shape(x)[:-1] + [r], like=x)
        z2 = sg.add_activation(f"{base}/cp/z2", T.FLOAT32, static_shape(out)[:-1] + [r], like=out)
        chain = [ops.conv2d(x, w1, zero_bias(sg, f"{base}/cp/in_bias", r), z1),
                 ops.depthwise_conv2d(z1, w2, zero_bias(sg, f"{base}/cp/depthwise_bias", r), z2, stride=stride,
                                      padding=opts.padding, dilation=dilation),
                 ops.conv2d(z2, w3, bias, out, activation=act)]
        entry.update(method="cp", rank=int(r))
    sg.replace_operator(op, pre1 + pre2 + pre3 + chain)
    entry.update(action="rewritten", params_after=params + bias_params, macs_after=macs,
                 rel_error=rel_error(kernel, approx), **extra)
    entry["factors"] = {"first": sf, "middle": sm, "last": sl}


def _finish_int8(entry, factors, kernel, approx, method, rank, params, macs, **extra):
    entry.update(action="rewritten", method=method, rank=rank, params_after=params, macs_after=macs,
                 rel_error=rel_error(kernel, approx), factors=factors, **extra)


def _check_profit(policy, params, dense_params, macs, dense_macs, what):
    if not policy.force and (params >= dense_params or macs >= dense_macs):
        raise Skip(f"{what} does not reduce parameters and MACs")


def _rewrite_1x1(sg, op, weight, policy, plan, entry, bias, bias_params, out_pixels, producers):
    if not policy.active:
        raise Skip("no rank given")
    o, _, _, i = weight.values.shape
    w = weight.values.reshape(o, i)
    r = lowrank_fc.choose_rank(w, policy)
    pb, pa, mb, ma = lowrank_fc.costs(out_pixels, o, i, r)
    _check_profit(policy, pa, pb, ma, mb, f"rank {r}")
    x, out, opts = op.inputs[0], op.outputs[0], op.builtin_options
    base = out.name.split(";")[0]
    if weight.full_integer:
        left, right = lowrank_fc.factorize(w, r, policy)
        factors = int8_chain.svd(sg, op, weight, policy, entry, left, right, base)
        entry.update(action="rewritten", method="svd", rank=r, params_after=pa + bias_params, macs_after=ma,
                     rel_error=lowrank_rel_error(w, factors["left"], factors["right"]),
                     factors={"left": factors["left"].reshape(o, 1, 1, r), "right": factors["right"].reshape(r, 1, 1, i)})
        return

    def make():
        left, right = lowrank_fc.factorize(w, r, policy)
        emitted = [emit_weight(sg, f"{base}/lowrank/right", right.reshape(r, 1, 1, i), weight, 0, hybrid=False),
                   emit_weight(sg, f"{base}/lowrank/left", left.reshape(o, 1, 1, r), weight, 0, hybrid=False)]
        return emitted, (stored_weight_values(left.reshape(o, 1, 1, r), weight, 0),
                         stored_weight_values(right.reshape(r, 1, 1, i), weight, 0))

    emitted = emit_shared(plan, sg, shared_key(weight, "svd1x1", r), make) if entry.get("shared") else make()
    ((w1, pre1), (w2, pre2)), (sl, sr) = emitted
    bias = finish_data_aware(sg, entry, policy, w, (sl.reshape(o, r), sr.reshape(r, i)), bias, producers,
                             f"{base}/lowrank/bias")
    mid = sg.add_activation(f"{base}/lowrank/mid", T.FLOAT32, static_shape(out)[:-1] + [r], like=out)
    chain = [ops.conv2d(x, w1, zero_bias(sg, f"{base}/lowrank/right_bias", r), mid, stride=(opts.strideH, opts.strideW),
                        padding=opts.padding),
             ops.conv2d(mid, w2, bias, out, activation=opts.fusedActivationFunction)]
    sg.replace_operator(op, pre1 + pre2 + chain)
    entry.update(action="rewritten", method="svd", rank=r, params_after=pa + bias_params, macs_after=ma,
                 rel_error=lowrank_rel_error(w, sl.reshape(o, r), sr.reshape(r, i)))
    entry["factors"] = {"left": sl, "right": sr}


def run(model: Model, plan, progress=None) -> list[dict]:
    return rewrite_all(model, plan, OP.CONV_2D, rewrite_op, progress)
