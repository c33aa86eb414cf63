"""Byte-identity check for refactors: run a fixed set of CLI option sets over the fixtures with one source tree
and record the sha256 of every written model and JSON report; compare two such records.

    python bench/byte_identity.py run SRC_DIR OUT_DIR [CASE ...]  # SRC_DIR: a checkout of the repo (code under
                                                                    # test); CASEs: only those (added to the record)
    python bench/byte_identity.py compare OUT_A OUT_B        # prints each case: identical / DIFFERENT

Each run uses `SRC_DIR` through PYTHONPATH (so two trees share this venv), one BLAS thread (sums in a fixed
order) and the calibration files this script writes into OUT_DIR from `fixtures/digits.py` (the first 32 calib
images; seeded normal rows for the small models).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"

# (name, fixture, options); CALIB in options is replaced by the fixture's calibration file.
CASES = [
    ("vgg_prune", "vgg_digits", "--prune 0.5 --sparse-encode"),
    ("vgg_prune_q8", "vgg_digits", "--prune 0.5 --prune-block 1x4 --quantize int8 --sparse-encode"),
    ("vgg_prune_da", "vgg_digits", "--prune 0.7 --prune-block 1x4 --calibration CALIB"),
    ("vgg_prune_fullint8", "vgg_digits", "--prune 0.5 --calibration CALIB --quantize full-int8"),
    ("vgg_prune_auto", "vgg_digits", "--prune auto --target-size 5 --calibration CALIB"),
    ("vgg_prune_auto_fi8", "vgg_digits", "--prune auto --rank auto --target-size 3 --calibration CALIB "
                                         "--quantize full-int8"),
    ("vgg_unreachable", "vgg_digits", "--target-size 200 --calibration CALIB"),
    ("vgg_unreachable_prune", "vgg_digits", "--prune auto --target-size 200 --calibration CALIB"),
    ("vgg_channels_auto", "vgg_digits", "--prune-channels auto --rank auto --target-macs 2 --calibration CALIB"),
    ("vgg_channels_fi8", "vgg_digits", "--prune-channels auto --target-size 2 --calibration CALIB "
                                       "--quantize full-int8"),
    ("fp16_prune_da", "vgg_digits_fp16", "--prune 0.5 --calibration CALIB"),
    ("dynint8_prune", "vgg_digits_dynint8", "--prune 0.5"),
    ("int8_prune", "vgg_digits_int8", "--prune 0.8 --prune-block 1x4"),
    ("int8_prune_da", "vgg_digits_int8", "--prune 0.8 --calibration CALIB"),
    ("int8_prune_auto", "vgg_digits_int8", "--prune auto --target-size 1.5 --calibration CALIB"),
    ("int8_channels_auto", "vgg_digits_int8", "--prune-channels auto --target-size 2 --calibration CALIB"),
    ("mnv2_prune_dw", "mobilenetv2_digits", "--prune 0.4 --prune-depthwise --calibration CALIB"),
    ("mnv2_prune_fp16", "mobilenetv2_digits", "--rank 4 --prune 0.5 --sparse-encode --quantize float16"),
    ("mnv2_int8_sparse", "mobilenetv2_digits_int8", "--prune 0.5 --sparse-encode"),
    ("shared_prune_da", "shared_weight", "--prune 0.5 --calibration CALIB --force"),  # kept though not smaller
    ("shared_prune_auto", "shared_weight", "--prune auto --target-size 2 --calibration CALIB"),
    ("twosig_prune", "two_signatures", "--prune 0.5 --sparse-encode --quantize int8"),
    ("int8_sparse", "vgg_digits_int8", "--prune 0.8 --sparse-encode"),
    ("dynint8_sparse", "vgg_digits_dynint8", "--sparse-encode"),
    ("mnv2_sparse_q8", "mobilenetv2_digits_sparse", "--sparse-encode --quantize int8"),
    # `inspect --json` (per-op rows and totals): its standard output is compared instead of a model.
    ("inspect_sparse", "mobilenetv2_digits_sparse", "inspect"),
    ("inspect_fp16", "vgg_digits_fp16", "inspect"),
    ("inspect_int8", "vgg_digits_int8", "inspect"),
    ("inspect_shared", "shared_weight", "inspect"),
]


def calibration(fixture: str, out: Path) -> Path:
    """The calibration file a fixture's cases read (written once per OUT_DIR)."""
    import numpy as np
    sys.path.insert(0, str(FIX))
    from digits import load_split
    path = out / f"calib_{fixture}.npz"
    if path.exists():
        return path
    if fixture.startswith("mobilenetv2"):
        arrays = {"keras_tensor_91": load_split("calib", 96)[0][:16]}
    elif fixture.startswith(("vgg", "resnet")):
        arrays = {"image": load_split("calib", 32)[0][:32]}
    else:  # shared_weight: [1, 16] float input
        arrays = {"x": np.random.default_rng(0).standard_normal((32, 1, 16)).astype(np.float32)}
    np.savez(path, **arrays)
    return path


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def run(src: Path, out: Path, only=()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    saved = out / "record.json"
    record = json.loads(saved.read_text()) if only and saved.exists() else {}
    for name, fixture, options in CASES:
        if only and name not in only:
            continue
        # Relative names in OUT_DIR as the working folder: a report or message naming a file reads the same in
        # both records.
        model, report = out / f"{name}.tflite", out / f"{name}.json"
        source = str(FIX / f"{fixture}.tflite")
        if options == "inspect":
            model = out / f"{name}.inspect.json"
            command = ["inspect", source, "--json"]
        else:
            command = [source, model.name, "--report", report.name, "--quiet",
                       *options.replace("CALIB", calibration(fixture, out).name).split()]
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "tfrewrite.cli", *command], env=env, capture_output=True,
                              text=True, cwd=out)
        if options == "inspect":
            model.write_text(proc.stdout)
        record[name] = {"fixture": fixture, "options": options, "exit": proc.returncode, "stderr": proc.stderr,
                        "model": _sha256(model), "report": _sha256(report) if options != "inspect" else None}
        print(f"{name}: exit {proc.returncode}, {time.time() - start:.0f} s", flush=True)
    (out / "record.json").write_text(json.dumps(record, indent=1))


def compare(a: Path, b: Path) -> int:
    ra, rb = (json.loads((p / "record.json").read_text()) for p in (a, b))
    different, compared = 0, 0
    for name in ra:
        x, y = ra[name], rb.get(name)
        if y is None:
            print(f"{name:24s} not in {b}")
            continue
        same = all(x[k] == y[k] for k in ("exit", "stderr", "model", "report"))
        different, compared = different + (not same), compared + 1
        print(f"{name:24s} {x['fixture']:24s} {x['options']:70s} exit {x['exit']}: "
              f"{'identical' if same else 'DIFFERENT'}")
        if x["model"] == y["model"] and x["report"] != y["report"]:
            for (where, old, new), count in _report_changes(a / f"{name}.json", b / f"{name}.json").items():
                print(f"    model identical; report {where} ({count}x): {old!r} -> {new!r}")
    print(f"{compared - different} of {compared} identical")
    return 1 if different else 0


def _report_changes(a: Path, b: Path) -> dict:
    """(field path without list indices, old, new) → count, for every value the two JSON reports differ in."""
    changes: dict = {}

    def walk(x, y, where):
        if isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys():
            for k in x:
                walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for u, v in zip(x, y):
                walk(u, v, f"{where}[]")
        elif x != y:
            key = (where, *("..." if isinstance(v, (dict, list)) else v for v in (x, y)))
            changes[key] = changes.get(key, 0) + 1
    walk(json.loads(a.read_text()), json.loads(b.read_text()), "")
    return changes


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve(), set(sys.argv[4:]))
    else:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
