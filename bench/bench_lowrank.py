#!/usr/bin/env python
"""Low-rank benchmark (issue 3): rewrite time, peak memory, size and speed of low-rank VGG16, and the
held-out accuracy of the low-rank VGG digits fixture.

    .venv/bin/python bench/bench_lowrank.py                 # writes bench/results/lowrank.md
    .venv/bin/python bench/bench_lowrank.py --repeat 3      # time each rewrite command 3 times (median)
    .venv/bin/python bench/bench_lowrank.py --skip-vgg16    # fixture accuracy table only

VGG16 (bench/cache/vgg16.tflite, random init, 553 MB; built by `python bench/make_models.py vgg16`):
  * `tfrewrite vgg16.tflite OUT --fc-rank 64`   (the three FULLY_CONNECTED layers only)
  * `tfrewrite vgg16.tflite OUT --ratio 5`      (every CONV_2D by CP at the rank that cuts its weights 5x,
                                                 every FULLY_CONNECTED by SVD likewise; the first conv, 3 input
                                                 channels, gets CP rank 4: it is rewritten too)
  each run as a subprocess under /usr/bin/time (wall time, peak RSS), the --ratio one inside a pseudo-terminal
  (`script -qc ... /dev/null`) so the per-layer progress bar is exercised and captured.
  Latency: tfrewrite.verify.time_interleaved (XNNPACK on, A and B alternately on the same input, medians;
  allocation and warm-up runs untimed) with 1 and 2 threads, next to the MAC reduction.
Fixture accuracy: fixtures/vgg_digits.tflite on the 360 held-out test digits (fixtures/digits.py
load_split('test', 32), batch 1, one sample per invoke), for cp and tucker2 at the --rank giving a file ~5x
and ~10x smaller (found by bisection on the rank), and at --ratio 5 / 10 --skip predictions.
The machine is shared: load averages are recorded beside every timing; compare ratios within one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "fixtures"))

from tfrewrite import io, rewrite, verify  # noqa: E402

OUT = ROOT / "bench" / "cache" / "lowrank"
RESULT = ROOT / "bench" / "results" / "lowrank.md"
TFREWRITE = ROOT / ".venv" / "bin" / "tfrewrite"


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def machine() -> dict:
    import ai_edge_litert
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    try:
        import threadpoolctl  # noqa: F401
        tpc = f"threadpoolctl {threadpoolctl.__version__}"
    except ImportError:
        tpc = "threadpoolctl not installed"
    blas = "?"
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{cfg.get('name')} {cfg.get('version')}"
    except Exception:
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "usable": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "numpy": np.__version__, "blas": blas,
            "litert": getattr(ai_edge_litert, "__version__", "?"), "threadpoolctl": tpc}


def timed(cmd: list[str], pty: bool = False) -> dict:
    """Run `cmd` under /usr/bin/time; wall seconds, peak RSS, output (through a pseudo-terminal if pty)."""
    timed_cmd = ["/usr/bin/time", "-f", "TIME %e %M"] + cmd
    before = load()
    if pty:
        proc = subprocess.run(["script", "-qec", shlex.join(timed_cmd), "/dev/null"], capture_output=True, text=True,
                              errors="replace")
        text = proc.stdout + proc.stderr
    else:
        proc = subprocess.run(timed_cmd, capture_output=True, text=True, errors="replace")
        text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{text[-2000:]}")
    m = re.findall(r"TIME ([\d.]+) (\d+)", text)
    wall, rss_kb = float(m[-1][0]), int(m[-1][1])
    bars = [s.strip() for s in re.split(r"[\r\n]", text) if s.strip().startswith("[")]
    return {"wall": wall, "rss_mb": rss_kb / 1024, "load_before": before, "load_after": load(),
            "bars": bars, "output": text}


def vgg16_section(repeat: int, runs: int) -> tuple[list[str], dict]:
    import make_models
    src = Path(make_models.ensure("vgg16"))
    OUT.mkdir(parents=True, exist_ok=True)
    lines, data = [], {}
    rows = []
    # --force: the random-init weights are not low rank, so the degenerate-rewrite floors would refuse every layer;
    # this measures the cost of the rewrite itself.
    configs = [("fc64", ["--fc-rank", "64"], False), ("ratio5", ["--ratio", "5", "--force"], True)]
    for key, flags, pty in configs:
        out, rep = OUT / f"vgg16_{key}.tflite", OUT / f"vgg16_{key}.json"
        cmd = [str(TFREWRITE), str(src), str(out), *flags, "--report", str(rep)]
        runs_ = [timed(cmd, pty=pty) for _ in range(repeat)]
        report = json.loads(rep.read_text())
        walls = [r["wall"] for r in runs_]
        data[key] = {"runs": runs_, "report": report, "out": out, "cmd": cmd}
        t = report["totals"]
        rewritten = [e for e in report["layers"] if e["action"] == "rewritten"]
        convs = sum(e["kind"] in ("conv", "conv1x1") for e in rewritten)
        fcs = sum(e["kind"] == "fc" for e in rewritten)
        rows.append(f"| `tfrewrite vgg16.tflite OUT {' '.join(flags)}` | {np.median(walls):.1f} s "
                    f"({', '.join(f'{w:.1f}' for w in walls)}) | {max(r['rss_mb'] for r in runs_):.0f} MB | "
                    f"{'; '.join(r['load_before'] + ' → ' + r['load_after'] for r in runs_)} | "
                    f"{t['file_bytes_before'] / 1e6:.1f} → {t['file_bytes_after'] / 1e6:.1f} MB "
                    f"({t['file_bytes_before'] / t['file_bytes_after']:.2f}x) | "
                    f"{t['params_before'] / 1e6:.2f}M → {t['params_after'] / 1e6:.2f}M | "
                    f"{t['macs_before'] / 1e9:.2f}G → {t['macs_after'] / 1e9:.2f}G "
                    f"({t['macs_before'] / t['macs_after']:.2f}x) | {convs}/13 conv, {fcs}/3 FC |")
    lines += ["| command | wall (median; all runs) | peak RSS | load avg before → after (1/5/15 min) | file | "
              "params | MACs | rewritten |", "|---|---|---|---|---|---|---|---|"] + rows
    bars = data["ratio5"]["runs"][-1]["bars"]
    lines += ["", f"Progress bar under a pseudo-terminal (`script -qec ... /dev/null`): {len(bars)} updates "
              f"(one per CONV_2D / FULLY_CONNECTED considered); the last one read `{bars[-1] if bars else 'NONE'}`."]

    # Per-layer detail of the --ratio 5 rewrite.
    rep = data["ratio5"]["report"]
    lines += ["", "Per layer (`--ratio 5`): rank, weight relative error ‖W − Ŵ‖/‖W‖ (random-init weights are not "
              "low-rank, so these errors are high whatever the algorithm), CP sweeps:", "",
              "| layer | weight | method | rank | rel. error | sweeps |", "|---|---|---|---|---|---|"]
    for e in rep["layers"]:
        name = e["output"].split(";")[-1].split("/")[1] if "/" in e["output"] else e["output"]
        lines.append(f"| {name} | {'x'.join(map(str, e['weight_shape']))} | {e['method']} | {e['rank']} | "
                     f"{e['rel_error']:.4f} | {e.get('n_iter', '-')} |")

    # Latency, 1 and 2 threads, interleaved.
    lines += ["", f"Latency (median ms of {runs} interleaved runs each, XNNPACK on, batch 1, 224x224x3; "
              "`tfrewrite.verify.time_interleaved`):", "",
              "| model | threads | original ms | rewritten ms | measured speed-up | MAC reduction | "
              "speed-up / MAC reduction | load avg before → after |", "|---|---|---|---|---|---|---|---|"]
    for key in ("ratio5", "fc64"):
        t = data[key]["report"]["totals"]
        mac_red = t["macs_before"] / t["macs_after"]
        for threads in ((1, 2) if key == "ratio5" else (1,)):
            before = load()
            la, lb = verify.time_interleaved([str(src), str(data[key]["out"])], runs=runs, threads=threads)
            sp = la / lb
            data.setdefault("latency", []).append((key, threads, la, lb))
            lines.append(f"| {' '.join(data[key]['cmd'][3:-2])} | {threads} | {la:.1f} | {lb:.1f} | {sp:.2f}x | "
                         f"{mac_red:.2f}x | {sp / mac_red:.2f} | {before} → {load()} |")
    return lines, data


def fixture_section() -> list[str]:
    from digits import tflite_accuracy
    src = ROOT / "fixtures" / "vgg_digits.tflite"
    size0 = os.path.getsize(src)
    base_acc = tflite_accuracy(str(src))

    def build(**opts):
        m = io.read(src)
        entries = rewrite.rewrite_model(m, rewrite.Options(**opts))
        blob = io.to_bytes(m)
        return blob, entries

    def ratio_of(rank, method):
        blob, _ = build(rank=rank, conv_method=method)
        return size0 / len(blob)

    def rank_for(target, method):
        lo, hi = 1, 256  # file ratio falls as the rank grows: largest rank still >= target
        if ratio_of(lo, method) < target:
            return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ratio_of(mid, method) >= target:
                lo = mid
            else:
                hi = mid
        return lo

    rows = []
    cases = []
    for method in ("cp", "tucker2"):
        for target in (5, 10):
            cases.append((f"--rank {rank_for(target, method)} --conv-method {method}", method,
                          {"rank": rank_for(target, method), "conv_method": method}))
    for method in ("cp", "tucker2"):
        for ratio in (5, 10):
            cases.append((f"--ratio {ratio} --skip predictions --conv-method {method}", method,
                          {"ratio": float(ratio), "skip": "predictions", "conv_method": method}))
    for label, method, opts in cases:
        t0 = time.perf_counter()
        blob, entries = build(**opts)
        took = time.perf_counter() - t0
        done = [e for e in entries if e["action"] == "rewritten"]
        convs = sum(e["kind"] in ("conv", "conv1x1") for e in done)
        fcs = sum(e["kind"] == "fc" for e in done)
        with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
            f.write(blob)
            f.flush()
            acc = tflite_accuracy(f.name)
        rows.append(f"| `{label}` | {size0 / len(blob):.2f}x ({len(blob) / 1e3:.0f} kB) | {convs}/6 conv, {fcs}/3 FC "
                    f"| {100 * acc:.2f} % | {took:.1f} s |")
    return [f"Held-out accuracy of `fixtures/vgg_digits.tflite` (360 test digits, 32x32, batch 1; unmodified: "
            f"{100 * base_acc:.2f} %, {size0 / 1e3:.0f} kB). `--rank R` applies R to every layer (a conv whose "
            "rank saves nothing is left dense); R is the largest rank whose file is at least 5x / 10x smaller.", "",
            "| options | file smaller | rewritten | top-1 accuracy | rewrite time |", "|---|---|---|---|---|"] + rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="times to run each VGG16 rewrite command (default 1)")
    ap.add_argument("--runs", type=int, default=7, help="interleaved timed runs per model and thread count")
    ap.add_argument("--skip-vgg16", action="store_true")
    a = ap.parse_args(argv)
    started = datetime.datetime.now()
    info = machine()
    lines = ["# Low rank (issue 3): VGG16 rewrite time, memory, size, speed; fixture accuracy", "",
             f"- Date: {started:%Y-%m-%d %H:%M} (took {{took}})",
             f"- Machine: {info['cpu']}, nproc {info['nproc']} ({info['usable']} usable), Python {info['python']}, "
             f"numpy {info['numpy']} ({info['blas']}), ai-edge-litert {info['litert']}, {info['threadpoolctl']}",
             f"- Load average (1/5/15 min) at the start: {load()}. The machine is shared with other jobs: absolute "
             "times move with the load; ratios measured within one interleaved run are the meaningful numbers.",
             f"- Command: `.venv/bin/python bench/bench_lowrank.py{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}` "
             "(VGG16: `bench/cache/vgg16.tflite`, from `python bench/make_models.py vgg16`; outputs in "
             "`bench/cache/lowrank/`)", ""]
    if not a.skip_vgg16:
        lines += ["## VGG16 (224, random init, 138M params)", ""]
        vl, _ = vgg16_section(a.repeat, a.runs)
        lines += vl + [""]
    lines += ["## Fixture accuracy", ""] + fixture_section() + [""]
    lines.append(f"Load average at the end: {load()}.")
    took = datetime.datetime.now() - started
    text = "\n".join(lines).replace("{took}", f"{took.total_seconds() / 60:.1f} min") + "\n"
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
