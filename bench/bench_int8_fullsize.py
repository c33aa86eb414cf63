#!/usr/bin/env python
"""Low rank inside full-size full-integer models (issue 14): wall time and peak memory of

    tfrewrite bench/cache/MODEL_int8.tflite OUT --target-size 3 --calibration calib224.npz

for MobileNetV2 and VGG16 made full-integer by the TF converter (`bench/make_models.py`: random seeded weights,
int8 activations, per-channel int8 weights, float input and output), with 64 calibration images of 224x224 (the
digits 'calib' split upsampled by exact repetition, as `bench/bench_calibration.py`). The weights are random,
so this measures the rewrite's speed and memory (and that the result runs with XNNPACK on and off), not accuracy.

    .venv/bin/python bench/bench_int8_fullsize.py [mobilenetv2] [vgg16]   # writes bench/results/int8_fullsize.md

Timed with /usr/bin/time -f "%e %M %U %S" around the CLI process (Python start-up included): wall time, peak
resident memory and CPU time (user + system; on the shared machine the wall time says more about the load).
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

TARGET = 3
IMAGES = 64
TIMEOUT = 1800


def xnnpack_lsb(path: Path, calib: Path, count: int = 2) -> tuple[float, bool]:
    """Largest |scores(XNNPACK on) − scores(off)| over `count` calibration images in LSB of the int8 scores
    before the output DEQUANTIZE, and whether every output is finite."""
    from tfrewrite import io, verify
    with np.load(calib) as z:
        x = z["image"][:count]
    on, off = (verify.run(path, [[im[None]] for im in x], xnnpack=xnn) for xnn in (True, False))
    diff = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(on, off))
    last = io.read(path).main.operators[-1]
    q = last.inputs[0].quantization if last.builtin == 6 else None  # DEQUANTIZE
    finite = all(np.all(np.isfinite(o[0])) for o in on + off)
    return (diff / float(q.scale[0]) if q is not None and q.scale is not None else diff), finite


def timed(cmd: list[str]) -> tuple[float, int, float, str, bool]:
    """(wall s, peak RSS kB, CPU s, stdout, finished) of one process, stopped after TIMEOUT s."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        p = subprocess.run(["/usr/bin/time", "-o", tf.name, "-f", "%e %M %U %S", "timeout", str(TIMEOUT), *cmd],
                           capture_output=True, text=True, cwd=ROOT)
        if p.returncode not in (0, 124, 143):  # 143: tfrewrite stopped by timeout's SIGTERM
            raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
        wall, kb, user, system = tf.read().split()[-4:]
    return float(wall), int(kb), float(user) + float(system), p.stdout, p.returncode == 0


def main() -> int:
    import make_models
    from bench_calibration import machine, make_calib
    names = sys.argv[1:] or ["mobilenetv2", "vgg16"]
    work = ROOT / "bench" / "cache" / "int8_fullsize"
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib224.npz"
    make_calib(calib, IMAGES)
    rows = []
    load = os.getloadavg()
    for name in names:
        src = Path(make_models.ensure(f"{name}_int8"))
        out = work / f"{name}_int8_t{TARGET}.tflite"
        cmd = [str(ROOT / ".venv" / "bin" / "tfrewrite"), os.path.relpath(src, ROOT), os.path.relpath(out, ROOT),
               "--target-size", str(TARGET), "--calibration", os.path.relpath(calib, ROOT)]
        print("running:", " ".join(cmd), flush=True)
        wall, kb, cpu, stdout, finished = timed(cmd)
        lines = [line for line in stdout.splitlines() if line.startswith(("total:", "budget:", "output error:"))]
        lsb, finite = xnnpack_lsb(out, calib) if finished else (float("nan"), False)
        rows.append((name, src, out if finished else None, wall, kb, cpu, finished, lines, lsb, finite))
        print(rows[-1], flush=True)
    md = [f"# Low rank inside full-size full-integer models: `--target-size {TARGET}` with {IMAGES} calibration "
          "images (issue 14)", "",
          f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
          f"- Machine: {machine()}; load average (1/5/15 min) at the start {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} (shared with other jobs)",
          "- Models: `bench/make_models.py` `mobilenetv2_int8`, `vgg16_int8` (TF converter, full-integer, random "
          "seeded weights, float input and output). Calibration: the digits `calib` split upsampled to 224x224 "
          "(`bench/bench_calibration.py`'s `make_calib`).",
          "- Reproduce: `.venv/bin/python bench/bench_int8_fullsize.py`", "",
          "| model | input file | output file | wall time | CPU time | peak resident memory | XNNPACK on/off (LSB "
          "of the int8 scores, 2 images) | outputs finite |", "|---|---|---|---|---|---|---|---|"]
    for name, src, out, wall, kb, cpu, finished, lines, lsb, finite in rows:
        size_out = f"{out.stat().st_size / 1e6:.1f} MB" if out is not None else "not finished"
        md.append(f"| {name}_int8 | {src.stat().st_size / 1e6:.1f} MB | {size_out} | {wall:.0f} s"
                  f"{'' if finished else ' (stopped)'} | {cpu:.0f} s | {kb / 1024:.0f} MB | {lsb:.0f} | "
                  f"{'yes' if finite else 'no'} |")
    for name, *_, lines, _lsb, _finite in rows:
        md += ["", f"{name}_int8, tfrewrite's summary lines:", "", "```", *lines, "```"]
    path = ROOT / "bench" / "results" / "int8_fullsize.md"
    path.write_text("\n".join(md) + "\n")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
