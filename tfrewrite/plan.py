"""What to do to each layer: command-line defaults, overridden per layer by an ordered recipe.

A recipe (JSON, `schemas/recipe.schema.json`) is a list of rules; each names a regex on the op's output tensor
name and any of rank / ratio / energy / conv_method / prune / prune_block / quantize / skip. Later rules
override earlier ones; the command line gives the defaults. A `Plan` is fixed before any pass runs; a run's
`RunContext` adds what the run finds and chooses (the budget's choice overrides the plan's). Passes ask the
context, never the options.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .graph import Operator
from .passes.common import RankPolicy


@dataclass(frozen=True)
class LayerSettings:
    rank: int | None = None          # both kinds, unless fc_rank / conv_rank say otherwise
    fc_rank: int | None = None
    conv_rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    conv_method: str = "cp"
    prune: float | None = None       # target sparsity of this layer
    prune_block: tuple[int, int] | None = None
    prune_depthwise: bool = False
    quantize: str | None = None      # None, "float16" or "int8"
    prune_channels: float | str | None = None  # share of each channel group to remove, or "auto" (the budget's)
    channel_multiple: int | None = None  # kept channel counts are multiples of this (default 8)
    skip: bool = False
    force: bool = False
    skip_reason: str | None = None   # set by the budget search for layers it keeps dense

    def rank_policy(self, kind: str) -> RankPolicy:
        explicit = self.fc_rank if kind == "fc" else self.conv_rank
        rank = explicit if explicit is not None else self.rank
        return RankPolicy(rank=rank, ratio=None if rank is not None else self.ratio,
                          energy=None if rank is not None else self.energy, force=self.force,
                          method=self.conv_method)


RULE_KEYS = {"match", "rank", "fc_rank", "conv_rank", "ratio", "energy", "conv_method", "prune", "prune_block",
             "quantize", "skip", "prune_channels", "channel_multiple"}


class RecipeError(ValueError):
    pass


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def load_recipe(path) -> list[dict]:
    """Read and validate a recipe file; raise RecipeError with a one-line reason."""
    path = Path(path)
    try:
        # Python's reader accepts NaN and Infinity, which JSON does not.
        doc = json.loads(path.read_text(), parse_constant=_no_constant)
    except OSError as e:
        raise RecipeError(f"{path}: {e.strerror or e}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise RecipeError(f"{path}: not valid JSON ({e})") from None
    return validate_recipe(doc, str(path))


def validate_recipe(doc, where: str = "recipe") -> list[dict]:
    """Check a recipe against schemas/recipe.schema.json (by hand: no jsonschema dependency at run time)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise RecipeError(f"{where}: a recipe is an object with a list 'rules'")
    extra = set(doc) - {"rules", "description", "version"}
    if extra:
        raise RecipeError(f"{where}: unknown key(s) {sorted(extra)}")
    if "description" in doc and not isinstance(doc["description"], str):
        raise RecipeError(f"{where}: 'description' must be a string")
    if "version" in doc and not _integer(doc["version"]):
        raise RecipeError(f"{where}: 'version' must be an integer")
    rules = []
    for i, rule in enumerate(doc["rules"]):
        at = f"{where}: rules[{i}]"
        if not isinstance(rule, dict):
            raise RecipeError(f"{at} is not an object")
        unknown = set(rule) - RULE_KEYS
        if unknown:
            raise RecipeError(f"{at}: unknown key(s) {sorted(unknown)}")
        if not isinstance(rule.get("match"), str):
            raise RecipeError(f"{at}: 'match' (a regex on the output tensor name) is required")
        try:
            re.compile(rule["match"])
        except re.error as e:
            raise RecipeError(f"{at}: bad regex {rule['match']!r}: {e}") from None
        try:
            rule = {"match": rule["match"], **check_layer_values({k: v for k, v in rule.items() if k != "match"},
                                                                 lambda key: f"'{key}'")}
        except ValueError as e:
            raise RecipeError(f"{at}: {e}") from None
        rules.append(rule)
    return rules


def _integer(v) -> bool:
    """An integer as JSON Schema means it: 3 or 3.0, never a boolean."""
    return type(v) is int or (type(v) is float and v.is_integer())


def _number(v) -> bool:
    """A finite number (1e400 reads as infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The blocks the sparse kernels read: 1x4 (float FULLY_CONNECTED), 1x16 (full-integer int8 FULLY_CONNECTED).
BLOCKS = {"1x1": None, "1x4": (1, 4), "1x16": (1, 16)}


def parse_block(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    if text not in BLOCKS:
        raise ValueError(f"block {text!r}: must be one of {', '.join(BLOCKS)}")
    return BLOCKS[text]


def check_layer_values(values: dict, name) -> dict:
    """The one check of per-layer settings, for command-line options and recipe rules alike;
    `name(key)` is how the message names a setting. Returns the values with integers as int."""
    values = dict(values)
    for key in ("rank", "fc_rank", "conv_rank"):
        if key in values:
            if not _integer(values[key]) or values[key] < 1:
                raise ValueError(f"{name(key)} must be an integer >= 1")
            values[key] = int(values[key])  # JSON Schema counts 2.0 as an integer too
    if "ratio" in values and (not _number(values["ratio"]) or not values["ratio"] > 1):
        raise ValueError(f"{name('ratio')} must be a number > 1")
    if "energy" in values and (not _number(values["energy"]) or not 0 < values["energy"] <= 1):
        raise ValueError(f"{name('energy')} must be in (0, 1]")
    given = [k for k in ("rank", "ratio", "energy") if k in values]
    if len(given) > 1:
        raise ValueError(f"choose one of {', '.join(name(k) for k in ('rank', 'ratio', 'energy'))} "
                         f"(got {' and '.join(name(k) for k in given)})")
    if "conv_method" in values and values["conv_method"] not in ("cp", "tucker2"):
        raise ValueError(f"{name('conv_method')} must be 'cp' or 'tucker2'")
    if "prune" in values and (not _number(values["prune"]) or not 0 <= values["prune"] < 1):
        raise ValueError(f"{name('prune')} must be a sparsity in [0, 1)")
    if "prune_block" in values:
        if not isinstance(values["prune_block"], str):
            raise ValueError(f"{name('prune_block')} must be one of {', '.join(BLOCKS)}")
        try:
            parse_block(values["prune_block"])
        except ValueError as e:
            raise ValueError(f"{name('prune_block')}: {e}") from None
    if "quantize" in values and values["quantize"] not in ("none", "float16", "int8"):
        raise ValueError(f"{name('quantize')} must be 'none', 'float16' or 'int8'")
    if "prune_channels" in values and values["prune_channels"] != "auto" and (
            not _number(values["prune_channels"]) or not 0 <= values["prune_channels"] < 1):
        raise ValueError(f"{name('prune_channels')} must be a share in [0, 1) or 'auto'")
    if "channel_multiple" in values:
        if not _integer(values["channel_multiple"]) or values["channel_multiple"] < 1:
            raise ValueError(f"{name('channel_multiple')} must be an integer >= 1")
        values["channel_multiple"] = int(values["channel_multiple"])
    if "skip" in values and not isinstance(values["skip"], bool):
        raise ValueError(f"{name('skip')} must be true or false")
    return values


@dataclass(frozen=True)
class Plan:
    """The per-layer settings decided before any pass runs: the command line's defaults and the recipe's rules.
    Immutable: what a run finds out or chooses on the way (the input's positions, calibration rows, the budget's
    per-layer choice, factors already emitted) lives in its `RunContext`."""
    defaults: LayerSettings = field(default_factory=LayerSettings)
    rules: tuple = ()
    only: str | None = None
    skip: str | None = None
    min_params: int = 0
    # What the budget chooses per layer: "lowrank" (ranks) and / or "prune" (sparsities, --prune auto).
    budget_kinds: frozenset = frozenset({"lowrank"})
    # --quantize full-int8 follows the passes: every weight ends up int8 (what pruning can store sparse).
    full_int8: bool = False

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))

    def settings(self, op: Operator) -> LayerSettings:
        """The defaults with every matching recipe rule applied in order (the budget's choice is the run's:
        `RunContext.settings`)."""
        name = op.outputs[0].name if op.outputs else ""
        s = self.defaults
        for rule in self.rules:
            if re.search(rule["match"], name):
                changes = {k: v for k, v in rule.items() if k != "match"}
                if any(k in changes for k in ("rank", "ratio", "energy")):
                    # A rule's rank choice replaces the default's, whichever form either takes.
                    s = replace(s, rank=None, ratio=None, energy=None)
                if "quantize" in changes and changes["quantize"] == "none":
                    changes["quantize"] = None
                if "prune_block" in changes:
                    changes["prune_block"] = parse_block(changes["prune_block"])
                s = replace(s, **changes)
        return s

    def reason_to_skip(self, op: Operator, n_params: int, settings: LayerSettings,
                       kept_dense_counts: bool = True) -> str | None:
        """Why a pass leaves `op` (whose settings are `settings`) alone, or None. `kept_dense_counts=False` (the
        quantize pass): a layer the budget kept dense is still stored as --quantize asks — the budget counted it
        so."""
        name = op.outputs[0].name if op.outputs else ""
        if self.only and not re.search(self.only, name):
            return "not matched by --only"
        if self.skip and re.search(self.skip, name):
            return "matched by --skip"
        if n_params < self.min_params:
            return f"fewer than {self.min_params} weights (--min-params)"
        if settings.skip_reason and kept_dense_counts:
            return settings.skip_reason
        if settings.skip:
            return "skipped by the recipe"
        return None

    # Which techniques any layer may use (so a pass can be skipped outright).
    def uses(self, technique: str) -> bool:
        candidates = [self.defaults] + [self.settings_of_rule(r) for r in self.rules]
        if technique == "lowrank":
            return any(s.rank_policy("fc").active or s.rank_policy("conv").active for s in candidates)
        if technique == "ratio":  # a rank chosen by a reduction ratio (--ratio, or a recipe rule's ratio)
            return any(s.ratio is not None for s in candidates)
        if technique == "prune":
            return any(s.prune for s in candidates)
        if technique == "quantize":
            return any(s.quantize for s in candidates)
        if technique == "prune_channels":
            return any(s.prune_channels for s in candidates)
        if technique == "channel_budget":  # `--prune-channels auto` or a recipe rule with "auto"
            return any(s.prune_channels == "auto" for s in candidates)
        raise ValueError(technique)

    def uses_data(self) -> bool:
        """Whether any layer setting is fitted to calibration data (low rank, pruning and channel pruning are)."""
        return self.uses("lowrank") or self.uses("prune") or self.uses("prune_channels")

    def settings_of_rule(self, rule: dict) -> LayerSettings:
        changes = {k: v for k, v in rule.items() if k not in ("match", "prune_block")}
        if changes.get("quantize") == "none":
            changes["quantize"] = None
        return replace(self.defaults, **changes)


@dataclass(eq=False)
class RunContext:
    """What one run finds out and decides on the way, handed to every pass with the (immutable) plan: the input
    model's ops and positions, calibration rows, the budget's per-layer choice, factors already emitted. The
    passes ask it, not the plan, for a layer's settings: the budget's choice overrides the plan's."""
    plan: Plan = field(default_factory=Plan)
    # id(op) → (subgraph, index) before any pass ran, so the report names ops as the input file does; the ops
    # themselves are held in `input_ops` so that no op a pass creates can reuse one of their ids.
    positions: dict = field(default_factory=dict)
    input_ops: list = field(default_factory=list)
    # id(tensor) → tensor of the input model: held, so that no tensor a pass creates after one was dropped can
    # take its id and pass for an input tensor (full-int8 tells a low-rank chain's inner factors by it).
    input_tensors: dict = field(default_factory=dict)
    # Per-op extra data for data-aware fitting: id(op) → dict (calibration rows, their mean, ...).
    layer_data: dict = field(default_factory=dict)
    # id(op) → LayerSettings chosen by the global budget search (override the defaults and the recipe).
    budget: dict = field(default_factory=dict)
    budget_info: dict = field(default_factory=dict)
    budget_summary: dict | None = None
    # `--prune-channels auto`: id(first layer writing a group) → units the budget keeps, or why it keeps them all.
    channel_budget: dict = field(default_factory=dict)
    # What calibration did (for the report), or None.
    calibration: dict | None = None
    # (id(weight buffer), rank) → factors already emitted for a weight that several ops share.
    shared_factors: dict = field(default_factory=dict)
    # `--per-tensor auto`: id(op) → damage, for the full-integer layers the budget requantizes per tensor.
    per_tensor: dict = field(default_factory=dict)

    def settings(self, op: Operator) -> LayerSettings:
        if id(op) in self.budget:
            return self.budget[id(op)]
        return self.plan.settings(op)

    def reason_to_skip(self, op: Operator, n_params: int, kept_dense_counts: bool = True) -> str | None:
        """`Plan.reason_to_skip` with the layer's settings in this run (the budget's choice included)."""
        return self.plan.reason_to_skip(op, n_params, self.settings(op), kept_dense_counts)

    def rank_policy(self, op: Operator, kind: str) -> RankPolicy:
        policy = self.settings(op).rank_policy(kind)
        data = self.layer_data.get(id(op))
        if data:
            policy.extra = data  # shared, so the layer's input metric is computed once (budget, then the fit)
        policy.budgeted = id(op) in self.budget
        return policy

    def uses(self, technique: str) -> bool:
        """`Plan.uses`, and the techniques the budget chose for some layer."""
        if technique in ("lowrank", "prune") and self.budget and technique in self.plan.budget_kinds:
            return True
        return self.plan.uses(technique)

    def remember_input(self, model) -> None:
        """Record the input model's ops (positions for the report; passes rewrite only these) and tensors."""
        self.input_ops = [op for sg in model.subgraphs for op in sg.operators]
        self.input_tensors = {id(t): t for sg in model.subgraphs for t in sg.tensors}
        self.positions = {id(op): (si, oi) for si, sg in enumerate(model.subgraphs) for oi, op in enumerate(sg.operators)}

    def release_model(self) -> None:
        """Drop every reference to the model's ops, tensors and arrays (the report keeps positions and summaries),
        so that the rewritten model can be freed once written."""
        self.input_ops = []
        self.input_tensors = {}
        self.layer_data = {}
        self.shared_factors = {}

    def is_input_op(self, op: Operator) -> bool:
        """Whether `op` was in the input model (always true when the input was not recorded)."""
        return not self.input_ops or id(op) in self.positions
