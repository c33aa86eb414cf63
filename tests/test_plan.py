"""Recipes: schemas/recipe.schema.json and plan.validate_recipe agree; rule order; CLI defaults; end to end."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from conftest import FIXTURES, ROOT
from tfrewrite import io, plan, schema, verify
from tfrewrite.rewrite import Options

jsonschema = pytest.importorskip("jsonschema")

OP = schema.BuiltinOperator
T = schema.TensorType
SCHEMA = json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())
VGG = FIXTURES / "vgg_digits.tflite"

GOOD = [
    {"rules": []},
    {"rules": [{"match": "."}]},
    {"rules": [{"match": "fc", "rank": 8}], "description": "fc at rank 8", "version": 1},
    {"rules": [{"match": "conv", "conv_rank": 4, "conv_method": "tucker2"}, {"match": "fc", "fc_rank": 2}]},
    {"rules": [{"match": ".", "ratio": 1.5}, {"match": "x", "energy": 1}, {"match": "y", "energy": 0.5}]},
    {"rules": [{"match": ".", "prune": 0}, {"match": "fc", "prune": 0.9, "prune_block": "1x4"}]},
    {"rules": [{"match": ".", "prune_block": "1x16"}, {"match": ".", "prune_block": "1x1"}]},
    {"rules": [{"match": ".", "quantize": "int8"}, {"match": "x", "quantize": "none"},
               {"match": "y", "quantize": "float16"}, {"match": "predictions", "skip": True}]},
    {"rules": [{"match": "^a(b|c)+$", "skip": False, "rank": 2.0}]},  # JSON Schema: 2.0 is an integer
    {"rules": [], "version": 3.0},
]
BAD = [
    [],                                              # not an object
    {},                                              # no rules
    {"rules": {}},                                   # rules not a list
    {"rules": [], "extra": 1},                       # unknown top-level key
    {"rules": [], "description": 5},
    {"rules": [], "version": "1"},
    {"rules": [], "version": 1.5},
    {"rules": ["conv"]},                             # rule not an object
    {"rules": [{}]},                                 # no match
    {"rules": [{"match": 3}]},
    {"rules": [{"match": "("}]},                     # bad regex
    {"rules": [{"match": ".", "rank": 0}]},
    {"rules": [{"match": ".", "rank": 2.5}]},
    {"rules": [{"match": ".", "rank": True}]},
    {"rules": [{"match": ".", "fc_rank": "4"}]},
    {"rules": [{"match": ".", "conv_rank": -1}]},
    {"rules": [{"match": ".", "ratio": 1}]},
    {"rules": [{"match": ".", "ratio": "2"}]},
    {"rules": [{"match": ".", "energy": 0}]},
    {"rules": [{"match": ".", "energy": 1.01}]},
    {"rules": [{"match": ".", "conv_method": "svd"}]},
    {"rules": [{"match": ".", "prune": 1}]},
    {"rules": [{"match": ".", "prune": -0.1}]},
    {"rules": [{"match": ".", "prune": False}]},
    {"rules": [{"match": ".", "prune_block": "2x2"}]},
    {"rules": [{"match": ".", "quantize": "int4"}]},
    {"rules": [{"match": ".", "quantize": None}]},
    {"rules": [{"match": ".", "skip": "yes"}]},
    {"rules": [{"match": ".", "skip": 1}]},
    {"rules": [{"match": ".", "Rank": 4}]},          # unknown rule key
    {"rules": [{"match": ".", "rank": 4, "ratio": 3}]},  # refused on the command line too
    {"rules": [{"match": ".", "ratio": 3, "energy": 0.9}]},
    {"rules": [{"match": ".", "prune_block": "0x4"}]},
    {"rules": [{"match": ".", "prune_block": "4x1"}]},
]


def schema_errors(doc):
    validator = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return list(validator.iter_errors(doc))


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("doc", GOOD, ids=[f"good{i}" for i in range(len(GOOD))])
def test_good_recipes_pass_both(doc):
    assert schema_errors(doc) == []
    plan.validate_recipe(json.loads(json.dumps(doc)))


@pytest.mark.parametrize("doc", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_malformed_recipes_fail_both_with_a_clear_message(doc):
    assert schema_errors(doc), "the schema accepts it"
    with pytest.raises(plan.RecipeError) as e:
        plan.validate_recipe(json.loads(json.dumps(doc)), "r.json")
    message = str(e.value)
    assert message.startswith("r.json") and "\n" not in message and len(message) < 200


def _op(name):
    from tfrewrite.graph import OpCode, Operator, Tensor
    return Operator(OpCode(OP.FULLY_CONNECTED), [], [Tensor(name, T.FLOAT32, [1])])


def test_later_rules_override_earlier_ones_and_cli_options_are_defaults():
    rules = plan.validate_recipe({"rules": [
        {"match": ".", "quantize": "int8", "rank": 8},
        {"match": "fc2", "quantize": "float16"},
        {"match": "predictions", "quantize": "none", "skip": True},
        {"match": "fc1", "energy": 0.9},
    ]})
    p = replace(Options(quantize="float16", rank=4, prune=0.3).plan(), rules=rules)
    fc1, fc2, pred, other = (p.settings(_op(n)) for n in ("m/fc1", "m/fc2", "m/predictions", "m/conv"))
    assert (fc1.quantize, fc1.rank, fc1.energy, fc1.prune) == ("int8", None, 0.9, 0.3)
    assert (fc2.quantize, fc2.rank, fc2.prune) == ("float16", 8, 0.3)
    assert pred.quantize is None and pred.skip
    assert (other.quantize, other.rank) == ("int8", 8)
    plain = Options(quantize="float16", rank=4).plan()  # no recipe: the command line everywhere
    s = plain.settings(_op("m/fc1"))
    assert (s.quantize, s.rank, s.skip) == ("float16", 4, False)
    assert plan.RunContext(p).reason_to_skip(_op("m/predictions"), 100) == "skipped by the recipe"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tfrewrite.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"rules": [{"match": ".", "quantize": "int4"}]}),
    json.dumps({"rules": [{"rank": 4}]}),
    json.dumps({"rules": [{"match": "(", "rank": 4}]}),
])
def test_cli_rejects_a_malformed_recipe(tmp, content):
    recipe, out = tmp / "recipe.json", tmp / "out.tflite"
    recipe.write_text(content)
    r = _cli(VGG, out, "--quantize", "int8", "--recipe", recipe)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tfrewrite: error: ") and "recipe.json" in lines[0], r.stderr
    assert not out.exists() and r.stdout == ""


@pytest.mark.parametrize("content", [
    '{"rules": [{"match": ".", "prune": NaN}]}',
    '{"rules": [{"match": ".", "ratio": Infinity}]}',
    '{"rules": [{"match": ".", "ratio": 1e400}]}',  # reads as infinity
    '{"rules": [' * 100_000,
    '[' * 100_000 + ']' * 100_000,
])
def test_non_json_numbers_and_deep_nesting_are_refused(tmp, content):
    recipe = tmp / "recipe.json"
    recipe.write_text(content)
    with pytest.raises(plan.RecipeError) as e:
        plan.load_recipe(recipe)
    assert str(e.value).startswith(str(recipe)) and "\n" not in str(e.value) and len(str(e.value)) < 300


def test_one_check_for_command_line_and_recipe_values():
    for block in ("0x4", "1x0", "4x1", "2x2", "1x1000000", "x4"):
        with pytest.raises(ValueError, match="--prune-block"):
            Options(prune=0.5, prune_block=block).validate()
        with pytest.raises(plan.RecipeError, match="'prune_block'"):
            plan.validate_recipe({"rules": [{"match": ".", "prune_block": block}]})
    for ok in ("1x1", "1x4", "1x16"):
        Options(prune=0.5, prune_block=ok).validate()
    with pytest.raises(ValueError, match="choose one of --rank, --ratio, --energy"):
        Options(rank=4, ratio=3).validate()
    with pytest.raises(plan.RecipeError, match="choose one of 'rank', 'ratio', 'energy'"):
        plan.validate_recipe({"rules": [{"match": ".", "rank": 4, "ratio": 3}]})


def test_cli_missing_recipe_file(tmp):
    r = _cli(VGG, tmp / "out.tflite", "--recipe", tmp / "nope.json")
    assert r.returncode == 2 and r.stderr.startswith("tfrewrite: error: ") and not (tmp / "out.tflite").exists()


def test_recipe_end_to_end_on_vgg(tmp):
    """int8 everywhere, but the last FC skipped and rank 16 for conv3_1 (the CP fit of every conv is slow)."""
    recipe = tmp / "recipe.json"
    recipe.write_text(json.dumps({"description": "int8, last FC float, conv3_1 at rank 16", "version": 1, "rules": [
        {"match": ".", "quantize": "int8"},
        {"match": "conv3_1", "conv_rank": 16},
        {"match": "predictions", "skip": True},
    ]}))
    out, report = tmp / "out.tflite", tmp / "report.json"
    r = _cli(VGG, out, "--recipe", recipe, "--report", report, "--min-params", 1)  # rank-16 factors are small
    assert r.returncode == 0, r.stderr
    layers = json.loads(report.read_text())["layers"]
    assert any(e["action"] == "rewritten" and "conv3_1" in e["output"] for e in layers)
    assert not any(e["action"] == "rewritten" and "conv3_1" not in e["output"] for e in layers)
    pred = [e for e in layers if "predictions" in e["output"]]
    assert pred and all(e["action"] == "skipped" and e["reason"] == "skipped by the recipe" for e in pred)
    model = io.read(out)
    fcs = [op for op in model.main.operators if op.builtin == OP.FULLY_CONNECTED]
    assert [op.inputs[1].type for op in fcs] == [T.INT8, T.INT8, T.FLOAT32]
    depthwise = [op for op in model.main.operators if op.builtin == OP.DEPTHWISE_CONV_2D]
    # The CP chain is quantized too; a depthwise weight is read through a DEQUANTIZE (no hybrid depthwise).
    producer = model.main.producer_of(depthwise[0].inputs[1]) if len(depthwise) == 1 else None
    assert producer is not None and producer.builtin == OP.DEQUANTIZE and producer.inputs[0].type == T.INT8
    sys.path.insert(0, str(FIXTURES))
    from digits import load_split
    x, y = load_split("test", 32)
    for xnnpack in (True, False):
        it = verify.interpreter(out, xnnpack=xnnpack)
        pred = np.array([verify.invoke(it, [x[i:i + 1]])[0].argmax() for i in range(100)])
        assert np.mean(pred == y[:100]) > 0.8
