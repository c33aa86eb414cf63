"""The main job: read a model, run the requested passes in order, write it, and say what was done."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import analysis, io, schema
from .ops import versions
from .plan import LayerSettings, Plan, RecipeError, RunContext, check_layer_values, load_recipe, parse_block
from .report import Entry


@dataclass
class Options:
    rank: int | str | None = None  # "auto": chosen by the budget (--target-size / --target-macs)
    fc_rank: int | None = None
    conv_rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    conv_method: str | None = None  # None: cp
    only: str | None = None
    skip: str | None = None
    min_params: int = 0
    force: bool = False
    prune: float | None = None
    prune_block: str | None = None
    prune_depthwise: bool = False
    sparse_encode: bool = False
    quantize: str | None = None
    prune_channels: float | str | None = None  # a share, or "auto" (chosen by the budget)
    channel_multiple: int | None = None          # None: 8
    per_tensor: str | None = None  # "auto": the budget may requantize full-integer layers' weights per tensor
    recipe: str | None = None
    report: str | None = None
    calibration: str | None = None
    sequential: bool = False
    activation_percentile: float | None = None
    target_size: float | None = None
    target_macs: float | None = None
    verify: bool = False
    data: str | None = None
    max_error: float | None = None
    min_top5_agree: float | None = None
    samples: int = 8
    runs: int = 10
    signature: str | None = None

    @classmethod
    def from_namespace(cls, ns) -> "Options":
        fields = {k: getattr(ns, k) for k in cls.__dataclass_fields__ if hasattr(ns, k)}
        options = cls(**fields)
        options.validate()
        return options

    def validate(self) -> None:
        """Each option on its own and against the others; the per-layer values by the same check as recipe
        rules (plan.check_layer_values)."""
        import re
        layer = {k: getattr(self, k) for k in ("rank", "fc_rank", "conv_rank", "ratio", "energy", "conv_method",
                                               "prune", "prune_block", "quantize", "prune_channels",
                                               "channel_multiple")}
        for key in ("rank", "prune"):  # "auto": chosen per layer by the budget (--target-size)
            if layer[key] == "auto":
                del layer[key]
        if self.quantize == "full-int8":  # a whole-model step, not a per-layer storage form
            del layer["quantize"]
            if not self.calibration:
                raise ValueError("--quantize full-int8 needs --calibration (the activation ranges are measured on it)")
            from .passes import full_int8
            if not full_int8.available():
                raise ValueError(f"--quantize full-int8 needs ai-edge-quantizer: {full_int8.INSTALL_HINT}")
        check_layer_values({k: v for k, v in layer.items() if v is not None}, lambda k: "--" + k.replace("_", "-"))
        if self.quantize == "none":
            raise ValueError("--quantize must be float16 or int8")
        if self.min_params < 0:
            raise ValueError("--min-params must be >= 0")
        if self.sequential and not self.calibration:
            raise ValueError("--sequential needs --calibration")
        if self.activation_percentile is not None and not 50 < self.activation_percentile <= 100:
            raise ValueError("--activation-percentile must be in (50, 100]")
        for flag, v in (("--target-size", self.target_size), ("--target-macs", self.target_macs)):
            if v is not None and not (v > 1 and math.isfinite(v)):
                raise ValueError(f"{flag} must be a number greater than 1")
        if self.target_size and self.target_macs:
            raise ValueError("choose one of --target-size and --target-macs")
        rank = None if self.rank == "auto" else self.rank
        if self.rank == "auto" and not (self.target_size or self.target_macs):
            raise ValueError("--rank auto needs --target-size X or --target-macs X (the budget chooses every rank)")
        if (self.target_size or self.target_macs) and (rank or self.fc_rank or self.conv_rank or self.ratio
                                                       or self.energy):
            raise ValueError("--target-size/--target-macs choose the ranks themselves; drop --rank/--ratio/--energy")
        if self.prune == "auto":
            if self.target_macs:
                raise ValueError("--prune auto: sparse weights do not cut the MACs the runtime runs (they are "
                                 "densified or read at dense cost); use --target-size X")
            if not self.target_size:
                raise ValueError("--prune auto needs --target-size X (the budget chooses every layer's sparsity)")
        elif self.prune is not None and self.target_size:
            raise ValueError("--prune S with --target-size: the budget would not count what the fixed sparsity "
                             "saves; use --prune auto (the budget chooses every layer's sparsity; add --rank auto "
                             "to mix in low rank)")
        if self.per_tensor is not None:
            if self.per_tensor != "auto":
                raise ValueError("--per-tensor must be 'auto' (the budget chooses the layers)")
            if not self.target_size:
                raise ValueError("--per-tensor auto needs --target-size X: the budget chooses the layers, and "
                                 "per-tensor weights save file bytes, not MACs")
            if not self.calibration:
                raise ValueError("--per-tensor auto needs --calibration (each layer's damage is measured on it)")
            if self.quantize == "full-int8":
                raise ValueError("--per-tensor auto requantizes the layers of a full-integer input; --quantize "
                                 "full-int8 quantizes a float model its own way")
        if not self.verify and (self.data or self.max_error is not None or self.min_top5_agree is not None):
            raise ValueError("--data, --max-error and --min-top5-agree need --verify")
        if self.max_error is not None and not self.max_error >= 0:
            raise ValueError("--max-error must be >= 0")
        if self.min_top5_agree is not None and not 0 <= self.min_top5_agree <= 1:
            raise ValueError("--min-top5-agree must be in [0, 1]")
        from .verify import check_run_options
        check_run_options(self.samples, self.runs)
        for flag, rx in (("--only", self.only), ("--skip", self.skip)):
            if rx is not None:
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ValueError(f"{flag}: bad regular expression: {e}") from None

    def budget_kinds(self) -> frozenset:
        """What the budget (--target-size / --target-macs) chooses per layer: ranks (the default, or --rank auto)
        and / or sparsities (--prune auto)."""
        if not (self.target_size or self.target_macs):
            return frozenset()
        kinds = {"prune"} if self.prune == "auto" else set()
        if self.rank == "auto" or not kinds:
            kinds.add("lowrank")
        return frozenset(kinds)

    def defaults(self) -> LayerSettings:
        return LayerSettings(rank=None if self.rank == "auto" else self.rank, fc_rank=self.fc_rank, conv_rank=self.conv_rank, ratio=self.ratio,
                             energy=self.energy, conv_method=self.conv_method or "cp", force=self.force,
                             prune=None if self.prune == "auto" else self.prune,
                             # Under full-int8 every FC becomes one whose sparse kernel reads 1x16 blocks only.
                             prune_block=parse_block("1x16" if self.quantize == "full-int8" else self.prune_block),
                             prune_depthwise=self.prune_depthwise,
                             quantize=None if self.quantize == "full-int8" else self.quantize,
                             prune_channels=self.prune_channels, channel_multiple=self.channel_multiple)

    def plan(self) -> Plan:
        rules = load_recipe(self.recipe) if self.recipe else []
        return Plan(defaults=self.defaults(), rules=rules, only=self.only, skip=self.skip,
                    min_params=self.min_params, budget_kinds=self.budget_kinds(),
                    full_int8=self.quantize == "full-int8")

    def check_used(self, plan: Plan) -> list[str]:
        """One rule for the command line and the recipe: a setting that nothing in the run would use is refused
        (OptionError, exit 2) rather than silently ignored. --calibration is the exception: it still measures
        the output error, so it gets a warning (returned) saying what it is (not) used for."""
        lowrank = plan.uses("lowrank") or "lowrank" in self.budget_kinds()
        prune = plan.uses("prune") or "prune" in self.budget_kinds()
        channels = plan.uses("prune_channels")
        if plan.uses("channel_budget") and not (self.target_size or self.target_macs):
            raise OptionError("--prune-channels auto (or a recipe rule's \"auto\") needs --target-macs or "
                              "--target-size: the budget chooses each group's share")
        if plan.uses("channel_budget") and self.prune == "auto":
            raise OptionError("--prune auto and --prune-channels auto both ask the budget for the target; choose one")
        ranks = ("a rank option (--rank, --fc-rank, --conv-rank, --ratio, --energy, --target-size, --target-macs, "
                 "or a recipe rule with rank, ratio or energy)")
        prunes = "--prune (or a recipe rule with 'prune')"
        channel_prunes = "--prune-channels (or a recipe rule with 'prune_channels')"
        for flag, given, needs, used in (("--prune-block", self.prune_block is not None, prunes, prune),
                                         ("--prune-depthwise", self.prune_depthwise, prunes, prune),
                                         ("--conv-method", self.conv_method is not None, ranks, lowrank),
                                         ("--force", self.force, "a technique option (it keeps rewrites that "
                                          "save nothing, make the file larger or break the model)",
                                          bool(asked_techniques(self))),
                                         ("--sequential", self.sequential, f"{ranks} or {prunes}",
                                          lowrank or prune),
                                         ("--activation-percentile", self.activation_percentile is not None,
                                          f"{ranks} (it sets the range of the int8 tensors a rewrite of a "
                                          "full-integer layer adds)", lowrank),
                                         ("--channel-multiple", self.channel_multiple is not None,
                                          channel_prunes, channels)):
            if given and not used:
                raise OptionError(f"{flag} has no effect without {needs}")
        for i, rule in enumerate(plan.rules):
            for key, needs, used in (("prune_block", prunes, prune), ("conv_method", ranks, lowrank),
                                     ("channel_multiple", channel_prunes, channels)):
                if key in rule and not used:
                    raise OptionError(f"{self.recipe}: rules[{i}]: '{key}' has no effect without {needs}")
        if self.only is not None and self.only == self.skip:
            raise OptionError("--only and --skip give the same expression: every layer would be skipped")
        if self.calibration and not (plan.uses_data() or self.target_size or self.target_macs
                                     or self.quantize == "full-int8"):
            return ["--calibration: no layer is fitted to it (no rank or prune option); it only measures the output "
                    "error"]
        return []


class OptionError(ValueError):
    """Options that nothing in the run would use, or that cancel each other."""


class RewriteFault(Exception):
    """The rewrite produced a model the runtime cannot run (a bug); nothing was written."""


class VerifyFailed(Exception):
    """The rewritten model broke a fidelity bound; no output was written."""


class Progress:
    """One line per layer on a terminal (stderr), overwritten in place."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.start = total, 0, enabled, time.monotonic()

    def __call__(self, entry: Entry) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        name = entry.output[-40:]
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{time.monotonic() - self.start:6.1f}s {name:<40}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def stage(self, label: str, total: int):
        """A counter for a slow step before the layers are rewritten (calibration runs, the budget's candidate
        fits), so that a long run never sits silent on a terminal; call it once per unit of work."""
        count = [0]

        def step(*_):
            count[0] += 1
            if self.enabled:
                end = "\n" if count[0] >= total else ""
                sys.stderr.write(f"\r{label} {count[0]}/{total} {time.monotonic() - self.start:6.1f}s{end}")
                sys.stderr.flush()
        return step


def calibration_samples(model, path, signature: str | None = None, budget: bool = False) -> list[list]:
    """The calibration file's samples (in batches of the model's batch size), checked against the model's
    inputs (names, shapes, dtypes, values); they may name the inputs of any one signature of the main subgraph.
    A `budget` judges its options on samples the fit did not see, so it needs two at least."""
    from . import verify
    source = model if isinstance(model, (str, Path)) else io.to_bytes(model)
    runner, samples, _, _ = verify.open_data(source, path, signature)
    if runner.subgraph is not runner.model.main:
        raise verify.DataError(f"{path}: feeds signature {runner.signature!r}, which runs subgraph "
                               f"{runner.model.subgraphs.index(runner.subgraph)}; data-aware fitting works on the "
                               f"main subgraph (subgraph 0) only")
    if budget and len(samples) < 2:
        raise verify.DataError(f"{path}: holds {len(samples)} sample; a budget (--target-size / --target-macs) "
                               "measures each option on samples its fit did not see, so it needs 2 at least")
    return samples[:len(samples) - held_out_count(len(samples))]


def held_out_count(samples: int) -> int:
    """How many of the calibration file's last samples no layer is fitted on: the output-error check measures on
    them. Measured on samples the fit used, a data-aware pruning printed 0.0004 for an error of 0.34 on other
    inputs. A file of fewer than 8 samples keeps them all for the fit (the check then says it is in-sample)."""
    return min(OUTPUT_ERROR_SAMPLES, samples // 8)


def lowrank_targets(model, ctx: RunContext) -> list:
    """The main subgraph's ops the low-rank passes may rewrite (their own `candidates`), in execution order."""
    from .passes import cp_conv, lowrank_fc
    order = {id(op): i for i, op in enumerate(model.main.operators)}
    return sorted((op for pass_ in (cp_conv, lowrank_fc) for op in pass_.candidates(model, ctx) if id(op) in order),
                  key=lambda op: order[id(op)])


def rewrite_model(model, options: Options, progress=None, context: RunContext | None = None, source=None
                  ) -> list[Entry]:
    """Run the passes on `model` in place, in the order decompose, prune, quantize, encode sparse.
    Returns one report entry per op each pass considered. `context`: the run's state (a new one for the options'
    plan when None; the caller's holds what the run found and chose afterwards). `source`: the model's file, for
    calibration. An input the graph invariants already find malformed (a cycle, a tensor read before it is
    written, options of another op type) is rewritten as far as it goes; where a pass then fails on it, the
    answer is a ModelError naming the input's problem, not an internal error."""
    from .io import ModelError
    from .verify import DataError, NotRunnable, first_line
    # Problems the input already has are not ours to fix; any new one after a pass is a fault of that pass.
    known_problems = model.problems()
    try:
        return _rewrite_model(model, options, progress, context, source, known_problems)
    except (ModelError, DataError, NotRunnable, OptionError, KeyboardInterrupt):
        raise
    except Exception as e:
        if not known_problems:
            raise
        raise ModelError(f"{source or 'the input model'}: malformed graph ({known_problems[0]}); the rewrite "
                         f"cannot go through it ({type(e).__name__}: {first_line(e)})") from None


def _dynamic_spatial_inputs(model) -> list[str]:
    """The names of the main subgraph's [N, H, W, C] inputs whose height or width is dynamic (-1 in the shape
    signature)."""
    return [t.name for t in model.main.inputs if t is not None and t.shape_signature is not None
            and len(t.shape_signature) == 4 and min(t.shape_signature[1:3]) < 0]


def _rewrite_model(model, options: Options, progress, context: RunContext | None, source, known_problems: list
                   ) -> list[Entry]:
    from .passes import cp_conv, lowrank_fc
    options.validate()  # a library caller's Options have not been through the command line's checks
    ctx = context or RunContext(options.plan())
    ctx.remember_input(model)
    lowrank = (cp_conv, lowrank_fc)
    entries = []

    def checked(pass_entries: list[Entry]) -> list[Entry]:
        model.validate(known_problems)
        return pass_entries
    samples = None
    target = options.target_macs or options.target_size
    by_macs = options.target_macs is not None
    channel_budget = ctx.uses("channel_budget")
    per_tensor = options.per_tensor == "auto"

    def per_tensor_ops() -> list:
        from .passes import per_tensor as pt
        return pt.candidates(model, ctx) if per_tensor else []
    if ctx.uses("prune_channels"):
        # First: it changes the shapes every later pass (and the calibration rows) see.
        from .passes import prune_channels
        if options.calibration:
            samples = calibration_samples(source or model, options.calibration, options.signature,
                                          budget=bool(target))
        elif channel_budget:  # no data: the groups are judged, chosen and refitted on generated images
            samples = _generated(model, source, options)
        if channel_budget:
            from . import budget
            total = _model_cost(model, source, by_macs, pruned=False)
            # --rank auto: rank options join the channel budget, judged on the unpruned layers' rows.
            mixed = lowrank if options.rank == "auto" else ()
            if mixed or per_tensor:
                targets = _lowrank_rows(model, ctx, samples, not options.calibration, progress,
                                        options.activation_percentile, few=per_tensor_ops())
            ctx.channel_budget, ranks, rank_info, ctx.budget_summary = budget.plan_channels(
                model, ctx, target, by_macs, total, samples,
                stage=lambda count: _stage(progress, "budget: channel group", count), passes=mixed,
                progress=_stage(progress, "budget: layer", len(targets) if mixed else 0),
                full_int8=options.quantize == "full-int8", per_tensor=per_tensor)
            if not options.calibration:
                ctx.budget_summary["damage"] = f"measured on {len(samples)} generated images (no data given)"
        entries += checked(prune_channels.run(model, ctx, samples=samples))
        if channel_budget:  # only now: a layer the ranks keep dense may still lose channels
            ctx.budget, ctx.budget_info = ranks, rank_info
    # The target goes to the channel budget when it is asked for, else to the ranks.
    rank_budget = bool(target) and not channel_budget
    # Without data, a budget judges and fits the layers, and --ratio fits them, on the model's response to generated
    # images (VGG-style fixture: --target-size 5 judged and fitted on the weights 34.7 %, on these 95.8 %; --ratio 5
    # with the same floors 93.6 % fitted on the weights, 95.6 % on these; bench/results/nodata_floors.md).
    generated = not options.calibration and (rank_budget or bool(ctx.budget) or ctx.uses("ratio"))
    depthwise = []
    if options.calibration or generated:
        if options.calibration:
            samples = samples or calibration_samples(source or model, options.calibration, options.signature,
                                                     budget=bool(target))
        else:  # no data: the model's response to generated images
            samples = _generated(model, source, options)
        # Depthwise layers to prune (--prune-depthwise) are fitted to calibration data too.
        if options.calibration:
            depthwise = depthwise_prune_targets(model, ctx)
        targets = _lowrank_rows(model, ctx, samples, generated, progress, options.activation_percentile, depthwise,
                                few=per_tensor_ops())
        ctx.calibration = {"file": str(options.calibration) if options.calibration else None,
                            "inputs": "calibration" if options.calibration else "generated",
                            "samples": len(samples), "layers": len(targets)}
    if rank_budget:
        from . import budget
        # After channel pruning the input file no longer measures the model: the budget then counts the pruned
        # model's own bytes (the target applies on top of the pruning).
        total = _model_cost(model, source, by_macs,
                            pruned=any(e.kind == "channels" and e.action == "pruned" for e in entries))
        sparsity_options = None
        if "prune" in ctx.plan.budget_kinds:
            from .passes import prune

            def sparsity_options(op):
                from .passes.common import Skip
                reason = ctx.reason_to_skip(op, analysis.numel(op.inputs[1].shape))
                if reason:
                    raise Skip(reason)
                return prune.sparsity_options(model, op, ctx.settings(op), ctx.layer_data[id(op)],
                                              min_params=ctx.plan.min_params,
                                              full_int8=options.quantize == "full-int8")
        ctx.budget, ctx.budget_info, ctx.budget_summary = budget.plan_ranks(
            model, ctx, target, by_macs, total, lowrank if "lowrank" in ctx.plan.budget_kinds else (),
            sparsity_options=sparsity_options,
            progress=_stage(progress, "budget: layer", len(targets)),  # targets: calibrated above, data or not
            full_int8=options.quantize == "full-int8", per_tensor=per_tensor)
        if generated:
            ctx.budget_summary["damage"] = f"measured on {len(samples)} generated images (no data given)"
    if ctx.per_tensor:
        # Before low rank: a chain then quantizes its last factor per tensor too (as the budget counted it).
        from .passes import per_tensor as pt
        entries += checked(pt.run(model, ctx))
    done = set()
    if options.sequential and ctx.uses("lowrank"):
        entries += checked(sequential_lowrank(model, ctx, samples, targets, progress))
        done = {id(op) for op in targets}
    # A rank budget that found no layer to rewrite: the passes still run, so that each layer says why.
    if ctx.uses("lowrank") or (rank_budget and "lowrank" in ctx.plan.budget_kinds and not ctx.budget_info):
        entries += checked(cp_conv.run(model, ctx, progress, done))
        entries += checked(lowrank_fc.run(model, ctx, progress, done))
    # The progress bar counts the low-rank layers, the slow part; the other passes take moments.
    if ctx.uses("prune"):
        from .passes import prune
        pruned_one_by_one = set()
        if options.sequential:
            order = {id(op): i for i, op in enumerate(model.main.operators)}
            layers = sorted([op for op in targets + depthwise if id(op) in order], key=lambda op: order[id(op)])
            entries += checked(sequential_prune(model, ctx, samples, layers))
            pruned_one_by_one = {id(op) for op in layers}
        entries += checked(prune.run(model, ctx, skip=pruned_one_by_one))
    if ctx.uses("quantize"):
        from .passes import quantize
        entries += checked(quantize.run(model, ctx))
    if options.quantize == "full-int8":
        from .passes import full_int8
        # An integer-only or already statically quantized input asks for nothing more (re-quantizing grew it,
        # or quantized ai-edge-quantizer's own output again).
        already = full_int8.already_quantized(model)
        if already:
            info = {"skipped": already}
        else:
            # Not calibrated on the samples the output-error check measures on, as no layer is fitted on them.
            info = full_int8.run(model, options.calibration, options.signature, ctx.input_tensors,
                                 held_out=held_out_count)
            update_min_runtime_version(model)
            model.validate(known_problems)
        ctx.calibration = dict(ctx.calibration or {}, full_int8={**info, **full_int8.float_report(model)})
    if ctx.uses("prune") or options.sparse_encode:
        from .passes import sparse_encode
        entries += checked(sparse_encode.run(model, ctx))
    if any(e.action != "skipped" for e in entries):
        model.cleanup()
        update_min_runtime_version(model)
        model.validate(known_problems)
    if ctx.budget_info:
        by_position = {ctx.positions[k]: v for k, v in ctx.budget_info.items() if k in ctx.positions}
        for e in entries:
            info = by_position.get((e.subgraph, e.index))
            if info is not None and e.kind in (("prune",) if "sparsity" in info else ("fc", "conv", "conv1x1")):
                e.damage, e.budget_share = info["damage"], info["share"]
    if ctx.channel_budget and ctx.budget_summary:
        by_output = {g["output"]: g for g in ctx.budget_summary["layers"] if "kept" in g}
        for e in entries:
            info = by_output.get(e.output) if e.kind == "channels" else None
            if info is not None:
                e.damage, e.budget_share = info["damage"], info["budget_share"]
    entries.sort(key=lambda e: (e.subgraph, e.index))
    return entries


def depthwise_prune_targets(model, ctx: RunContext) -> list:
    """The main subgraph's DEPTHWISE_CONV_2D ops of the input model that are to be pruned (--prune-depthwise)."""
    OP = schema.BuiltinOperator
    return [op for op in model.main.operators if op.builtin == OP.DEPTHWISE_CONV_2D and ctx.is_input_op(op)
            and ctx.settings(op).prune and ctx.settings(op).prune_depthwise]


def _lowrank_rows(model, ctx: RunContext, samples, generated: bool, progress=None, percentile: float | None = None,
                  more=(), few=()) -> list:
    """Collect the low-rank targets' input rows on `samples` into `ctx.layer_data`, and those of the ops in
    `more` and `few` (in the same runs; `few` only measured, not fitted: at most `per_tensor.ROWS` rows each);
    returns the low-rank targets.
    `percentile`: --activation-percentile, for the int8 chains fitted on these rows."""
    from . import calibrate
    from .passes.per_tensor import ROWS
    targets = lowrank_targets(model, ctx)
    seen = {id(op) for op in targets}
    more = [op for op in more if id(op) not in seen and not seen.add(id(op))]  # each op's rows once
    measured = [op for op in few if id(op) not in seen and not seen.add(id(op))]
    more += measured
    rows = calibrate.collect(model, samples, targets + more,
                             progress=_stage(progress, "calibration: sample", len(samples)),
                             max_rows=calibrate.GENERATED_ROWS if generated else calibrate.MAX_ROWS,
                             row_caps={id(op): ROWS for op in measured})
    extra = {"damping": calibrate.GENERATED_DAMPING, "temper": calibrate.GENERATED_TEMPER, "generated": True} \
        if generated else {}
    if percentile is not None:
        extra["activation_percentile"] = percentile
    for op in targets + more:
        ctx.layer_data[id(op)] = {"rows": rows[id(op)].rows, "mean": rows[id(op)].mean, **extra}
    return targets


def _generated(model, source, options: Options) -> list:
    """The model's generated inputs (`verify.generated_samples`) for a budget without data."""
    from . import calibrate, verify
    return verify.generated_samples(source if isinstance(source, (str, Path)) else io.to_bytes(model),
                                    calibrate.GENERATED_SAMPLES, options.signature)


def _model_cost(model, source, by_macs: bool, pruned: bool) -> int:
    """The model's MACs, or its file bytes (the input file's, unless channels were already cut)."""
    if by_macs:
        return analysis.summary(model, zeros=False)["totals"]["macs"]
    return os.path.getsize(source) if isinstance(source, (str, Path)) and not pruned else len(io.to_bytes(model))


def _stage(progress, label: str, total: int):
    """A step counter from the run's progress display, or None (library use without one)."""
    return progress.stage(label, total) if isinstance(progress, Progress) and total else None


def sequential_lowrank(model, ctx: RunContext, samples, targets, progress=None) -> list[Entry]:
    """Rewrite the main subgraph's layers in execution order, each fitted on the activations of the already
    rewritten layers before it (paired with the original activations at the same positions), so that errors
    compounding through the network are accounted for. Only the input model's layers: never the factor layers
    a rewrite before it emitted."""
    from . import calibrate
    from .passes import cp_conv, lowrank_fc
    OP = schema.BuiltinOperator
    entries = []
    for op in list(targets):
        if op not in model.main.operators:
            continue
        data = ctx.layer_data[id(op)]
        if entries and any(e.action == "rewritten" for e in entries):
            now = calibrate.collect(model, samples, [op])[id(op)]
            settings = {k: data[k] for k in ("damping", "activation_percentile") if k in data}
            ctx.layer_data[id(op)] = {"rows": now.rows, "mean": now.mean, "target_rows": data["rows"],
                                       "target_mean": data["mean"], **settings}
        pass_ = lowrank_fc if op.builtin == OP.FULLY_CONNECTED else cp_conv
        entries.append(pass_.rewrite_op(model, model.main, op, ctx))
        if progress:
            progress(entries[-1])
    return entries


def sequential_prune(model, ctx: Plan, samples, targets) -> list[dict]:
    """Prune the main subgraph's FULLY_CONNECTED and CONV_2D layers (and DEPTHWISE_CONV_2D with
    --prune-depthwise) in execution order, each on the activations
    of the already pruned (or rewritten) layers before it, its kept weights fitted to reproduce the original
    layer's outputs (rows paired with the original activations at the same positions)."""
    from . import calibrate
    from .passes import prune
    entries = []
    changed = any(op not in model.main.operators for op in targets)  # low rank ran first and replaced some
    done: dict = {}  # a shared weight is pruned once, at its first reader (on the rows of all of them)
    for op in targets:
        if op not in model.main.operators:
            continue
        data = ctx.layer_data.get(id(op))  # None: a shared weight's later reader, pruned with the first
        if changed and data is not None:
            now = calibrate.collect(model, samples, [op])[id(op)]
            ctx.layer_data[id(op)] = {"rows": now.rows, "mean": now.mean,
                                       "target_rows": data.get("target_rows", data["rows"]),
                                       "target_mean": data.get("target_mean", data["mean"])}
        entries.append(prune.prune_op(model, model.main, op, ctx, done))
        changed = changed or entries[-1]["action"] != "skipped"
    return entries


def count_targets(model) -> int:
    OP = schema.BuiltinOperator
    return sum(op.builtin in (OP.CONV_2D, OP.FULLY_CONNECTED) for _, op in model.operators())


def update_min_runtime_version(model) -> None:
    """Raise the `min_runtime_version` metadata when an emitted op version needs a newer runtime."""
    needed = versions.min_runtime_version((op.opcode.builtin, op.opcode.version) for _, op in model.operators())
    buf = model.get_metadata("min_runtime_version")
    current = bytes(buf.data).rstrip(b"\0").decode("ascii", "replace") if buf is not None else None
    if current is None or versions.compare_runtime_versions(needed, current) > 0:
        # The converter stores it as a zero-padded 16-byte string.
        model.set_metadata("min_runtime_version", needed.encode("ascii").ljust(16, b"\0"))


def run(input_path, output_path, options: Options, progress: bool = False, committed: list | None = None) -> dict:
    """The whole job. Paths are checked before any work; the model and the report are written under temporary
    names and moved into place together at the end (both or neither; on a broken --verify bound, the report
    only). `committed`: a list the paths are added to as they are moved into place (complete), so that a caller
    interrupted afterwards can say what it leaves."""
    input_path, output_path = Path(input_path), Path(output_path)
    options.validate()
    io.check_paths(reads={"input model": input_path, "--calibration file": options.calibration,
                          "--recipe file": options.recipe, "--data file": options.data},
                   writes={"output": output_path, "--report": options.report})
    plan = options.plan()
    warnings = options.check_used(plan)
    ctx = RunContext(plan)
    model = io.read(input_path)
    from . import verify
    interface_before = verify.interface(model)
    from .passes import int8_chain
    # A budget's low rank counts too: chains whose int8 ranges came from generated images gave XNNPACK and the
    # builtin kernels outputs 15 % apart (the input: 1.6 %).
    budget_lowrank = bool(options.target_size or options.target_macs) and "lowrank" in plan.budget_kinds and (
        not plan.uses("channel_budget") or options.rank == "auto")
    if (plan.uses("lowrank") or budget_lowrank) and not options.calibration and any(
            int8_chain.is_full_integer(op) for op in lowrank_targets(model, ctx)):
        raise io.ModelError(f"{input_path}: a full-integer int8 model: low rank needs --calibration (the new "
                            "intermediate tensors get their int8 ranges from it)")
    if (options.per_tensor or options.activation_percentile is not None) and not any(
            int8_chain.is_full_integer(op) for op in model.main.operators):
        # Both act on full-integer layers only (the input's own): on another model they would change nothing.
        asked = " and ".join(flag for flag, given in (("--per-tensor", options.per_tensor),
                                                      ("--activation-percentile", options.activation_percentile
                                                       is not None)) if given)
        warnings.append(f"{asked}: the model has no full-integer layer, so it changes nothing (it acts on the "
                        "layers of a full-integer int8 input model)")
    open_size = _dynamic_spatial_inputs(model) if options.target_macs else []
    if open_size:
        # MACs are counted on the file's shapes, 1x1 where an image's size is left open: the layers' shares at the
        # real size differ (a "2.79x" at 1x1 was 1.07x at 64x64), so the budget would cut the wrong layers.
        raise io.ModelError(f"{input_path}: input {', '.join(open_size)} has a dynamic height or width, so its MACs "
                            "depend on the size it is run at: use --target-size")
    keys = [d.key for d in model.signature_defs]
    if options.signature is not None and options.signature not in keys:
        from .verify import DataError
        raise DataError(f"--signature {options.signature!r}: the model has {'signatures ' + ', '.join(keys) if keys else 'no signatures'}")
    size_before = os.path.getsize(input_path)
    before = analysis.summary(model, zeros=False)["totals"]
    nonzero_before = analysis.nonzero_params(model)
    bar = Progress(count_targets(model), enabled=progress)
    # The input as the writer would write it (what tables and buffers it really uses): a rewrite is judged against
    # this too, since rewriting nothing can already free bytes (unused buffers, padding) that would hide a pass
    # that made the model larger.
    estimate_before = io.estimated_size(model)
    entries = rewrite_model(model, options, bar, ctx, source=input_path)
    full_int8 = (ctx.calibration or {}).get("full_int8") or {}
    float_ops_warning = None
    if full_int8.get("float_ops"):  # users ask for full-int8 for integer-only hardware: say what is not
        from .passes.full_int8 import float_warning
        float_ops_warning = float_warning(full_int8)
        warnings.append(float_ops_warning)
    with io.Staged(committed) as staged:
        target = staged.path(output_path)
        report_target = staged.path(options.report) if options.report else None
        size_after = _written(lambda: io.write(model, target), output_path)
        made_full_int8 = bool(full_int8) and "skipped" not in full_int8
        changed = made_full_int8 or any(e.action != "skipped" for e in entries)
        notes = [] if changed else [f"nothing was rewritten: --quantize full-int8: {full_int8['skipped']}"
                                    if full_int8.get("skipped") else nothing_done(options, entries)]
        kept_larger = False
        grown = None if made_full_int8 else io.estimated_size(model) - estimate_before
        if grown is not None and grown > 0 and size_after <= size_before and not notes and not options.force:
            _undo_entries(entries, f"undone: the rewrite made the model about {grown} bytes larger than the input "
                                   "written as it is")
            notes.append(f"the rewrite made the model about {grown} bytes larger than the input written as it is "
                         f"(the input's own file is {size_before} bytes): the input was written unchanged (--force "
                         "keeps such a rewrite)")
            size_after, model = _written(lambda: _copy_unchanged(input_path, target), output_path), io.read(input_path)
        elif size_after > size_before and made_full_int8 and not notes and options.force:
            # A full-integer model can cost bytes (the input's weights were already 8-bit, or stored sparse, and
            # the activation scales come on top): kept when asked for, and said.
            notes.append(f"the full-integer model is larger than the input ({size_after} > {size_before} bytes); "
                         "kept (--force)")
            kept_larger = True
        elif size_after > size_before and (not options.force or not changed):
            # Never a larger file unless asked for (--force; and when nothing was rewritten, --force asked for
            # nothing): the input goes out as it is, and the report says so.
            if not notes:
                _undo_entries(entries, f"undone: the rewritten file ({size_after} bytes) was larger than the input "
                                       f"({size_before} bytes)")
                what = "the full-integer model is" if made_full_int8 else "the rewrite made the file"
                notes.append(f"{what} larger ({size_after} > {size_before} bytes): the input was written unchanged "
                             "(--force keeps such a rewrite)")
            size_after, model = _written(lambda: _copy_unchanged(input_path, target), output_path), io.read(input_path)
        after = analysis.summary(model, zeros=False)["totals"]
        nonzero_after = analysis.nonzero_params(model)
        interface_changes = verify.interface_changes(interface_before, verify.interface(model))
        # The output-error check loads the input and the written model in LiteRT: let go of the rewritten IR
        # first (its new weights and the input's mapped pages; 1.7 GB for VGG16 pruned to 50 %).
        model = None
        ctx.release_model()
        import gc
        gc.collect()
        fidelity = None
        if not notes or kept_larger:  # whenever the written model is not the input's
            # A caller of the input must be able to call what is written: an input or output whose type, shape
            # or name changed is a fault of the rewrite (full-int8 once made a float output int8, and the output
            # error, measured on dequantized values, did not show it). Refused even with --force: no trade-off.
            fidelity = None if interface_changes else measure_output_error(input_path, target, options)
            gap = fidelity.get("xnnpack") if fidelity else None
            refused = None
            if interface_changes:
                refused = _interface_refused(entries, notes, interface_changes)
            elif broken_result(fidelity) and not options.force:
                # A broken model is not a result, whichever technique or budget made it: the input goes out as it
                # is (MobileNetV2 fixture, low rank at 4.36x: every 1x1 conv at rank 3-9, output error 0.8-1.0,
                # 11 %; a channel budget on a BatchNorm-folded net without data), and the report says why.
                refused = _broken_refused(entries, notes, ctx.budget_summary, fidelity)
            elif gap and delegate_gap_verdict(gap) == "refuse" and not options.force:
                # XNNPACK on and off must agree on what is written as they do on the input.
                refused = _delegates_refused(entries, notes, gap)
            if refused is not None:
                size_after, after, nonzero_after = _input_unchanged(input_path, target, output_path)
                fidelity = None
                if made_full_int8:
                    ctx.calibration["full_int8"] = {"skipped": f"undone: {notes[0]}"}
                if float_ops_warning in warnings:
                    warnings.remove(float_ops_warning)
            else:
                warnings += _fidelity_warnings(fidelity)
        report = {
            "input": str(input_path), "output": str(output_path),
            "options": {k: v for k, v in vars(options).items() if k != "report"},
            "layers": [e.as_json() for e in entries],
            "totals": {
                "file_bytes_before": size_before, "file_bytes_after": size_after,
                "params_before": before["params"], "params_after": after["params"],
                "macs_before": before["macs"], "macs_after": after["macs"],
                "weight_bytes_before": before["weight_bytes"], "weight_bytes_after": after["weight_bytes"],
                "nonzero_params_before": nonzero_before, "nonzero_params_after": nonzero_after,
            },
            "notes": notes,
            "warnings": warnings,
        }
        if fidelity is not None:
            report["output_error"] = fidelity
        if ctx.calibration:
            report["calibration"] = ctx.calibration
        if ctx.budget_summary:
            report["budget"] = judge_budget(ctx.budget_summary, report["totals"])
            if ctx.budget_summary["reached"] and not report["budget"]["reached"] and changed and not notes:
                # The plan met the target on paper; the file says otherwise: a miss is said, not only shown.
                goal, achieved = report["budget"]["goal"], report["budget"]["achieved"]
                digits = 2 if round(achieved, 2) < goal else 3  # 2.996x is not "3.00x"
                warnings.append(f"the target {goal:g}x was not reached: the written file is {achieved:.{digits}f}x "
                                f"smaller (the budget estimated {report['budget']['estimate']:.{digits}f}x)")
        if options.verify:
            report["verify"] = verify_against(input_path, target, options)
            if not report["verify"]["passed"]:  # only the report is written then: say so in it
                report["notes"].append(f"verification failed, so {output_path} was not written")
        if report_target is not None:
            _written(lambda: write_json(report, report_target), options.report)
        if options.verify and not report["verify"]["passed"]:
            staged.commit([options.report] if options.report else [])
            raise VerifyFailed("; ".join(report["verify"]["failures"]))
        staged.commit()
    return report


def _fidelity_warnings(fidelity: dict) -> list[str]:
    """What the output-error check (and the XNNPACK/builtin gap of integer models) warns about."""
    warnings = []
    gap = fidelity.get("xnnpack")
    if gap and delegate_gap_verdict(gap) is not None:  # "refuse" too, where --force kept the rewrite
        warnings.append(f"XNNPACK and the builtin kernels give outputs {gap['rel_l2']:.3g} apart (relative "
                        f"L2; {gap['steps']:.3g} integer steps; the input's: {gap['input_rel_l2']:.3g}, "
                        f"{gap['input_steps']:.3g} steps) on this model: check it on the target runtime")
    if fidelity["measured"] and fidelity["worst"] is None:
        warnings.append(f"the rewritten model gives NaN or infinite outputs on {measured_on(fidelity)} where "
                        f"the input model does not — it is broken")
    elif fidelity["measured"] and fidelity["worst"] > OUTPUT_ERROR_WARNING:
        warnings.append(f"output error {fidelity['worst']:.3g} (relative L2) on {measured_on(fidelity)} — "
                        f"this model is probably broken; check it with --verify --data")
    return warnings


def measured_on(fidelity: dict) -> str:
    """What the output error was measured on, for the summary: '4 held-out calibration inputs', ..."""
    n, kind = fidelity["samples"], fidelity["inputs"]
    if kind == "calibration":
        return (f"{n} held-out calibration inputs" if fidelity.get("held_out", True) else
                f"{n} calibration inputs the fit also used (fewer than 8 samples: none held out)")
    return f"{n} {kind} inputs"


def broken_result(fidelity: dict) -> bool:
    """Whether the measured output error calls the written model broken: above OUTPUT_ERROR_WARNING, or NaN /
    infinite outputs the input model does not give. Such a result is never written unless --force asks."""
    return fidelity["measured"] and (fidelity["worst"] is None or fidelity["worst"] > OUTPUT_ERROR_WARNING)


def _broken_refused(entries: list[Entry], notes: list[str], summary: dict | None, fidelity: dict) -> str:
    """Say in the entries and notes why a broken result (`broken_result`) is replaced by the input: a budget's
    (rank, sparsity or channel; `summary`) did not reach its target, a fixed option asked for too much."""
    worst = f"{fidelity['worst']:.3g}" if fidelity["worst"] is not None else "NaN/inf"
    measured = f"output error {worst} on {measured_on(fidelity)}"
    what = f"the budget's choice for {summary['target']}" if summary else "the rewrite"
    _undo_entries(entries, f"undone: {what} gave {measured} (above {OUTPUT_ERROR_WARNING}: a broken model)")
    if summary:
        summary["refused_output_error"] = fidelity["worst"]
        notes.append(f"cannot reach {summary['target']} without breaking the model: the budget's choice gave "
                     f"{measured}, so the input was written unchanged (ask for less, or --force to keep it)")
    else:
        notes.append(f"the rewrite gave {measured} (above {OUTPUT_ERROR_WARNING}: a broken model), so the input "
                     "was written unchanged (ask for less, or --force to keep it)")
    return notes[-1]


def _interface_refused(entries: list[Entry], notes: list[str], changes: list[str]) -> str:
    """Say in the entries and notes (the note replaces any other) why a result whose inputs or outputs differ
    from the input model's (`verify.interface_changes`) is replaced by the input."""
    reason = f"the rewrite changed the model's inputs or outputs ({'; '.join(changes)})"
    _undo_entries(entries, f"undone: {reason}")
    notes[:] = [f"{reason}: a fault of the rewrite; the input was written unchanged"]
    return notes[0]


def _delegates_refused(entries: list[Entry], notes: list[str], gap: dict) -> str:
    """Say in the entries and notes (the note replaces any other) why a result whose XNNPACK and builtin outputs
    disagree far more than the input's (`delegate_gap_verdict`) is replaced by the input."""
    reason = (f"XNNPACK and the builtin kernels give the rewritten model's outputs {gap['rel_l2']:.3g} apart "
              f"(relative L2; {gap['steps']:.3g} integer steps), the input's {gap['input_rel_l2']:.3g} "
              f"({gap['input_steps']:.3g} steps)")
    _undo_entries(entries, f"undone: {reason}")
    notes[:] = [f"{reason}: the input was written unchanged (--force keeps such a rewrite)"]
    return notes[0]


def judge_budget(summary: dict, totals: dict) -> dict:
    """The budget's summary with `achieved` measured on the written file (or the rewritten model's MACs) and
    `reached` true only when that meets the goal: the planner's own figure is an estimate. Before `--quantize
    full-int8` the goal is relative to the input quantized alone (`baseline_bytes`, estimated)."""
    if summary["measure"] == "macs":
        achieved = totals["macs_before"] / max(totals["macs_after"], 1)
    elif summary.get("baseline_bytes"):
        achieved = summary["baseline_bytes"] / max(totals["file_bytes_after"], 1)
    else:
        achieved = totals["file_bytes_before"] / max(totals["file_bytes_after"], 1)
    return {**summary, "achieved": round(achieved, 3), "reached": achieved >= summary["goal"]}


def _copy_unchanged(source, target) -> int:
    import shutil
    shutil.copyfile(source, target)
    return os.path.getsize(target)


def _input_unchanged(input_path, target, output_path) -> tuple[int, dict, int]:
    """Write the input unchanged in place of a refused result: the written size and the input's totals and
    nonzero parameters."""
    size = _written(lambda: _copy_unchanged(input_path, target), output_path)
    unchanged = io.read(input_path)
    return size, analysis.summary(unchanged, zeros=False)["totals"], analysis.nonzero_params(unchanged)


def _undo_entries(entries: list[Entry], reason: str) -> None:
    for e in entries:
        if e.action != "skipped":
            e.set(action="skipped", reason=reason, params_after=e.params_before, macs_after=e.macs_before)


# Above this relative L2 distance between the outputs with XNNPACK and with the builtin kernels, a result with
# integer activations gets a warning (the sweep's tolerance for integer models: the two round requantization
# differently, by a step per op, and a softmax in steps of 1/256 moves by a few percent).
XNNPACK_GAP_WARNING = 0.08
# A gap more than this many times the input model's own is the rewrite's doing: a warning above
# XNNPACK_GAP_FLOOR (below it, a step or two of rounding), and the rewrite is undone above XNNPACK_GAP_WARNING too.
# r3-style int8 model, channel budget + rank auto: 0.084 against the input's 0.02; its uint8-in/out twin 0.038
# against 0.011, which the absolute threshold alone did not warn about.
XNNPACK_GAP_FACTOR = 2.0
# How many inputs (the first calibration samples, else generated ones) the gap is measured on.
XNNPACK_GAP_SAMPLES = 16
XNNPACK_GAP_FLOOR = 0.02


def delegate_gap_verdict(gap: dict) -> str | None:
    """'refuse', 'warn' or None for the written model's XNNPACK-vs-builtin gap (`verify.delegate_disagreement`
    with the input's own as input_rel_l2)."""
    own = gap["rel_l2"] > XNNPACK_GAP_FACTOR * gap.get("input_rel_l2", 0.0)
    if own and gap["rel_l2"] > XNNPACK_GAP_WARNING:
        return "refuse"
    if gap["rel_l2"] > XNNPACK_GAP_WARNING or (own and gap["rel_l2"] > XNNPACK_GAP_FLOOR):
        return "warn"
    return None
# Above this relative L2 error of an output on a few inputs the rewritten model is broken (`broken_result`): the
# input is written instead, unless --force keeps it (then with a "probably broken" warning).
OUTPUT_ERROR_WARNING = 0.5
# How many inputs (calibration samples, else generated) the output error is measured on.
OUTPUT_ERROR_SAMPLES = 4
# Options that ask for a technique (for the message when nothing was rewritten).
TECHNIQUE_OPTIONS = ("rank", "fc_rank", "conv_rank", "ratio", "energy", "target_size", "target_macs", "prune",
                     "prune_channels", "per_tensor", "quantize", "sparse_encode", "recipe")


def asked_techniques(options: Options) -> list[str]:
    """The technique options given, as typed ('--rank 4', '--sparse-encode')."""
    return [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k in TECHNIQUE_OPTIONS
            if (v := getattr(options, k, None)) is not None and v is not False]


def nothing_done(options: Options, entries: list[Entry]) -> str:
    """Why the model came out unchanged: no technique asked for, no layer of a kind it applies to, or the
    reasons the layers considered were left as they are."""
    asked = asked_techniques(options)
    if not asked:
        return "no technique option given: the model was re-serialized unchanged"
    asked = ", ".join(asked)
    if not entries:
        return (f"nothing was rewritten: {asked} asked, but the model has no layer that applies to "
                f"(a FULLY_CONNECTED, CONV_2D or DEPTHWISE_CONV_2D with a constant weight); re-serialized unchanged")
    reasons: dict[str, int] = {}
    for e in entries:
        reasons[e.reason or "left as it is"] = reasons.get(e.reason or "left as it is", 0) + 1
    why = "; ".join(f"{r} ({n}x)" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f"nothing was rewritten: {asked} asked, but none of the {len(entries)} layers considered qualified: {why}"


def _integer_activations(path) -> bool:
    """Whether the model computes on int8 / int16 activations (full-integer layers)."""
    integer = (schema.TensorType.INT8, schema.TensorType.INT16)
    return any(t.type in integer and not t.is_constant for sg in io.read(path).subgraphs for t in sg.tensors)


def measure_output_error(original, rewritten, options: Options) -> dict:
    """The rewritten model's output error against the input's on a few inputs: the first calibration samples
    when given, else generated ones (`verify.generated_samples`: images for image inputs, where standard normal
    noise called a good 5x rewrite of a trained classifier "probably broken"). A rewritten model that does not run
    where the input does is a fault (RewriteFault: nothing is written)."""
    from . import verify
    signature, inputs, kind = options.signature, None, "generated"
    held_out = True  # generated inputs: drawn with verify.CHECK_SEED, never the data-free fits' own
    if options.calibration:
        runner, batches, _, _ = verify.open_data(original, options.calibration, options.signature)
        held = held_out_count(len(batches))
        held_out = held > 0
        inputs = batches[len(batches) - held:] if held_out else batches[:OUTPUT_ERROR_SAMPLES]
        signature, kind = runner.signature, "calibration"
    try:
        result = verify.output_error(original, rewritten, inputs, OUTPUT_ERROR_SAMPLES, signature)
    except verify.CandidateFailed as e:
        _check_still_there(rewritten)  # not the rewrite's fault when someone removed it
        raise RewriteFault(f"the rewritten model does not run in LiteRT ({e}); nothing written") from None
    result["inputs"], result["held_out"] = kind, held_out
    if result["measured"] and _integer_activations(rewritten):
        # What an integer model computes must not depend on the kernels: ai-edge-quantizer's output of a
        # LayerNorm/GELU model gave 5 steps between XNNPACK and the builtin kernels (its input: 1e-7).
        # On more inputs than the output error (fitted ones too: this measures the kernels, not the fit): on 4,
        # one input at a softmax's steepest point decided the verdict (a 1-vs-8 digit: 0.125 apart, the other
        # three 0.004; 0.030 on all 100 calibration samples).
        gap_inputs = batches[:XNNPACK_GAP_SAMPLES] if options.calibration else None
        gap = verify.delegate_disagreement(rewritten, gap_inputs, signature, XNNPACK_GAP_SAMPLES)
        if gap is not None:  # the input's own gap on the same inputs: what the rewrite is measured against
            own = verify.delegate_disagreement(original, gap_inputs, signature, XNNPACK_GAP_SAMPLES) \
                if _integer_activations(original) else None
            gap.update(input_steps=own["steps"] if own else 0.0, input_rel_l2=own["rel_l2"] if own else 0.0)
        result["xnnpack"] = gap
    model = io.read(original) if result["measured"] else None
    defs = model.signature_defs if model is not None else []
    # Every other signature, on generated inputs: a pass may have changed its subgraph too. Without a signature
    # the run above was subgraph 0's.
    others = [d.key for d in defs if d.key != signature and (signature is not None or d.subgraph is not model.main)
              ] if len(defs) > 1 else []
    for key in others:
        try:
            other = verify.output_error(original, rewritten, None, OUTPUT_ERROR_SAMPLES, key)
        except verify.CandidateFailed as e:
            raise RewriteFault(f"signature {key!r} of the rewritten model does not run in LiteRT ({e}); "
                               f"nothing written") from None
        if not other["measured"]:
            continue
        result["outputs"] += [{**row, "name": f"{key}/{row['name']}"} for row in other["outputs"]]
        if result["worst"] is not None:
            result["worst"] = None if other["worst"] is None else max(result["worst"], other["worst"])
        result.setdefault("generated_signatures", []).append(key)
    return result


def _written(write, path):
    """Run `write`; a file system that refuses (full, read-only, quota) is a path error, not a fault."""
    try:
        return write()
    except OSError as e:
        raise io.PathError(f"{path}: cannot write ({e.strerror or e})") from None


def _check_still_there(staged) -> None:
    """A PathError when the staged model (under its temporary name) is gone: its folder or the file was removed
    during the run, which is no fault of the rewrite's."""
    if not Path(staged).is_file():
        raise io.PathError(f"{Path(staged).parent}: the model being written there was removed during the run (the "
                           "folder or the file); nothing written")


def verify_against(original, rewritten, options: Options) -> dict:
    """Compare the rewritten model with the original and check the bounds the options give."""
    from . import verify
    _check_still_there(rewritten)
    result = verify.compare(original, rewritten, data=options.data, samples=options.samples, runs=options.runs,
                            signature=options.signature)
    failures = []
    if options.max_error is not None:
        worst = max(o["rel_l2"] for o in result["outputs"])
        if worst > options.max_error:
            failures.append(f"output relative L2 error {worst:.4g} exceeds --max-error {options.max_error:g}")
    if options.min_top5_agree is not None:
        agrees = [o["top5_agree"] for o in result["outputs"] if o["top5_agree"] is not None]
        if not agrees:  # a usage error, not a failed bound: nothing is written (exit 2)
            raise OptionError("--min-top5-agree needs an output that looks like a classifier with more than 5 "
                              "classes ([1, classes] per sample); use --max-error for this model")
        elif min(agrees) < options.min_top5_agree:
            failures.append(f"top-5 agreement {min(agrees):.4g} is below --min-top5-agree {options.min_top5_agree:g}")
    result["passed"] = not failures
    result["failures"] = failures
    return result


def write_json(obj, path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")
