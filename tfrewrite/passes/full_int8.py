"""`--quantize full-int8`: the whole (already decomposed / pruned) model to full-integer int8 — int8 activations
per tensor, int8 weights per output channel, int32 biases — so an NPU, DSP or microcontroller runtime can run it.

Static quantization with calibration is done by Google's ai-edge-quantizer (an optional dependency, the
`int8` extra), recipe `static_wi8_ai8`, calibrated on the `--calibration` samples. The model's float inputs and
outputs stay float (a QUANTIZE op after each input, a DEQUANTIZE before each output, as the TF converter does by
default), so it is called exactly as before. ai-edge-quantizer 0.10 writes version 1 for every op; the versions
of the CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED ops are raised to what TFLite's op-version rules give for
int8 (`ops.versions`), as the converter would write them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import re
import warnings
from io import StringIO

import numpy as np

from .. import io, ops, schema
from ..graph import Model, SignatureDef

RECIPE = "static_wi8_ai8"
OP = schema.BuiltinOperator
# The signature a model without one is quantized with (`run`); the output has none again.
CALIBRATION_SIGNATURE = "tfrewrite_calibration"
INSTALL_HINT = "pip install 'tfrewrite[int8]' (ai-edge-quantizer)"


def available() -> bool:
    return importlib.util.find_spec("ai_edge_quantizer") is not None


class QuantizeError(io.ModelError):
    """The model cannot be quantized this way; the message says why (exit 2)."""


def run(model: Model, calibration, signature: str | None = None, original_tensors: dict | None = None,
        held_out=None) -> dict:
    """Replace `model`'s contents by its full-integer version; returns what the report shows.
    `original_tensors`: id(tensor) → tensor for the input model's tensors (held, so no new tensor takes an id) —
    a conv / FC writing any other tensor into a single conv / FC reader is an inner factor of a low-rank chain
    (per-tensor weight scales, balanced first). `held_out`: how many of the calibration file's last samples (given
    their number) the run's output-error check measures on; no activation range is measured on them (None: none)."""
    from importlib.metadata import version

    from .. import verify
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError:
        raise QuantizeError(f"--quantize full-int8 needs ai-edge-quantizer: {INSTALL_HINT}") from None
    keys = [d.key for d in model.signature_defs]
    if len(keys) > 1:
        # ai-edge-quantizer calibrates every signature of the model, and one data file feeds one of them: with
        # --signature it failed on the other signature's tensors (an internal error).
        raise QuantizeError(f"--quantize full-int8 needs a model with one signature at most (the model has "
                            f"{len(keys)}): ai-edge-quantizer calibrates every signature, and --calibration feeds one")
    if not keys:
        # ai-edge-quantizer calibrates by signature: a model without one (MediaPipe's) gets one for the run, over
        # the main subgraph's inputs and outputs named as their tensors (the names its data file uses), and loses
        # it again in `unsigned`.
        main = model.main
        names = [t.name for t in main.outputs]
        if len({t.name for t in main.inputs + main.outputs}) != len(main.inputs) + len(main.outputs):
            raise QuantizeError("--quantize full-int8 on a model without a signature needs distinct names for its "
                                "inputs and outputs (it is calibrated through a signature named after them)")
        model.signature_defs = [SignatureDef(CALIBRATION_SIGNATURE, main, [(t.name, t) for t in main.inputs],
                                             [(t.name, t) for t in main.outputs])]
        try:
            info = run(model, calibration, None, original_tensors, held_out)
        finally:
            model.signature_defs = []
        unsigned(model, names)
        return info
    key = keys[0]
    edge_types = output_types(model)
    restored = float_weights(model)
    inner = chain_inner_ops(model, original_tensors) if original_tensors else []
    balanced = balance(model, inner)
    data = io.to_bytes(model)
    runner = verify.Runner(data, signature=key)
    batches, _ = runner.samples_from(calibration)
    if held_out is not None:
        batches = batches[:len(batches) - held_out(len(batches))]
    names = [name for name, _, _ in runner.inputs]
    steps = getattr(recipe, RECIPE)() + [  # the model's float inputs and outputs stay float
        {"regex": ".*", "operation": edge, "algorithm_key": "no_quantize"} for edge in ("INPUT", "OUTPUT")]
    if inner:  # ai-edge-quantizer's scope of an op: its output names, each followed by ';'
        rule = dict(steps[0], regex="^(?:" + "|".join(re.escape(op.outputs[0].name) for _, op, _ in inner) + ");$")
        rule["op_config"] = dict(rule["op_config"], weight_tensor_config=dict(
            rule["op_config"]["weight_tensor_config"], granularity="TENSORWISE"))
        steps.append(rule)
    qt = quantizer.Quantizer(data, steps)
    # Its calibration prints a progress bar and a warning about keeping all tensors: not ours to show.
    with warnings.catch_warnings(), contextlib.redirect_stderr(StringIO()):
        warnings.simplefilter("ignore")
        try:
            result = calibrate(data, steps, {key: [dict(zip(names, batch)) for batch in batches]})
            quantized = qt.quantize(result, enable_progress_report=False).quantized_model
        except Exception as e:  # what it cannot handle (recurrent ops, control flow, ...): a model error, not ours
            text = str(e).strip().splitlines()
            raise QuantizeError(f"ai-edge-quantizer cannot quantize this model to full-integer: "
                                f"{text[0] if text else type(e).__name__}") from None
    new = io.read_buffer(bytes(quantized), "<ai-edge-quantizer output>")
    outputs_restored = float_outputs(new, edge_types)
    edge_shape_signatures(new)
    rewired = read_integer_outputs(new)
    if rewired or outputs_restored:
        new.cleanup()
    keep_origins(model, new)
    for f in dataclasses.fields(Model):
        setattr(model, f.name, getattr(new, f.name))
    raised = raise_versions(model)
    check_runs(model)
    return {"tool": f"ai-edge-quantizer {version('ai-edge-quantizer')}", "recipe": RECIPE, "samples": len(batches),
            "versions_raised": raised, "float_weights_restored": restored, "per_tensor_chain_ops": len(inner),
            "balanced_channels": balanced, "integer_inputs_rewired": rewired, "float_outputs_restored": outputs_restored}


def calibrate(data: bytes, steps: list[dict], samples: dict) -> dict:
    """Activation ranges of the float model `data` for the recipe `steps`: each tensor's min and max over all
    `samples` ({signature key: [inputs by name]}), as the TF converter measures them and tfrewrite's own int8
    chains do. `Quantizer.calibrate` keeps, per tensor, a moving average (smoothing 0.95) of each sample's min
    and max instead: close to the typical sample's extremes, so an input of standard normal features got the
    range ±1.8 where the data spans ±3.3 (clipped; outputs 14-22x further from the float model's than the
    converter's). ai-edge-quantizer's own Calibrator takes the update rule as an argument (`qsv_update_func`),
    and its `min_max_update` is the global min / max; the result is the {tensor name: {min, max}} mapping
    `Quantizer.quantize` reads, the form `Quantizer.calibrate` returns."""
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(steps)
    if not manager.need_calibration():
        return {}
    ranges = calibrator.Calibrator(data, qsv_update_func=qsv_utils.min_max_update)
    ranges.calibrate(samples, manager)
    return ranges.get_model_qsvs()


def unsigned(model: Model, output_names: list[str]) -> None:
    """The model quantized with `CALIBRATION_SIGNATURE` back without a signature, like its input, its outputs
    named as before: ai-edge-quantizer names the float output of its DEQUANTIZE '<name>_dequant' and the int8
    tensor '<name>', and a caller without a signature reads outputs by tensor name (the names are swapped)."""
    model.signature_defs = []
    for out, name in zip(model.main.outputs, output_names):
        if out.name != name:
            inner = next((t for t in model.main.tensors if t.name == name), None)
            if inner is not None:
                inner.name = out.name
            out.name = name


INTEGER = (schema.TensorType.INT8, schema.TensorType.INT16)


def float_outputs(model: Model, types: dict) -> int:
    """Every output (of a subgraph or of a signature) that was float and came out integer is float again:
    ai-edge-quantizer 0.10, for an output a CONCATENATION also reads (its inputs share one scale, so it gets a
    requantizing QUANTIZE), pointed the signature's output at the op's int8 result and made that QUANTIZE's
    int8 copy the subgraph output (the output's DEQUANTIZE was left unread) — an int8 output, exit 0. The output
    becomes that DEQUANTIZE's float tensor again (the one that reads the op's own int8 result, not the
    requantized copy), or a new DEQUANTIZE's; the QUANTIZE feeds only its other readers. `types`: what
    `output_types` gave before quantization. Returns how many float tensors became outputs again."""
    copies: dict = {}  # id(integer tensor) → its float copy: one DEQUANTIZE per tensor, however many name it

    def float_copy(sg, t, was):
        if id(t) not in copies:
            sources = [t]
            if t.producer is not None and t.producer.builtin == OP.QUANTIZE and t.producer.inputs[0] is not None \
                    and t.producer.inputs[0].type in INTEGER:
                sources.insert(0, t.producer.inputs[0])  # the requantized tensor's source: no second rounding
            copy = next((d.outputs[0] for s in sources for d in s.consumers if d.builtin == OP.DEQUANTIZE
                         and d.outputs and d.outputs[0].type == was), None)
            if copy is None:
                copy = sg.add_activation(t.name + "_dequant", was, t.shape, like=t)
                copy.shape_signature = list(t.shape_signature) if t.shape_signature is not None else None
                sg.add_operator(ops.dequantize(sources[0], copy))
            copies[id(t)] = copy
        return copies[id(t)]

    for sg, before in zip(model.subgraphs, types["subgraphs"]):
        for i, (t, was) in enumerate(zip(list(sg.outputs), before)):
            if was in FLOATS and t.type in INTEGER:
                sg.outputs[i] = float_copy(sg, t, was)
    for sig in model.signature_defs:
        before = types["signatures"].get(sig.key, {})
        for i, (name, t) in enumerate(list(sig.outputs)):
            if before.get(name) in FLOATS and t.type in INTEGER:
                sig.outputs[i] = (name, float_copy(sig.subgraph, t, before[name]))
    return len({id(c) for c in copies.values()})


def edge_shape_signatures(model: Model) -> int:
    """Each QUANTIZE / DEQUANTIZE output without a shape signature gets its input's: ai-edge-quantizer 0.10 writes
    the tensors of the ops it adds at the edges without one, so a model output of dynamic batch size ([-1, 10])
    came out fixed ([1, 10]). Both ops keep the shape. Returns how many tensors got one."""
    given = 0
    for _, op in model.operators():
        x, y = (op.inputs[0] if op.inputs else None), (op.outputs[0] if op.outputs else None)
        if op.builtin in (OP.QUANTIZE, OP.DEQUANTIZE) and x is not None and y is not None \
                and y.shape_signature is None and x.shape_signature is not None and list(x.shape) == list(y.shape) \
                and len(x.shape_signature) == len(x.shape):
            y.shape_signature = [int(d) for d in x.shape_signature]
            given += 1
    return given


def output_types(model: Model) -> dict:
    """The element types of every subgraph's outputs, and of every signature's by name (for `float_outputs`)."""
    return {"subgraphs": [[t.type for t in sg.outputs] for sg in model.subgraphs],
            "signatures": {sig.key: {name: t.type for name, t in sig.outputs} for sig in model.signature_defs}}


def read_integer_outputs(model: Model) -> int:
    """An integer op that reads a float tensor which a DEQUANTIZE makes of an integer activation reads that
    activation instead: ai-edge-quantizer wires a model output that another op also reads (an embedding the
    logits FC reads) to the reader through the output's DEQUANTIZE, and LiteRT's int8 FULLY_CONNECTED refused
    the float input. The dequantized copy stays the model's output. A SHAPE (a flatten's) reads the integer
    tensor too: it reads only the shape, and a float SHAPE left the model with a float op and a DEQUANTIZE for
    nothing. Returns how many inputs were rewired."""
    rewired = 0
    for sg in model.subgraphs:
        for op in sg.operators:
            if op.builtin in (OP.QUANTIZE, OP.DEQUANTIZE) or not op.outputs or op.builtin != OP.SHAPE and any(
                    t is not None and t.type not in INTEGER for t in op.outputs):
                continue
            for i, t in enumerate(op.inputs):
                src = t.producer if t is not None and t.type == schema.TensorType.FLOAT32 else None
                if src is not None and src.builtin == OP.DEQUANTIZE and src.inputs[0] is not None \
                        and not src.inputs[0].is_constant and src.inputs[0].type in INTEGER:
                    op.inputs[i] = src.inputs[0]
                    rewired += 1
    return rewired


def check_runs(model: Model) -> None:
    """ai-edge-quantizer's output must run in LiteRT, with XNNPACK and with the builtin kernels alone; when it does
    not, the model cannot be made full-integer this way (exit 2, naming the op LiteRT refused)."""
    from .. import verify
    data = io.to_bytes(model)
    for xnnpack in (False, True):
        try:
            verify.interpreter(data, xnnpack=xnnpack)
        except verify.NotRunnable as e:
            reason = str(e).split("does not run in LiteRT: ", 1)[-1]
            raise QuantizeError(f"ai-edge-quantizer's full-integer model does not run in LiteRT"
                                f"{'' if xnnpack else ' (builtin kernels)'}: {reason}") from None


def keep_origins(old: Model, new: Model) -> None:
    """Give each op of the quantized model, as its `origin`, the op of `old` that wrote the same output tensor (or
    that op's own origin): ai-edge-quantizer keeps the tensor names, so a later pass's report entry still names the
    input model's op (its QUANTIZE after each input shifts every position by one)."""
    for old_sg, new_sg in zip(old.subgraphs, new.subgraphs):
        by_output = {op.outputs[0].name: op.origin or op for op in old_sg.operators if op.outputs}
        for op in new_sg.operators:
            source = by_output.get(op.outputs[0].name) if op.outputs else None
            if source is not None:
                op.origin = source


def chain_inner_ops(model: Model, original_tensors: dict) -> list[tuple]:
    """(subgraph, op, reader) for every inner factor of a low-rank chain: a CONV_2D, DEPTHWISE_CONV_2D or
    FULLY_CONNECTED without fused activation writing a new tensor that exactly one such op reads."""
    from ..ops.semantics import LAYER_OPS
    out = []
    for sg in model.subgraphs:
        outputs = {id(t) for t in sg.outputs}
        for op in sg.operators:
            t = op.outputs[0] if op.builtin in LAYER_OPS and op.outputs else None
            if t is None or id(t) in original_tensors or id(t) in outputs:
                continue
            readers = t.consumers
            opts = op.builtin_options
            if len(readers) == 1 and readers[0].builtin in LAYER_OPS and readers[0].inputs[0] is t \
                    and getattr(opts, "fusedActivationFunction", 0) == 0:
                out.append((sg, op, readers[0]))
    return out


def balance(model: Model, inner: list[tuple]) -> int:
    """Cross-layer equalization of each inner factor A with its reader B, in execution order: A's output channel
    j divided by s_j = √(r₁/r₂) and B's input channel j multiplied by it, r₁ / r₂ the largest |weight| of channel j
    in A / B — exact in float, and both ranges become √(r₁·r₂). Constants read by any other op are left alone.
    Returns how many channels were rescaled."""
    from ..linalg.int8 import channel_ranges, equalization_scales
    from ..ops.semantics import LAYERS
    readers: dict = {}  # Buffer → how many op inputs read it (held, not its id: see `own`)
    for _, op in model.operators():
        for t in op.inputs:
            if t is not None and t.is_constant:
                readers[t.buffer] = readers.get(t.buffer, 0) + 1
    # The constants no other op reads, as tensors: rescaling one gives it a new buffer of its own, which the next
    # pair of the chain (the depthwise factor of a CP chain is in two) must still find unshared. Counted by
    # id(buffer), the new buffer was found only when it happened to reuse a freed buffer's id: the same run
    # balanced all pairs or skipped some, and wrote different models.
    own = {t for _, op in model.operators() for t in op.inputs
           if t is not None and t.is_constant and readers[t.buffer] == 1}
    changed = 0
    for _, a, b in inner:
        la, lb = LAYERS[a.builtin], LAYERS[b.builtin]
        wa, wb = a.inputs[la.weight], b.inputs[lb.weight]
        bias = a.inputs[la.bias] if len(a.inputs) > la.bias else None
        consts = [t for t in (wa, wb, bias) if t is not None]
        if any(not t.is_constant or t.type != schema.TensorType.FLOAT32 or t not in own for t in consts):
            continue
        a_axis, b_axis = la.out_axis, (lb.out_axis if lb.coupled else lb.in_axis)
        va, vb = np.asarray(wa.data, np.float64), np.asarray(wb.data, np.float64)
        r1, r2 = channel_ranges(va, a_axis), channel_ranges(vb, b_axis)
        if len(r1) != len(r2):
            continue
        s = equalization_scales(r1, r2)
        shape_a, shape_b = [1] * va.ndim, [1] * vb.ndim
        shape_a[a_axis], shape_b[b_axis] = -1, -1
        wa.set_data((va / s.reshape(shape_a)).astype(np.float32))
        wb.set_data((vb * s.reshape(shape_b)).astype(np.float32))
        if bias is not None:
            bias.set_data((np.asarray(bias.data, np.float64) / s).astype(np.float32))
        changed += int(np.count_nonzero(s != 1.0))
    return changed


ALREADY_INTEGER = "the model is already integer-only (every op but QUANTIZE / DEQUANTIZE reads and writes integers)"
ALREADY_STATIC = ("the model is already statically quantized (it computes on int8 / int16 activations; any op it "
                  "still runs in float is named in a warning)")
FLOATS = (schema.TensorType.FLOAT32, schema.TensorType.FLOAT16)


def integer_only(model: Model) -> bool:
    """Whether no op but a QUANTIZE or DEQUANTIZE at the edges reads or writes a float tensor: a full-integer
    model already (the converter's, or one this tool made)."""
    return not float_ops(model)


def float_ops(model: Model) -> list:
    """The ops other than QUANTIZE / DEQUANTIZE that read or write a float tensor, in model order."""
    return [op for _, op in model.operators() if op.builtin not in (OP.QUANTIZE, OP.DEQUANTIZE)
            and any(t is not None and t.type in FLOATS for t in (*op.inputs, *op.outputs))]


def already_quantized(model: Model) -> str | None:
    """Why `model` needs no static quantization, or None when it does: it is integer-only, or some op already
    computes on int8 / int16 activations (statically quantized; ai-edge-quantizer's own output, whose float ops
    it left float, was quantized again)."""
    if integer_only(model):
        return ALREADY_INTEGER
    for _, op in model.operators():
        if op.builtin not in (OP.QUANTIZE, OP.DEQUANTIZE) and any(
                t is not None and not t.is_constant and t.type in INTEGER for t in op.inputs) and op.outputs and all(
                t is not None and t.type in INTEGER for t in op.outputs):
            return ALREADY_STATIC
    return None


def float_report(model: Model) -> dict:
    """The ops a full-integer model still runs in float: op names with counts and MACs, and their share of the
    model's MACs (None when no op has a MAC formula)."""
    from ..analysis import layer_weight, macs
    left = float_ops(model)
    if not left:
        return {"float_ops": []}
    work = {id(op): macs(op, layer_weight(op)) for _, op in model.operators()}
    by_name: dict[str, dict] = {}
    for op in left:
        row = by_name.setdefault(op.name, {"op": op.name, "count": 0, "macs": 0})
        row["count"] += 1
        row["macs"] += work[id(op)]
    total = sum(work.values())
    share = sum(r["macs"] for r in by_name.values()) / total if total else None
    return {"float_ops": sorted(by_name.values(), key=lambda r: (-r["macs"], -r["count"], r["op"])),
            "float_macs_share": None if share is None else round(share, 4)}


def float_warning(report: dict) -> str:
    """The summary's warning line for the ops `float_report` found."""
    ops_text = ", ".join(f"{r['count']}x {r['op']}" for r in report["float_ops"])
    share = report.get("float_macs_share")
    macs_text = f"; {100 * share:.4g} % of the MACs" if share is not None else ""
    return (f"--quantize full-int8: ops left in float ({ops_text}{macs_text}): the model is not integer-only; an "
            f"integer-only runtime (NPU, DSP, microcontroller) cannot run it as it is")


def float_weights(model: Model) -> int:
    """Float32 constants before static quantization: ai-edge-quantizer expects the float model, and crashed on
    constants stored float16 behind a DEQUANTIZE (the converter's float16 weights and biases) or kept the layers
    whose weights were dynamic-range int8. Every float16 or int8 constant behind a DEQUANTIZE and every conv / FC
    weight read as int8 by a hybrid kernel gets its float32 values back. Returns how many were restored."""
    from ..analysis import WEIGHT_CARRIERS
    from ..ops.semantics import LAYERS
    from .common import Skip, read_weight
    restored = 0
    for sg in model.subgraphs:
        for op in sg.operators:
            for i, t in enumerate(op.inputs):
                # float16 or int8 (a low-rank factor of a dynamic-range model) behind a DEQUANTIZE, or sparse
                # behind a DENSIFY (the converter's sparse weights): ai-edge-quantizer took such a weight for an
                # activation and gave a conv weight zero point -128, which LiteRT refuses.
                values = carried_values(t) if op.builtin not in WEIGHT_CARRIERS else None
                if values is not None:
                    op.inputs[i] = sg.add_constant(t.name + "/float", np.asarray(values, np.float32))
                    restored += 1
            x = op.inputs[0] if op.inputs else None
            layout = LAYERS.get(op.builtin)
            if layout is None or x is None or x.type != schema.TensorType.FLOAT32:
                continue
            try:
                weight = read_weight(op, layout.weight)
            except Skip:
                continue
            if weight.kind == "int8":
                op.inputs[layout.weight] = sg.add_constant(op.inputs[layout.weight].name + "/float", weight.values)
                restored += 1
    if restored:
        model.cleanup()
    return restored


def carried_values(t) -> np.ndarray | None:
    """The dense float32 values of a constant that DEQUANTIZE / DENSIFY ops carry to `t` (float16 widened, int8
    dequantized, a sparse one decoded); None when `t` is a constant itself, an activation, or of another type."""
    from ..analysis import stored
    from ..linalg import sparse
    from .sparse_encode import from_sparsity
    s = stored(t) if t is not None and not t.is_constant else None
    if s is None or not s.carriers:
        return None
    c = s.tensor
    if c.sparsity is None:
        if not any(op.builtin == OP.DEQUANTIZE for op in s.carriers) or c.type == schema.TensorType.FLOAT32:
            return None
        return s.values()
    if c.type not in (schema.TensorType.FLOAT32, schema.TensorType.FLOAT16, schema.TensorType.INT8):
        return None
    try:
        dense = sparse.decode(from_sparsity(c))
    except ValueError:  # a block layout the decoder does not read: the weight stays as it is
        return None
    if c.type == schema.TensorType.INT8:
        q = c.quantization
        return q.dequantize(dense) if q is not None and q.scale is not None else None
    return np.asarray(dense, np.float32)


def raise_versions(model: Model) -> int:
    """Raise conv / FC / DEQUANTIZE versions to TFLite's rules for their tensor types; returns how many changed."""
    from ..invariants import required_version
    changed = 0
    for _, op in model.operators():
        if op.builtin not in (OP.CONV_2D, OP.DEPTHWISE_CONV_2D, OP.FULLY_CONNECTED, OP.DEQUANTIZE):
            continue
        x, w = op.inputs[0] if op.inputs else None, op.inputs[1] if len(op.inputs) > 1 else None
        if x is None or (w is None and op.builtin != OP.DEQUANTIZE):
            continue
        need = required_version(op, x, w, op.outputs[0] if op.outputs else None)
        if need is not None and need > op.opcode.version:
            op.opcode.version = need
            changed += 1
    return changed
