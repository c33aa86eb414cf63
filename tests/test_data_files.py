"""Data and calibration files: unreadable or out-of-range contents are one error line and exit 2."""
import numpy as np
import pytest

import builders as B
from tfrewrite import cli


def _fc(tmp, seed=0):
    rng = np.random.default_rng(seed)
    path = tmp / "fc.tflite"
    path.write_bytes(B.fc_model(rng.standard_normal((24, 16)).astype(np.float32)))
    return path


def _truncated(path):
    np.savez(path, input=np.zeros((4, 16), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "truncated npz": _truncated,
    "float64 beyond float32": lambda p: np.savez(p, input=np.full((4, 16), 1e300)),
    "a plain .npy": lambda p: np.save(open(p, "wb"), np.zeros((4, 16), np.float32)),
    "not a zip": lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 64),
}


@pytest.mark.parametrize("what", sorted(BAD_FILES))
def test_bad_data_files_are_exit_2(tmp, capsys, what):
    model = _fc(tmp)
    data = tmp / "d.npz"
    BAD_FILES[what](data)
    for argv in (["--rank", "4", "--calibration", str(data)], ["--verify", "--data", str(data), "--runs", "1"]):
        out = tmp / "o.tflite"
        code = cli.main([str(model), str(out), *argv])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("tfrewrite: error: ") and err.count("\n") == 1, (what, err)
        assert not out.exists()
    code = cli.main(["compare", str(model), str(model), "--data", str(data), "--runs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tfrewrite: error: ") and err.count("\n") == 1, (what, err)
