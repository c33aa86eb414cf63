#!/usr/bin/env python
"""Structured channel pruning benchmark: real speed-up against MAC reduction, and accuracy without retraining.

    .venv/bin/python bench/bench_prune_channels.py               # writes bench/results/prune_channels.md
    .venv/bin/python bench/bench_prune_channels.py --runs 30 --skip-vgg16

1. Full-size MobileNetV2 and VGG16 (random weights, bench/make_models.py, 224×224): `--prune-channels F`
   without data for F = 0.15, 0.25, 0.35, 0.5; MACs, parameters and file size before/after; latency of original
   and pruned measured interleaved in one run (verify.time_interleaved: medians, 1 thread, XNNPACK on), and the
   speed-up divided by the MAC reduction (the goal: ≥ 0.8). XNNPACK on/off agreement on one seeded input.
2. The trained digit fixtures at F = 0.25, 0.5 and with the channel budget (`--prune-channels auto
   --target-macs 2 / 3`), without and with `--calibration` (the 100 calibration images): top-1 accuracy on the
   360 held-out test images, MAC reduction.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "fixtures"))

from tfrewrite import rewrite, verify  # noqa: E402

OUT = ROOT / "bench" / "cache" / "prune_channels"
FIXTURES = [("vgg_digits", 32), ("vgg_digits_int8", 32), ("mobilenetv2_digits", 96), ("resnet_concat_digits", 32)]
TARGETS = (2, 3)  # --target-macs of the channel budget on the fixtures


def prune(src: Path, fraction, calibration: Path | None = None, tag: str = "",
          recipe: Path | None = None, target_macs: float | None = None) -> tuple[Path, dict, float]:
    out = OUT / f"{src.stem}_c{fraction}{target_macs or ''}{tag}.tflite"
    t0 = time.perf_counter()
    report = rewrite.run(src, out, rewrite.Options(prune_channels=fraction, recipe=str(recipe) if recipe else None,
                                                   calibration=str(calibration) if calibration else None,
                                                   target_macs=target_macs))
    return out, report["totals"], time.perf_counter() - t0


def full_size(name: str, fractions, runs: int) -> list[str]:
    import make_models
    src = Path(make_models.ensure(name))
    rows = []
    for f in fractions:
        out, tot, seconds = prune(src, f)
        orig_ms, pruned_ms = verify.time_interleaved([src, out], runs=runs)
        x = verify.random_inputs(verify.interpreter(out), 1)
        a = verify.run(out, x)[0][0]
        b = verify.run(out, x, xnnpack=False)[0][0]
        agree = float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) or 1))
        mac_x = tot["macs_before"] / tot["macs_after"]
        speed = orig_ms / pruned_ms
        rows.append(f"| {name} | {f} | {tot['macs_before'] / 1e6:.0f}M → {tot['macs_after'] / 1e6:.0f}M "
                    f"({mac_x:.2f}×) | {tot['params_before'] / 1e6:.2f}M → {tot['params_after'] / 1e6:.2f}M | "
                    f"{tot['file_bytes_before'] / 1e6:.1f} → {tot['file_bytes_after'] / 1e6:.1f} MB | "
                    f"{orig_ms:.1f} → {pruned_ms:.1f} ms ({speed:.2f}×) | {speed / mac_x:.2f} | {agree:.1e} | "
                    f"{seconds:.1f} s | {os.getloadavg()[0]:.1f} |")
        print(rows[-1], flush=True)
    return rows


def fixtures(fractions) -> list[str]:
    from digits import load_split, tflite_accuracy
    import ai_edge_litert.interpreter as lite
    rows = []
    for name, size in FIXTURES:
        src = ROOT / "fixtures" / f"{name}.tflite"
        if not src.exists():
            continue
        x, _ = load_split("calib", size)
        it = lite.Interpreter(model_path=str(src))
        calib = OUT / f"calib_{name}.npz"
        np.savez(calib, **{it.get_input_details()[0]["name"]: x})
        base = tflite_accuracy(src, "test", size)
        rows.append(f"| {name} | original | - | {100 * base:.2f} % | - |")
        for f in fractions:
            for cal in (None, calib):
                out, tot, seconds = prune(src, f, cal, "_cal" if cal else "")
                acc = tflite_accuracy(out, "test", size)
                rows.append(f"| {name} | {f} | {'yes' if cal else 'no'} | {100 * acc:.2f} % "
                            f"({100 * (acc - base):+.2f}) | {tot['macs_before'] / tot['macs_after']:.2f}× | "
                            f"{seconds:.1f} s |")
                print(rows[-1], flush=True)
        for target in TARGETS:
            # The budget chooses each group's share (`--prune-channels auto --target-macs X`).
            for cal in (None, calib):
                out, tot, seconds = prune(src, "auto", cal, "_cal" if cal else "", target_macs=target)
                acc = tflite_accuracy(out, "test", size)
                rows.append(f"| {name} | auto, `--target-macs {target:g}` | {'yes' if cal else 'no'} | "
                            f"{100 * acc:.2f} % ({100 * (acc - base):+.2f}) | "
                            f"{tot['macs_before'] / tot['macs_after']:.2f}× | {seconds:.1f} s |")
                print(rows[-1], flush=True)
        if name.startswith("mobilenetv2"):
            # Practical tools prune inside the inverted-residual blocks first: keep the residual streams (the
            # project layers' outputs, which every ADD of a stage ties together) whole.
            recipe = OUT / "keep_residual_streams.json"
            recipe.write_text('{"rules": [{"match": "project", "prune_channels": 0}]}')
            for f in (0.5, 0.6):
                out, tot, seconds = prune(src, f, calib, "_cal_streams", recipe)
                acc = tflite_accuracy(out, "test", size)
                rows.append(f"| {name}, residual streams kept (recipe `project` → 0) | {f} | yes | "
                            f"{100 * acc:.2f} % ({100 * (acc - base):+.2f}) | "
                            f"{tot['macs_before'] / tot['macs_after']:.2f}× | {seconds:.1f} s |")
                print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--skip-vgg16", action="store_true")
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--fractions", default="0.15,0.25,0.35,0.5", help="shares for the full-size models")
    args = p.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    lines = [f"# Structured channel pruning ({started:%Y-%m-%d %H:%M} UTC)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared); "
             f"load average at start {load_before[0]:.1f}. Command: `.venv/bin/python bench/bench_prune_channels.py "
             f"--runs {args.runs} --fractions {args.fractions}{' --skip-vgg16' if args.skip_vgg16 else ''}"
             f"{' --skip-full' if args.skip_full else ''}`.", ""]
    if not args.skip_full:
        lines += ["## Full-size models, random weights, no data (latency: interleaved medians, 1 thread, XNNPACK)",
                  "", "| model | F | MACs | params | file | latency | speed-up / MAC reduction | XNNPACK on/off "
                  "max rel diff | rewrite time | load |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name in ["mobilenetv2"] + ([] if args.skip_vgg16 else ["vgg16"]):
            lines += full_size(name, fractions, args.runs)
        lines.append("")
    lines += ["## Trained digit fixtures (no retraining): top-1 on the 360 test images", "",
              "| fixture | F | calibration (100 images) | accuracy (vs original) | MAC reduction | rewrite time |",
              "|---|---|---|---|---|---|"]
    lines += fixtures([0.25, 0.5])
    load_after = os.getloadavg()
    lines += ["", f"Load average at the end: {load_after[0]:.1f}."]
    (ROOT / "bench" / "results" / "prune_channels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
