import os
import sys
from pathlib import Path

# One BLAS thread for the tests: the maths here is mostly small factorizations, which a multi-threaded OpenBLAS
# makes many times slower as soon as another process competes for the two cores. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))  # fixtures/digits.py loads the committed data splits

ALL_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.tflite"))
# Fixtures the stock interpreter can run (the custom op has no kernel).
RUNNABLE = [f for f in ALL_FIXTURES if f != "custom_op.tflite"]


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def digits_calibration(tmp_path_factory, count: int | None = None) -> Path:
    """A calibration file of the first `count` images (all when None) of the digits calib split at 32x32, under
    the VGG and MobileNetV2 fixtures' input name."""
    from digits import load_split
    x, _ = load_split("calib", 32)
    x = x[:count]
    path = tmp_path_factory.mktemp("calib") / f"calib{len(x)}.npz"
    np.savez(path, image=x)
    return path


def outputs(model, xnnpack=True, seed=0, samples=2):
    """Outputs of every signature-less invoke on seeded random inputs."""
    from tfrewrite import verify
    it = verify.interpreter(model, xnnpack=xnnpack)
    return [verify.invoke(it, x) for x in verify.random_inputs(it, samples, seed)]


def assert_outputs_equal(a, b):
    assert len(a) == len(b)
    for xa, xb in zip(a, b):
        for ya, yb in zip(xa, xb):
            np.testing.assert_array_equal(ya, yb)


@pytest.fixture(autouse=True)
def validate_after_every_pass(monkeypatch):
    """Every pass a test runs directly is followed by the graph invariant check (rewrite_model does it itself):
    a pass may not add a problem the model did not have before it."""
    from tfrewrite.passes import cp_conv, lowrank_fc, prune, quantize, sparse_encode

    def checked(run):
        def wrapper(model, *args, **kwargs):
            known = model.problems()
            result = run(model, *args, **kwargs)
            model.validate(known)
            return result
        return wrapper

    for module in (cp_conv, lowrank_fc, prune, quantize, sparse_encode):
        monkeypatch.setattr(module, "run", checked(module.run))
