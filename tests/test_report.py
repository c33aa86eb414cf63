"""Report entries: made only as report.Entry, matching the schema's layer record; an entry for an op a pass
created names the input model's op it came from."""
import json

import jsonschema

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
    e = created[0]
    e["reason"] = "x"
    e["shared"] = True
    assert e.reason == "x" and e.details["shared"] is True and "shared" in e
    del e["shared"]
    assert "shared" not in e
