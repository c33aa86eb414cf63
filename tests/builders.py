"""Single-layer models built with tfrewrite's own IR, and numpy references of the layers we emit."""
import numpy as np

from tfrewrite import io, ops, schema
from tfrewrite.graph import Model, Quantization, Subgraph, Tensor
from tfrewrite.linalg import quant

T = schema.TensorType
ACT = {"NONE": schema.ActivationFunctionType.NONE, "RELU": schema.ActivationFunctionType.RELU,
       "RELU6": schema.ActivationFunctionType.RELU6}
PAD = {"SAME": schema.Padding.SAME, "VALID": schema.Padding.VALID}


def conv_out_size(size, k, stride, dilation, padding):
    eff = (k - 1) * dilation + 1
    return -(-size // stride) if padding == "SAME" else -(-(size - eff + 1) // stride)


def _weight(sg, name, values, form, axis):
    """A weight stored as `form`: the tensor the op reads, and any DEQUANTIZE to run first."""
    if form == "float32":
        return sg.add_constant(name, values.astype(np.float32)), []
    if form == "float16":
        c = sg.add_constant(name + "_fp16", values.astype(np.float16))
        out = sg.add_activation(name, T.FLOAT32, values.shape)
        return out, [ops.dequantize(c, out)]
    if form == "int8":
        q, scales = quant.quantize_symmetric_int8(values, axis=axis)
        return sg.add_constant(name, q, quantization=Quantization.symmetric(scales, axis)), []
    raise ValueError(form)


def stored(values, form, axis=0):
    """The float values a weight really has once stored as `form`."""
    if form == "float16":
        return values.astype(np.float16).astype(np.float64)
    if form == "int8":
        q, s = quant.quantize_symmetric_int8(values, axis=axis)
        return quant.dequantize_int8(q, s, axis=axis).astype(np.float64)
    return values.astype(np.float64)


def conv_model(weight, bias=None, input_hw=(9, 9), batch=1, stride=1, padding="SAME", dilation=1, act="NONE",
               form="float32", name="layer/conv"):
    o, kh, kw, i = weight.shape
    sg = Subgraph()
    x = sg.add_tensor(Tensor("input", T.FLOAT32, [batch, *input_hw, i]))
    oh = conv_out_size(input_hw[0], kh, stride, dilation, padding)
    ow = conv_out_size(input_hw[1], kw, stride, dilation, padding)
    y = sg.add_tensor(Tensor(name, T.FLOAT32, [batch, oh, ow, o]))
    w, pre = _weight(sg, "layer/kernel", weight, form, 0)
    b = sg.add_constant("layer/bias", bias.astype(np.float32)) if bias is not None else \
        sg.add_constant("layer/bias", np.zeros(o, np.float32))
    op = ops.conv2d(x, w, b, y, stride=(stride, stride), padding=PAD[padding], dilation=(dilation, dilation),
                    activation=ACT[act])
    sg.operators = pre + [op]
    sg.inputs, sg.outputs = [x], [y]
    return io.to_bytes(Model(subgraphs=[sg]))


def fc_model(weight, bias=None, input_shape=(1, 16), keep_num_dims=False, act="NONE", form="float32",
             name="layer/fc"):
    m, n = weight.shape
    sg = Subgraph()
    x = sg.add_tensor(Tensor("input", T.FLOAT32, list(input_shape)))
    rows = int(np.prod(input_shape)) // n
    out_shape = list(input_shape[:-1]) + [m] if keep_num_dims else [rows, m]
    y = sg.add_tensor(Tensor(name, T.FLOAT32, out_shape))
    w, pre = _weight(sg, "layer/weight", weight, form, 0)
    b = sg.add_constant("layer/bias", bias.astype(np.float32)) if bias is not None else None
    op = ops.fully_connected(x, w, b, y, activation=ACT[act], keep_num_dims=keep_num_dims)
    sg.operators = pre + [op]
    sg.inputs, sg.outputs = [x], [y]
    return io.to_bytes(Model(subgraphs=[sg]))


# ------------------------------------------------------------------------------------ numpy references
def activation(y, act):
    if act == "RELU":
        return np.maximum(y, 0)
    if act == "RELU6":
        return np.clip(y, 0, 6)
    return y


def conv2d(x, w, b=None, stride=1, padding="SAME", dilation=1):
    """NHWC x, [O,kh,kw,I] w; TF padding rules (extra pad at the end)."""
    n, h, wd, c = x.shape
    o, kh, kw, _ = w.shape
    oh = conv_out_size(h, kh, stride, dilation, padding)
    ow = conv_out_size(wd, kw, stride, dilation, padding)
    if padding == "SAME":
        ph = max((oh - 1) * stride + (kh - 1) * dilation + 1 - h, 0)
        pw = max((ow - 1) * stride + (kw - 1) * dilation + 1 - wd, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    y = np.zeros((n, oh, ow, o))
    for a in range(kh):
        for bb in range(kw):
            patch = x[:, a * dilation: a * dilation + (oh - 1) * stride + 1: stride,
                      bb * dilation: bb * dilation + (ow - 1) * stride + 1: stride, :]
            y += patch @ w[:, a, bb, :].T
    return y + (b if b is not None else 0)


def depthwise2d(x, w, stride=1, padding="SAME", dilation=1):
    """w: [1, kh, kw, C], depth multiplier 1."""
    c = x.shape[-1]
    kh, kw = w.shape[1:3]
    out = [conv2d(x[..., j:j + 1], w[:, :, :, j].reshape(1, kh, kw, 1), None, stride, padding, dilation)
           for j in range(c)]
    return np.concatenate(out, axis=-1)


# ------------------------------------------------------------------------------------ odd models (the sweep)
def _signature(key, sg):
    from tfrewrite.graph import SignatureDef
    return SignatureDef(key=key, subgraph=sg, inputs=[(t.name.split(":")[0], t) for t in sg.inputs],
                        outputs=[(t.name.split(":")[0], t) for t in sg.outputs])


def shared_across_signatures(weight, layer="fc", form="float32", bias=None, input_hw=(6, 6)):
    """Two signatures, one subgraph each, whose FULLY_CONNECTED (or CONV_2D) ops read one constant: one Buffer,
    one tensor in each subgraph (as the converter writes a weight two signatures share). Stored as `form`
    ('float32' or 'float16' behind a DEQUANTIZE in each subgraph). The second signature adds a RELU."""
    from tfrewrite.graph import Buffer
    stored_values = weight.astype(np.float16 if form == "float16" else np.float32)
    buffer = Buffer(np.ascontiguousarray(stored_values).reshape(-1).view(np.uint8))
    subgraphs = []
    for key in ("first", "second"):
        sg = Subgraph(name=key)
        stored = sg.add_tensor(Tensor("shared/weight" + ("_fp16" if form == "float16" else ""),
                                      T.FLOAT16 if form == "float16" else T.FLOAT32, list(weight.shape), buffer))
        pre = []
        if form == "float16":
            w = sg.add_activation("shared/weight", T.FLOAT32, weight.shape)
            pre = [ops.dequantize(stored, w)]
        else:
            w = stored
        b = sg.add_constant(f"{key}/bias", (bias if bias is not None else np.zeros(weight.shape[0])).astype(np.float32))
        if layer == "fc":
            x = sg.add_tensor(Tensor(f"{key}_x", T.FLOAT32, [1, weight.shape[1]]))
            y = sg.add_tensor(Tensor(f"{key}/fc", T.FLOAT32, [1, weight.shape[0]]))
            op = ops.fully_connected(x, w, b, y, activation=ACT["RELU" if key == "second" else "NONE"])
        else:
            o, kh, kw, i = weight.shape
            x = sg.add_tensor(Tensor(f"{key}_x", T.FLOAT32, [1, *input_hw, i]))
            y = sg.add_tensor(Tensor(f"{key}/conv", T.FLOAT32, [1, *input_hw, o]))
            op = ops.conv2d(x, w, b, y, padding=PAD["SAME"], activation=ACT["RELU" if key == "second" else "NONE"])
        sg.operators = pre + [op]
        sg.inputs, sg.outputs = [x], [y]
        subgraphs.append(sg)
    model = Model(subgraphs=subgraphs)
    model.signature_defs = [_signature(sg.name, sg) for sg in subgraphs]
    return io.to_bytes(model)


def shared_in_one_subgraph(width=16, hidden=32, out=10, form="float32", seed=0):
    """x[1, width] → FC (hidden) → RELU → FC (S) → RELU → FC (S again: the same tensor, or the same DEQUANTIZE
    output when stored float16) → FC (out): one weight two ops of one subgraph read."""
    rng = np.random.default_rng(seed)
    sg = Subgraph(name="main")
    x = sg.add_tensor(Tensor("x", T.FLOAT32, [1, width]))
    first = sg.add_constant("first/weight", rng.standard_normal((hidden, width)).astype(np.float32) / 4)
    shared, pre = _weight(sg, "shared/weight", rng.standard_normal((hidden, hidden)) / 6, form, 0)
    last = sg.add_constant("last/weight", rng.standard_normal((out, hidden)).astype(np.float32) / 6)
    h = [sg.add_activation(f"h{k}", T.FLOAT32, [1, hidden]) for k in range(3)]
    y = sg.add_activation("y", T.FLOAT32, [1, out])
    sg.operators = pre + [
        ops.fully_connected(x, first, sg.add_constant("first/bias", rng.standard_normal(hidden).astype(np.float32)),
                            h[0], activation=ACT["RELU"]),
        ops.fully_connected(h[0], shared, sg.add_constant("a/bias", np.full(hidden, 0.1, np.float32)), h[1],
                            activation=ACT["RELU"]),
        ops.fully_connected(h[1], shared, sg.add_constant("b/bias", np.full(hidden, 0.2, np.float32)), h[2],
                            activation=ACT["RELU"]),
        ops.fully_connected(h[2], last, None, y)]
    sg.inputs, sg.outputs = [x], [y]
    model = Model(subgraphs=[sg])
    model.signature_defs = [_signature("serving_default", sg)]
    return io.to_bytes(model)


def fc_chain(weights, seed=0):
    """x → FC → RELU → FC → ... (float32, with biases): weights[k] of shape (out, in), each layer its own."""
    rng = np.random.default_rng(seed)
    sg = Subgraph(name="main")
    x = sg.add_tensor(Tensor("x", T.FLOAT32, [1, weights[0].shape[1]]))
    operators = []
    for k, w in enumerate(weights):
        y = sg.add_activation(f"fc{k}/out", T.FLOAT32, [1, w.shape[0]])
        bias = sg.add_constant(f"fc{k}/bias", rng.standard_normal(w.shape[0]).astype(np.float32) / 10)
        last = k == len(weights) - 1
        operators.append(ops.fully_connected(x, sg.add_constant(f"fc{k}/weight", np.asarray(w, np.float32)), bias, y,
                                             activation=ACT["NONE" if last else "RELU"]))
        x = y
    sg.operators = operators
    sg.inputs, sg.outputs = [operators[0].inputs[0]], [x]
    model = Model(subgraphs=[sg])
    model.signature_defs = [_signature("serving_default", sg)]
    return io.to_bytes(model)


def unrolled_rnn(steps=12, width=8, hidden=32, out=4, form="float32", seed=0, unused_bytes=0, recurrent=None):
    """An unrolled recurrence without an input per step: h1 = relu(W_in·x + b), h(t+1) = relu(U·h(t) + b) for
    `steps` steps, y = W_out·h: one recurrent weight U (stored as `form`) read by `steps` FULLY_CONNECTED ops,
    as a converted unrolled RNN has. U is scaled to spectral norm 0.9 so the steps neither explode nor vanish.
    `unused_bytes`: a constant of that many bytes no op reads (the converter leaves such; writing drops it).
    `recurrent`: U's values before the scaling (default random)."""
    rng = np.random.default_rng(seed)
    sg = Subgraph(name="main")
    x = sg.add_tensor(Tensor("x", T.FLOAT32, [1, width]))
    w_in = sg.add_constant("in/weight", (rng.standard_normal((hidden, width)) / np.sqrt(width)).astype(np.float32))
    u = rng.standard_normal((hidden, hidden)) if recurrent is None else np.array(recurrent, np.float64)
    u *= 0.9 / np.linalg.norm(u, 2)
    shared, pre = _weight(sg, "rnn/recurrent", u, form, 0)
    bias = sg.add_constant("rnn/bias", np.full(hidden, 0.05, np.float32))
    w_out = sg.add_constant("out/weight", (rng.standard_normal((out, hidden)) / np.sqrt(hidden)).astype(np.float32))
    h = [sg.add_activation(f"rnn/step{k}", T.FLOAT32, [1, hidden]) for k in range(steps + 1)]
    y = sg.add_activation("y", T.FLOAT32, [1, out])
    body = [ops.fully_connected(x, w_in, bias, h[0], activation=ACT["RELU"])]
    body += [ops.fully_connected(h[k], shared, bias, h[k + 1], activation=ACT["RELU"]) for k in range(steps)]
    sg.operators = pre + body + [ops.fully_connected(h[steps], w_out, None, y)]
    if unused_bytes:
        sg.add_constant("unused", np.zeros(unused_bytes // 4, np.float32))
    sg.inputs, sg.outputs = [x], [y]
    model = Model(subgraphs=[sg])
    model.signature_defs = [_signature("serving_default", sg)]
    return io.to_bytes(model)


def gather_fc_model(table_rows=50, width=16, out=32, indices=4, seed=0):
    """An index input: int32 indices → GATHER rows of a float32 table → FULLY_CONNECTED."""
    from tfrewrite.graph import Operator
    rng = np.random.default_rng(seed)
    sg = Subgraph()
    idx = sg.add_tensor(Tensor("indices", T.INT32, [indices]))
    table = sg.add_constant("table", rng.standard_normal((table_rows, width)).astype(np.float32))
    rows = sg.add_tensor(Tensor("rows", T.FLOAT32, [indices, width]))
    y = sg.add_tensor(Tensor("fc", T.FLOAT32, [indices, out]))
    options = schema.GatherOptionsT()
    options.axis = 0
    gather = Operator(opcode=ops.opcode_for(schema.BuiltinOperator.GATHER, 1), inputs=[table, idx], outputs=[rows],
                      builtin_options=options, builtin_options_type=schema.BuiltinOptions.GatherOptions)
    w = sg.add_constant("fc/weight", rng.standard_normal((out, width)).astype(np.float32))
    sg.operators = [gather, ops.fully_connected(rows, w, None, y)]
    sg.inputs, sg.outputs = [idx], [y]
    return io.to_bytes(Model(subgraphs=[sg]))


def stateful_model(width=16, out=32, seed=0):
    """A stateful model with two signatures, as the converter writes a tf.Variable: a CALL_ONCE runs an
    initializer subgraph that assigns zeros to a resource variable; 'accumulate' adds FC(x) to it and returns
    the sum, 'peek' returns FC(x) plus the variable without changing it."""
    from tfrewrite.graph import Operator
    OP = schema.BuiltinOperator
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out, width)) @ np.diag(np.linspace(1, 0.01, width))

    def op(builtin, inputs, outputs, options=None, options_type=0):
        return Operator(opcode=ops.opcode_for(builtin, 1), inputs=inputs, outputs=outputs,
                        builtin_options=options, builtin_options_type=options_type)

    def handle(sg):
        h = sg.add_tensor(Tensor("acc_handle", T.RESOURCE, []))
        options = schema.VarHandleOptionsT()
        options.sharedName = "acc"
        return h, op(OP.VAR_HANDLE, [], [h], options, schema.BuiltinOptions.VarHandleOptions)

    def call_once(init_index):
        options = schema.CallOnceOptionsT()
        options.initSubgraphIndex = init_index
        return op(OP.CALL_ONCE, [], [], options, schema.BuiltinOptions.CallOnceOptions)

    subgraphs = []
    for key in ("accumulate", "peek"):
        sg = Subgraph(name=key)
        x = sg.add_tensor(Tensor(f"{key}_x", T.FLOAT32, [1, width]))
        w = sg.add_constant(f"{key}/fc/weight", weight.astype(np.float32))
        y = sg.add_tensor(Tensor(f"{key}/fc", T.FLOAT32, [1, out]))
        h, var = handle(sg)
        prev = sg.add_tensor(Tensor(f"{key}/previous", T.FLOAT32, [1, out]))
        total = sg.add_tensor(Tensor(f"{key}/sum", T.FLOAT32, [1, out]))
        add_options = schema.AddOptionsT()
        sg.operators = [call_once(2), var, op(OP.READ_VARIABLE, [h], [prev]), ops.fully_connected(x, w, None, y),
                        op(OP.ADD, [prev, y], [total], add_options, schema.BuiltinOptions.AddOptions)]
        if key == "accumulate":
            sg.operators.append(op(OP.ASSIGN_VARIABLE, [h, total], []))
        sg.inputs, sg.outputs = [x], [total]
        subgraphs.append(sg)
    init = Subgraph(name="init")
    h, var = handle(init)
    zeros = init.add_constant("acc/zeros", np.zeros((1, out), np.float32))
    init.operators = [var, op(OP.ASSIGN_VARIABLE, [h, zeros], [])]
    subgraphs.append(init)
    model = Model(subgraphs=subgraphs)
    model.signature_defs = [_signature(sg.name, sg) for sg in subgraphs[:2]]
    return io.to_bytes(model)


def int16_fc_model(width=64, out=32, seed=0):
    """A 16x8 full-integer model (int16 activations, zero point 0; int8 weights per output channel; int64
    bias at s_in·s_w), as the converter's EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8 writes it."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out, width)) @ np.diag(np.linspace(1, 0.05, width))
    s_in, s_out = 4.0 / 32767, 16.0 / 32767

    def quantization(scale, zero=None, axis=0):
        scale = np.asarray(scale, np.float32).reshape(-1)
        return Quantization.affine(scale, np.zeros(len(scale)) if zero is None else zero, axis)

    sg = Subgraph()
    x = sg.add_tensor(Tensor("input", T.INT16, [1, width], quantization=quantization([s_in])))
    q, scales = quant.quantize_symmetric_int8(weight, axis=0)
    w = sg.add_constant("fc/weight", q, quantization=quantization(scales))
    bias_scale = s_in * np.asarray(scales, np.float64).reshape(-1)
    b = sg.add_constant("fc/bias", np.round(rng.standard_normal(out) * 0.1 / bias_scale).astype(np.int64),
                        quantization=quantization(bias_scale))
    y = sg.add_tensor(Tensor("fc", T.INT16, [1, out], quantization=quantization([s_out])))
    sg.operators = [ops.fully_connected(x, w, b, y)]
    sg.inputs, sg.outputs = [x], [y]
    return io.to_bytes(Model(subgraphs=[sg]))


def int8_conv_chain(widths=(3, 16, 16, 8), hw=6, per_tensor=True, seed=0):
    """A full-integer int8 chain of 3×3 SAME convs with RELU (int8 input and output, int32 biases at s_in·s_w),
    weights with one scale each (`per_tensor`, the converter's `_experimental_disable_per_channel`) or one
    per output channel."""
    rng = np.random.default_rng(seed)
    s_act = 0.04

    def quantization(scale, zero=0):
        scale = np.asarray(scale, np.float32).reshape(-1)
        return Quantization.affine(scale, np.full(len(scale), zero))

    sg = Subgraph()
    x = sg.add_tensor(Tensor("input", T.INT8, [1, hw, hw, widths[0]], quantization=quantization([1 / 64])))
    sg.inputs = [x]
    for k, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        w = rng.standard_normal((o, 3, 3, i)) / np.sqrt(9 * i)
        q, scales = quant.quantize_symmetric_int8(w, axis=None if per_tensor else 0)
        weight = sg.add_constant(f"conv{k}/weight", q, quantization=quantization(scales))
        s_b = float(x.quantization.scale[0]) * np.asarray(scales, np.float64).reshape(-1)
        b = sg.add_constant(f"conv{k}/bias", np.round(rng.standard_normal(o) * 0.2 / s_b).astype(np.int32),
                            quantization=quantization(s_b))
        y = sg.add_tensor(Tensor(f"conv{k}", T.INT8, [1, hw, hw, o], quantization=quantization([s_act], -128)))
        sg.operators.append(ops.conv2d(x, weight, b, y, padding=PAD["SAME"], activation=ACT["RELU"]))
        x = y
    sg.outputs = [x]
    return io.to_bytes(Model(subgraphs=[sg]))


def odd_models() -> dict[str, bytes]:
    """The models of the sweep that the fixtures do not cover, built with the IR (seeded)."""
    rng = np.random.default_rng(10)
    lowrank = rng.standard_normal((64, 8)) @ rng.standard_normal((8, 128))
    return {
        "shared_fc_signatures": shared_across_signatures(lowrank, bias=rng.standard_normal(64)),
        "shared_conv_signatures_fp16": shared_across_signatures(rng.standard_normal((32, 3, 3, 16)), layer="conv",
                                                                form="float16"),
        "all_zero_fc": fc_model(np.zeros((64, 128)), rng.standard_normal(64), (1, 128)),
        "all_zero_conv_fp16": conv_model(np.zeros((32, 3, 3, 16)), rng.standard_normal(32), (8, 8), form="float16"),
        "batch3_conv": conv_model(rng.standard_normal((32, 3, 3, 16)), rng.standard_normal(32), (8, 8), batch=3),
        "tiny_fc": fc_model(rng.standard_normal((8, 6)), rng.standard_normal(8), (1, 6)),
        "hybrid_fc": fc_model(rng.standard_normal((64, 128)), rng.standard_normal(64), (1, 128), form="int8"),
        "gather_fc": gather_fc_model(),
        "stateful_signatures": stateful_model(),
        "int16_fc": int16_fc_model(),
    }


def layer_stack(form="float32", widths=(8, 48, 64, 32), out=16, hw=8, rank=6, seed=0):
    """conv 3×3 → conv 3×3 → conv 1×1 (RELU each) → FULLY_CONNECTED over every pixel, weights stored as `form`
    ('float32', 'float16' behind DEQUANTIZE, 'int8' hybrid per channel) and of low CP / matrix rank `rank` plus
    a little noise (so that low-rank options do little damage)."""
    rng = np.random.default_rng(seed)

    def low_rank(o, k, i):
        cp = np.einsum("or,kr,ir->oki", *(rng.standard_normal((n, rank)) for n in (o, k, i)))
        w = cp + 0.05 * np.std(cp) * rng.standard_normal(cp.shape)
        return w / np.sqrt(k * i * rank)

    sg = Subgraph()
    x = sg.add_tensor(Tensor("input", T.FLOAT32, [1, hw, hw, widths[0]]))
    sg.inputs, chain = [x], []
    for n, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        k = 1 if n == len(widths) - 2 else 3
        w, pre = _weight(sg, f"conv{n}/kernel", low_rank(o, k * k, i).reshape(o, k, k, i), form, 0)
        b = sg.add_constant(f"conv{n}/bias", rng.standard_normal(o).astype(np.float32) * 0.1)
        y = sg.add_tensor(Tensor(f"conv{n}", T.FLOAT32, [1, hw, hw, o]))
        chain += pre + [ops.conv2d(x, w, b, y, padding=PAD["SAME"], activation=ACT["RELU"])]
        x = y
    w, pre = _weight(sg, "fc/weight", low_rank(out, 1, widths[-1]).reshape(out, -1), form, 0)
    y = sg.add_tensor(Tensor("fc", T.FLOAT32, [hw * hw, out]))
    chain += pre + [ops.fully_connected(x, w, sg.add_constant("fc/bias", np.zeros(out, np.float32)), y)]
    sg.operators, sg.outputs = chain, [y]
    return io.to_bytes(Model(subgraphs=[sg]))


def int8_fc_chain(widths=(64, 128, 96, 10), bias=False, rank=8, seed=0):
    """A full-integer int8 chain of FULLY_CONNECTED layers (RELU but the last), int8 weights per output channel
    of low rank `rank` plus a little noise, int32 biases at s_in·s_w or none (`bias`: the TF converter writes a
    Dense(use_bias=False) without one)."""
    rng = np.random.default_rng(seed)

    def quantization(scale, zero=0):
        scale = np.asarray(scale, np.float32).reshape(-1)
        return Quantization.affine(scale, np.full(len(scale), zero))

    sg = Subgraph()
    x = sg.add_tensor(Tensor("input", T.INT8, [1, widths[0]], quantization=quantization([1 / 64])))
    sg.inputs = [x]
    for k, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        w = rng.standard_normal((o, rank)) @ rng.standard_normal((rank, i)) / np.sqrt(i * rank)
        w += 0.05 * np.std(w) * rng.standard_normal(w.shape)
        q, scales = quant.quantize_symmetric_int8(w, axis=0)
        weight = sg.add_constant(f"fc{k}/weight", q, quantization=quantization(scales))
        b = None
        if bias:
            s_b = float(x.quantization.scale[0]) * np.asarray(scales, np.float64).reshape(-1)
            b = sg.add_constant(f"fc{k}/bias", np.round(rng.standard_normal(o) * 0.2 / s_b).astype(np.int32),
                                quantization=quantization(s_b))
        last = k == len(widths) - 2
        y = sg.add_tensor(Tensor(f"fc{k}", T.INT8, [1, o], quantization=quantization([0.04], 0 if last else -128)))
        sg.operators.append(ops.fully_connected(x, weight, b, y, activation=ACT["NONE" if last else "RELU"]))
        x = y
    sg.outputs = [x]
    return io.to_bytes(Model(subgraphs=[sg]))
