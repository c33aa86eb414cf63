"""Live use-def links of the IR (Tensor.producer / consumers, Buffer.users): kept in sync by every edit made
through the IR's lists and helpers, and checked against the operator lists by the invariant check."""
import numpy as np
import pytest

import builders as B
from conftest import FIXTURES
from tfrewrite import io, ops, schema
from tfrewrite.graph import Operator, OpCode, Subgraph, Tensor

OP = schema.BuiltinOperator
T = schema.TensorType


def recomputed(sg: Subgraph):
    """Producer and consumers of every tensor the way the operator lists say (what the links must equal)."""
    producer, readers = {}, {}
    for op in sg.operators:
        for t in op.outputs:
            producer[id(t)] = op
        for t in op.inputs:
            if t is not None and op not in readers.setdefault(id(t), []):
                readers[id(t)].append(op)
    return producer, readers


def assert_links_match(sg: Subgraph):
    producer, readers = recomputed(sg)
    used = {id(t): t for op in sg.operators for t in list(op.inputs) + list(op.outputs) if t is not None}
    for t in list(sg.tensors) + list(used.values()):
        assert t.producer is producer.get(id(t)), t
        assert t.consumers == readers.get(id(t), []), t  # execution order
    assert all(op.subgraph is sg for op in sg.operators)
    assert all(t.subgraph is sg for t in sg.tensors)


def test_links_of_a_read_model_match_its_operators():
    model = io.read(FIXTURES / "mobilenetv2_digits.tflite")
    sg = model.main
    assert_links_match(sg)
    assert model.problems() == []
    add = next(op for op in sg.operators if op.builtin == OP.ADD)
    # A residual ADD reads the outputs of two earlier ops; the input of the block feeds both the ADD and a conv.
    assert all(t.producer is not None for t in add.inputs)
    skip = next(t for t in add.inputs if len(t.consumers) > 1)
    assert add in skip.consumers and any(c.builtin == OP.CONV_2D for c in skip.consumers)


def test_edits_through_the_lists_and_helpers_keep_the_links():
    model = io.read(FIXTURES / "vgg_digits.tflite")
    sg = model.main
    fc = next(op for op in sg.operators if op.builtin == OP.FULLY_CONNECTED)
    x, w, out = fc.inputs[0], fc.inputs[1], fc.outputs[0]
    reader = out.consumers[0]

    # Item assignment on an op's inputs.
    w2 = sg.add_constant("w2", np.zeros(w.shape, np.float32))
    fc.inputs[1] = w2
    assert w.consumers == [] and w2.consumers == [fc]
    fc.inputs[1] = w
    # replace_operator: a chain that writes the old op's output takes over the links.
    mid = sg.add_activation("mid", T.FLOAT32, [1, 8], like=x)
    first = ops.fully_connected(x, sg.add_constant("a", np.zeros((8, w.shape[1]), np.float32)), None, mid)
    second = ops.fully_connected(mid, sg.add_constant("b", np.zeros((w.shape[0], 8), np.float32)), None, out)
    assert first.subgraph is None and x.consumers.count(first) == 0  # not linked before it joins a subgraph
    sg.replace_operator(fc, [first, second])
    assert fc.subgraph is None and out.producer is second and mid.producer is first and mid.consumers == [second]
    assert x.consumers == [first] and w.consumers == []
    assert model.problems() == []
    # rewire: the reader of `out` now reads `mid`.
    sg.rewire(out, mid)
    assert out.consumers == [] and mid.consumers == [second, reader]
    sg.rewire(mid, out, after=second)
    assert mid.consumers == [second] and out.consumers == [reader]
    # Appended ops go into place with toposort; cleanup drops what nobody reads.
    extra_out = sg.add_activation("extra", T.FLOAT32, list(out.shape))
    relu = sg.add_operator(Operator(OpCode(OP.RELU), [out], [extra_out]))
    late = second.inputs[1]
    dq_out = sg.add_activation("w_dq", T.FLOAT32, list(late.shape))
    dq = sg.add_operator(ops.dequantize(sg.add_constant("w16", np.zeros(late.shape, np.float16)), dq_out))
    second.inputs[1] = dq_out
    sg.toposort()
    assert sg.operators.index(dq) == sg.operators.index(second) - 1
    assert sg.operators.index(relu) > sg.operators.index(second)
    sg.cleanup()
    assert relu.subgraph is None and out.consumers == [reader] and late.subgraph is None
    assert_links_match(sg)
    assert model.problems() == []
    # Removing and popping.
    sg.remove_operator(dq)
    assert dq_out.producer is None and dq.inputs[0].consumers == []
    sg.operators.insert(sg.operators.index(second), dq)
    assert dq_out.producer is dq
    assert_links_match(sg)
    assert model.problems() == []


def test_toposort_is_stable_and_finds_cycles():
    sg = Subgraph()
    a, b, c = (sg.add_tensor(Tensor(n, T.FLOAT32, [1])) for n in "abc")
    sg.inputs = [a]
    first = Operator(OpCode(OP.RELU), [a], [b])
    second = Operator(OpCode(OP.RELU), [b], [c])
    sg.operators = [second, first]
    sg.toposort()
    assert list(sg.operators) == [first, second]
    # An appended op goes right before the first op that needs it, not after ops that merely were ready first.
    d, e, f, g = (sg.add_tensor(Tensor(n, T.FLOAT32, [1])) for n in "defg")
    add = Operator(OpCode(OP.ADD), [c, d], [e])
    other = Operator(OpCode(OP.RELU), [a], [f])
    sg.operators.extend([add, other])
    late = sg.add_operator(Operator(OpCode(OP.RELU), [a], [d]))
    sg.add_operator(Operator(OpCode(OP.RELU), [e], [g]))
    sg.toposort()
    assert [op.outputs[0].name for op in sg.operators] == ["b", "c", "d", "e", "f", "g"] and late.outputs == [d]
    first.inputs = [c]
    with pytest.raises(ValueError, match="cycle"):
        sg.toposort()


def test_snapshot_restore_restores_the_links():
    model = io.read(FIXTURES / "vgg_digits.tflite")
    sg = model.main
    conv = next(op for op in sg.operators if op.builtin == OP.CONV_2D)
    w, out = conv.inputs[1], conv.outputs[0]
    snapshot = model.snapshot()
    new_out = sg.add_activation("other", out.type, out.shape)
    sg.replace_operator(conv, [ops.conv2d(conv.inputs[0], w, conv.inputs[2], new_out)])
    sg.rewire(out, new_out)
    w.set_data(np.zeros(w.shape, np.float32))
    snapshot.restore()
    assert out.producer is conv and new_out.producer is None and new_out.consumers == []
    assert w.consumers == [conv] and w.buffer.users == [w]
    assert_links_match(sg)
    assert model.problems() == []


def test_buffer_users_follow_shared_weights_across_subgraphs():
    rng = np.random.default_rng(0)
    model = io.read_buffer(B.shared_across_signatures(rng.standard_normal((8, 16)).astype(np.float32), layer="fc",
                                                      form="float32", bias=rng.standard_normal(8)))
    weights = [op.inputs[1] for sg in model.subgraphs for op in sg.operators if op.builtin == OP.FULLY_CONNECTED]
    buffer = weights[0].buffer
    assert len(model.subgraphs) == 2 and all(t.buffer is buffer for t in weights)
    assert set(map(id, buffer.users)) == set(map(id, weights))
    assert [t for _, t in model.sharers(weights[1])] == [t for sg in model.subgraphs for t in sg.tensors
                                                        if t.buffer is buffer]
    model.set_shared_data(weights[0], np.ones((8, 16), np.float32))
    assert buffer.users == [] and set(map(id, weights[0].buffer.users)) == set(map(id, weights))
    # A tensor leaving its subgraph's list leaves its buffer's users.
    sg0 = weights[0].subgraph
    sg0.tensors.remove(weights[0])
    assert weights[0].subgraph is None and weights[0] not in weights[0].buffer.users


def test_the_invariant_check_sees_links_that_do_not_match():
    model = io.read(FIXTURES / "vgg_digits.tflite")
    conv = next(op for op in model.main.operators if op.builtin == OP.CONV_2D)
    conv.inputs[0]._readers.clear()  # as if an edit went around the IR
    conv.outputs[0]._producer = None
    problems = model.problems()
    assert any("consumer links do not match" in p for p in problems)
    assert any("producer link does not match" in p for p in problems)
    # Two ops writing one tensor.
    model = io.read(FIXTURES / "vgg_digits.tflite")
    sg = model.main
    conv = next(op for op in sg.operators if op.builtin == OP.CONV_2D)
    sg.add_operator(ops.conv2d(conv.inputs[0], conv.inputs[1], conv.inputs[2], conv.outputs[0]))
    assert any("written by 2 ops" in p for p in model.problems())


def test_a_pass_can_remove_channels_of_a_full_integer_conv_with_ir_helpers_alone():
    """Find a conv's consumers, walk the channel-wise ops after it to the layer that reads its channels, and slice
    the per-channel int8 weights, int32 bias and activations: with Tensor.consumers, the op-semantics table and
    Tensor.take only. Checked against the same model with those channels' weights and bias zeroed (each then
    outputs exactly its zero point, which the reader multiplies by nothing): the outputs must be identical."""
    from conftest import assert_outputs_equal, outputs
    from tfrewrite.ops import semantics
    rng = np.random.default_rng(3)
    src = FIXTURES / "vgg_digits_int8.tflite"

    def channel_path(model):
        convs = [op for op in model.main.operators if op.builtin == OP.CONV_2D]
        conv = convs[1]
        walked, t = [], conv.outputs[0]
        while True:
            (reader,) = t.consumers
            if reader.builtin not in semantics.CHANNELWISE_UNARY:
                break
            walked.append(reader)
            t = reader.outputs[0]
        assert semantics.LAYERS[reader.builtin].in_axis == 3 and walked  # a CONV_2D behind a MAX_POOL_2D
        return conv, walked, reader

    drop = np.sort(rng.choice(32, 8, replace=False))
    keep = np.setdiff1d(np.arange(32), drop)

    zeroed = io.read(src)
    conv, _, _ = channel_path(zeroed)
    layout = semantics.LAYERS[conv.builtin]
    w, b = conv.inputs[layout.weight], conv.inputs[layout.bias]
    assert w.quantization.channels == 32 and w.quantization.axis == layout.out_axis
    data = np.array(w.data)
    data[drop] = 0
    w.set_data(data)
    bias = np.array(b.data)
    bias[drop] = 0
    b.set_data(bias)

    sliced = io.read(src)
    conv, walked, reader = channel_path(sliced)
    w, b = conv.inputs[layout.weight], conv.inputs[layout.bias]
    scales = np.array(w.quantization.scale)
    w.take(keep, layout.out_axis)
    b.take(keep, 0)
    assert w.shape == [24, 3, 3, 32] and np.array_equal(w.quantization.scale, scales[keep])
    assert b.quantization.channels == 24
    for op in [conv] + walked:
        op.outputs[0].shape = op.outputs[0].shape[:-1] + [len(keep)]
    reader.inputs[1].take(keep, semantics.LAYERS[reader.builtin].in_axis)
    assert reader.inputs[1].quantization.channels == 64  # per output channel: untouched by an input-axis slice
    assert sliced.problems() == []
    assert len(io.to_bytes(sliced)) < len(io.to_bytes(zeroed))
    for xnnpack in (True, False):
        assert_outputs_equal(outputs(io.to_bytes(sliced), xnnpack), outputs(io.to_bytes(zeroed), xnnpack))


@pytest.mark.parametrize("name,form", [("vgg_digits.tflite", "float32"), ("vgg_digits_fp16.tflite", "float16"),
                                       ("vgg_digits_dynint8.tflite", "int8"), ("vgg_digits_sparse.tflite", "sparse")])
def test_one_weight_reader_follows_the_links_to_the_stored_constant(name, form):
    from tfrewrite.analysis import stored
    model = io.read(FIXTURES / name)
    fc = next(op for op in model.main.operators if op.builtin == OP.FULLY_CONNECTED)
    src = stored(fc.inputs[1])
    assert src.tensor.is_constant and src.tensor.subgraph is model.main
    carriers = [c.name for c in src.carriers]
    if form == "float32":
        assert carriers == [] and src.values() is not None and src.values().base is not None  # a view
    elif form == "float16":
        assert carriers == ["DEQUANTIZE"] and np.array_equal(src.values(), src.tensor.data.astype(np.float32))
    elif form == "int8":
        q = src.tensor.quantization
        assert carriers == [] and q.channels > 1
        assert np.allclose(src.values(), src.tensor.data * q.scale[:, None])
    else:
        assert carriers[0] == "DENSIFY" and src.values() is None
    assert stored(fc.inputs[0]) is None  # an activation


def test_copies_and_reorderings_keep_the_links():
    import copy
    model = io.read(FIXTURES / "vgg_digits.tflite")
    sg = model.main
    conv = next(op for op in sg.operators if op.builtin == OP.CONV_2D)
    twin = copy.copy(conv)
    assert twin.subgraph is None and twin.inputs == conv.inputs and twin.inputs is not conv.inputs
    twin.inputs[0] = sg.add_activation("elsewhere", T.FLOAT32, [1, 32, 32, 3])
    assert conv.inputs[0].consumers == [conv]  # editing the copy leaves the original's links alone
    w = copy.copy(conv.inputs[1])
    assert w.subgraph is None and w.consumers == [] and w.buffer is conv.inputs[1].buffer
    assert w not in w.buffer.users
    order = list(sg.operators)
    sg.operators.reverse()
    assert sg.operators[0] is order[-1] and order[-1].outputs[0].consumers == []
    assert order[0].outputs[0].consumers == [order[1]]
    sg.operators.sort(key=order.index)
    assert list(sg.operators) == order
    assert_links_match(sg)
    assert model.problems() == []
