"""The TFLite flatbuffer schema (generated, with the object API), as LiteRT ships it.

Only `io` and the op builders in `ops/` touch these classes; passes work on `graph`.
"""
from ai_edge_litert.schema_py_generated import *  # noqa: F401,F403


def shallow_copy(obj):
    """A copy of an object-API value (options, quantization parameters) whose fields can be changed alone."""
    new = object.__new__(type(obj))
    new.__dict__.update(vars(obj))
    return new
