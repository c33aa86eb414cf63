"""The whole-model budget (`--target-size X`, `--target-macs X`): a planner that chooses every low-rank layer's
rank so the target is met where it hurts least. It decides; the passes edit.

Each low-rank pass offers, for every layer it may rewrite (its own `candidates`), a few ranks with their cost
and damage (`rank_options`: the layer's relative output error on the calibration rows after the same fit the
rewrite will use, or without calibration data the relative error of the weights themselves, which bounds the
relative output error for inputs spread evenly over all directions). A search over one shared damage level then
picks, for each layer, the cheapest option whose damage stays under it (AIMET's greedy ratio selection, with a
layer-local damage measure); the smallest level that meets the target wins.
Deterministic: fixed options, seeded decompositions, ties broken by layer order.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import schema
from .analysis import numel, static_shape
from .linalg.svd import blas_threads_for
from .passes.common import RankOption, Skip, SparsityOption, read_weight

OP = schema.BuiltinOperator
CANDIDATE_RATIOS = (1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1, "full-int8": 1}
KEPT_DENSE = "kept dense by the budget: the target is met at a damage level below every candidate option's"


@dataclass
class BudgetLayer:
    """One layer the budget may compress: its options (any kind with `.params`, `.macs`, `.damage`, and
    `.nbytes` when its bytes are not params × itemsize) and its dense cost (`dense_bytes` when known, else the
    weights' bytes)."""
    name: str
    options: list
    dense_params: int
    dense_macs: int
    itemsize: int = 4                 # bytes per weight as the run stores it
    input_bytes: int | None = None    # the dense weight's bytes in the input (default dense_params × itemsize)
    dense_bytes: float | None = None  # the dense layer's bytes as stored, when counted beyond its weights
    op_bytes: float = 0.0             # what each op of an option adds whatever its shape (tables), when counted
    readers: tuple = ()               # the other ops that read the same stored weight (a shared weight: one layer)


@dataclass
class Allocation:
    choice: list                      # per layer: one of its options, or None = kept dense
    level: float                      # the shared damage level
    estimate: float                   # total cost the choice gives (bytes or MACs)
    reached: bool                     # the estimate meets the goal


def cost(layer: BudgetLayer, option: RankOption | None, by_macs: bool) -> float:
    if by_macs:
        return option.macs if option else layer.dense_macs
    if option is None:
        return layer.dense_bytes if layer.dense_bytes is not None else layer.dense_params * layer.itemsize
    stored = getattr(option, "nbytes", None)
    return stored if stored is not None else option.params * layer.itemsize


def stored_bytes(params: int, channels: tuple, form: str, name_bytes: int) -> float:
    """About the file bytes of a layer's ops as `form` stores them ('float32', 'float16', 'int8' dynamic range,
    'full-int8'): weights, biases, quantization parameters and each op's tables (its weight, bias and output
    tensors with their names, two buffers). `channels`: each op's output channels, the layer's own output last.
    Per output channel a float32 bias costs 4 bytes; a per-channel int8 weight adds a float32 scale and an int64
    zero point (12), and a full-integer int32 bias the same again: `io.FULL_INT8_CHANNEL_BYTES` (28) per channel
    beside 1-byte weights.
    The ops before the last of a full-integer chain are quantized per tensor (their rank channels cost only a
    zero int32 bias each; `passes.int8_chain`, `passes.full_int8`)."""
    from .io import (BUFFER_BYTES, CHANNEL_QUANTIZATION_BYTES, FULL_INT8_CHANNEL_BYTES, OPERATOR_BYTES,
                     OPTIONS_BYTES, QUANTIZATION_BYTES, TENSOR_BYTES)
    tables = OPERATOR_BYTES + 16 + OPTIONS_BYTES + 3 * (TENSOR_BYTES + name_bytes + 16) + 2 * BUFFER_BYTES
    ops = len(channels)
    if form == "full-int8":
        per_tensor = QUANTIZATION_BYTES + CHANNEL_QUANTIZATION_BYTES  # one scale and one zero point
        return (params + FULL_INT8_CHANNEL_BYTES * channels[-1] + 4 * sum(channels[:-1])
                + ops * (tables + 3 * per_tensor))
    if form == "int8":
        return params + (4 + CHANNEL_QUANTIZATION_BYTES) * sum(channels) + ops * (tables + 2 * QUANTIZATION_BYTES)
    return params * ITEMSIZE[form] + 4 * sum(channels) + ops * tables


def full_int8_size(model, file_bytes: int) -> float:
    """About the file size of `model` (`file_bytes` as it is) once every float conv / FC / depthwise layer is
    quantized full-integer and every activation gets a scale and zero point: what `--quantize full-int8` alone
    would write, so that a target applies on top of it."""
    from .ops.semantics import LAYERS
    from .io import CHANNEL_QUANTIZATION_BYTES, QUANTIZATION_BYTES
    size = float(file_bytes)
    counted = []  # buffers already quantized: a weight several ops read is stored once
    for sg in model.subgraphs:
        for op in sg.operators:
            layout = LAYERS.get(op.builtin)
            if layout is None:
                continue
            try:
                weight = read_weight(op, layout.weight)
            except Skip:
                continue
            if weight.full_integer or weight.kind not in ("float32", "float16") or \
                    any(b is weight.stored.buffer for b in counted):
                continue
            counted.append(weight.stored.buffer)
            w, nb = weight.values, len(op.outputs[0].name)
            channels = (w.shape[layout.out_axis],)
            size += stored_bytes(w.size, channels, "full-int8", nb) - stored_bytes(w.size, channels, weight.kind, nb)
        size += sum(QUANTIZATION_BYTES + CHANNEL_QUANTIZATION_BYTES for t in sg.tensors if not t.is_constant)
    return size


def fixed_cost(layers: list, total: float, by_macs: bool) -> float:
    """What of `total` the layers' options do not touch: total minus each layer's dense cost in the input."""
    return total - sum(cost(layer, None, by_macs) if by_macs or getattr(layer, "input_bytes", None) is None
                       else layer.input_bytes for layer in layers)


def allocate(layers: list, total: float, goal: float, by_macs: bool = False, measure=None) -> Allocation:
    """The smallest shared damage level at which every layer's cheapest option under it brings `total` (the
    model's whole cost, the layers' dense costs included) down to `goal`; when no level does, the cheapest
    option everywhere (and `reached` False). `layers`: anything with `options` (each with `.params`, `.macs`,
    `.damage`) and `cost(option, by_macs)`-able dense costs (`BudgetLayer`). `measure(choice)`: the whole
    model's cost under a choice, for option kinds whose savings are not additive (pruning a layer's input and
    output channels); by default `total` minus what each chosen option saves."""
    fixed = fixed_cost(layers, total, by_macs)

    def pick(level):
        choice = []
        for layer in layers:
            ok = [o for o in layer.options if o.damage <= level]
            choice.append(min(ok, key=lambda o: (cost(layer, o, by_macs), o.damage)) if ok else None)
        if measure is not None:
            return choice, measure(choice)
        return choice, fixed + sum(cost(layer, c, by_macs) for layer, c in zip(layers, choice))

    levels = sorted({o.damage for layer in layers for o in layer.options})
    for level in levels:
        choice, achieved = pick(level)
        if achieved <= goal:
            return Allocation(choice, level, achieved, True)
    choice, achieved = pick(np.inf)
    return Allocation(choice, levels[-1] if levels else 0.0, achieved, False)


def give_back(layers: list, choice: list, goal: float, measure) -> tuple[list, float]:
    """The allocation's choice with what it spends beyond the goal given back: one step of the shared level can
    move many layers at once (a group's share jumps by 1/8 of its channels) and overshoot the goal. Repeatedly,
    the layer with the most damaging choice whose next less damaging option (or none) still meets `goal` takes
    it. Returns the new choice and its `measure`."""
    choice = list(choice)
    changed = True
    while changed:
        changed = False
        for i in sorted((i for i, c in enumerate(choice) if c is not None), key=lambda i: -choice[i].damage):
            below = [o for o in layers[i].options if o.damage < choice[i].damage]
            trial = choice[:i] + [max(below, key=lambda o: o.damage) if below else None] + choice[i + 1:]
            if measure(trial) <= goal:
                choice, changed = trial, True
                break
    return choice, measure(choice)


def plan_ranks(model, ctx, target: float, by_macs: bool, total: float, passes, progress=None,
               sparsity_options=None, full_int8: bool = False, per_tensor: bool = False) -> tuple[dict, dict, dict]:
    """Per-layer settings (id(op) → LayerSettings) that meet `target` (X times smaller file, or X times fewer MACs
    when `by_macs`), what the report shows per layer (id(op) → dict) and the budget's summary. `total`: the input's file bytes or MACs. `passes`: the low-rank
    pass modules, each with `candidates`, `rank_options` and its op kind. Layers with calibration rows are judged
    on them; without any, every candidate is judged on its weights. `sparsity_options(op)` (`--prune auto`): the
    prune pass's options for a layer with calibration rows (Skip: none); they join the layer's rank options.
    Costs count each weight as it will be stored (after --quantize float16 / int8); full-integer layers (of an
    int8 model, or all with `full_int8`: --quantize full-int8 follows) count their ops' bytes in the file
    (`stored_bytes`), and with `full_int8` the target applies to the input quantized alone (`full_int8_size`).
    `per_tensor` (--per-tensor auto): full-integer layers with calibration rows may also have their weights
    requantized per tensor (`per_tensor_layers`); the layers chosen go to `ctx.per_tensor`."""
    data_aware = bool(ctx.layer_data)
    ops, layers = rank_layers(model, ctx, passes, progress, full_int8)
    if sparsity_options is not None:
        ops, layers = add_sparsity_options(model, ctx, ops, layers, sparsity_options, None if passes else progress,
                                           full_int8)
    quantized, total = _baseline(model, total, by_macs, full_int8)
    pt_ops, pt_layers = per_tensor_layers(model, ctx) if per_tensor and not by_macs else ([], [])
    n = len(layers)
    everything = list(layers) + pt_layers
    result = allocate(everything, total, total / target, by_macs)
    if sparsity_options is not None and result.reached:
        # A sparsity step can halve a big layer's bytes (fc1 of the VGG fixture 0.8 → 0.9): give back what the
        # level step overshoots (data-free --prune auto --target-size 5 came out at 7.0x).
        fixed = fixed_cost(everything, total, by_macs)
        _give_back(result, everything, total / target,
                   lambda choice: fixed + sum(cost(layer, c, by_macs) for layer, c in zip(everything, choice)))
    limit = total / max(result.estimate, 1)
    kept = KEPT_DENSE
    if not result.reached:
        # Out of reach even with every layer at its most compressed option, where models break (MobileNetV2
        # fixture, low rank alone: at most 4.95x, at 11 %): nothing is rewritten, and the report says how far it goes.
        out_of_reach = f"cannot reach {target:g}x with {_techniques(everything)}: at most about {limit:.2f}x"
        kept = f"kept dense: the budget {out_of_reach}, with every layer at its most compressed option"
        result.choice = [None] * len(everything)
    settings, info = rank_settings(ctx, ops, layers, result.choice[:n], by_macs, kept)
    ctx.per_tensor = per_tensor_choice(pt_ops, result.choice[n:])
    note = None if result.reached else f"{out_of_reach}; {_unreached_hint(ctx, passes, sparsity_options, full_int8)}"
    damage = "measured on the calibration data" if data_aware else "estimated from the weights (no data)"
    if not everything:
        damage = "not measured (no layer the budget's techniques apply to)"
    summary = _summary(target, by_macs, quantized, total, result,
                       list(info.values()) + per_tensor_info(pt_layers, result.choice[n:], by_macs), note,
                       damage=damage)
    return settings, info, summary


def _baseline(model, total: float, by_macs: bool, full_int8: bool) -> tuple[bool, float]:
    """(whether the target applies to the input quantized alone, the total it applies to): with `full_int8`
    (--quantize full-int8 follows) a file target counts the model as that quantization alone would write it."""
    quantized = full_int8 and not by_macs
    return quantized, (full_int8_size(model, total) if quantized else total)


def _give_back(result: Allocation, layers: list, goal: float, measure) -> None:
    """`give_back` on an allocation that reached its goal: its choice, estimate and level updated."""
    result.choice, result.estimate = give_back(layers, result.choice, goal, measure)
    result.level = max((c.damage for c in result.choice if c is not None), default=0.0)


def _summary(target: float, by_macs: bool, quantized: bool, total: float, result: Allocation, layers: list,
             note: str | None = None, **fields) -> dict:
    """The budget's summary for the report: the target, `fields` (what the budget judged), the allocation's
    outcome, the per-layer rows, `note` when given, and the baseline the target applies to when it is the input
    quantized alone."""
    summary = {"target": f"{target:g}x {_target_measure(by_macs, quantized, total)}", "goal": target,
               "measure": "macs" if by_macs else "file", **fields, "reached": result.reached,
               "damage_level": round(float(result.level), 6), "estimate": round(total / max(result.estimate, 1), 3),
               "layers": layers}
    if note is not None:
        summary["note"] = note
    if quantized:
        summary["baseline_bytes"] = round(total)
    return summary


def rank_layers(model, ctx, passes, progress=None, full_int8: bool = False) -> tuple[list, list]:
    """(ops, their BudgetLayers with rank options) for every layer the low-rank passes may rewrite, in the
    input's order; with calibration rows, only the layers that have them. Layers count the bytes their ops
    will take in the file (`stored_bytes`), as full-integer layers with `full_int8` (--quantize full-int8
    follows). A weight several ops read is one layer (`_shared_layer`), at its first reader."""
    from .analysis import weight_uses
    data_aware = bool(ctx.layer_data)
    ops, layers = [], []
    for pass_ in passes:
        candidates = pass_.candidates(model, ctx)
        eligible, done = {id(op) for op in candidates}, set()
        for op in candidates:
            if id(op) in done or data_aware and id(op) not in ctx.layer_data:
                continue
            try:
                weight = read_weight(op)
            except Skip:
                continue
            kind = "fc" if op.builtin == OP.FULLY_CONNECTED else "conv"
            uses = weight_uses(model, weight.stored)
            if uses.shared:
                done.update(id(o) for o in uses.ops)
                layer = _shared_layer(pass_, op, weight, uses, eligible, ctx, full_int8)
                if layer is None:
                    continue
            else:
                policy = ctx.rank_policy(op, kind)
                with blas_threads_for(weight.values.size):
                    options = pass_.rank_options(op, weight, policy, CANDIDATE_RATIOS)
                layer = _budget_layer(op, weight, options, ctx, full_int8,
                                      lambda ranked: pass_.option_bytes(model, op, weight, ranked, policy))
            if progress:
                progress(op)
            ops.append(op)
            layers.append(layer)
    return _in_input_order(ctx, ops, layers)


def reader_bytes(name_bytes: int) -> float:
    """About the file bytes one more reader of a low-rank weight adds beside the factors: a second op and the
    intermediate tensor between its two ops."""
    from .io import OPERATOR_BYTES, OPTIONS_BYTES, TENSOR_BYTES
    return OPERATOR_BYTES + OPTIONS_BYTES + 16 + TENSOR_BYTES + name_bytes + 16 + 8


def _shared_layer(pass_, op, weight, uses, eligible: set, ctx, full_int8: bool) -> BudgetLayer | None:
    """The budget layer of a weight several ops read (an unrolled RNN's recurrent weight: one per time step), or
    None when its readers cannot all get one set of factors (`shared_refusal`, which the rewrite asks too). It is
    counted once: its bytes once, every reader's MACs; each option's bytes are the factors once plus each
    reader's new op and tensor (`reader_bytes`), and only options that pay for all of them are offered. The
    rewrite fits a shared weight on all its readers' rows together (`shared_layer_data`; not on one reader's), so
    an option's damage is that fit's: its relative output error on every reader's rows, the worst of them (the
    pass's `shared_damages`; without rows the weights' own relative error)."""
    from .passes.common import layer_metric, shared_layer_data, shared_refusal
    kind = "fc" if op.builtin == OP.FULLY_CONNECTED else "conv"
    readers = uses.ops
    if weight.full_integer or shared_refusal(ctx, op, kind, weight, uses, eligible):
        return None  # a full-integer chain is fitted to its own layer (passes.int8_chain refuses shared weights)
    pooled = shared_layer_data(ctx, readers) if hasattr(pass_, "shared_damages") else None
    if ctx.layer_data and pooled is None:
        return None  # a reader without rows, or no measure of the shared fit on the readers' rows (convs)
    policy = replace(ctx.rank_policy(op, kind), extra=pooled or {})
    policy.budgeted = True
    with blas_threads_for(weight.values.size):
        options = pass_.rank_options(op, weight, policy, CANDIDATE_RATIOS)
        if pooled is not None and options:
            metrics = [layer_metric(ctx.rank_policy(reader, kind)) for reader in readers]
            damages = pass_.shared_damages(weight.values, [o.rank for o in options], policy, metrics)
            options = [o._replace(damage=d) for o, d in zip(options, damages)]
    layer = _budget_layer(op, weight, options, ctx, full_int8)
    dense_macs = layer.dense_macs
    layer.dense_macs = sum(numel(static_shape(r.outputs[0])) * int(np.prod(weight.values.shape[1:]))
                           for r in readers)
    extra = reader_bytes(len(op.outputs[0].name.split(";")[0]) + 12)
    dense = cost(layer, None, False)
    options = []
    for o in layer.options:
        nbytes = cost(layer, o, False) + len(readers) * extra
        if nbytes < dense:
            options.append(o._replace(macs=o.macs * layer.dense_macs / max(dense_macs, 1), nbytes=nbytes))
    layer.options, layer.readers = options, tuple(r for r in readers if r is not op)
    return layer


def add_sparsity_options(model, ctx, ops: list, layers: list, sparsity_options, progress=None,
                         full_int8: bool = False) -> tuple[list, list]:
    """`ops`, `layers` with every main-subgraph layer that has calibration rows given its sparsity options
    (`sparsity_options(op)`; Skip: none): added to its rank options, or as a layer of its own (counted as
    full-integer with `full_int8`). A weight several ops read gets none: a reader's options are its own (its
    rows, its bytes), and counted per reader they would count the weight's bytes once per reader."""
    from .analysis import weight_uses
    ops, layers = list(ops), list(layers)
    index = {id(op): i for i, op in enumerate(ops)}
    for op in [op for op in model.main.operators if id(op) in ctx.layer_data]:
        try:
            weight = read_weight(op)
            if weight_uses(model, weight.stored).shared:
                continue
            options = sparsity_options(op)
        except Skip:
            continue
        if progress:
            progress(op)
        if id(op) in index:
            layers[index[id(op)]].options.extend(_with_layer_overhead(options, layers[index[id(op)]], weight))
        else:
            ops.append(op)
            layers.append(_budget_layer(op, weight, options, ctx, full_int8))
    return _in_input_order(ctx, ops, layers)


def _in_input_order(ctx, ops: list, layers: list) -> tuple[list, list]:
    order = {id(op): ctx.positions.get(id(op), (0, i)) for i, op in enumerate(ops)}
    ops, layers = zip(*sorted(zip(ops, layers), key=lambda p: order[id(p[0])])) if ops else ((), ())
    return list(ops), list(layers)


def per_tensor_layers(model, ctx) -> tuple[list, list]:
    """(ops, BudgetLayers) for `--per-tensor auto`: every full-integer layer with calibration rows whose weights
    may be requantized per tensor (`passes.per_tensor.candidates`), with that one option. Its cost is the bytes
    of the weight's and bias's quantization parameters (24 per output channel, or 24 per tensor): what it saves
    adds to what a rank or a channel share saves on the same layer (a low-rank chain's last op takes the
    layer's weight quantization; the first ops of a chain are per tensor already)."""
    from .passes import per_tensor
    ops, layers = [], []
    for op in per_tensor.candidates(model, ctx):
        data = ctx.layer_data.get(id(op))
        if data is None:
            continue
        option = per_tensor.option(op, data["rows"])
        dense = per_tensor.per_channel_bytes(op)
        ops.append(op)
        layers.append(BudgetLayer(op.outputs[0].name, [option], option.params, option.macs, 1,
                                  input_bytes=dense, dense_bytes=dense))
    return ops, layers


def per_tensor_choice(ops: list, choice: list) -> dict:
    """id(op) → damage of every layer whose per-tensor option was chosen."""
    return {id(op): c.damage for op, c in zip(ops, choice) if c is not None}


def per_tensor_info(layers: list, choice: list, by_macs: bool) -> list[dict]:
    """What the report shows of the per-tensor layers: chosen or not, the damage, the share of their bytes."""
    spent = sum(cost(layer, c, by_macs) for layer, c in zip(layers, choice)) or 1
    return [{"output": layer.name, "per_tensor": c is not None, "damage": round(c.damage, 6) if c else 0.0,
             "share": round(cost(layer, c, by_macs) / spent, 6),
             "candidates": [{"per_tensor": True, "damage": round(o.damage, 6)} for o in layer.options]}
            for layer, c in zip(layers, choice)]


def _unreached_hint(ctx, passes, sparsity_options, full_int8: bool) -> str:
    """What the note on an unreached target says was done, and what else to try (the options not given)."""
    more = [option for option, given in (("--rank auto", bool(passes)), ("--prune auto", sparsity_options is not None),
                                         ("--quantize", full_int8 or ctx.uses("quantize"))) if not given]
    quantized = full_int8 or ctx.uses("quantize")
    done = "the budget's layers were left as they are" + (", the model still quantized" if quantized else "")
    return f"{done}: ask for less{', or add ' + ' or '.join(more) if more else ''}"


def _techniques(layers: list) -> str:
    """What the layers' options are, for a message: 'low rank', 'pruning', 'per-tensor weights', joined."""
    from .passes.per_tensor import PerTensorOption
    kinds = {type(o) for layer in layers for o in layer.options}
    names = (("low rank", RankOption), ("pruning", SparsityOption), ("per-tensor weights", PerTensorOption))
    return " and ".join(name for name, kind in names if kind in kinds) or "the options asked (no layer qualified)"


def rank_settings(ctx, ops: list, layers: list, choice: list, by_macs: bool, kept: str = KEPT_DENSE
                  ) -> tuple[dict, dict]:
    """The chosen ranks (or sparsities) as per-layer settings (id(op) → LayerSettings; a layer without a choice
    is kept dense, for the reason `kept`) and what the report shows per layer."""
    spent = sum(cost(layer, c, by_macs) for layer, c in zip(layers, choice)) or 1
    settings, info = {}, {}
    for op, layer, c in zip(ops, layers, choice):
        base = ctx.settings(op)
        cleared = dict(rank=None, fc_rank=None, conv_rank=None, energy=None)
        if c is None:
            settings[id(op)] = replace(base, **cleared, ratio=None, skip_reason=kept)
        elif isinstance(c, SparsityOption):
            settings[id(op)] = replace(base, **cleared, ratio=None, prune=c.sparsity)
        else:
            settings[id(op)] = replace(base, **cleared, ratio=c.ratio)
        for reader in getattr(layer, "readers", ()):  # a shared weight: every reader gets the same choice
            settings[id(reader)] = replace(ctx.settings(reader), **{k: getattr(settings[id(op)], k) for k in
                                                                   ("rank", "fc_rank", "conv_rank", "energy",
                                                                    "ratio", "skip_reason", "prune")})
        info[id(op)] = {"output": layer.name, **_option_json(c), "damage": round(c.damage, 6) if c else 0.0,
                        "share": round(cost(layer, c, by_macs) / spent, 6),
                        "candidates": [{**_option_json(o), "damage": round(o.damage, 6)} for o in layer.options]}
    return settings, info


def _budget_layer(op, weight, options: list, ctx, full_int8: bool = False, option_bytes=None) -> BudgetLayer:
    """A layer's budget entry: its dense cost as stored in the input, its options at the itemsize the run stores
    its weights in (a float32 weight becomes float16 / int8 under --quantize). Where the weights stay as they are
    stored, an option's bytes are what its rewrite adds to the file (`option_bytes(options)`, one number per rank
    option: the pass's own factors with their scales and zero points, DEQUANTIZE ops and their float tensors,
    biases, intermediate tensors and op tables, counted as its does-not-pay check counts them); with `full_int8`
    (--quantize full-int8 follows) the bytes of its ops as full-integer layers (`stored_bytes`: 28 bytes per
    output channel beside the 1-byte weights). An option whose ops would take more than the dense layer is not
    offered (small int8 layers: each new op's tables and quantization parameters outweigh the weights it saves)."""
    from .passes import quantize
    w = weight.values
    now = ITEMSIZE.get(weight.kind, 4)
    macs_ = numel(static_shape(op.outputs[0])) * int(np.prod(w.shape[1:]))
    integer = weight.full_integer or full_int8

    def stored_as() -> int:  # the itemsize --quantize stores a float weight in (no context for an integer layer)
        return quantize.stored_itemsize(weight.kind, w.size, ctx.settings(op).quantize, ctx.plan.min_params)
    measured = option_bytes is not None and (weight.full_integer or not full_int8 and stored_as() == now)
    if not (measured or integer):
        return BudgetLayer(op.outputs[0].name, list(options), w.size, macs_, stored_as(), input_bytes=w.size * now)
    # The dense cost of a full-integer layer is its ops' bytes as `stored_bytes` counts them (as its sparsity
    # options and channel cuts are counted), of the others their weights' bytes.
    nb = len(op.outputs[0].name.split(";")[0]) + 12  # the chain's tensors: the layer's name + a suffix
    dense = stored_bytes(w.size, (w.shape[0],), "full-int8", nb) if integer else w.size * now
    layer = BudgetLayer(op.outputs[0].name, [], w.size, macs_, 1 if integer else now, input_bytes=dense,
                        dense_bytes=dense, op_bytes=stored_bytes(0, (0,), "full-int8", nb) if integer else 0.0)
    if measured:  # an option costs the dense bytes plus what its rewrite adds (negative where it frees bytes)
        ranked = [o for o in options if isinstance(o, RankOption)]
        added = dict(zip(map(id, ranked), option_bytes(ranked)))
        options = [o._replace(nbytes=dense + added[id(o)]) if id(o) in added else o for o in options]
    else:
        options = [o._replace(nbytes=stored_bytes(o.params, o.channels, "full-int8", nb))
                   if getattr(o, "channels", None) else o for o in options]
    layer.options = [o for o in _with_layer_overhead(options, layer, weight) if o.nbytes is None or o.nbytes < dense]
    return layer


def _with_layer_overhead(options: list, layer: BudgetLayer, weight) -> list:
    """Sparsity options (whose bytes are the sparse weight's alone) of a layer whose dense cost counts more
    than its weights (`dense_bytes`: a full-integer layer's bias, per-channel scales and zero points, op and
    tensor tables): charged the same overhead, which the sparse layer keeps."""
    if layer.dense_bytes is None:
        return list(options)
    overhead = layer.dense_bytes - weight.values.size * layer.itemsize
    return [o._replace(nbytes=o.nbytes + overhead) if isinstance(o, SparsityOption) else o for o in options]


def _option_json(option) -> dict:
    """What the report says of a chosen or candidate option (rank and ratio, or sparsity and bytes)."""
    if isinstance(option, SparsityOption):
        return {"sparsity": option.sparsity, "bytes": option.nbytes}
    if option is None:
        return {"rank": None, "ratio": None}
    return {"rank": _rank_json(option.rank), "ratio": option.ratio}


FILE_MARGIN = 0.995
CHANNELS_KEPT = "kept whole by the budget: the target is met at a damage level below every share's"


def plan_channels(model, ctx, target: float, by_macs: bool, total: float, samples, stage=None, passes=(),
                  progress=None, full_int8: bool = False, per_tensor: bool = False) -> tuple[dict, dict, dict, dict]:
    """`--prune-channels auto`: each channel group open to the budget keeps the channels its cheapest option
    under one shared damage level leaves (options and damage: `prune_channels.group_options`, on `samples`).
    Savings are not additive (a layer between two pruned groups shrinks by both shares), so every level is
    judged on the whole model's cost under its choice, and what one level step overshoots is given back
    (`give_back`). With low-rank `passes` (`--rank auto`), their layers' rank options (judged on the unpruned
    layers' calibration rows in `ctx.layer_data`) join the same allocation: a rank option saves its share of
    what the layer keeps after the channel cut, and the chosen ratio is then applied to the pruned layer.
    Returns id(lead op) → kept units (or the reason the group stays whole), the low-rank settings and report
    info (as `plan_ranks`), and the summary. `stage(count)`: a progress step for the `count` groups, or None.
    `per_tensor` (--per-tensor auto): per-tensor weights join too (`per_tensor_layers`), saving their bytes on
    the output channels a layer keeps; the layers chosen go to `ctx.per_tensor`."""
    from .passes import prune_channels as pc
    space = pc.budget_space(model, ctx, samples, stage, full_int8)
    layers = [BudgetLayer(b.group.producers[0].op.outputs[0].name, b.options, b.params, b.macs, 1,
                          input_bytes=b.nbytes, dense_bytes=b.nbytes) for b in space.open]
    ops, ranked = rank_layers(model, ctx, passes, progress, full_int8) if passes else ([], [])
    pt_ops, pt_layers = per_tensor_layers(model, ctx) if per_tensor and not by_macs else ([], [])
    n, m = len(layers), len(layers) + len(ranked)
    quantized, total = _baseline(model, total, by_macs, full_int8)

    def measure(choice):
        keeps = [(b.group, c.keep) for b, c in zip(space.open, choice) if c is not None]
        saved = space.saving(keeps, by_macs)[0]
        kept = space.kept(keeps) if ops or pt_ops else {}
        for op, layer, c in zip(ops, ranked, choice[n:m]):
            if c is not None:
                inp, out = kept.get(id(op), (1.0, 1.0))
                saved += saving_after_cut(layer, c, inp * out, by_macs)
        for op, layer, c in zip(pt_ops, pt_layers, choice[m:]):
            if c is not None:  # the per-channel parameters of the output channels the cut leaves, less one set
                saved += layer.dense_bytes * kept.get(id(op), (1.0, 1.0))[1] - c.nbytes
        return total - saved

    everything = layers + ranked + pt_layers
    result = allocate(everything, total, total / target, by_macs, measure=measure)
    if result.reached:
        # The MACs are counted exactly; the file also holds what the estimate leaves out (buffer padding, shapes:
        # 0.1 % of MobileNetV2's pruned file), so the give-back keeps a margin there.
        margin = 1.0 if by_macs else FILE_MARGIN
        _give_back(result, everything, margin * total / target, measure)
    keeps = dict(space.closed)
    groups = []
    spent = sum(cost(layer, c, by_macs) for layer, c in zip(layers, result.choice[:n])) or 1
    for b, layer, c in zip(space.open, layers, result.choice[:n]):
        keeps[id(b.group.producers[0].op)] = c.keep if c is not None else CHANNELS_KEPT
        groups.append({"output": layer.name, "channels": b.group.channels,
                       "kept": c.keep if c is not None else b.group.channels,
                       "share": c.share if c is not None else 0.0, "damage": round(c.damage, 6) if c else 0.0,
                       "budget_share": round(cost(layer, c, by_macs) / spent, 6),
                       "candidates": [{"kept": o.keep, "damage": round(o.damage, 6)} for o in b.options]})
    settings, info = rank_settings(ctx, ops, ranked, result.choice[n:m], by_macs)
    ctx.per_tensor = per_tensor_choice(pt_ops, result.choice[m:])
    summary = _summary(target, by_macs, quantized, total, result,
                       groups + list(info.values()) + per_tensor_info(pt_layers, result.choice[m:], by_macs),
                       technique="channels+lowrank" if passes else "channels",
                       damage="measured on the calibration data")
    return keeps, settings, info, summary


def _target_measure(by_macs: bool, quantized: bool, total: float) -> str:
    if by_macs:
        return "fewer MACs"
    return f"smaller file than --quantize full-int8 alone (estimated {total / 1e3:.1f} kB)" if quantized \
        else "smaller file"


def saving_after_cut(layer: BudgetLayer, option, kept: float, by_macs: bool) -> float:
    """What `option` saves on `layer` once a channel cut has left `kept` of its weights: its share of what it
    saves on the whole layer, less the tables of the ops it adds, which do not shrink with the layer (20 int8
    chains of the MobileNetV2 fixture at about half their channels: the estimate 2 % short of the file)."""
    saved = (cost(layer, None, by_macs) - cost(layer, option, by_macs)) * kept
    if by_macs:
        return saved
    return saved - (len(getattr(option, "channels", ()) or (1,)) - 1) * layer.op_bytes * (1 - kept)


def _rank_json(rank):
    return list(rank) if isinstance(rank, tuple) else rank
