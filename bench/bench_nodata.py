#!/usr/bin/env python
"""No data at hand (issue 12): plain `--ratio X` and data-free `--target-size X` on the two trained fixtures,
next to the data-aware `--calibration calib.npz --target-size X`; writes bench/results/nodata.md.

    .venv/bin/python bench/bench_nodata.py                    # X = 2, 4.36, 5, 7.98, 10.54, both fixtures
    .venv/bin/python bench/bench_nodata.py --ratios 5 --fixtures vgg_digits --no-aware
    .venv/bin/python bench/bench_nodata.py --table1           # the plain rows of RESULTS.md's Table 1
    .venv/bin/python bench/bench_nodata.py --levels           # data-free results: damage level vs output error

Accuracy: top-1 on the 360 held-out digits (fixtures/digits.py, batch 1) via `tfrewrite compare --data`;
speed-up: the same command's interleaved medians (1 thread, XNNPACK on, --runs 20).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import reproduce as R

SIZES = {"vgg_digits": 32, "mobilenetv2_digits": 96, "resnet_concat_digits": 32}


def layer_floors(names) -> list[str]:
    """Each low-rank layer rewritten alone at --ratio 5 with --force: its rank, weight error and the top-1 it
    leaves (what the degenerate-rewrite floors in tfrewrite/passes/common.py are chosen from)."""
    import json
    import re
    from digits import tflite_accuracy
    lines = ["### Each layer alone at `--ratio 5 --force` (the degenerate-rewrite floors)", "",
             "| fixture | layer | weight | rank | weight error | top-1 |", "|---|---|---|---|---|---|"]
    for name in names:
        src = R.ROOT / "fixtures" / f"{name}.tflite"
        out = R.CACHE / f"floors_{name}.tflite"
        R.run_cli([src, out, "--ratio", "5", "--force", "--quiet", "--report", out.with_suffix(".json")])
        layers = [e for e in json.loads(out.with_suffix(".json").read_text())["layers"] if e["action"] == "rewritten"]
        for e in layers:
            only = "^" + re.escape(e["output"]) + "$"
            R.run_cli([src, out, "--ratio", "5", "--force", "--only", only, "--quiet"])
            top1 = tflite_accuracy(str(out), "test", SIZES[name])
            lines.append(f"| {name} | {e['output'].split(';')[0][-40:]} | {'x'.join(map(str, e['weight_shape']))} | "
                         f"{e['rank']} | {e['rel_error']:.2f} | {100 * top1:.2f} % |")
            R.log(lines[-1])
    return lines + [""]


LEVEL_CASES = [("vgg_digits", x) for x in (2, 4.36, 5, 7.98, 10.54)] + \
    [("resnet_concat_digits", 1.5), ("resnet_concat_digits", 2)] + [("mobilenetv2_digits", x) for x in (1.25, 1.5, 2)]


def level_rows(runs: int) -> list[str]:
    """Data-free `--target-size X --force` (the result as the budget chose it, kept whatever its error): the budget's
    damage level, the output error on the 4 generated inputs, their ratio, and top-1 on the test digits; and what
    the same command without --force writes (the input unchanged when the check calls the result broken)."""
    import json
    lines = ["| fixture | X | x smaller | damage level | output error (generated) | error / level | top-1 (original) | "
             "without --force |", "|---|---|---|---|---|---|---|---|"]
    for name, x in LEVEL_CASES:
        src = R.ROOT / "fixtures" / f"{name}.tflite"
        _, test = R.data_files(name, SIZES[name])
        out = R.CACHE / f"levels_{name}_{x:g}.tflite"
        r = R.fixture_row(src, out, ["--target-size", f"{x:g}", "--force"], test, runs)
        level = r["budget"]["damage_level"]
        worst = json.loads(out.with_suffix(".json").read_text())["output_error"]["worst"]
        plain = R.rewrite(src, R.CACHE / f"levels_{name}_{x:g}_unforced.tflite", ["--target-size", f"{x:g}"])
        refused = r["budget"].get("refused_output_error") or plain["budget"].get("refused_output_error")
        verdict = "input written unchanged" if refused is not None and plain["bytes"] == plain["before"] else "kept"
        lines.append(f"| {name} | {x:g} | {r['before'] / r['bytes']:.2f}x | {level:.3f} | {worst:.3f} | "
                     f"{worst / level:.2f} | {100 * r['top1']:.2f} % ({100 * r['base_top1']:.2f} %) | {verdict} |")
        R.log(lines[-1])
    return lines + [""]


def table1_plain_rows(runs: int) -> list[str]:
    """The plain columns of bench/RESULTS.md's Table 1 (VGG-style fixture, X = the published VGG16 ratios):
    `--ratio X` and `--ratio X --skip predictions`, x smaller / top-1 / top-5 and the fixture speed-up."""
    src = R.ROOT / "fixtures" / "vgg_digits.tflite"
    _, test = R.data_files("vgg_digits", SIZES["vgg_digits"])
    lines = ["| X | plain `--ratio X`: x smaller / top-1 / top-5 | plain `--ratio X --skip predictions`: x smaller / "
             "top-1 / top-5 | fixture speed-up (plain / skip) | load average after the row |", "|---|---|---|---|---|"]
    for x in R.PUB_RATIOS:
        cells, speed = [], []
        for tag, extra in (("plain", []), ("skip", ["--skip", "predictions"])):
            r = R.fixture_row(src, R.CACHE / f"table1_vgg_digits_{tag}_{x:g}.tflite", ["--ratio", f"{x:g}", *extra],
                              test, runs)
            cells.append(f"{r['before'] / r['bytes']:.2f}x / {100 * r['top1']:.2f} % / {100 * r['top5']:.2f} %")
            speed.append(f"{r['speedup']:.2f}x")
        lines.append(f"| {x:g} | {cells[0]} | {cells[1]} | {' / '.join(speed)} | {R.load_str()} |")
        R.log(lines[-1])
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ratios", default="2,4.36,5,7.98,10.54")
    p.add_argument("--fixtures", default="vgg_digits,mobilenetv2_digits")
    p.add_argument("--no-aware", action="store_true", help="skip the data-aware rows")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--layers", action="store_true", help="also: each layer alone at --ratio 5 --force (the floors)")
    p.add_argument("--table1", action="store_true",
                   help="only the plain rows of bench/RESULTS.md's Table 1 (VGG-style fixture), printed")
    p.add_argument("--levels", action="store_true",
                   help="only the data-free results' damage level against their output error, printed")
    p.add_argument("--out", default=str(R.ROOT / "bench" / "results" / "nodata.md"))
    args = p.parse_args(argv)
    R.CACHE.mkdir(parents=True, exist_ok=True)
    if args.levels:
        print("\n".join([f"Load average at the start {R.load_str()}", *level_rows(args.runs),
                          f"Load average at the end {R.load_str()}", "Commands:", "", "```", *R.COMMANDS, "```"]))
        return 0
    if args.table1:
        print("\n".join([f"Load average at the start {R.load_str()}", *table1_plain_rows(args.runs),
                          "Commands:", "", "```", *R.COMMANDS, "```"]))
        return 0
    started, load_start, t0 = datetime.datetime.now(datetime.timezone.utc), R.load_str(), time.monotonic()
    ratios = [float(x) for x in args.ratios.split(",")]
    lines = []
    for name in args.fixtures.split(","):
        src = R.ROOT / "fixtures" / f"{name}.tflite"
        calib, test = R.data_files(name, SIZES[name])
        modes = [("plain `--ratio X`", lambda x: ["--ratio", f"{x:g}"]),
                 ("data-free `--target-size X`", lambda x: ["--target-size", f"{x:g}"])]
        if not args.no_aware:
            modes.append(("data-aware `--target-size X --calibration`",
                          lambda x: ["--target-size", f"{x:g}", "--calibration", calib]))
        rows, base = [], None
        for x in ratios:
            cells = []
            for label, opts in modes:
                out = R.CACHE / f"nodata_{name}_{label.split()[0]}_{x:g}.tflite"
                r = R.fixture_row(src, out, opts(x), test, args.runs)
                base = r["base_top1"]
                reached = ""
                if r["budget"]:
                    reached = " (reached)" if r["budget"]["reached"] else " (NOT reached)"
                cells.append(f"{r['before'] / r['bytes']:.2f}x{reached} / {100 * r['top1']:.2f} % / "
                             f"{r['speedup']:.2f}x / {r['rewrite_s']:.0f} s")
                R.log(f"{name} X={x:g} {label}: {cells[-1]}")
            rows.append(f"| {x:g} | " + " | ".join(cells) + f" | {R.load_str()} |")
        lines += [f"### `fixtures/{name}.tflite` (original top-1 {100 * base:.2f} %)", "",
                  "| X | " + " | ".join(f"{label}: x smaller / top-1 / speed-up / rewrite time" for label, _ in modes)
                  + " | load average after the row |",
                  "|---" * (len(modes) + 2) + "|", *rows, ""]
    if args.layers:
        lines += layer_floors(args.fixtures.split(","))
    wall = (time.monotonic() - t0) / 60
    head = ["# No data at hand: plain `--ratio X` vs data-free `--target-size X` (vs data-aware)", "",
            f"- Date: {started:%Y-%m-%d %H:%M} UTC; {wall:.1f} min; machine: {R.machine()}",
            f"- Load average at the start {load_start}, at the end {R.load_str()} (a shared machine: the speed-ups "
            "are interleaved medians of A and B, robust to load; absolute times are not)",
            f"- Command: `.venv/bin/python bench/bench_nodata.py {' '.join(argv or sys.argv[1:])}`",
            "- x smaller = input file / output file; `(reached)` = the budget's own verdict, checked against the "
            "written file. No `--calibration` (plain and data-free): the layers are fitted (and the budget's "
            "candidates judged) on 64 generated dead-leaves images (`tfrewrite/calibrate.py`); plain `--ratio X` "
            "leaves the layers its floors refuse as they are (README, \"Degenerate rewrites\").",
            "- top-1: the 360 held-out test digits (`tfrewrite compare --data`); speed-up: `tfrewrite compare` "
            "interleaved medians (1 thread, XNNPACK), original / rewritten; rewrite time: wall seconds of the "
            "rewrite command on the shared machine.", ""]
    tail = ["Commands:", "", "```", *R.COMMANDS, "```", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(head + lines + tail))
    print(f"wrote {os.path.relpath(args.out, R.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
