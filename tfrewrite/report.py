"""Records of the report (`schemas/report.schema.json`)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields


class _Absent:
    """The value of an optional entry field that is not in the report (None is a value: JSON null)."""
    __slots__ = ()

    def __repr__(self):
        return "ABSENT"

    def __bool__(self):
        return False

    def __reduce__(self):
        return "ABSENT"  # copies and pickles stay the one instance


ABSENT = _Absent()


@dataclass(eq=False)
class Entry(Mapping):
    """One item of the report's `layers` ($defs/layer): an op a pass considered, what it did and why.

    Passes write it through its attributes only. The first fields are in every entry; the optional ones
    (ABSENT until a pass sets them) only where a pass set them. Read as a mapping too (`entry["reason"]`,
    `"shared" in entry`): the fields present, in the order the JSON report lists them — the schema's, then the
    optional fields in the order below, which is the order the passes have always written them in.
    `subgraph`/`index` name the op in the input model: for an op a pass created, the op it came from."""
    subgraph: int
    index: int
    op: str
    output: str
    kind: str
    weight_shape: list | None = None
    weight_dtype: str | None = None
    action: str = "skipped"
    method: str | None = None
    rank: int | list | tuple | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    rel_error: float | None = None
    reason: str | None = None
    # Optional. Channel pruning: the group's members, its channels and how they were chosen.
    members: list = ABSENT
    channels_before: int = ABSENT
    channels_after: int = ABSENT
    selection: str = ABSENT
    # Storage (quantize, sparse_encode): the weight's type after, its bytes, its zero share, which input it is
    # (ops other than a layer's weight).
    dtype_after: str | None = ABSENT
    bytes_before: int = ABSENT
    bytes_after: int = ABSENT
    zero_fraction: float = ABSENT
    input: int = ABSENT
    shared: bool = ABSENT  # the weight is shared with other ops (one rewrite serves them all)
    sparsity_before: float = ABSENT
    sparsity_after: float = ABSENT
    # Data-aware fitting: the layer's relative output error on the calibration rows (and magnitude pruning's).
    output_error: float = ABSENT
    output_error_magnitude: float = ABSENT
    bias_corrected: bool = ABSENT
    # CP-ALS: how it started, how degenerate the result is, how many sweeps it took.
    init: str = ABSENT
    degeneracy: float = ABSENT
    n_iter: int = ABSENT
    factors: dict = ABSENT  # the emitted factors' values, for checks (never in the JSON report)
    # The budget: the layer's damage at its chosen option and its share of the saving.
    damage: float = ABSENT
    budget_share: float = ABSENT

    def set(self, **values) -> None:
        """Set several fields at once (each must be one of the entry's fields)."""
        for key, value in values.items():
            if key not in _KEYS:
                raise AttributeError(f"a report entry has no field {key!r}")
            setattr(self, key, value)

    def drop(self, *keys: str) -> None:
        """Leave optional fields out of the report again."""
        for key in keys:
            if key not in _OPTIONAL:
                raise AttributeError(f"{key!r} is not an optional field of a report entry")
            setattr(self, key, ABSENT)

    def __getitem__(self, key):
        value = getattr(self, key, ABSENT) if key in _KEYS else ABSENT
        if value is ABSENT:
            raise KeyError(key)
        return value

    def __iter__(self):
        return (k for k in _KEYS if getattr(self, k) is not ABSENT)

    def __len__(self):
        return sum(1 for _ in self)

    def __repr__(self):
        return f"Entry({', '.join(f'{k}={v!r}' for k, v in self.items())})"

    def as_json(self) -> dict:
        return {k: v for k, v in self.items() if k != "factors"}


_KEYS = tuple(f.name for f in fields(Entry))
_OPTIONAL = frozenset(f.name for f in fields(Entry) if f.default is ABSENT)
