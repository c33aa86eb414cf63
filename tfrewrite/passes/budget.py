"""A whole-model budget (`--target-size X`, `--target-macs X`) spread over the layers where it hurts least.

For every low-rank candidate layer the damage of a few candidate ranks is measured on the calibration rows —
the layer's relative output error after the same data-aware fit the rewrite will use (for large convs, the
whitened-spectrum estimate described at EXACT_CONV_LIMIT) — then a search over one
shared damage level picks, for each layer, the cheapest candidate whose damage stays under it (AIMET's greedy
ratio selection, with a layer-local damage measure). The smallest level that meets the target wins.
Deterministic: fixed candidates, seeded decompositions, ties broken by layer order.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from .. import schema
from ..analysis import numel, static_shape
from .common import Skip, layer_metric, pixels, read_weight

OP = schema.BuiltinOperator
CANDIDATE_RATIOS = (1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
# Above this many kernel weights a k×k conv's candidates are not each fitted (a CP fit of a 512×3×3×512 kernel
# at rank 1500 takes tens of seconds): their damage is read off the whitened spectrum of the kernel's [out, k·k·in]
# matrix at the rank with the same number of parameters — the same measure the FC layers get, from one
# eigen-decomposition per layer.
EXACT_CONV_LIMIT = 300_000
# The whitened spectrum of an FC weight is computed up to the rank where m·n·r reaches this (VGG16's 4096×25088
# fc1: rank 292, a truncated SVD). Beyond it the energy not yet captured is taken as spread evenly over the
# remaining singular values: a spectrum that decreases puts more of it in the next ones, so the damage of a
# larger rank is over-estimated, never under-estimated.
SPECTRUM_WORK_LIMIT = 3e10
# CP candidates whose ALS work (rank × kernel weights per sweep) exceeds this are not offered: a rank-1500 CP of
# a 512×3×3×512 kernel takes minutes to fit and saves only a third of the weights.
CP_WORK_LIMIT = 1.2e9
ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1}


def _candidates(op, weight, policy, method):
    """(ratio, rank, params, macs, damage) for each profitable candidate of one layer."""
    from ..linalg import cp, fit, rank as rk, svd, tucker
    metric = layer_metric(policy)
    w = weight.values
    out = []
    if op.builtin == OP.FULLY_CONNECTED or (w.ndim == 4 and w.shape[1] == w.shape[2] == 1):
        m = w.shape[0]
        mat = w.reshape(m, -1)
        n = mat.shape[1]
        count = numel(static_shape(op.outputs[0])) // m
        r_cap = int(SPECTRUM_WORK_LIMIT // (m * n))
        if r_cap >= min(m, n) // 2:
            s = fit.whitened_singular_values(mat, metric)
            total = float(np.sum(s ** 2))
        else:
            whitened = metric.sqrt_apply(mat, 0.5).astype(np.float32)
            _, s, _ = svd.truncated_svd(whitened, r_cap)
            total = svd.squared_norm(whitened)
            del whitened
        captured = np.cumsum(s.astype(np.float64) ** 2)
        known, rest = len(s), min(m, n) - len(s)
        seen = set()
        for ratio in CANDIDATE_RATIOS:
            r = min(svd.rank_for_ratio(m, n, ratio), m, n)
            if r in seen or r * (m + n) >= m * n:
                continue
            seen.add(r)
            if r <= known:
                kept = captured[r - 1]
            else:  # beyond the computed spectrum: the remaining energy spread evenly (see above)
                tail = max(total - captured[-1], 0.0)
                kept = captured[-1] + tail * (r - known) / max(rest, 1)
            damage = float(np.sqrt(max(total - kept, 0.0) / total)) if total > 0 else 0.0
            out.append((ratio, r, r * (m + n), count * r * (m + n), damage))
        return out
    o, kh, kw, i = w.shape
    k = kh * kw
    kernel = w.reshape(o, k, i)
    in_px, out_px = pixels(op.inputs[0]), pixels(op.outputs[0])
    exact = w.size <= EXACT_CONV_LIMIT
    if not exact:
        s = fit.whitened_singular_values(w.reshape(o, -1), metric)
        total = float(np.sum(s ** 2))
    seen = set()
    for ratio in CANDIDATE_RATIOS:
        if method == "tucker2":
            r_out, r_in = rk.tucker2_ranks_for_ratio(o, k, i, ratio)
            key = (r_out, r_in)
            params = rk.tucker2_params(o, k, i, r_out, r_in)
            macs = in_px * i * r_in + out_px * k * r_in * r_out + out_px * r_out * o
        else:
            r = rk.cp_rank_for_ratio(o, k, i, ratio)
            if r * w.size > CP_WORK_LIMIT:
                continue
            key = r
            params = rk.cp_params(o, k, i, r)
            macs = in_px * i * r + out_px * k * r + out_px * r * o
        if key in seen or params >= w.size or macs >= out_px * k * i * o:
            continue
        seen.add(key)
        if not exact:
            r_eq = max(1, int(params // (o + k * i)))
            damage = float(np.sqrt(np.sum(s[r_eq:] ** 2) / total)) if total > 0 else 0.0
            out.append((ratio, key, params, macs, damage))
            continue
        if method == "tucker2":
            # A few HOOI sweeps: the damage ranking, not the last digit, matters here.
            res = tucker.tucker2(kernel, r_out, r_in, n_iter_max=5, tol=1e-5)
            u, core = fit.tucker2_output_fit(kernel, res.in_factor, r_out, metric)
            approx = np.einsum("tp,pkq,sq->tks", u, core, res.in_factor)
        else:
            # Fewer ALS sweeps than the final fit, for the same reason.
            res = cp.cp3(kernel, key, n_iter_max=40, tol=1e-5)
            phi = (res.mid_factor[:, None, :] * res.in_factor[None, :, :]).reshape(k * i, key)
            a = fit.refit_output_factor(w.reshape(o, -1), phi, metric)
            approx = (a @ phi.T).reshape(o, k, i)
        damage = fit.output_error(w.reshape(o, -1), approx.reshape(o, -1), metric)
        out.append((ratio, key, params, macs, damage))
    return out


def choose_ranks(model, plan, options, source=None, progress=None) -> dict:
    """Fill `plan.budget` (id(op) → LayerSettings) so the target is met; returns what the report shows."""
    from ..rewrite import lowrank_candidates
    by_macs = options.target_macs is not None
    target = options.target_macs if by_macs else options.target_size
    producers = model.main.producers()
    layers = []
    for op in lowrank_candidates(model, plan):
        if id(op) not in plan.layer_data:
            continue
        try:
            weight = read_weight(op, producers)
        except Skip:
            continue
        settings = plan.settings(op)
        policy = plan.rank_policy(op, "fc" if op.builtin == OP.FULLY_CONNECTED else "conv")
        cands = _candidates(op, weight, policy, settings.conv_method)
        if progress:
            progress(op)
        dense_params = weight.values.size
        dense_macs = numel(static_shape(op.outputs[0])) * int(np.prod(weight.values.shape[1:]))
        layers.append({"op": op, "weight": weight, "settings": settings, "candidates": cands,
                       "dense_params": dense_params, "dense_macs": dense_macs,
                       "itemsize": ITEMSIZE.get(weight.kind, 4)})

    def cost(layer, cand):
        if by_macs:
            return cand[3] if cand else layer["dense_macs"]
        return (cand[2] if cand else layer["dense_params"]) * layer["itemsize"]

    if by_macs:
        from ..analysis import summary
        total = summary(model, zeros=False)["totals"]["macs"]
    else:
        total = os.path.getsize(source) if source is not None else sum(
            layer["dense_params"] * layer["itemsize"] for layer in layers)
    goal = total / target
    fixed = total - sum(cost(layer, None) for layer in layers)

    def pick(level):
        choice = []
        for layer in layers:
            ok = [c for c in layer["candidates"] if c[4] <= level]
            choice.append(min(ok, key=lambda c: (cost(layer, c), c[4])) if ok else None)
        return choice, fixed + sum(cost(layer, c) for layer, c in zip(layers, choice))

    levels = sorted({c[4] for layer in layers for c in layer["candidates"]})
    chosen, level, reached = None, None, False
    for lv in levels:
        choice, achieved = pick(lv)
        if achieved <= goal:
            chosen, level, reached = choice, lv, True
            break
    if chosen is None:  # not reachable: the cheapest candidate everywhere
        level = levels[-1] if levels else 0.0
        chosen, achieved = pick(np.inf)
    else:
        achieved = pick(level)[1]
    spent = sum(cost(layer, c) for layer, c in zip(layers, chosen)) or 1
    report_layers = []
    for layer, c in zip(layers, chosen):
        op = layer["op"]
        if c is None:
            settings = replace(layer["settings"], rank=None, fc_rank=None, conv_rank=None, ratio=None, energy=None,
                               skip_reason="kept dense by the budget: the target is met at a damage level below every candidate rank's")
        else:
            settings = replace(layer["settings"], rank=None, fc_rank=None, conv_rank=None, ratio=c[0], energy=None)
        plan.budget[id(op)] = settings
        info = {"output": op.outputs[0].name, "rank": (list(c[1]) if isinstance(c[1], tuple) else c[1]) if c else None,
                "ratio": c[0] if c else None, "damage": round(c[4], 6) if c else 0.0,
                "share": round(cost(layer, c) / spent, 6),
                "candidates": [{"rank": list(x[1]) if isinstance(x[1], tuple) else x[1], "damage": round(x[4], 6)}
                               for x in layer["candidates"]]}
        plan.budget_info[id(op)] = info
        report_layers.append(info)
    return {"target": f"{target:g}x {'fewer MACs' if by_macs else 'smaller file'}", "reached": reached,
            "damage_level": round(float(level), 6), "estimate": round(total / max(achieved, 1), 3),
            "layers": report_layers}
