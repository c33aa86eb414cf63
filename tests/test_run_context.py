"""A run keeps its state in its RunContext: the Plan it was given is the same afterwards, every report entry is a
typed `report.Entry` written through its fields (one that a pass wrote as a dict key would have failed: Entry refuses
item assignment), and every entry names the input model's op it is or came from — whichever pass made the op it
reports (low rank, the int8 chains, pruning, channel pruning, quantization, full-integer, sparse encoding)."""
import copy
import json

import pytest

from conftest import FIXTURES, digits_calibration
from tfrewrite import io, rewrite
from tfrewrite.plan import RunContext
from tfrewrite.report import Entry

RECIPE = {"rules": [{"match": "fc1", "rank": 12, "prune": 0.3}, {"match": "conv2", "conv_method": "tucker2"},
                    {"match": "conv1_1", "skip": True}, {"match": "predictions", "quantize": "none"}]}
CASES = {  # fixture, options (calibration: 16 images of the digits calib split)
    "recipe: low rank, prune, quantize, sparse": ("vgg_digits.tflite", dict(rank=8, prune=0.5, quantize="float16")),
    "budget on calibration": ("vgg_digits.tflite", dict(target_size=3, calibration=True, quantize="float16")),
    "channel pruning, low rank": ("resnet_concat_digits.tflite", dict(prune_channels=0.5, rank=8, calibration=True,
                                                                      quantize="int8")),
    "int8 chains, sparse": ("vgg_digits_int8.tflite", dict(rank=8, calibration=True, sparse_encode=True)),
    "prune, full-int8, sparse": ("vgg_digits.tflite", dict(prune=0.5, quantize="full-int8", calibration=True)),
}


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return digits_calibration(tmp_path_factory, 16)


@pytest.mark.parametrize("case", CASES)
def test_a_run_leaves_its_plan_and_reports_input_ops_through_typed_entries(case, calib, tmp_path):
    fixture, options = CASES[case]
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    options = rewrite.Options(**{**options, "calibration": str(calib) if options.get("calibration") else None},
                              recipe=str(recipe) if case.startswith("recipe") else None)
    if options.quantize == "full-int8":
        pytest.importorskip("ai_edge_quantizer")
    plan = options.plan()
    before = copy.deepcopy(plan)
    ctx = RunContext(plan)
    model = io.read(FIXTURES / fixture)
    entries = rewrite.rewrite_model(model, options, context=ctx, source=FIXTURES / fixture)
    assert ctx.plan is plan and plan == before
    assert entries and any(e.action != "skipped" for e in entries)
    assert all(type(e) is Entry for e in entries)
    # The op each entry reports, in the rewritten model (tensor names are unique within a subgraph), and the
    # input op it is or came from: the entry's position is that op's.
    by_output = {(si, op.outputs[0].name): op for si, sg in enumerate(model.subgraphs) for op in sg.operators
                 if op.outputs}
    created = 0
    for e in entries:
        op = by_output.get((e.subgraph, e.output))
        if op is None:  # the op was replaced after it was reported (a low-rank layer): its entry is its own
            continue
        source = op if id(op) in ctx.positions else op.origin
        assert source is not None and id(source) in ctx.positions, e
        assert ctx.positions[id(source)] == (e.subgraph, e.index), e
        created += source is not op
    assert created, "the case reports no op a pass created"


def test_the_input_tensors_are_held_so_no_new_tensor_takes_one_of_their_ids():
    """full-int8 tells a low-rank chain's inner factors by the input model's tensors (id(tensor)). Were only the
    ids kept, a tensor a pass dropped could be freed and a factor's new tensor take its id (the allocator reuses
    freed memory at will): that factor would pass for an input tensor, and the written model depend on the
    allocator."""
    import gc
    import weakref
    model = io.read(FIXTURES / "vgg_digits.tflite")
    ctx = RunContext()
    ctx.remember_input(model)
    sg = model.main
    op = sg.operators[0]
    dropped = op.outputs[0]
    seen = weakref.ref(dropped)
    replacement = sg.add_activation(dropped.name + "/new", dropped.type, list(dropped.shape))
    op.outputs[0] = replacement
    sg.operators[1].inputs[0] = replacement
    ctx.input_ops = []  # only the context's own record of tensors may keep it
    model.cleanup()
    del dropped, op
    gc.collect()
    assert seen() is not None and id(seen()) in ctx.input_tensors
    ctx.release_model()
    gc.collect()
    assert seen() is None
