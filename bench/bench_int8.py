#!/usr/bin/env python
"""Full-integer int8 models (issue 14): low rank inside int8 models, and `--quantize full-int8`.

1. `--target-size X --calibration calib.npz` (VGG: X = 3, 5; MobileNetV2: 1.5, 2, 3, with `--sequential`;
   100 calibration images) on the full-integer fixtures
   (vgg_digits_int8: TF converter; mobilenetv2_digits_int8: ai-edge-quantizer) against the float fixture
   compressed the same way: file size, test accuracy (360 images), latency of the int8 rewrite against the int8
   original (interleaved medians, XNNPACK, 1 thread), and the largest XNNPACK on/off difference of the scores.
2. Float fixture → `--target-size 5 --calibration calib.npz --quantize full-int8` (5x smaller than
   `--quantize full-int8` alone): size against float32, accuracy, XNNPACK on/off.
3. `--quantize full-int8` alone (ai-edge-quantizer static_wi8_ai8) against the TF converter's full-integer
   output (vgg_digits_int8.tflite, same 100 calibration images).

    .venv/bin/python bench/bench_int8.py [vgg] [mobilenetv2]     # writes bench/results/int8.md (int8_KEY.md
                                                                  # for a subset)
4. `--mixed`: `--rank auto --prune-channels auto --target-size X --calibration calib.npz` (the budget mixes
   channel shares with ranks) on the int8 and the float fixture at the same X, with the same columns:

    .venv/bin/python bench/bench_int8.py --mixed [mobilenetv2] [vgg]  # writes bench/results/int8_mixed.md
5. `--per-tensor`: what per-tensor weights do to the int8 original (every pointwise CONV_2D, every CONV_2D and
   FULLY_CONNECTED, every layer with the DEPTHWISE_CONV_2D too: accuracy, bytes), then item 4 with the int8 rewrite
   also given `--per-tensor auto`, beside the float and the int8 rewrite without it:

    .venv/bin/python bench/bench_int8.py --per-tensor [mobilenetv2] [vgg]  # writes bench/results/int8_per_tensor.md
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT))
FIX = ROOT / "fixtures"
MODELS = {"vgg": ("vgg_digits.tflite", "vgg_digits_int8.tflite", 32),
          "mobilenetv2": ("mobilenetv2_digits.tflite", "mobilenetv2_digits_int8.tflite", 96)}
# (target, sequential). MobileNetV2 is compact already: at 3x both the float and the int8 rewrite lose most of the
# accuracy, so it is measured at 1.5x and 2x too, with --sequential (each layer fitted on the already rewritten
# layers' activations), which the int8 rewrite needs (1.5x: 77.5 % without, 91.4 % with).
TARGETS = {"vgg": ((3, False), (5, False)),
           "mobilenetv2": ((1.5, False), (1.5, True), (2, True), (3, True))}
MIXED_TARGETS = {"vgg": (3, 5), "mobilenetv2": (1.5, 2, 3)}


def data_files(tmp: Path, source: Path, size: int) -> tuple[Path, Path]:
    from digits import load_split
    from tfrewrite import io
    (name, _), = io.read(source).signature_defs[0].inputs
    calib, timing = tmp / f"calib{size}.npz", tmp / f"time{size}.npz"
    np.savez(calib, **{name: load_split("calib", size)[0]})
    np.savez(timing, **{name: load_split("test", size)[0][:16]})
    return calib, timing


def xnnpack_lsb(path: Path, size: int, count: int = 48) -> float:
    """Largest |scores(XNNPACK on) − scores(off)| over `count` test images, in LSB of the int8 scores."""
    from digits import load_split
    from tfrewrite import io, verify
    x, _ = load_split("test", size)
    on, off = (verify.run(path, [[im[None]] for im in x[:count]], xnnpack=xnn) for xnn in (True, False))
    diff = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(on, off))
    last = io.read(path).main.operators[-1]
    q = last.inputs[0].quantization if last.builtin == 6 else None  # DEQUANTIZE
    return diff / float(q.scale[0]) if q is not None and q.scale is not None else diff


def where_bytes_go(path) -> tuple[int, int]:
    """(weight and bias bytes, quantization parameter bytes: float32 scales and int64 zero points) of a file."""
    from tfrewrite import io
    model = io.read(path)
    buffers, params = {}, 0
    for sg in model.subgraphs:
        for t in sg.tensors:
            if t.is_constant:
                buffers[id(t.buffer)] = t.buffer.nbytes
            q = t.quantization
            if q is not None and q.scale is not None:
                params += 4 * len(q.scale) + 8 * len(q.zero_point if q.zero_point is not None else [])
    return sum(buffers.values()), params


def row(label, path, base_bytes, size, t0=None):
    from digits import tflite_accuracy
    seconds = None if t0 is None else time.monotonic() - t0  # the rewrite's, before the accuracy run
    acc = tflite_accuracy(path, "test", size)
    weights, qparams = where_bytes_go(path)
    return {"label": label, "bytes": os.path.getsize(path), "ratio": base_bytes / os.path.getsize(path),
            "acc": acc, "seconds": seconds, "weights": weights,
            "qparams": qparams}


def int8_row(label, out, isrc, timing, size, t0):
    """`row` for an int8 rewrite, with its latency against the int8 original and its XNNPACK on/off gap."""
    from tfrewrite import verify
    r = row(label, out, isrc.stat().st_size, size, t0)
    c = verify.compare(isrc, out, data=timing, runs=30)
    r["speedup"] = c["a"]["latency_ms"] / c["b"]["latency_ms"]
    r["latency"] = (c["a"]["latency_ms"], c["b"]["latency_ms"])
    r["lsb"] = xnnpack_lsb(out, size)
    return r


def originals(tmp: Path, key: str):
    """(float fixture, int8 fixture, image size, calibration file, timing file, their table rows)."""
    float_name, int8_name, size = MODELS[key]
    fsrc, isrc = FIX / float_name, FIX / int8_name
    calib, timing = data_files(tmp, fsrc, size)
    rows = [row(f"float original ({float_name})", fsrc, fsrc.stat().st_size, size),
            row(f"int8 original ({int8_name})", isrc, isrc.stat().st_size, size)]
    rows[1]["lsb"] = xnnpack_lsb(isrc, size)
    return fsrc, isrc, size, calib, timing, rows


def mixed(keys):
    """Item 4: the budget mixing channel shares with ranks, int8 and float fixture at the same target."""
    from tfrewrite import rewrite
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-int8-mixed-"))
    results = {}
    for key in keys:
        fsrc, isrc, size, calib, timing, rows = originals(tmp, key)
        for target in MIXED_TARGETS[key]:
            for kind, src in (("float", fsrc), ("int8", isrc)):
                out = tmp / f"{key}_{kind}_mixed{target}.tflite"
                t0 = time.monotonic()
                rewrite.run(src, out, rewrite.Options(target_size=target, calibration=str(calib), rank="auto",
                                                      prune_channels="auto"))
                label = f"{kind} --rank auto --prune-channels auto --target-size {target}"
                rows.append(int8_row(label, out, isrc, timing, size, t0) if kind == "int8"
                            else row(label, out, src.stat().st_size, size, t0))
            print(key, target, rows[-2:], flush=True)
        results[key] = rows
    write(results, load, "int8_mixed.md")


def all_per_tensor(isrc: Path, out: Path, which) -> None:
    """The int8 original with every layer `which(op)` accepts among `passes.per_tensor.candidates` requantized
    per tensor (no budget, no data: the weights and biases alone)."""
    from tfrewrite import io
    from tfrewrite.passes import per_tensor
    from tfrewrite.plan import RunContext
    model = io.read(isrc)
    ctx = RunContext()
    ctx.remember_input(model)
    ctx.per_tensor = {id(op): 0.0 for op in per_tensor.candidates(model, ctx) if which(op)}
    entries = per_tensor.run(model, ctx)
    assert all(e.action == "requantized" for e in entries), [e.reason for e in entries]
    io.write(model, out)


def per_tensor_table(keys):
    """Item 5: per-tensor weights on the int8 original, then the mixed budget with and without them."""
    from tfrewrite import rewrite, schema
    OP = schema.BuiltinOperator
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-int8-per-tensor-"))
    kinds = {"every pointwise CONV_2D": lambda op: op.builtin == OP.CONV_2D and op.inputs[1].shape[1:3] == [1, 1],
             "every CONV_2D and FULLY_CONNECTED": lambda op: op.builtin != OP.DEPTHWISE_CONV_2D,
             "every CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED": lambda op: True}
    results = {}
    for key in keys:
        fsrc, isrc, size, calib, timing, rows = originals(tmp, key)
        for i, (label, which) in enumerate(kinds.items()):
            out = tmp / f"{key}_int8_all_per_tensor{i}.tflite"
            all_per_tensor(isrc, out, which)
            rows.append(int8_row(f"int8 original, {label} per tensor", out, isrc, timing, size, None))
        for target in MIXED_TARGETS[key]:
            for kind, src, extra in (("float", fsrc, {}), ("int8", isrc, {}), ("int8", isrc, {"per_tensor": "auto"})):
                out = tmp / f"{key}_{kind}_mixed{target}{'_pt' * bool(extra)}.tflite"
                t0 = time.monotonic()
                rewrite.run(src, out, rewrite.Options(target_size=target, calibration=str(calib), rank="auto",
                                                      prune_channels="auto", **extra))
                label = f"{kind} --rank auto --prune-channels auto --target-size {target}" + \
                    " --per-tensor auto" * bool(extra)
                rows.append(int8_row(label, out, isrc, timing, size, t0) if kind == "int8"
                            else row(label, out, src.stat().st_size, size, t0))
            print(key, target, rows[-3:], flush=True)
        results[key] = rows
    write(results, load, "int8_per_tensor.md" if set(keys) == set(MODELS) else f"int8_per_tensor_{'_'.join(keys)}.md",
          "Full-integer int8: per-tensor weights (`--per-tensor auto`) in the mixed budget")


def main():
    from tfrewrite import rewrite, verify
    if sys.argv[1:2] == ["--mixed"]:
        return mixed(sys.argv[2:] or ["mobilenetv2", "vgg"])
    if sys.argv[1:2] == ["--per-tensor"]:
        return per_tensor_table(sys.argv[2:] or ["mobilenetv2", "vgg"])
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    results = {}
    keys = sys.argv[1:] or list(MODELS)
    for key in keys:
        fsrc, isrc, size, calib, timing, rows = originals(tmp, key)
        for target, sequential in TARGETS[key]:
            for kind, src in (("float", fsrc), ("int8", isrc)):
                out = tmp / f"{key}_{kind}_t{target}{'_seq' * sequential}.tflite"
                t0 = time.monotonic()
                rewrite.run(src, out, rewrite.Options(target_size=target, calibration=str(calib),
                                                      sequential=sequential))
                label = f"{kind} --target-size {target}{' --sequential' * sequential}"
                rows.append(int8_row(label, out, isrc, timing, size, t0) if kind == "int8"
                            else row(label, out, src.stat().st_size, size, t0))
            print(key, target, rows[-2:], flush=True)
        out = tmp / f"{key}_float_t5_fullint8.tflite"
        t0 = time.monotonic()
        rewrite.run(fsrc, out, rewrite.Options(target_size=5, calibration=str(calib), quantize="full-int8"))
        r = row("float --target-size 5 --quantize full-int8", out, fsrc.stat().st_size, size, t0)
        c = verify.compare(fsrc, out, data=timing, runs=30)
        r["speedup_vs_float"] = c["a"]["latency_ms"] / c["b"]["latency_ms"]
        r["lsb"] = xnnpack_lsb(out, size)
        rows.append(r)
        out = tmp / f"{key}_float_fullint8.tflite"
        t0 = time.monotonic()
        rewrite.run(fsrc, out, rewrite.Options(calibration=str(calib), quantize="full-int8"))
        r = row("float --quantize full-int8 (ai-edge-quantizer)", out, fsrc.stat().st_size, size, t0)
        r["lsb"] = xnnpack_lsb(out, size)
        rows.append(r)
        print(key, rows[-2:], flush=True)
        results[key] = rows
    write(results, load, "int8.md" if set(keys) == set(MODELS) else f"int8_{'_'.join(keys)}.md")


def write(results, load, name, title="Full-integer int8: low rank inside int8 models, and `--quantize full-int8`"):
    from importlib.metadata import version
    out = [f"# {title}", "",
           f"{datetime.date.today()}, `bench/bench_int8.py`, ai-edge-litert {version('ai-edge-litert')}, "
           f"ai-edge-quantizer {version('ai-edge-quantizer')}, 2-core shared machine, load average at start "
           f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}. Calibration: the 100 `calib` images; accuracy: top-1 on "
           "the 360 `test` images (batch 1, XNNPACK). Latency: the int8 rewrite against the int8 original, "
           "interleaved, 30 runs each on 16 images, medians (1 thread, XNNPACK). XNNPACK on/off: the largest "
           "difference of the scores over 48 test images, in LSB of the int8 scores (the whole network: "
           "differences of single ops, each within 1 LSB, compound). Weights: the bytes of all constants (weights, "
           "biases); q-params: float32 scales and int64 zero points.", ""]
    for key, rows in results.items():
        out += [f"## {key}", "", "| model | file | weights / q-params | smaller | test top-1 | "
                "int8 speed-up vs int8 original | XNNPACK on/off (LSB) | rewrite time |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            speed = f"{r['speedup']:.2f}x ({r['latency'][0]:.3f} → {r['latency'][1]:.3f} ms)" if "speedup" in r else \
                (f"{r['speedup_vs_float']:.2f}x vs float original" if "speedup_vs_float" in r else "-")
            lsb = f"{r['lsb']:.0f}" if "lsb" in r else "-"
            out.append(f"| {r['label']} | {r['bytes'] / 1e3:.1f} kB | {r['weights'] / 1e3:.1f} / "
                       f"{r['qparams'] / 1e3:.1f} kB | {r['ratio']:.2f}x | {100 * r['acc']:.2f} % | {speed} | {lsb} |")
            out[-1] += f" {r['seconds']:.0f} s |" if r["seconds"] is not None else " - |"
        out.append("")
    path = ROOT / "bench" / "results" / name
    path.write_text("\n".join(out) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
