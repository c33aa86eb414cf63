"""Report entries: made only as report.Entry, matching the schema's layer record; an entry for an op a pass
created names the input model's op it came from."""
import json

import jsonschema
import pytest

from conftest import FIXTURES, ROOT
from tfrewrite import io, rewrite
from tfrewrite.report import Entry


def test_entries_match_the_schema_and_created_ops_point_at_their_input_op():
    model = io.read(FIXTURES / "vgg_digits.tflite")
    inputs = [op for op in model.main.operators]
    input_outputs = {op.outputs[0].name for op in inputs}
    entries = rewrite.rewrite_model(model, rewrite.Options(rank=8, quantize="float16"))
    layer = json.loads((ROOT / "schemas" / "report.schema.json").read_text())
    validator = jsonschema.Draft202012Validator({**layer["$defs"]["layer"], "$defs": layer["$defs"]})
    for e in entries:
        assert isinstance(e, Entry)
        validator.validate(e.as_json())
        assert list(e)[:16] == ["subgraph", "index", "op", "output", "kind", "weight_shape", "weight_dtype", "action",
                                "method", "rank", "params_before", "params_after", "macs_before", "macs_after",
                                "rel_error", "reason"]
    rewritten = {e["index"] for e in entries if e["kind"] in ("fc", "conv") and e["action"] == "rewritten"}
    created = [e for e in entries if e["kind"] == "quantize" and e["output"] not in input_outputs]
    assert rewritten and created
    # Every factor layer the quantize pass saw is reported at the index of the input layer it replaced.
    assert {e["index"] for e in created} <= rewritten
    assert all(inputs[e["index"]].name in ("CONV_2D", "FULLY_CONNECTED") for e in created)


def test_an_entry_is_written_through_its_fields_only():
    """Item assignment is refused (a pass that wrote an entry as a dict would fail here and in every run); an
    optional field is in the mapping and the JSON only once set, in the schema's order whatever the order of
    writing; `factors` is never in the JSON."""
    e = Entry(subgraph=0, index=3, op="FULLY_CONNECTED", output="fc", kind="fc")
    with pytest.raises(TypeError):
        e["reason"] = "x"
    with pytest.raises(TypeError):
        del e["reason"]
    assert "shared" not in e and "output_error" not in e and e.get("shared") is None
    e.bias_corrected = True
    e.set(output_error=0.25, shared=True, factors={"left": None})
    e.dtype_after = None  # None is a value (JSON null), not an absent field
    assert list(e)[16:] == ["dtype_after", "shared", "output_error", "bias_corrected", "factors"]
    assert list(e.as_json())[16:] == ["dtype_after", "shared", "output_error", "bias_corrected"]
    assert e["output_error"] == 0.25 and e.as_json()["dtype_after"] is None
    e.drop("output_error", "factors")
    assert "output_error" not in e and "factors" not in e
    with pytest.raises(AttributeError):
        e.set(no_such_field=1)
    with pytest.raises(AttributeError):
        e.drop("reason")  # every entry has one
