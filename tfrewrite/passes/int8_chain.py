"""Low-rank chains inside full-integer int8 models.

The low-rank passes fit their float factors as usual, on the layer's calibration rows — for a full-integer model
those are the layer's *quantized* inputs captured from the int8 model itself (dequantized), so upstream
quantization error is part of the fit. This module then turns the factors into int8 ops:

- the factors before the last are quantized symmetric int8 per tensor: per channel, each rank channel would cost
  a float32 scale and an int64 zero point for the weight and again for its bias (24 bytes beside a few 1-byte
  weights); the last factor, which writes the layer's own output channels, per output channel (per tensor when
  the original weight was). Measured on the int8 VGG fixture at 5x: the same accuracy as per channel (96.11 %);
  balancing the factors first (cross-layer equalization, as `passes.full_int8` does) kept it too but made
  XNNPACK and the builtin kernels drift 43 LSB apart at the output instead of 13, so the factors stay as fitted;
- each new intermediate tensor gets an activation (scale, zero point) from its range on the calibration rows
  (min/max, or percentiles with `--activation-percentile`), computed through the already quantized factors and
  intermediates before it;
- the last factor and the bias are refitted in closed form on the quantized intermediate (`linalg.int8.refit_last`),
  so the chain's final rounding errors are corrected against the original layer's outputs;
- biases are int32 at s_in·s_w[c] (weight scales grown where a bias would overflow); the first ops of a chain get
  zero biases (the builtin conv kernels insist on one);
- the last op writes the original output tensor with its quantization and fused activation. Nothing else in the
  model changes.

Op versions come from the builders (int8 in/out: CONV_2D v3, DEPTHWISE_CONV_2D v3, FULLY_CONNECTED v4, the
versions the TF converter gives its own per-channel full-integer ops).
"""
from __future__ import annotations

import numpy as np

from .. import ops, schema
from ..analysis import static_shape
from ..graph import Operator, Quantization, Subgraph, Tensor
from ..report import Entry
from .common import LayerWeight, RankPolicy, Skip, size_changes

T = schema.TensorType
# The range of a chain's new int8 tensors (`--activation-percentile`): min/max of the calibration values.
DEFAULT_PERCENTILE = 100.0


def is_full_integer(op: Operator) -> bool:
    """int8 activations in and out and an int8 weight: the op runs on the integer kernels."""
    x, w = (list(op.inputs) + [None, None])[:2]
    out = op.outputs[0] if op.outputs else None  # ops without operands (VAR_HANDLE) are none
    return x is not None and w is not None and out is not None and x.type == T.INT8 and w.type == T.INT8 \
        and out.type == T.INT8


def per_tensor(t: Tensor) -> tuple[float, int]:
    q = t.quantization
    if q is None or q.scale is None or len(q.scale) != 1:
        raise Skip("int8 activation without a per-tensor scale")
    zero = int(q.zero_point[0]) if q.zero_point is not None and len(q.zero_point) else 0
    return float(np.float32(q.scale[0])), zero


def check(op: Operator, weight: LayerWeight, policy: RankPolicy, entry: Entry) -> None:
    """Skip what the int8 chains cannot rewrite; a full-integer layer needs its calibration rows."""
    if not is_full_integer(op):
        raise Skip("mixed int8 / float activations")
    if entry.shared:
        raise Skip("full-integer weight shared by several ops (each chain is fitted to its own layer)")
    if policy.extra.get("rows") is None:
        raise Skip("full-integer int8 layer: needs --calibration")
    per_tensor(op.inputs[0])
    per_tensor(op.outputs[0])


def bias_real(op: Operator, channels: int) -> np.ndarray:
    """The original int32 bias as real values (b_q · s_in · s_w[c]); zeros without one."""
    bias = op.inputs[2] if len(op.inputs) > 2 else None
    if bias is None:
        return np.zeros(channels)
    if not bias.is_constant or bias.type != T.INT32 or bias.quantization is None or bias.quantization.scale is None:
        raise Skip("bias is not a constant int32")
    return bias.data.astype(np.float64) * np.asarray(bias.quantization.scale, np.float64)


def _activation(sg: Subgraph, name: str, shape, like: Tensor, scale: float, zero: int) -> Tensor:
    t = sg.add_activation(name, T.INT8, shape, like=like)
    t.quantization = Quantization.affine([scale], [zero])
    return t


class Chain:
    """Quantizes a chain stage by stage on the calibration rows and emits its constants.
    `rows` [N, K·C] are the layer's real-valued inputs (patches of K taps for k×k convs, K = 1 otherwise)."""

    fitted = True  # `PlaceholderChain`: the same tensors and ops, nothing fitted

    def __init__(self, sg: Subgraph, op: Operator, weight: LayerWeight, policy: RankPolicy, taps: int, base: str):
        from ..linalg import fit
        self.sg, self.op, self.base, self.taps = sg, op, base, taps
        self.axis = 0 if weight.per_channel else None
        self.in_scale, _ = per_tensor(op.inputs[0])
        rows = np.asarray(policy.extra["rows"], np.float64)
        w = weight.values.reshape(weight.values.shape[0], -1).astype(np.float64)
        bias = bias_real(op, w.shape[0])
        source = policy.extra.get("target_rows")  # sequential fitting: match the original model's outputs
        self.target = (rows if source is None else np.asarray(source, np.float64)) @ w.T + bias
        self.rows = rows
        self.damping = policy.extra.get("damping", fit.DEFAULT_DAMPING)
        self.percentile = policy.extra.get("activation_percentile", DEFAULT_PERCENTILE)
        self.z = rows.reshape(len(rows), taps, -1)  # [N, K, C]: the chain's current real-valued signal
        self.first_new_tensor, self.entry = len(sg.tensors), None

    def replace(self, ops_: list[Operator]) -> None:
        """Put the chain in the layer's place, unless an op's requantization scale s_in·s_w[c]/s_out is one
        XNNPACK refuses: then the layer stays as it is (its new tensors dropped) and the report says why."""
        from ..linalg import int8
        for new in ops_:
            x, w, out = new.inputs[0], new.inputs[1], new.outputs[0]
            ratio = per_tensor(x)[0] * float(np.max(w.quantization.scale)) / per_tensor(out)[0]
            if not ratio < int8.MAX_REQUANTIZATION_SCALE:
                del self.sg.tensors[self.first_new_tensor:]
                if self.entry is not None:
                    self.entry.drop("output_error", "bias_corrected")
                raise Skip(f"the int8 chain's requantization scale s_in*s_w/s_out would be {ratio:.3g} at "
                           f"{out.name}: XNNPACK accepts below {int8.MAX_REQUANTIZATION_SCALE:g}")
        self.sg.replace_operator(self.op, ops_)

    def weight(self, name: str, values: np.ndarray, axis: int, in_scale: float, bias=None, per_tensor=False
               ) -> tuple[Tensor, Tensor, np.ndarray]:
        """An int8 weight (per channel along `axis` if the layer's weights are and not `per_tensor`) and its int32
        bias (zeros by default) at in_scale·s_w; returns (weight, bias, real weight values)."""
        from ..linalg import int8
        channels = values.shape[axis]
        q_axis = axis if self.axis is not None and not per_tensor else None
        q, scales, b, b_scales = int8.weights_and_bias(values, np.zeros(channels) if bias is None else bias,
                                                      in_scale, q_axis)
        w_t = self.sg.add_constant(f"{self.base}/{name}", q,
                                   quantization=Quantization.symmetric(scales, axis if q_axis is not None else None))
        b_t = self.sg.add_constant(f"{self.base}/{name}_bias", b,
                                   quantization=Quantization.symmetric(b_scales))
        shape = [1] * values.ndim
        if q_axis is not None:
            shape[axis] = -1
        return w_t, b_t, q.astype(np.float64) * scales.astype(np.float64).reshape(shape)

    def intermediate(self, values: np.ndarray, name: str, shape, like: Tensor) -> tuple[Tensor, float]:
        """A new int8 tensor for the real `values` seen on the rows; the signal becomes its quantized values."""
        from ..linalg import int8
        # All zero on the rows (a dead layer): the chain's input scale keeps every requantization scale moderate.
        scale, zero = int8.activation_params(values, self.percentile, fallback=self.in_scale)
        self.z = int8.fake_quant(values, scale, zero)
        return _activation(self.sg, f"{self.base}/{name}", shape, like, scale, zero), scale

    def last(self, name: str, prior: np.ndarray, in_scale: float, entry: Entry, conv: bool
             ) -> tuple[Tensor, Tensor, np.ndarray]:
        """The last factor [out, r] (stored [out, 1, 1, r] for a 1×1 conv), refitted with its bias on the
        quantized intermediate; reports the chain's output error on the rows. Returns real values [out, r]."""
        from ..linalg import int8
        self.entry = entry
        z = self.z.reshape(len(self.z), -1)
        a, _ = int8.refit_last(z, self.target, prior, self.damping)
        a_real = int8.stored(a, self.axis)
        bias = self.target.mean(axis=0) - a_real @ z.mean(axis=0)  # bias correction with the stored factor
        w_t, b_t, a_real = self.weight(name, a.reshape(a.shape[0], 1, 1, -1) if conv else a, 0, in_scale, bias)
        a_real = a_real.reshape(a.shape)
        approx = z @ a_real.T + b_t.data.astype(np.float64) * b_t.quantization.scale.astype(np.float64)
        den = float(np.linalg.norm(self.target))
        entry.output_error = float(np.linalg.norm(approx - self.target)) / den if den > 0 else 0.0
        entry.bias_corrected = True
        return w_t, b_t, a_real


class PlaceholderChain(Chain):
    """A chain that writes the tensors, quantization parameters and ops `Chain` writes, with placeholder values
    and without the calibration rows: what `option_bytes` measures."""

    fitted = False

    def __init__(self, sg: Subgraph, op: Operator, weight: LayerWeight, policy: RankPolicy, taps: int, base: str):
        self.sg, self.op, self.base, self.taps = sg, op, base, taps
        self.axis = 0 if weight.per_channel else None
        self.in_scale = 1.0
        self.z = np.zeros((1, taps, weight.values.shape[-1]))
        self.first_new_tensor, self.entry = len(sg.tensors), None

    def intermediate(self, values: np.ndarray, name: str, shape, like: Tensor) -> tuple[Tensor, float]:
        self.z = np.zeros_like(values)
        return _activation(self.sg, f"{self.base}/{name}", shape, like, 1.0, 0), 1.0

    def last(self, name: str, prior: np.ndarray, in_scale: float, entry: Entry, conv: bool
             ) -> tuple[Tensor, Tensor, np.ndarray]:
        w_t, b_t, a_real = self.weight(name, prior.reshape(prior.shape[0], 1, 1, -1) if conv else prior, 0, in_scale,
                                       np.zeros(prior.shape[0]))
        return w_t, b_t, a_real.reshape(prior.shape)

    def replace(self, ops_: list[Operator]) -> None:
        self.sg.replace_operator(self.op, ops_)


def option_bytes(model, op: Operator, weight: LayerWeight, options: list, policy: RankPolicy, emit) -> list[int]:
    """The file bytes a full-integer chain at each option's rank adds to `model` (negative: frees), counted as
    the rewrite's does-not-pay check counts them (`size_changes`): `emit(sg, op, weight, policy, option,
    PlaceholderChain)` writes the pass's chain (`svd` or `kxk`) with placeholder values."""
    sg = op.subgraph
    return size_changes(model, sg, [lambda o=o: emit(sg, op, weight, policy, o, PlaceholderChain) for o in options])


def svd(sg: Subgraph, op: Operator, weight: LayerWeight, policy: RankPolicy, entry: Entry, left: np.ndarray,
        right: np.ndarray, base: str, chain_type: type = Chain) -> dict:
    """FULLY_CONNECTED or 1×1 CONV_2D → two int8 ops from (left [out, r], right [r, in])."""
    x, out, opts = op.inputs[0], op.outputs[0], op.builtin_options
    r = right.shape[0]
    chain = chain_type(sg, op, weight, policy, 1, base)
    fc = op.builtin == schema.BuiltinOperator.FULLY_CONNECTED
    w1, b1, right_real = chain.weight("lowrank/right", right if fc else right.reshape(r, 1, 1, -1), 0, chain.in_scale,
                                      per_tensor=True)
    right_real = right_real.reshape(r, -1)
    z = chain.z[:, 0, :] @ right_real.T
    if fc:
        keep = bool(getattr(opts, "keepNumDims", False))
        n = right.shape[1]
        mid_shape = (static_shape(x)[:-1] if keep else [int(np.prod(static_shape(x))) // n]) + [r]
        mid, s_mid = chain.intermediate(z, "lowrank/mid", mid_shape, x)
        if x.shape_signature is not None and not keep and any(d < 0 for d in x.shape_signature):
            mid.shape_signature = [-1, r]
        w2, b2, left_real = chain.last("lowrank/left", left, s_mid, entry, conv=False)
        first = ops.fully_connected(x, w1, b1, mid, keep_num_dims=keep)
        second = ops.fully_connected(mid, w2, b2, out, activation=opts.fusedActivationFunction, keep_num_dims=keep)
    else:
        mid, s_mid = chain.intermediate(z, "lowrank/mid", static_shape(out)[:-1] + [r], out)
        w2, b2, left_real = chain.last("lowrank/left", left, s_mid, entry, conv=True)
        first = ops.conv2d(x, w1, b1, mid, stride=(opts.strideH, opts.strideW), padding=opts.padding)
        second = ops.conv2d(mid, w2, b2, out, activation=opts.fusedActivationFunction)
    chain.replace([first, second])
    return {"left": left_real.astype(np.float32), "right": right_real.astype(np.float32)}


def kxk(sg: Subgraph, op: Operator, weight: LayerWeight, policy: RankPolicy, entry: Entry, method: str,
        first: np.ndarray, middle: np.ndarray, last: np.ndarray, base: str, chain_type: type = Chain
        ) -> tuple[dict, np.ndarray]:
    """k×k CONV_2D → 1×1 CONV_2D (first [r_in, in]) → k×k op → 1×1 CONV_2D (last [out, r_out]), all int8. The
    k×k op is a DEPTHWISE_CONV_2D for CP (middle [k·k, r]) or a CONV_2D for Tucker-2 (core [r_out, k·k, r_in]).
    Returns the stored factors (shaped as emitted) and their reconstruction [out, k·k, in]."""
    from ..linalg import cp, tucker
    x, out, opts = op.inputs[0], op.outputs[0], op.builtin_options
    _, kh, kw, i = weight.values.shape
    k, r_in = kh * kw, first.shape[0]
    chain = chain_type(sg, op, weight, policy, k, base)
    w1, b1, first_real = chain.weight(f"{method}/in", first.reshape(r_in, 1, 1, i), 0, chain.in_scale, per_tensor=True)
    z1, s1 = chain.intermediate(chain.z @ first_real.reshape(r_in, i).T, f"{method}/z1",
                                static_shape(x)[:-1] + [r_in], x)
    if method == "cp":  # the depthwise weight [1, kh, kw, r] has its channels on axis 3
        r_out, build = r_in, ops.depthwise_conv2d
        w2, b2, mid_real = chain.weight("cp/depthwise", middle.reshape(1, kh, kw, r_in), 3, s1, per_tensor=True)
        z = np.einsum("nkr,kr->nr", chain.z, mid_real.reshape(k, r_in))
    else:
        r_out, build = middle.shape[0], ops.conv2d
        w2, b2, mid_real = chain.weight("tucker2/core", middle.reshape(r_out, kh, kw, r_in), 0, s1, per_tensor=True)
        z = chain.z.reshape(len(chain.z), -1) @ mid_real.reshape(r_out, -1).T
    z2, s2 = chain.intermediate(z, f"{method}/z2", static_shape(out)[:-1] + [r_out], out)
    w3, b3, last_real = chain.last(f"{method}/out", last, s2, entry, conv=True)
    chain.replace([
        ops.conv2d(x, w1, b1, z1),
        build(z1, w2, b2, z2, stride=(opts.strideH, opts.strideW), padding=opts.padding,
              dilation=(opts.dilationHFactor, opts.dilationWFactor)),
        ops.conv2d(z2, w3, b3, out, activation=opts.fusedActivationFunction)])
    if not chain.fitted:
        return {}, None
    # Contracted pairwise (a three-operand einsum loops over every index at once: VGG16's 512-channel int8 convs
    # spent 1650 of a 2380 s rewrite there).
    if method == "cp":
        approx = cp.cp_reconstruct(last_real, mid_real.reshape(k, r_in), first_real.reshape(r_in, i).T)
    else:
        approx = tucker.tucker2_reconstruct(last_real, mid_real.reshape(r_out, k, r_in), first_real.reshape(r_in, i).T)
    return ({"first": first_real.astype(np.float32), "middle": mid_real.astype(np.float32),
             "last": last_real.reshape(-1, 1, 1, r_out).astype(np.float32)}, approx)
