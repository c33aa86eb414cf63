#!/usr/bin/env python
"""Data-aware pruning (issue 15): magnitude vs data-aware vs data-aware sequential pruning without retraining.

1. Accuracy and file size on the trained fixtures (top-1 on the 360 held-out test digits; calibration = the
   separate 100-image calib split, fixtures/README.md):

       tfrewrite fixtures/X.tflite OUT --prune S                                        # magnitude
       tfrewrite fixtures/X.tflite OUT --prune S --calibration calib.npz                # data-aware
       tfrewrite fixtures/X.tflite OUT --prune S --calibration calib.npz --sequential   # data-aware sequential

2. Wall time and peak memory (/usr/bin/time around the CLI, Python start-up included) of data-aware pruning of
   the full-size VGG16 and MobileNetV2 (bench/make_models.py, random weights) with 64 calibration images.

    .venv/bin/python bench/bench_prune_data_aware.py            # writes bench/results/prune_data_aware.md
    .venv/bin/python bench/bench_prune_data_aware.py --skip-full   # the fixtures only
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_calibration import BAR_KB, BAR_SECONDS, machine, make_calib, timed  # noqa: E402

TFREWRITE = str(ROOT / ".venv" / "bin" / "tfrewrite")
CACHE = ROOT / "bench" / "cache" / "prune_data_aware"
OUT = ROOT / "bench" / "results" / "prune_data_aware.md"
FIXTURES = {"vgg_digits": (32, [0.5, 0.7, 0.8, 0.9]),
            "mobilenetv2_digits": (96, [0.15, 0.25, 0.35, 0.5, 0.7, 0.8, 0.9])}
# Fixtures run on some of their layers only (not in the default run; `--rows-only NAME`): the full-integer VGG's
# FULLY_CONNECTED layers (1x16 blocks; its int8 convs would stay dense), MobileNetV2 with its depthwise layers.
EXTRA = {"vgg_digits_int8": (32, [0.5, 0.7, 0.8, 0.9], ["--only", "fc|predictions"]),
         "mobilenetv2_digits+depthwise": (96, [0.35, 0.5], ["--prune-depthwise"])}
MODES = {"magnitude": [], "data-aware": ["--calibration", "{calib}"],
         "data-aware sequential": ["--calibration", "{calib}", "--sequential"]}


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S} load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def calib_file(name: str, size: int) -> Path:
    from digits import load_split
    from tfrewrite import verify
    key = verify.Runner(ROOT / "fixtures" / f"{name}.tflite").inputs[0][0].split(":")[0]
    path = CACHE / f"{name}_calib.npz"
    x, _ = load_split("calib", size)
    np.savez(path, **{key.removeprefix("serving_default_"): x})
    return path


def fixture_rows(name: str, size: int, sparsities, modes, flags=()) -> list[dict]:
    """`name`: a fixture, or fixture+label for a run with extra `flags`."""
    from digits import tflite_accuracy
    src = ROOT / "fixtures" / f"{name.split('+')[0]}.tflite"
    calib = calib_file(name.split("+")[0], size)
    rows = [{"sparsity": 0.0, "mode": "original", "bytes": os.path.getsize(src),
             "top1": tflite_accuracy(str(src), "test", size), "seconds": 0.0, "max_error_ratio": None}]
    for s in sparsities:
        for mode in modes:
            out = CACHE / f"{name.replace('+', '_')}_{mode.replace(' ', '_')}_{round(100 * s)}.tflite"
            report = out.with_suffix(".json")
            cmd = [TFREWRITE, str(src), str(out), "--prune", f"{s:g}", *flags, "--quiet", "--report", str(report)]
            cmd += [a.format(calib=calib) for a in MODES[mode]]
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
            wall = time.perf_counter() - t
            layers = [e for e in json.loads(report.read_text())["layers"] if e.get("output_error") is not None]
            ratio = max((e["output_error"] / e["output_error_magnitude"] for e in layers
                         if e["output_error_magnitude"] > 0), default=None)
            rows.append({"sparsity": s, "mode": mode, "bytes": os.path.getsize(out),
                         "top1": tflite_accuracy(str(out), "test", size), "seconds": wall,
                         "max_error_ratio": ratio, "command": " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c)
                                                                       else c for c in cmd)})
            log(f"{name} {mode} {s:g}: {100 * rows[-1]['top1']:.2f} % {rows[-1]['bytes']} B {wall:.1f} s")
    return rows


BUDGET_MODES = {"prune auto": ["--prune", "auto"], "prune auto + rank auto": ["--prune", "auto", "--rank", "auto"],
                "rank (reference)": []}


def budget_rows(name: str, size: int, target: float, data: bool) -> list[dict]:
    """`--target-size X` with the sparsities, sparsities and ranks, or ranks alone chosen by the budget."""
    from digits import tflite_accuracy
    src = ROOT / "fixtures" / f"{name}.tflite"
    calib = calib_file(name, size)
    rows = []
    for mode, flags in BUDGET_MODES.items():
        out = CACHE / f"{name}_budget_{mode.split()[0]}{'_rank' if 'rank auto' in mode else ''}_{target:g}" \
                      f"{'' if data else '_nodata'}.tflite"
        report = out.with_suffix(".json")
        cmd = [TFREWRITE, str(src), str(out), "--target-size", f"{target:g}", *flags, "--quiet", "--report",
               str(report)] + (["--calibration", str(calib)] if data else [])
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        wall = time.perf_counter() - t
        budget = json.loads(report.read_text())["budget"]
        kinds = [("sparsity" if layer.get("sparsity") is not None else "rank" if layer.get("rank") else "dense")
                 for layer in budget["layers"]]
        rows.append({"mode": mode, "data": data, "target": target, "bytes": os.path.getsize(out),
                     "achieved": budget["achieved"], "top1": tflite_accuracy(str(out), "test", size), "seconds": wall,
                     "choice": {k: kinds.count(k) for k in ("sparsity", "rank", "dense")},
                     "command": " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd)})
        log(f"{name} budget {mode} {target:g} data={data}: {100 * rows[-1]['top1']:.2f} % {budget['achieved']}x")
    return rows


def full_size(name: str, sparsity: float) -> dict:
    import make_models
    src = make_models.ensure(name)
    calib = CACHE / "calib224.npz"
    if not calib.exists():
        make_calib(calib)
    out = CACHE / f"{name}_p{round(100 * sparsity)}.tflite"
    cmd = [TFREWRITE, src, str(out), "--prune", f"{sparsity:g}", "--calibration", str(calib), "--quiet"]
    load = os.getloadavg()[0]
    wall, kb, stdout, finished = timed(cmd, timeout=4 * BAR_SECONDS)
    result = {"model": name, "sparsity": sparsity, "wall": wall, "kb": kb, "finished": finished, "load": load,
              "load_after": os.getloadavg()[0], "bytes_before": os.path.getsize(src),
              "bytes_after": os.path.getsize(out) if out.exists() else None, "summary": stdout.strip()[-400:],
              "command": "tfrewrite " + " ".join(os.path.relpath(c, ROOT) for c in cmd[1:3]) + " " +
                         " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd[3:])}
    if out.exists():
        out.unlink()
    log(f"{name} full size: {wall:.1f} s, {kb / 1024:.0f} MB")
    return result


def budget_table(rows: list[dict]) -> list[str]:
    L = ["## Global allocation: `--target-size X` with `--prune auto` (issue 15)", "",
         "Per-layer sparsities (0.4 … 0.95) at one shared damage level; `--rank auto` as well puts rank and sparsity "
         "options in one list per layer; the last mode is the rank budget alone, for reference. Layers: how many the "
         "budget gave a sparsity / a rank / kept dense.", "",
         "| fixture | target | mode | data | top-1 | file | achieved | layers (sparse / rank / dense) | s |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["choice"]
        L.append(f"| {r['name']} | {r['target']:g}x | {r['mode']} | {'calibration' if r['data'] else 'none (generated)'} "
                 f"| {100 * r['top1']:.2f} % | {r['bytes']:,} B | {r['achieved']:.2f}x | {c['sparsity']} / {c['rank']} / "
                 f"{c['dense']} | {r['seconds']:.1f} |")
    return L + ["", "```sh"] + [r["command"] for r in rows] + ["```", ""]


def fixture_table(name: str, rows: list[dict]) -> list[str]:
    """One fixture's fixed-sparsity table (rows[0]: the original)."""
    base = rows[0]
    L = [f"## {name}", "", f"Original: {base['bytes']:,} B, top-1 {100 * base['top1']:.2f} %.", "",
         "| sparsity | magnitude top-1 | data-aware top-1 | data-aware sequential top-1 | file (all three) | "
         "data-aware s / sequential s | worst layer error ratio |", "|---|---|---|---|---|---|---|"]
    for s in sorted({r["sparsity"] for r in rows[1:]}):
        by = {r["mode"]: r for r in rows if r["sparsity"] == s}
        cells = [f"{100 * by[m]['top1']:.2f} % ({100 * (by[m]['top1'] - base['top1']):+.2f})"
                 if m in by else "-" for m in MODES]
        sizes = sorted({by[m]["bytes"] for m in by})
        secs = " / ".join(f"{by[m]['seconds']:.1f}" for m in ("data-aware", "data-aware sequential") if m in by)
        ratio = by.get("data-aware", {}).get("max_error_ratio")
        L.append(f"| {100 * s:g} % | " + " | ".join(cells) + f" | {' / '.join(f'{b:,} B' for b in sizes)} | "
                 f"{secs} | {'-' if ratio is None else f'{ratio:.3f}'} |")
    return L + ["", "```sh"] + [r["command"] for r in rows if r.get("command")] + ["```", ""]


def write(fixtures: dict, full: list[dict], started: str) -> None:
    L = ["# Data-aware pruning: magnitude vs OBS/SparseGPT, no retraining (issue 15)", "",
         f"- Date: {started} UTC; machine: {machine()}; OPENBLAS_NUM_THREADS="
         f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')} (the machine is shared: one BLAS thread avoids "
         "oversubscription; rewrite seconds are then an upper bound)",
         "- Reproduce: `.venv/bin/python bench/bench_prune_data_aware.py` (each row is one `tfrewrite` process; "
         "commands below the tables)",
         "- Accuracy: top-1 on the 360 held-out test digits (`fixtures/digits.py`, batch 1, LiteRT); calibration: "
         "the separate 100-image `calib` split. `--prune S` prunes CONV_2D and FULLY_CONNECTED weights to S "
         "(depthwise left dense), stored sparse where that saves bytes.",
         "- data-aware: `--calibration calib.npz` (SparseGPT mask + exact least-squares update of the kept weights "
         "on the layer's calibration inputs, bias correction); sequential: `--sequential` as well (each layer "
         "pruned on the activations of the already pruned ones). Worst layer error ratio = max over layers of "
         "data-aware output error / magnitude output error on the calibration rows (report fields "
         "`output_error`, `output_error_magnitude`).", ""]
    for name, rows in fixtures.items():
        L += fixture_table(name, rows)
    if full:
        L += ["## Full-size models: time and memory", "",
              "64 calibration images of 224x224 (the digits `calib` split upsampled; random weights, so speed and "
              f"memory only). Bar (issue 15): VGG16 within {BAR_SECONDS:.0f} s and 4 GiB on 2 cores.", "",
              "| model | command | wall s | peak RSS | file | load before / after |", "|---|---|---|---|---|---|"]
        for r in full:
            after = f"{r['bytes_before'] / 1e6:.1f} → {r['bytes_after'] / 1e6:.1f} MB" if r["bytes_after"] else "-"
            L.append(f"| {r['model']} | `{r['command']}` | {r['wall']:.1f}{'' if r['finished'] else ' (stopped)'} | "
                     f"{r['kb'] / 1024:.0f} MB ({r['kb'] / BAR_KB * 4:.2f} GiB) | {after} | "
                     f"{r['load']:.2f} / {r['load_after']:.2f} |")
        L.append("")
    OUT.write_text("\n".join(L))
    print(f"wrote {OUT.relative_to(ROOT)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-full", action="store_true", help="only the fixtures")
    ap.add_argument("--skip-fixtures", action="store_true", help="only the full-size models")
    ap.add_argument("--full-sparsity", type=float, default=0.5)
    ap.add_argument("--rows-only", nargs="+", metavar="FIXTURE [S ...]",
                    help="only one fixture's fixed-sparsity rows at the given sparsities (printed as a markdown table, "
                         "the results file is left as it is)")
    ap.add_argument("--budget-only", type=float, nargs="*", metavar="X",
                    help="only the --prune auto --target-size X rows (printed as a markdown table)")
    args = ap.parse_args()
    if args.rows_only:
        CACHE.mkdir(parents=True, exist_ok=True)
        name, sparsities = args.rows_only[0], [float(v) for v in args.rows_only[1:]]
        size, default, *flags = {**FIXTURES, **EXTRA}[name]
        rows = fixture_rows(name, size, sparsities or default, list(MODES), *flags)
        print("\n".join(fixture_table(name, rows)))
        return 0
    if args.budget_only is not None:
        CACHE.mkdir(parents=True, exist_ok=True)
        rows = []
        for name, (size, _) in FIXTURES.items():
            for target in args.budget_only or [5.0]:
                for data in (True, False):
                    rows += [dict(r, name=name) for r in budget_rows(name, size, target, data)]
        print("\n".join(budget_table(rows)))
        return 0
    CACHE.mkdir(parents=True, exist_ok=True)
    started = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
    fixtures = {}
    if not args.skip_fixtures:
        for name, (size, sparsities) in FIXTURES.items():
            fixtures[name] = fixture_rows(name, size, sparsities, list(MODES))
    full = [] if args.skip_full else [full_size(n, args.full_sparsity) for n in ("vgg16", "mobilenetv2")]
    write(fixtures, full, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
