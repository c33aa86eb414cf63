"""Re-serialization of the full-size VGG16: tfrewrite's reader/writer vs the stock flatbuffer object classes.

Each measurement runs in a fresh process (wall time and peak resident memory from wait4), the two
methods interleaved, `--repeats` times; medians are reported. Writes bench/results/io.md.

    python bench/bench_io.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = HERE / "cache" / "vgg16.tflite"

TFREWRITE = """
import sys
from tfrewrite import io
io.write(io.read(sys.argv[1]), sys.argv[2])
"""

NAIVE = """
import sys, flatbuffers
from ai_edge_litert import schema_py_generated as s
with open(sys.argv[1], 'rb') as f:
    data = bytearray(f.read())
m = s.ModelT.InitFromPackedBuf(data, 0)
b = flatbuffers.Builder(1024)
b.Finish(m.Pack(b), file_identifier=b'TFL3')
with open(sys.argv[2], 'wb') as f:
    f.write(b.Output())
"""


def measure(code: str, src: Path, dst: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in bytes) of one fresh process."""
    if dst.exists():
        dst.unlink()
    subprocess.run(["sync"])
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(dst)], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"benchmark process failed: {code.splitlines()[2]}")
    return wall, usage.ru_maxrss * 1024


def python_startup() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import numpy, flatbuffers"], check=True)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not MODEL.exists():
        subprocess.run([sys.executable, str(HERE / "make_models.py")], check=True)
    size = MODEL.stat().st_size
    load_before = os.getloadavg()
    results = {"tfrewrite": [], "naive": []}
    with tempfile.TemporaryDirectory(dir=HERE / "cache") as tmp:
        for r in range(args.repeats):
            order = ["tfrewrite", "naive"] if r % 2 == 0 else ["naive", "tfrewrite"]
            for name in order:
                code = TFREWRITE if name == "tfrewrite" else NAIVE
                wall, rss = measure(code, MODEL, Path(tmp) / f"{name}.tflite")
                results[name].append((wall, rss))
                print(f"run {r} {name:9s} {wall:6.2f} s  {rss / 1e6:7.1f} MB", flush=True)
        same = (Path(tmp) / "tfrewrite.tflite").stat().st_size
    startup = python_startup()
    rows = []
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rss = statistics.median(m for _, m in runs)
        rows.append((name, wall, rss))
    t, n = rows
    lines = [
        "# Re-serializing the full-size VGG16",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {_cpu()}, Python {platform.python_version()}",
        f"- load average (1/5/15 min) before / after: {'/'.join(f'{v:.2f}' for v in load_before)} / "
        f"{'/'.join(f'{v:.2f}' for v in os.getloadavg())} (the machine is shared)",
        f"- model: `bench/cache/vgg16.tflite` ({size / 1e6:.1f} MB, keras VGG16 weights=None, made by "
        "`bench/make_models.py`)",
        f"- command: `python bench/bench_io.py --repeats {args.repeats}` (each run a fresh process, methods "
        "interleaved, medians; includes Python start-up of about "
        f"{startup:.2f} s)",
        "",
        "| method | wall (s) | peak RSS (MB) | RSS / file size |",
        "|---|---|---|---|",
    ]
    for name, wall, rss in rows:
        label = "tfrewrite `io.read` + `io.write`" if name == "tfrewrite" else \
            "stock object API (`ModelT` unpack + pack)"
        lines.append(f"| {label} | {wall:.2f} | {rss / 1e6:.0f} | {rss / size:.2f}x |")
    lines += ["", f"tfrewrite is {n[1] / t[1]:.1f}x faster and uses {n[2] / t[2]:.1f}x less memory than the "
              f"naive baseline. Output size {same / 1e6:.1f} MB. Unchanged weights are copied file to file "
              "(`copy_file_range`), so they never enter the process's memory.", ""]
    out = HERE / "results" / "io.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
