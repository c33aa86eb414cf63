#!/usr/bin/env python
"""Data-aware fitting at full size (issue 7): wall time and peak memory of

    tfrewrite bench/cache/vgg16.tflite OUT --target-size 5 --calibration calib224.npz

with 64 calibration images of 224x224 (the digits 'calib' split, upsampled 8x8 -> 224 by exact repetition:
224 = 28 * 8). The VGG16 weights are random (bench/make_models.py), so this measures speed and memory only,
not accuracy; accuracy of data-aware fitting is measured on the trained fixtures by bench/reproduce.py.

    .venv/bin/python bench/bench_calibration.py             # writes bench/results/calibration.md
    .venv/bin/python bench/bench_calibration.py --profile   # also profile it (cProfile, stopped after --profile-seconds)

Bar: <= 300 s wall and <= 4 GB peak resident memory on the 2-core machine, measured with
/usr/bin/time -f "%e %M" around the CLI process (Python start-up included).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "bench"))

BAR_SECONDS = 300.0
BAR_KB = 4 * 1024 * 1024  # 4 GiB in the kB /usr/bin/time reports
TFREWRITE = str(ROOT / ".venv" / "bin" / "tfrewrite")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"


def make_calib(path: Path, n: int = 64, size: int = 224) -> None:
    from digits import load_split
    x, _ = load_split("calib", size)
    np.savez(path, image=x[:n])  # 'image' = the model input serving_default_image:0


def timed(cmd: list[str], timeout: float) -> tuple[float, int, str, bool]:
    """(wall s, peak RSS kB, stdout, finished) of one process under /usr/bin/time, stopped after `timeout` s
    (/usr/bin/time then still reports the peak RSS of the stopped process)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        p = subprocess.run(["/usr/bin/time", "-o", tf.name, "-f", "%e %M", "timeout", str(int(timeout)), *cmd],
                           capture_output=True, text=True, cwd=ROOT)
        finished = p.returncode == 0
        if p.returncode not in (0, 124):
            raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
        wall, kb = tf.read().split()[-2:]
    return float(wall), int(kb), p.stdout, finished


PROFILE = """
import cProfile, pstats, signal, sys
def stop(*_):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, stop)
signal.alarm(int(sys.argv[1]))
from tfrewrite import cli
pr = cProfile.Profile()
pr.enable()
try:
    code = cli.main(sys.argv[2:])
except KeyboardInterrupt:
    code = 'stopped'
pr.disable()
print('exit:', code, flush=True)
st = pstats.Stats(pr)
st.sort_stats('tottime').print_stats(22)
st.sort_stats('cumulative').print_stats(30)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--target-size", type=float, default=5.0)
    ap.add_argument("--profile", action="store_true", help="also run it under cProfile and list the top functions")
    ap.add_argument("--timeout", type=float, default=900, help="stop the timed run after this many seconds")
    ap.add_argument("--profile-seconds", type=float, default=300,
                    help="stop the profiled run after this many seconds and print what it spent them on")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration.md"))
    a = ap.parse_args(argv)
    import make_models
    src = make_models.ensure("vgg16")
    work = ROOT / "bench" / "cache" / "calibration"
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib224.npz"
    make_calib(calib, a.images)
    out = work / "vgg16_t5.tflite"
    load_before = os.getloadavg()
    cmd = [TFREWRITE, os.path.relpath(src, ROOT), os.path.relpath(out, ROOT), "--target-size", f"{a.target_size:g}",
           "--calibration", os.path.relpath(calib, ROOT)]
    print("running:", " ".join(cmd), flush=True)
    wall, kb, stdout, finished = timed(cmd, a.timeout)
    load_after = os.getloadavg()
    total = next((line for line in stdout.splitlines() if line.startswith("total:")), "")
    budget = next((line for line in stdout.splitlines() if line.startswith("budget:")), "")
    if not finished:
        total = f"(stopped after {a.timeout:.0f} s: not finished)"
    print(f"{wall:.1f} s, {kb / 1024:.0f} MB; {total}; {budget}", flush=True)
    prof = None
    if a.profile or not finished or wall > BAR_SECONDS or kb > BAR_KB:
        pcmd = [sys.executable, "-c", PROFILE, str(int(a.profile_seconds)), *cmd[1:], "--quiet"]
        print(f"profiling (stopped after {a.profile_seconds:.0f} s)", flush=True)
        p = subprocess.run(pcmd, capture_output=True, text=True, cwd=ROOT)
        prof = [line.rstrip() for line in p.stdout.splitlines() if line.strip()]
        prof = [line for line in prof if not line.startswith("INFO")]
    ok_t, ok_m = finished and wall <= BAR_SECONDS, kb <= BAR_KB
    md = ["# Data-aware fitting at full size: VGG16, `--target-size 5`, 64 calibration images (issue 7)", "",
          f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
          f"- Machine: {machine()}",
          f"- Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}",
          f"- Command (timed with `/usr/bin/time -f \"%e %M\"`, Python start-up included): `{' '.join(cmd)}`",
          f"- Calibration: {a.images} images of 224x224x3, the digits `calib` split upsampled by exact repetition "
          "(`load_split('calib', 224)[:64]`, saved with `np.savez(path, image=x)`). The VGG16 weights are random "
          "(`bench/make_models.py`), so this measures the speed and memory of data-aware fitting, not accuracy; "
          "accuracy is in [`bench/RESULTS.md`](../RESULTS.md) (trained fixtures).",
          f"- Reproduce: `.venv/bin/python bench/bench_calibration.py{' --profile' if a.profile else ''}`", "",
          "| measure | result | bar | met |", "|---|---|---|---|",
          f"| wall time | {wall:.1f} s{'' if finished else ' (stopped: not finished)'} | ≤ 300 s | {'yes' if ok_t else 'NO'} |",
          f"| peak resident memory | {kb / 1024:.0f} MB ({kb / 1024 ** 2:.2f} GiB) | ≤ 4 GiB | {'yes' if ok_m else 'NO'} |",
          "", "tfrewrite's summary lines:", "", "```", total, budget, "```"]
    if prof:
        md += ["", f"Profile (cProfile around `tfrewrite.cli.main`, the same command with `--quiet`, stopped by "
               f"SIGALRM after {a.profile_seconds:.0f} s if still running; sorted by tottime, then cumulative):",
               "", "```", *prof, "```"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if ok_t and ok_m else 1


if __name__ == "__main__":
    sys.exit(main())
