"""Records of the report (`schemas/report.schema.json`)."""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field, fields


@dataclass
class Entry(MutableMapping):
    """One item of the report's `layers` ($defs/layer): an op a pass considered, what it did and why.

    The schema's fields are attributes; what a pass adds beyond them (output_error, shared, sparsity_after, …)
    lives in `details`. Read and written as a mapping too (`entry["reason"]`, `entry.update(...)`), in the
    schema's field order followed by the details in the order they were added, as the JSON report lists them.
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
    details: dict = field(default_factory=dict)

    def __getitem__(self, key):
        if key in _FIELDS:
            return getattr(self, key)
        return self.details[key]

    def __setitem__(self, key, value):
        if key in _FIELDS:
            setattr(self, key, value)
        else:
            self.details[key] = value

    def __delitem__(self, key):
        if key in _FIELDS:
            raise KeyError(f"{key!r} is a field every report entry has")
        del self.details[key]

    def __iter__(self):
        yield from _FIELDS
        yield from self.details

    def __len__(self):
        return len(_FIELDS) + len(self.details)

    def __eq__(self, other):
        return MutableMapping.__eq__(self, other)

    def as_json(self) -> dict:
        return dict(self.items())


_FIELDS = tuple(f.name for f in fields(Entry) if f.name != "details")
