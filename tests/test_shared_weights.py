"""A weight shared across subgraphs / signatures (one Buffer, a tensor in each subgraph): every pass keeps it
stored once and gives each subgraph tensors of its own (issue 10, fault 1)."""
import numpy as np
import pytest

import builders as B
from tfrewrite import io, rewrite, verify
from tfrewrite.passes import prune
from tfrewrite.plan import RunContext


def low_rank(shape, rank, rng):
    """A weight of exactly `rank` (conv: Tucker-2 ranks rank x rank), so that such a rewrite keeps the outputs."""
    if len(shape) == 2 or shape[1] == shape[2] == 1:
        return (rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[-1]))).reshape(shape)
    o, kh, kw, i = shape
    core = rng.standard_normal((rank, kh * kw, rank))
    return np.einsum("tp,pkq,qs->tks", rng.standard_normal((o, rank)), core,
                     rng.standard_normal((rank, i))).reshape(shape)


def signature_outputs(model: bytes, xnnpack: bool, seed: int = 0) -> dict:
    out = {}
    for key in ("first", "second"):
        runner = verify.Runner(model, xnnpack=xnnpack, signature=key)
        out[key] = runner(runner.random_samples(1, seed)[0])[0]
    return out


def distinct_weight_buffers(model) -> int:
    """Buffers holding the weight (input 1) of some FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D op."""
    from tfrewrite.analysis import stored_constant
    return len({id(stored_constant(op.inputs[1]).buffer) for sg in model.subgraphs
                for op in sg.operators if op.name in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")})


def rewrite_and_check(model: bytes, rtol: float, **options):
    m = io.read_buffer(model)
    entries = rewrite.rewrite_model(m, rewrite.Options(**options))
    out = io.to_bytes(m)
    assert m.problems() == []
    assert len(out) < len(model)
    for xnn in (True, False):
        ref, got = signature_outputs(model, xnn), signature_outputs(out, xnn)
        for key in ref:
            assert np.isfinite(got[key]).all()
            np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=rtol * float(np.abs(ref[key]).max()))
    return entries, io.read_buffer(out)


@pytest.mark.parametrize("layer,shape,form,method", [
    ("fc", (64, 128), "float32", "cp"), ("fc", (64, 128), "float16", "cp"),
    ("conv", (32, 3, 3, 16), "float32", "tucker2"), ("conv", (32, 3, 3, 16), "float16", "tucker2"),
    ("conv", (32, 1, 1, 48), "float32", "cp"),
])
def test_low_rank_of_a_weight_two_signatures_share_keeps_one_set_of_factors(layer, shape, form, method):
    rng = np.random.default_rng(1)
    w = low_rank(shape, 8, rng)
    model = B.shared_across_signatures(w, layer=layer, form=form, bias=rng.standard_normal(shape[0]))
    entries, out = rewrite_and_check(model, 2e-2 if form == "float16" else 1e-4, rank=8, conv_method=method)
    assert [e["action"] for e in entries] == ["rewritten", "rewritten"] and all(e.get("shared") for e in entries)
    factors = 2 if layer == "fc" or shape[1] == 1 else 3
    assert distinct_weight_buffers(out) == factors  # one set, shared by both subgraphs


def test_low_rank_cp_of_a_shared_conv_weight():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 3, 3, 16))
    model = B.shared_across_signatures(w, layer="conv")
    m = io.read_buffer(model)
    entries = rewrite.rewrite_model(m, rewrite.Options(rank=6))
    assert [e["action"] for e in entries] == ["rewritten", "rewritten"]
    assert entries[0]["rel_error"] == entries[1]["rel_error"]
    assert m.problems() == []
    out = io.to_bytes(m)
    for xnn in (True, False):
        a, b = signature_outputs(out, True), signature_outputs(out, xnn)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["float32", "float16"])
def test_pruning_a_weight_two_signatures_share_stores_it_once(form):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 128))
    model = B.shared_across_signatures(w, form=form)
    m = io.read_buffer(model)
    entries = rewrite.rewrite_model(m, rewrite.Options(prune=0.8))
    assert m.problems() == []
    out = io.to_bytes(m)
    assert len(out) < 0.6 * len(model)  # stored once: twice would be larger than the input
    pruned = [e for e in entries if e["kind"] == "prune"]
    assert [e["action"] for e in pruned] == ["pruned", "skipped"] and "pruned once" in pruned[1]["reason"]
    encoded = [e for e in entries if e["kind"] == "sparse_encode"]
    assert [e["action"] for e in encoded] == ["encoded", "encoded"]
    stored = {id(t.buffer) for sg in io.read_buffer(out).subgraphs for t in sg.tensors if t.sparsity is not None}
    assert len(stored) == 1
    dense = io.read_buffer(model)  # the same pruning, stored dense
    ctx = RunContext(rewrite.Options(prune=0.8).plan())
    prune.run(dense, ctx)
    for xnn in (True, False):
        ref, got = signature_outputs(io.to_bytes(dense), xnn), signature_outputs(out, xnn)
        for key in ref:
            np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-5 * float(np.abs(ref[key]).max()))


@pytest.mark.parametrize("mode", ["float16", "int8"])
def test_quantizing_a_weight_two_signatures_share_stores_it_once(mode):
    rng = np.random.default_rng(4)
    model = B.shared_across_signatures(rng.standard_normal((64, 128)))
    entries, out = rewrite_and_check(model, 1e-2 if mode == "float16" else 5e-2, quantize=mode)
    assert [e["action"] for e in entries] == ["quantized", "quantized"]
    assert distinct_weight_buffers(out) == 1


# ----------------------------------------------------------------------------- the IR's shared-weight helpers
def single_outputs(model: bytes, xnnpack: bool = False) -> np.ndarray:
    runner = verify.Runner(model, xnnpack=xnnpack)
    return runner(runner.random_samples(1, 0)[0])[0]


@pytest.mark.parametrize("form", ["float32", "float16"])
def test_private_weight_gives_one_reader_its_own_copy_over_the_same_bytes(form):
    from tfrewrite.analysis import private_weight, stored
    from tfrewrite.schema import BuiltinOperator as OP
    built = B.shared_in_one_subgraph(form=form)
    model = io.read_buffer(built)
    sg = model.main
    a, b = [op for op in sg.operators if op.builtin == OP.FULLY_CONNECTED][1:3]
    assert a.inputs[1] is b.inputs[1]
    before = stored(a.inputs[1])
    mine = private_weight(b, 1)
    theirs = stored(a.inputs[1])
    # a keeps what it read; b reads a tensor (and, stored float16, a DEQUANTIZE) of its own over the same bytes.
    assert theirs.tensor is before.tensor and a.inputs[1] is not b.inputs[1]
    assert mine.tensor is not theirs.tensor and mine.tensor.buffer is theirs.tensor.buffer
    assert len(mine.carriers) == len(theirs.carriers) == (1 if form == "float16" else 0)
    assert mine.carriers == () or mine.carriers[0] is not theirs.carriers[0]
    assert b.inputs[1].consumers == [b] and model.problems() == []
    assert private_weight(b, 1).tensor is mine.tensor  # already its own: nothing more to copy
    unchanged = io.to_bytes(model)
    np.testing.assert_array_equal(single_outputs(unchanged), single_outputs(built))
    # New data for b's copy changes b only.
    mine.tensor.set_data(np.zeros(mine.tensor.shape, mine.tensor.dtype))
    assert np.count_nonzero(theirs.tensor.data) > 0 and model.problems() == []
    assert stored(a.inputs[1]).tensor.buffer is before.tensor.buffer


@pytest.mark.parametrize("form", ["float32", "float16"])
def test_channel_pruning_slices_a_weight_two_ops_read_on_copies_of_their_own(form):
    from tfrewrite.analysis import stored
    from tfrewrite.schema import BuiltinOperator as OP
    built = B.shared_in_one_subgraph(form=form)
    m = io.read_buffer(built)
    entries = rewrite.rewrite_model(m, rewrite.Options(prune_channels=0.5))
    assert m.problems() == []
    fcs = [op for op in m.main.operators if op.builtin == OP.FULLY_CONNECTED]
    shapes = [stored(op.inputs[1]).tensor.shape for op in fcs]
    assert shapes == [[16, 16], [16, 16], [16, 16], [10, 16]], shapes  # each hidden group halved
    assert stored(fcs[1].inputs[1]).tensor is not stored(fcs[2].inputs[1]).tensor
    channels = [e for e in entries if e["kind"] == "channels"]
    assert [e["action"] for e in channels] == ["pruned"] * 3 + ["skipped"] and channels[3]["reason"] == "a subgraph output"
    out = io.to_bytes(m)
    for xnn in (True, False):
        assert np.isfinite(single_outputs(out, xnn)).all()


@pytest.mark.parametrize("form", ["float32", "float16"])
def test_weight_uses_finds_every_reader_through_the_carriers_in_model_order(form):
    from tfrewrite.analysis import stored, weight_uses
    from tfrewrite.schema import BuiltinOperator as OP
    model = io.read_buffer(B.shared_in_one_subgraph(form=form))
    fcs = [op for op in model.main.operators if op.builtin == OP.FULLY_CONNECTED]
    found = weight_uses(model, stored(fcs[1].inputs[1]).tensor)
    assert [(u.op, u.index) for u in found.uses] == [(fcs[1], 1), (fcs[2], 1)]
    assert [c.builtin for c in found.carriers] == ([OP.DEQUANTIZE] if form == "float16" else [])
    assert found.shared and found.first is fcs[1]
    alone = weight_uses(model, stored(fcs[0].inputs[1]).tensor)
    assert not alone.shared and alone.ops == [fcs[0]]
    # Across signatures: one Buffer, a tensor (and a DEQUANTIZE) in each subgraph; subgraph order first.
    model = io.read_buffer(B.shared_across_signatures(np.ones((8, 16)), form=form))
    found = weight_uses(model, stored(model.subgraphs[1].operators[-1].inputs[1]).tensor)
    assert [(u.subgraph, u.op.builtin) for u in found.uses] == [(sg, OP.FULLY_CONNECTED) for sg in model.subgraphs]
    assert len(found.carriers) == (2 if form == "float16" else 0) and found.first is model.subgraphs[0].operators[-1]


def test_refusal_names_the_reader_in_the_way():
    from tfrewrite.analysis import weight_uses, stored
    from tfrewrite.schema import BuiltinOperator as OP
    model = io.read_buffer(B.shared_in_one_subgraph())
    a, b = [op for op in model.main.operators if op.builtin == OP.FULLY_CONNECTED][1:3]
    found = weight_uses(model, stored(a.inputs[1]).tensor)
    assert found.refusal(lambda u: True, ask=lambda u: "same") is None
    assert found.refusal(lambda u: u.op is a) == "the weight is also read by FULLY_CONNECTED"
    assert found.refusal(lambda u: u.op is a or "excluded", left="b is excluded") == "shared weight: b is excluded"
    assert found.refusal(lambda u: True, ask=lambda u: u.op is a, differ="they differ") == "shared weight: they differ"


@pytest.mark.parametrize("options,kind,both", [
    (dict(prune=0.5), "prune", ["pruned", None]),  # pruned once, at the first reader
    (dict(rank=4), "fc", ["rewritten", "rewritten"])])  # one set of factors for both
def test_a_weight_one_reader_leaves_alone_is_left_alone_for_every_reader(options, kind, both):
    """Pruning or low rank for every reader of a shared weight happens only when every reader asks for it: a
    reader excluded by --skip keeps the weight as it is, and so the other reader does too (before, the other
    reader changed it for both)."""
    from tfrewrite.analysis import stored
    built = B.shared_in_one_subgraph()
    for skip, expected in ((None, both), ("^h2$", [None, None])):
        m = io.read_buffer(built)
        entries = [e for e in rewrite.rewrite_model(m, rewrite.Options(skip=skip, **options))
                   if e["kind"] == kind and e["output"] in ("h1", "h2")]
        assert [e["action"] if e["action"] != "skipped" else None for e in entries] == expected, entries
        if skip:
            assert entries[0]["reason"] == "shared weight: another reader is left as it is"
            assert entries[1]["reason"] == "matched by --skip"
            readers = [op for op in m.main.operators if op.outputs[0].name in ("h1", "h2")]
            assert stored(readers[0].inputs[1]).tensor is stored(readers[1].inputs[1]).tensor
            assert np.count_nonzero(stored(readers[0].inputs[1]).tensor.data) == 32 * 32


def test_a_weight_read_by_many_fcs_is_fitted_on_the_rows_of_all_its_readers(tmp_path):
    """With calibration data, the one set of factors of an unrolled RNN's recurrent weight is fitted on every
    reader's rows (the weights-alone SVD keeps directions the steps never see): on inputs it was not fitted on,
    the output error is lower. Each reader keeps its bias, so the bias stays stored once."""
    import json
    from tfrewrite import cli
    rng = np.random.default_rng(7)
    src, data = tmp_path / "rnn.tflite", tmp_path / "x.npz"
    decaying = rng.standard_normal((48, 48)) * 0.9 ** np.arange(48)  # a spectrum that decays, as trained ones do
    src.write_bytes(B.unrolled_rnn(steps=8, width=8, hidden=48, seed=7, recurrent=decaying))
    basis = rng.standard_normal((3, 8))  # inputs on a 3-dim subspace, as real inputs are correlated
    np.savez(data, x=(rng.standard_normal((64, 3)) @ basis).astype(np.float32))
    held_out = [(rng.standard_normal((1, 3)) @ basis).astype(np.float32) for _ in range(8)]  # not fitted on
    reference = [verify.Runner(src.read_bytes())([v])[0] for v in held_out]
    errors = {}
    for name, extra in (("weights", []), ("rows", ["--calibration", str(data)])):
        out, rep = tmp_path / f"{name}.tflite", tmp_path / f"{name}.json"
        assert cli.main([str(src), str(out), "--fc-rank", "10", "--only", "rnn/step[1-8]$", "--report", str(rep),
                         "--quiet", "--force", *extra]) == 0
        readers = [e for e in json.loads(rep.read_text())["layers"] if e["weight_shape"] == [48, 48]]
        assert len(readers) == 8 and all(e["action"] == "rewritten" for e in readers)
        runner = verify.Runner(out.read_bytes())
        errors[name] = max(np.linalg.norm(runner([v])[0] - r) / np.linalg.norm(r) for v, r in zip(held_out, reference))
        steps = [op for op in io.read(out).main.operators
                 if op.outputs[0].name.startswith("rnn/step") and "lowrank" not in op.outputs[0].name]
        assert len({id(op.inputs[2].buffer) for op in steps}) == 1  # the readers' one bias, still shared
    assert errors["rows"] < 0.7 * errors["weights"], errors
