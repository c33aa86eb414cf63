"""Structured channel pruning: groups follow the op-semantics table, slicing is physical, and a pruned model
computes what the original computes with the removed channels' weights set to zero (they output act(bias))."""
import numpy as np
import pytest

from conftest import FIXTURES
from tfrewrite import analysis, io, ops, rewrite, schema, verify
from tfrewrite.graph import Model, Operator, Subgraph, Tensor
from tfrewrite.ops import semantics
from tfrewrite.passes import prune_channels as pc
from tfrewrite.plan import RunContext

OP = schema.BuiltinOperator
T = schema.TensorType
ACT = schema.ActivationFunctionType
VALID = schema.Padding.VALID


class Net:
    """A small float32 NHWC graph built op by op with the IR."""

    def __init__(self, rng, shape):
        self.rng, self.sg = rng, Subgraph()
        self.x = self.sg.add_tensor(Tensor("input", T.FLOAT32, list(shape)))
        self.sg.inputs = [self.x]

    def act(self, name, shape):
        return self.sg.add_tensor(Tensor(name, T.FLOAT32, list(shape)))

    def const(self, name, values):
        return self.sg.add_constant(name, np.asarray(values, np.float32))

    def conv(self, name, x, out, k=1, act=ACT.RELU, weight=None, bias=None):
        n, h, w, c = x.shape
        y = self.act(name, [n, h - k + 1, w - k + 1, out])
        weight = self.rng.standard_normal((out, k, k, c)) / np.sqrt(k * k * c) if weight is None else weight
        wt = self.const(name + "/w", weight)
        b = self.const(name + "/b", self.rng.standard_normal(out) * 0.5 if bias is None else bias)
        self.sg.operators.append(ops.conv2d(x, wt, b, y, padding=VALID, activation=act))
        return y

    def depthwise(self, name, x, m=1, k=3):
        n, h, w, c = x.shape
        y = self.act(name, [n, h - k + 1, w - k + 1, c * m])
        wt = self.const(name + "/w", self.rng.standard_normal((1, k, k, c * m)) / 3)
        b = self.const(name + "/b", self.rng.standard_normal(c * m) * 0.5)
        self.sg.operators.append(ops.depthwise_conv2d(x, wt, b, y, padding=VALID, activation=ACT.RELU6,
                                                      depth_multiplier=m))
        return y

    def fc(self, name, x, out, act=ACT.RELU):
        y = self.act(name, [x.shape[0], out])
        wt = self.const(name + "/w", self.rng.standard_normal((out, x.shape[-1])) / np.sqrt(x.shape[-1]))
        b = self.const(name + "/b", self.rng.standard_normal(out) * 0.5)
        self.sg.operators.append(ops.fully_connected(x, wt, b, y, activation=act))
        return y

    def op(self, builtin, inputs, out_shape, name, options=None, options_type=0):
        y = self.act(name, out_shape)
        self.sg.operators.append(Operator(ops.opcode_for(builtin, 1), list(inputs), [y], options, options_type))
        return y

    def add(self, a, b, name):
        o = schema.AddOptionsT()
        o.fusedActivationFunction = ACT.NONE
        return self.op(OP.ADD, [a, b], a.shape, name, o, schema.BuiltinOptions.AddOptions)

    def mul_const(self, a, name):
        o = schema.MulOptionsT()
        o.fusedActivationFunction = ACT.NONE
        c = self.const(name + "/scale", self.rng.uniform(0.5, 1.5, (1, 1, 1, a.shape[-1])))
        return self.op(OP.MUL, [a, c], a.shape, name, o, schema.BuiltinOptions.MulOptions)

    def prelu(self, a, name):
        alpha = self.const(name + "/alpha", self.rng.uniform(0.1, 0.3, (1, 1, a.shape[-1])))
        return self.op(OP.PRELU, [a, alpha], a.shape, name)

    def concat(self, parts, name):
        o = schema.ConcatenationOptionsT()
        o.axis = -1
        shape = list(parts[0].shape[:-1]) + [sum(p.shape[-1] for p in parts)]
        return self.op(OP.CONCATENATION, parts, shape, name, o, schema.BuiltinOptions.ConcatenationOptions)

    def max_pool(self, a, name):
        o = schema.Pool2DOptionsT()
        o.padding, o.strideH, o.strideW, o.filterHeight, o.filterWidth = VALID, 2, 2, 2, 2
        n, h, w, c = a.shape
        return self.op(OP.MAX_POOL_2D, [a], [n, h // 2, w // 2, c], name, o, schema.BuiltinOptions.Pool2DOptions)

    def reshape(self, a, shape, name):
        o = schema.ReshapeOptionsT()
        o.newShape = list(shape)
        s = self.sg.add_constant(name + "/shape", np.asarray(shape, np.int32))
        return self.op(OP.RESHAPE, [a, s], shape, name, o, schema.BuiltinOptions.ReshapeOptions)

    def finish(self, *outputs) -> bytes:
        self.sg.outputs = list(outputs)
        return io.to_bytes(Model(subgraphs=[self.sg]))


def residual_concat_net(rng) -> bytes:
    """conv → two 1×1 convs joined by a residual ADD → PRELU → MUL by a per-channel constant → depthwise
    (multiplier 2), concatenated with a second branch → max pool → flatten → FC → FC (the output)."""
    n = Net(rng, [1, 10, 10, 3])
    c1 = n.conv("c1", n.x, 16, k=3)
    a = n.add(n.conv("c2", c1, 16, act=ACT.RELU6), n.conv("c3", c1, 16, act=ACT.NONE), "add")
    d = n.depthwise("dw", n.mul_const(n.prelu(a, "prelu"), "mul"), m=2)
    cat = n.concat([d, n.conv("c5", c1, 16, k=3)], "cat")
    flat = n.reshape(n.max_pool(cat, "pool"), [1, 3 * 3 * 48], "flatten")
    return n.finish(n.fc("fc2", n.fc("fc1", flat, 24), 5, act=ACT.NONE))


def prune(model_bytes, **options):
    m = io.read_buffer(model_bytes)
    ctx = RunContext(rewrite.Options(**options).plan())
    return m, ctx


def zeroed_reference(model_bytes, choices) -> bytes:
    """The original model with every removed channel's producing weights set to zero (bias kept)."""
    ref = io.read_buffer(model_bytes)
    index = {id(op): i for i, op in enumerate(choices[0][0].operators)}
    for sg, g, groups, removed in choices:
        for layer in g.layers.values():
            y = layer.op.outputs[0]
            if id(y) in removed and not layer.layout.coupled:
                op = ref.main.operators[index[id(layer.op)]]
                w = np.array(op.inputs[1].data)
                w[removed[id(y)]] = 0
                op.inputs[1] = ref.main.add_constant(op.inputs[1].name + "/zeroed", w)  # not the shared one
    return io.to_bytes(ref)


def outputs(model, inputs, xnnpack=True):
    return [o[0] for o in verify.run(model, inputs, xnnpack=xnnpack)]


def test_groups_follow_add_concat_depthwise_and_flatten():
    rng = np.random.default_rng(0)
    m, ctx = prune(residual_concat_net(rng), prune_channels=0.5)
    ((sg, g, groups),) = pc.candidates(m, ctx)
    by_first = {grp.tensors[0].name: grp for grp in groups if grp.producers}
    # c2 and c3 meet in the residual ADD: one group through PRELU, MUL, depthwise, concat, pool, flatten.
    res = by_first["c2"]
    assert {t.name for t in res.tensors} == {"c2", "c3", "add", "prelu", "mul", "dw", "cat", "pool", "flatten"}
    assert res.channels == 16 and [p.op.outputs[0].name for p in res.producers] == ["c2", "c3"]
    assert [r.op.outputs[0].name for r in res.readers] == ["fc1"]
    # One unit = c2[c], c3[c], …, dw[2c], dw[2c+1], cat[2c], cat[2c+1], and 9 flatten columns per cat channel.
    assert all(len(u) == 5 + 3 * 2 + 2 * 9 for u in res.units)
    assert {t.name for t in by_first["c5"].tensors} == {"c5", "cat", "pool", "flatten"}
    assert [r.op.outputs[0].name for r in by_first["c1"].readers] == ["c2", "c3", "c5"]
    assert by_first["fc2"].reason == "a subgraph output"
    assert all(grp.reason is None for name, grp in by_first.items() if name != "fc2")


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_pruned_model_equals_original_with_removed_channels_at_their_bias(fraction):
    rng = np.random.default_rng(1)
    original = residual_concat_net(rng)
    m, ctx = prune(original, prune_channels=fraction)
    choices = pc.choose(m, ctx)
    reference = zeroed_reference(original, choices)
    for sg, g, groups, removed in choices:
        pc.apply(g, removed)
    m.main.cleanup()
    pruned = io.to_bytes(m)
    inputs = [[rng.standard_normal((1, 10, 10, 3)).astype(np.float32)] for _ in range(4)]
    want = outputs(reference, inputs)
    got, got_ref_kernels = outputs(pruned, inputs), outputs(pruned, inputs, xnnpack=False)
    for w, a, b in zip(want, got, got_ref_kernels):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    rows = {r["output"]: r for r in analysis.op_rows(io.read_buffer(pruned))}
    keep = pc.kept_count(16, fraction, 8)
    assert rows["c1"]["weight_shape"] == [keep, 3, 3, 3] and rows["c1"]["channels"] == [3, keep]
    assert rows["add"]["channels"] is None and rows["c2"]["channels"] == [keep, keep]
    assert rows["dw"]["weight_shape"] == [1, 3, 3, 2 * keep]
    assert rows["fc1"]["weight_shape"] == [pc.kept_count(24, fraction, 8), 9 * (2 * keep + keep)]
    shape = next(op for op in m.main.operators if op.builtin == OP.RESHAPE)
    assert list(shape.builtin_options.newShape) == [1, 9 * 3 * keep]
    assert list(shape.inputs[1].data) == [1, 9 * 3 * keep]


def test_rewrite_reports_groups_and_shrinks_macs(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "net.tflite"
    src.write_bytes(residual_concat_net(rng))
    # Half the channels of a random net, chosen by weight norms: broken (output error above 0.5), kept by force.
    report = rewrite.run(src, tmp_path / "out.tflite", rewrite.Options(prune_channels=0.5, force=True))
    pruned = [e for e in report["layers"] if e["action"] == "pruned"]
    assert {e["output"] for e in pruned} == {"c1", "c2", "c5", "fc1"}
    for e in pruned:
        assert e["kind"] == "channels" and e["channels_after"] < e["channels_before"]
        assert e["channels_after"] % 8 == 0 and e["macs_after"] < e["macs_before"]
    assert report["totals"]["macs_after"] < 0.5 * report["totals"]["macs_before"]
    assert report["totals"]["file_bytes_after"] < report["totals"]["file_bytes_before"]
    import json
    import jsonschema
    from conftest import ROOT
    jsonschema.validate(report, json.loads((ROOT / "schemas" / "report.schema.json").read_text()))


def test_barriers_leave_groups_untouched():
    rng = np.random.default_rng(3)
    n = Net(rng, [1, 6, 6, 4])
    c1 = n.conv("c1", n.x, 16)
    mixed = n.reshape(n.conv("c2", c1, 16), [1, 6, 96], "mix")  # channels mixed with W: a barrier
    model = n.finish(mixed, n.conv("c3", c1, 16))                # c3 is a subgraph output
    m, ctx = prune(model, prune_channels=0.5)
    ((sg, g, groups),) = pc.candidates(m, ctx)
    reasons = {grp.tensors[0].name: grp.reason for grp in groups if grp.producers}
    assert reasons["c1"] is None
    assert "reshape mixes channels" in reasons["c2"] and reasons["c3"] == "a subgraph output"
    entries = pc.run(m, ctx)
    assert [e["output"] for e in entries if e["action"] == "pruned"] == ["c1"]
    shapes = {t.name: t.shape for t in m.main.tensors}
    assert shapes["c2"][-1] == 16 and shapes["c3"][-1] == 16 and shapes["c1"][-1] == 8


def test_a_grouped_conv_is_a_barrier_named_as_such():
    rng = np.random.default_rng(4)
    n = Net(rng, [1, 6, 6, 4])
    c1 = n.conv("c1", n.x, 16)
    grouped = n.conv("g", c1, 8, weight=rng.standard_normal((8, 1, 1, 4)))  # 16 channels read in 4 groups of 4
    m, ctx = prune(n.finish(n.conv("c3", grouped, 4)), prune_channels=0.5)
    ((sg, g, groups),) = pc.candidates(m, ctx)
    reasons = {grp.tensors[0].name: grp.reason for grp in groups if grp.producers}
    assert "grouped convolution (4 groups)" in reasons["c1"], reasons


def test_semantics_table_is_one_source():
    from tfrewrite.passes import prune, quantize
    assert prune.TARGETS is semantics.LAYER_OPS and quantize.LAYER_OPS is semantics.LAYER_OPS
    assert analysis.WEIGHTED_OPS is semantics.WEIGHTED_OPS
    assert semantics.is_barrier(OP.TRANSPOSE) and semantics.is_barrier(OP.SOFTMAX)
    assert not semantics.is_barrier(OP.HARD_SWISH) and not semantics.is_barrier(OP.CONCATENATION)


@pytest.mark.parametrize("name", ["vgg_digits_int8.tflite", "vgg_digits_fp16.tflite", "mobilenetv2_digits.tflite",
                                  "resnet_concat_digits.tflite"])
def test_fixtures_prune_and_run_with_and_without_xnnpack(tmp_path, name):
    out = tmp_path / "out.tflite"
    # Without data, half the channels chosen by weight norms break these trained models (output error above 0.5):
    # kept by --force, to check what is written.
    report = rewrite.run(FIXTURES / name, out, rewrite.Options(prune_channels=0.5, force=True))
    assert report["totals"]["macs_after"] < 0.5 * report["totals"]["macs_before"]
    assert report["totals"]["file_bytes_after"] < report["totals"]["file_bytes_before"]
    model = out.read_bytes()
    inputs = verify.random_inputs(verify.interpreter(model), samples=2)
    a, b = outputs(model, inputs), outputs(model, inputs, xnnpack=False)
    for x, y in zip(a, b):
        assert np.all(np.isfinite(x.astype(np.float32)))
        # Full-integer kernels round differently with and without XNNPACK: a step of the softmax output (1/256).
        tol = 2.5 / 256 if "int8" in name else 1e-3
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=tol)


def test_greedy_removal_and_refit_on_synthetic_rows():
    from tfrewrite.linalg import channels as ch
    rng = np.random.default_rng(4)
    # Columns 3 and 5 are copies of columns 0 and 1 (plus a constant): removing them loses nothing after the
    # refit; column 7 carries an independent signal and must stay.
    x = rng.standard_normal((500, 8))
    x[:, 3], x[:, 5] = x[:, 0] + 2.0, x[:, 1] - 1.0
    x[:, 7] *= 10
    w = rng.standard_normal((6, 8))
    b = rng.standard_normal(6)
    mean, cov = ch.moments(x)
    units = [np.array([i]) for i in range(8)]
    gram = ch.unit_gram(w, units, cov)
    assert np.allclose(np.diag(gram), [np.var(x[:, i]) * np.sum(w[:, i] ** 2) for i in range(8)])
    drop = ch.greedy_removal(gram, 2)
    assert 7 not in drop
    keep = np.setdiff1d(np.arange(8), [3, 5])
    new_w, new_b, err = ch.refit(w, b, keep, x, damping=1e-9)
    assert err < 1e-6 and np.all(new_w[:, [3, 5]] == 0)
    np.testing.assert_allclose(x @ new_w.T + new_b, x @ w.T + b, atol=1e-5)


def test_calibration_keeps_accuracy_at_half_the_channels(tmp_path):
    from digits import load_split, tflite_accuracy
    x, _ = load_split("calib", 32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=x)  # the 100 calibration images
    acc = {}
    for name in ("vgg_digits", "vgg_digits_int8"):
        out = tmp_path / f"{name}.tflite"
        report = rewrite.run(FIXTURES / f"{name}.tflite", out,
                             rewrite.Options(prune_channels=0.5, calibration=str(calib)))
        assert report["totals"]["macs_after"] < 0.3 * report["totals"]["macs_before"]
        layers = [e for e in report["layers"] if e["action"] == "pruned"]
        assert all(e["selection"] == "reconstruction" for e in layers)
        assert all(0 <= e["output_error"] < 1 for e in layers if "output_error" in e)
        acc[name] = tflite_accuracy(out, "test", 32)
    # The originals score 97.5 % (float) and 97.2 % (int8) on the 360 test images.
    assert acc["vgg_digits"] >= tflite_accuracy(FIXTURES / "vgg_digits.tflite", "test", 32) - 0.01
    assert abs(acc["vgg_digits_int8"] - acc["vgg_digits"]) <= 0.01


def test_a_bias_shared_with_an_unpruned_layer_gets_a_private_copy():
    rng = np.random.default_rng(5)
    n = Net(rng, [1, 6, 6, 4])
    c1 = n.conv("c1", n.x, 16)
    c2 = n.conv("c2", c1, 16)
    n.sg.operators[1].inputs[2] = n.sg.operators[0].inputs[2]  # the converter shares equal constants
    original = n.finish(c2)                                    # c2 is the output: its group stays
    m, ctx = prune(original, prune_channels=0.5)
    entries = pc.run(m, ctx)
    assert [e["output"] for e in entries if e["action"] == "pruned"] == ["c1"]
    conv1, conv2 = m.main.operators
    assert conv1.inputs[2].shape == [8] and conv2.inputs[2].shape == [16] and conv1.inputs[2] is not conv2.inputs[2]
    inputs = [[rng.standard_normal((1, 6, 6, 4)).astype(np.float32)]]
    m.main.cleanup()
    # c1's removed channels are constant: the fold into c2's (private) bias keeps the output exact.
    reference = zeroed_reference(original, pc.choose(io.read_buffer(original), ctx))
    np.testing.assert_allclose(outputs(io.to_bytes(m), inputs)[0], outputs(reference, inputs)[0],
                               rtol=1e-4, atol=1e-4)


def test_converted_residual_concat_groups():
    m, ctx = prune((FIXTURES / "resnet_concat_digits.tflite").read_bytes(), prune_channels=0.5)
    ((sg, g, groups),) = pc.candidates(m, ctx)
    pruned = [grp for grp in groups if grp.reason is None]
    kinds = sorted((len(grp.producers), grp.channels) for grp in pruned)
    # stem + second conv of block 1 (joined by the ADD), each concatenated branch joined through the ADD of
    # block 2 with its half of that block's second conv, the first convs of both blocks, the head, the FC.
    assert kinds == [(1, 32), (1, 64), (1, 64), (1, 96), (2, 32), (2, 32), (2, 32)]
    cat = next(op for op in sg.operators if op.builtin == OP.CONCATENATION).outputs[0]
    halves = [grp for grp in pruned if any(t is cat for t in grp.tensors)]
    assert len(halves) == 2 and all(grp.channels == 32 for grp in halves)


def test_a_weight_shared_by_two_layers_is_sliced_for_each():
    """The converter's shared Dense: both FULLY_CONNECTED ops read one weight; the first one's output channels
    go, so it loses rows and the second loses columns of its own copy."""
    original = (FIXTURES / "shared_weight.tflite").read_bytes()
    m, ctx = prune(original, prune_channels=0.5)
    choices = pc.choose(m, ctx)
    reference = zeroed_reference(original, choices)
    for sg, g, groups, removed in choices:
        pc.apply(g, removed)
    first, second = [op for op in m.main.operators if op.builtin == OP.FULLY_CONNECTED]
    assert first.inputs[1].shape == [8, 16] and second.inputs[1].shape == [16, 8]
    inputs = verify.random_inputs(verify.interpreter(original), 3)
    for want, got in zip(outputs(reference, inputs), outputs(io.to_bytes(m), inputs)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("builtin", [OP.SPLIT, OP.SPLIT_V])
def test_split_maps_channels_to_its_pieces(builtin):
    rng = np.random.default_rng(6)
    n = Net(rng, [1, 6, 6, 4])
    c1 = n.conv("c1", n.x, 32)
    pieces = [n.act(f"piece{k}", [1, 6, 6, 16]) for k in range(2)]
    axis = n.sg.add_constant("axis", np.asarray([3], np.int32))
    if builtin == OP.SPLIT:
        o = schema.SplitOptionsT()
        o.numSplits = 2
        op = Operator(ops.opcode_for(OP.SPLIT, 1), [axis, c1], pieces, o, schema.BuiltinOptions.SplitOptions)
    else:
        o = schema.SplitVOptionsT()
        o.numSplits = 2
        sizes = n.sg.add_constant("sizes", np.asarray([16, 16], np.int32))
        op = Operator(ops.opcode_for(OP.SPLIT_V, 1), [c1, sizes, axis], pieces, o, schema.BuiltinOptions.SplitVOptions)
    n.sg.operators.append(op)
    original = n.finish(n.conv("a", pieces[0], 8, act=ACT.NONE), n.conv("b", pieces[1], 8, act=ACT.NONE))
    m, ctx = prune(original, prune_channels=0.5)
    ((sg, g, groups),) = pc.candidates(m, ctx)
    live = [grp for grp in groups if grp.reason is None]
    # SPLIT: one group whose units own a channel of each piece; SPLIT_V: one group per piece.
    assert [grp.channels for grp in live] == ([16] if builtin == OP.SPLIT else [16, 16])
    choices = pc.choose(m, ctx)
    reference = zeroed_reference(original, choices)
    for sg, g, groups, removed in choices:
        pc.apply(g, removed)
    assert [t.shape[-1] for t in m.main.operators[1].outputs] == [8, 8]
    if builtin == OP.SPLIT_V:
        assert list(m.main.operators[1].inputs[1].data) == [8, 8]
    inputs = [[rng.standard_normal((1, 6, 6, 4)).astype(np.float32)]]
    got = verify.run(io.to_bytes(m), inputs)[0]
    for w, a in zip(verify.run(reference, inputs)[0], got):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-4)


def test_refit_error_from_moments_matches_the_refit_and_greedy_order_is_a_prefix():
    from tfrewrite.linalg import channels as ch
    rng = np.random.default_rng(7)
    x = rng.standard_normal((400, 10)) @ rng.standard_normal((10, 10))
    w, b = rng.standard_normal((5, 10)), rng.standard_normal(5)
    _, cov = ch.moments(x)
    keep = np.array([0, 2, 3, 7, 9])
    _, _, err = ch.refit(w, b, keep, x)
    residual, total = ch.refit_error(w, cov, keep)
    assert 0 < err < 1 and np.sqrt(residual / total) == pytest.approx(err, rel=1e-9)
    # Fewer rows than columns: the fit reproduces its own rows, rows it did not see show the damage.
    few = x[:4]
    halves = (ch.moments(few[:2])[1], ch.moments(few[2:])[1])
    residual, total = ch.refit_error(w, ch.moments(few)[1], keep, damping=1e-9)
    assert residual / total < 1e-6 and ch.held_out_error(w, halves, keep) > 0.1
    gram = ch.unit_gram(w, [np.array([i]) for i in range(10)], cov)
    order = ch.removal_order(gram, 6)
    for r in range(1, 7):
        np.testing.assert_array_equal(ch.greedy_removal(gram, r), np.sort(order[:r]))


def _net_and_calibration(tmp_path, seed, count=24):
    """The residual+concat net and a calibration file of `count` uniform random inputs for it."""
    rng = np.random.default_rng(seed)
    src = tmp_path / "net.tflite"
    src.write_bytes(residual_concat_net(rng))
    shape = verify.interpreter(src.read_bytes()).get_input_details()[0]["shape"]
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=rng.uniform(0, 1, (count, *shape)).astype(np.float32))
    return src, calib


def _runs_alike_with_and_without_xnnpack(path):
    model = path.read_bytes()
    inputs = verify.random_inputs(verify.interpreter(model), samples=2)
    for x, y in zip(outputs(model, inputs), outputs(model, inputs, xnnpack=False)):
        assert np.all(np.isfinite(x)) and np.allclose(x, y, rtol=1e-4, atol=1e-4)


def test_budget_chooses_each_groups_share_and_reports_it(tmp_path):
    import json
    import jsonschema
    from conftest import ROOT
    src, calib = _net_and_calibration(tmp_path, 8)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"rules": [{"match": "^c5$", "prune_channels": 0}]}))
    report = rewrite.run(src, tmp_path / "out.tflite", rewrite.Options(
        prune_channels="auto", target_macs=1.6, calibration=str(calib), recipe=str(recipe)))
    jsonschema.validate(report, json.loads((ROOT / "schemas" / "report.schema.json").read_text()))
    budget = report["budget"]
    assert budget["reached"] and budget["achieved"] >= 1.6 and budget["measure"] == "macs"
    # The planner's cost model counts a layer between two cut groups by both shares: its estimate is the model's.
    assert budget["estimate"] == pytest.approx(budget["achieved"], abs=0.01)
    entries = {e["output"]: e for e in report["layers"] if e["kind"] == "channels"}
    assert entries["c5"]["action"] == "skipped" and entries["c5"]["reason"] == "no channel pruning asked for"
    planned = {g["output"]: g for g in budget["layers"]}
    assert "c5" not in planned and planned
    for name, g in planned.items():
        e = entries[name]
        assert g["damage"] <= budget["damage_level"] and e["channels_after"] == g["kept"]
        assert [c["kept"] for c in g["candidates"]] == sorted({c["kept"] for c in g["candidates"]}, reverse=True)
        # Damage grows with the share removed (a larger removal extends the smaller one).
        damage = [c["damage"] for c in g["candidates"]]
        assert damage == sorted(damage)
        if e["action"] == "pruned":
            assert e["damage"] == g["damage"] and e["channels_after"] % 8 == 0 and "output_error" in e
        else:
            assert "kept whole by the budget" in e["reason"]


def test_budget_without_data_judges_groups_on_generated_images(tmp_path):
    src, _ = _net_and_calibration(tmp_path, 10)
    out = tmp_path / "out.tflite"
    report = rewrite.run(src, out, rewrite.Options(prune_channels="auto", target_macs=1.5))
    assert "generated images" in report["budget"]["damage"] and report["budget"]["reached"]
    assert all(e["selection"] == "reconstruction" for e in report["layers"] if e["action"] == "pruned")
    _runs_alike_with_and_without_xnnpack(out)


def test_budget_meets_two_fold_fewer_macs_on_the_vgg_fixture_within_a_point(tmp_path):
    from digits import load_split, tflite_accuracy
    x, _ = load_split("calib", 32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=x[:48])
    out = tmp_path / "out.tflite"
    report = rewrite.run(FIXTURES / "vgg_digits.tflite", out,
                         rewrite.Options(prune_channels="auto", target_macs=2, calibration=str(calib)))
    assert report["budget"]["reached"]
    shares = {e["channels_after"] / e["channels_before"] for e in report["layers"] if e["action"] == "pruned"}
    assert len(shares) > 1  # non-uniform: each group where it hurts least
    assert tflite_accuracy(out, "test", 32) >= tflite_accuracy(FIXTURES / "vgg_digits.tflite", "test", 32) - 0.01


def test_rank_auto_mixes_low_rank_into_the_channel_budget(tmp_path):
    src, calib = _net_and_calibration(tmp_path, 11)
    out = tmp_path / "out.tflite"
    report = rewrite.run(src, out, rewrite.Options(prune_channels="auto", rank="auto", target_macs=2.5,
                                                   calibration=str(calib)))
    budget = report["budget"]
    assert budget["technique"] == "channels+lowrank" and budget["reached"] == (budget["achieved"] >= 2.5)
    # The ratios were chosen on the unpruned layers and apply to the pruned ones: the estimate is close, not exact.
    assert budget["achieved"] == pytest.approx(budget["estimate"], rel=0.1)
    ranked = {g["output"]: g for g in budget["layers"] if "ratio" in g}
    assert ranked and all(g["damage"] <= budget["damage_level"] for g in budget["layers"])
    rewritten = {e["output"] for e in report["layers"] if e["kind"] in ("fc", "conv", "conv1x1")
                 and e["action"] == "rewritten"}
    # The allocation's ratios are applied to the channel-pruned layers (unless the rewrite would not pay in file
    # bytes, as everywhere); layers it keeps dense stay dense.
    assert rewritten and rewritten <= {name for name, g in ranked.items() if g["ratio"] is not None}
    _runs_alike_with_and_without_xnnpack(out)


def test_budget_by_file_size_meets_the_written_size(tmp_path):
    src, calib = _net_and_calibration(tmp_path, 13)
    out = tmp_path / "out.tflite"
    report = rewrite.run(src, out, rewrite.Options(prune_channels="auto", target_size=1.5, calibration=str(calib)))
    budget = report["budget"]
    assert budget["measure"] == "file" and budget["reached"]
    assert src.stat().st_size / out.stat().st_size == pytest.approx(budget["achieved"], abs=1e-3)
    assert budget["achieved"] >= 1.5


def test_refit_of_a_per_tensor_int8_layer_keeps_one_bias_scale(tmp_path):
    """A full-int8 model whose weights have one scale each: the refitted layers keep a per-tensor bias (one scale
    per bias channel makes XNNPACK refuse the conv, which the next layer's calibration run would hit)."""
    from builders import int8_conv_chain
    rng = np.random.default_rng(21)
    src, out, calib = tmp_path / "pt.tflite", tmp_path / "out.tflite", tmp_path / "calib.npz"
    src.write_bytes(int8_conv_chain(per_tensor=True))
    np.savez(calib, input=rng.integers(-128, 128, (8, 1, 6, 6, 3)).astype(np.int8))
    report = rewrite.run(src, out, rewrite.Options(prune_channels=0.5, calibration=str(calib)))
    assert [e["output"] for e in report["layers"] if e["action"] == "pruned"] == ["conv0", "conv1"]
    for op in io.read(out).main.operators:
        weight, bias = op.inputs[1], op.inputs[2]
        assert len(bias.quantization.scale) == len(weight.quantization.scale) == 1
    verify.interpreter(out.read_bytes())  # XNNPACK delegates every conv


def test_transpose_conv_is_a_barrier_on_its_data_input(tmp_path):
    """TRANSPOSE_CONV reads its activation as input 2 (input 0 is the output shape): the conv feeding it keeps
    its channels, and inspect's channel column names the real input."""
    rng = np.random.default_rng(22)
    n = Net(rng, [1, 5, 5, 3])
    c1 = n.conv("c1", n.x, 16, k=1)
    y = n.act("tconv", [1, 10, 10, 8])
    o = schema.TransposeConvOptionsT()
    o.padding, o.strideH, o.strideW = schema.Padding.SAME, 2, 2
    shape = n.sg.add_constant("tconv/shape", np.asarray([1, 10, 10, 8], np.int32))
    w = n.const("tconv/w", rng.standard_normal((8, 3, 3, 16)) / 12)
    b = n.const("tconv/b", rng.standard_normal(8))
    n.sg.operators.append(Operator(ops.opcode_for(OP.TRANSPOSE_CONV, 3), [shape, w, c1, b], [y], o,
                                   schema.BuiltinOptions.TransposeConvOptions))
    src, out = tmp_path / "tconv.tflite", tmp_path / "out.tflite"
    src.write_bytes(n.finish(n.conv("c3", y, 4, k=1)))
    rows = analysis.op_rows(io.read(src))
    assert [r["channels"] for r in rows if r["op"] == "TRANSPOSE_CONV"] == [[16, 8]]
    report = rewrite.run(src, out, rewrite.Options(prune_channels=0.5))
    reasons = {e["output"]: e.get("reason", "") for e in report["layers"]}
    assert "TRANSPOSE_CONV" in reasons["c1"] or "tconv" in reasons["c1"]
    assert {t.name: t.shape[-1] for t in io.read(out).main.tensors}["c1"] == 16
    _runs_alike_with_and_without_xnnpack(out)


def test_budget_counts_the_bytes_of_full_integer_layers(tmp_path):
    """A full-integer layer stores 1-byte weights and, per output channel, an int32 bias and a float32 scale and
    int64 zero point for the weight and again for the bias (28 bytes): the channel budget counts those, on an
    int8 model and before --quantize full-int8, so its estimate is the written file (counted as float bytes it
    was 1.54x for 1.68x on the int8 net, and 1.71x for 3.97x before --quantize full-int8)."""
    pytest.importorskip("ai_edge_quantizer", reason="the test extra installs ai-edge-quantizer")
    from builders import _signature
    src, calib = _net_and_calibration(tmp_path, 13)
    model = io.read(src)
    model.signature_defs = [_signature("serving_default", model.main)]  # ai-edge-quantizer calibrates signatures
    io.write(model, src)
    int8 = tmp_path / "int8.tflite"
    rewrite.run(src, int8, rewrite.Options(quantize="full-int8", calibration=str(calib)))
    report = rewrite.run(int8, tmp_path / "pruned.tflite", rewrite.Options(
        prune_channels="auto", target_size=1.5, calibration=str(calib)))
    budget = report["budget"]
    assert budget["reached"] and budget["estimate"] == pytest.approx(budget["achieved"], rel=0.01)
    out = tmp_path / "pruned_then_int8.tflite"
    report = rewrite.run(src, out, rewrite.Options(prune_channels="auto", target_size=1.5, quantize="full-int8",
                                                   calibration=str(calib)))
    budget = report["budget"]
    # The target applies to the input quantized alone, estimated within 1 %, and is met within 1 % of estimate.
    assert budget["baseline_bytes"] == pytest.approx(int8.stat().st_size, rel=0.01)
    assert budget["reached"] and budget["estimate"] == pytest.approx(budget["achieved"], rel=0.015)
    assert budget["achieved"] == pytest.approx(budget["baseline_bytes"] / out.stat().st_size, rel=1e-3)


def test_budget_mixing_ranks_into_channels_of_the_int8_mobilenetv2_meets_its_size(tmp_path):
    """The int8 MobileNetV2 fixture at 3x with channel shares and ranks mixed: a rank option on a layer the cut
    leaves at a share of its weights saves that share, less the tables of the op it adds (these do not shrink):
    counted in proportion, the estimate said 3.02x and the file came out 2.95x (target missed). With these 32 images
    the result's output error is 1.04 (a broken model, seen 2026-12-05): --force keeps it, to be counted."""
    from digits import load_split
    source = FIXTURES / "mobilenetv2_digits_int8.tflite"
    (name, _), = io.read(source).signature_defs[0].inputs
    x, _ = load_split("calib", 96)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{name: x[:32]})
    out = tmp_path / "out.tflite"
    report = rewrite.run(source, out, rewrite.Options(prune_channels="auto", rank="auto", target_size=3,
                                                      calibration=str(calib), force=True))
    budget = report["budget"]
    assert any(e["action"] == "rewritten" for e in report["layers"])  # low-rank chains and channel cuts both
    assert budget["reached"] and budget["achieved"] == pytest.approx(budget["estimate"], rel=0.02)
    assert source.stat().st_size / out.stat().st_size == pytest.approx(budget["achieved"], rel=1e-3)


def zero_sum_chain(seed, width=32, depth=6) -> bytes:
    """1×1 convs with RELU and no bias whose weights (after the first's) sum to zero over their inputs, as a
    BatchNorm-folded net's next layer removes what all channels share, then a linear 1×1 conv of the same kind:
    each reader's refit looks good on its own, and the errors compound along the chain."""
    rng = np.random.default_rng(seed)
    n = Net(rng, [1, 4, 4, 8])
    x = n.x
    for i, out in enumerate([width] * depth + [10]):
        w = rng.standard_normal((out, 1, 1, x.shape[-1])) / np.sqrt(x.shape[-1])
        if i:
            w -= w.mean(axis=3, keepdims=True)
        x = n.conv(f"c{i}", x, out, act=ACT.RELU if i < depth else ACT.NONE, weight=w, bias=np.zeros(out))
    return n.finish(x)


def test_a_broken_channel_budget_or_share_leaves_the_input_unchanged(tmp_path):
    """The one rule for every rewrite: a result whose output error calls it broken (above 0.5) is not written;
    the input goes out unchanged, and the report says why — for the channel budget as for the rank budget, and for
    a fixed share. --force keeps it, with the warning. (The channel budget wrote such results with a warning.)"""
    src = tmp_path / "chain.tflite"
    src.write_bytes(zero_sum_chain(seed=2))
    budget = dict(prune_channels="auto", target_macs=8)
    for options, why in ((budget, "cannot reach 8x fewer MACs without breaking the model: the budget's choice gave "
                                  "output error"),
                         (dict(prune_channels=0.5), "the rewrite gave output error")):
        out = tmp_path / "out.tflite"
        report = rewrite.run(src, out, rewrite.Options(**options))
        assert out.read_bytes() == src.read_bytes(), options
        assert len(report["notes"]) == 1 and report["notes"][0].startswith(why), report["notes"]
        assert "written unchanged" in report["notes"][0] and not report["warnings"]
        assert report["totals"]["macs_after"] == report["totals"]["macs_before"]
        assert all(e["action"] == "skipped" for e in report["layers"])
        assert any(e["reason"].startswith("undone: ") for e in report["layers"])
        if "budget" in report:
            assert report["budget"]["refused_output_error"] > rewrite.OUTPUT_ERROR_WARNING
            assert not report["budget"]["reached"]
        forced = rewrite.run(src, out, rewrite.Options(**options, force=True))
        assert forced["output_error"]["worst"] > rewrite.OUTPUT_ERROR_WARNING
        assert any("probably broken" in w for w in forced["warnings"])
        assert forced["totals"]["macs_after"] < forced["totals"]["macs_before"]
