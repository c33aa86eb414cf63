"""Every path a run writes is checked against every path it reads before any work; the model and the report are
written together at the end, or neither; Ctrl-C before that leaves nothing behind."""
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, ROOT
from tfrewrite import cli, io, rewrite, verify

SMALL = FIXTURES / "two_signatures.tflite"


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _folder(tmp):
    """A folder with an input model, a recipe and a calibration file; returns their paths."""
    model = tmp / "in.tflite"
    model.write_bytes(SMALL.read_bytes())
    recipe = tmp / "recipe.json"
    recipe.write_text(json.dumps({"rules": [{"match": ".", "quantize": "float16"}]}))
    calib = tmp / "calib.npz"
    np.savez(calib, x=np.zeros((2, 1, 4), np.float32))
    return model, recipe, calib


def _snapshot(tmp):
    return {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()}


def _assert_refused(capsys, tmp, *argv, words=()):
    before = _snapshot(tmp)
    code, out, err = _run(capsys, *argv)
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tfrewrite: error: "), err
    for w in words:
        assert w in err, err
    assert _snapshot(tmp) == before, "a file was changed, written or left behind"


def test_report_or_output_over_a_file_read(capsys, tmp):
    model, recipe, calib = _folder(tmp)
    out = tmp / "out.tflite"
    _assert_refused(capsys, tmp, model, out, "--report", model, words=["--report", "input model"])
    _assert_refused(capsys, tmp, model, out, "--report", out, words=["--report", "output"])
    _assert_refused(capsys, tmp, model, out, "--recipe", recipe, "--report", recipe, words=["--recipe file"])
    _assert_refused(capsys, tmp, model, recipe, "--recipe", recipe, words=["--recipe file"])
    _assert_refused(capsys, tmp, model, calib, "--rank", "2", "--calibration", calib, words=["--calibration file"])
    _assert_refused(capsys, tmp, model, out, "--verify", "--data", calib, "--report", calib, words=["--data file"])
    _assert_refused(capsys, tmp, model, tmp / "." / "in.tflite", words=["input model"])


def test_links_to_a_file_read_are_the_same_file(capsys, tmp):
    model, _, _ = _folder(tmp)
    (tmp / "soft.tflite").symlink_to(model)
    os.link(model, tmp / "hard.tflite")
    _assert_refused(capsys, tmp, model, tmp / "soft.tflite", words=["same file"])
    _assert_refused(capsys, tmp, model, tmp / "hard.tflite", words=["same file"])
    _assert_refused(capsys, tmp, model, tmp / "o.tflite", "--report", tmp / "hard.tflite", words=["same file"])
    sub = tmp / "sub"
    sub.mkdir()
    (tmp / "link").symlink_to(sub)
    _assert_refused(capsys, tmp, model, sub / "o.tflite", "--report", tmp / "link" / "o.tflite", words=["same file"])


def test_an_output_that_is_a_link_writes_the_file_it_points_to(capsys, tmp):
    """A link stays a link (as `cp` treats it): the model and the report go to the files the links lead to,
    through a chain of links and a dangling one too; a link into /dev or /proc (`/dev/stdout`) is a stream, not a
    file: refused, and nothing there is replaced."""
    model, _, _ = _folder(tmp)
    other = tmp / "other"
    other.mkdir()
    (other / "old.tflite").write_bytes(b"old")
    (tmp / "out.tflite").symlink_to(other / "old.tflite")
    (tmp / "chain.json").symlink_to(tmp / "step.json")
    (tmp / "step.json").symlink_to(other / "new.json")  # dangling: the report creates it
    code, out, err = _run(capsys, model, tmp / "out.tflite", "--quantize", "float16", "--report", tmp / "chain.json")
    assert code == 0, err
    assert (tmp / "out.tflite").is_symlink() and (tmp / "chain.json").is_symlink() and (tmp / "step.json").is_symlink()
    io.read(other / "old.tflite").validate()
    assert json.loads((other / "new.json").read_text())["layers"]
    assert sorted(p.name for p in other.iterdir()) == ["new.json", "old.tflite"]  # no temporary file left
    (tmp / "stdout.tflite").symlink_to("/dev/stdout")
    (tmp / "fd.json").symlink_to("/proc/self/fd/1")
    _assert_refused(capsys, tmp, model, tmp / "stdout.tflite", "--quantize", "float16", words=["/dev/stdout",
                                                                                                 "not to a file"])
    _assert_refused(capsys, tmp, model, tmp / "o.tflite", "--report", tmp / "fd.json", words=["/proc/self/fd/1"])
    assert (tmp / "stdout.tflite").is_symlink() and (tmp / "fd.json").is_symlink()
    (tmp / "loop.tflite").symlink_to(tmp / "loop.tflite")
    _assert_refused(capsys, tmp, model, tmp / "loop.tflite", words=["loop.tflite"])
    # The library's own writer follows a link the same way.
    io.write(io.read(model), tmp / "out.tflite")
    assert (tmp / "out.tflite").is_symlink() and (other / "old.tflite").read_bytes() == io.to_bytes(io.read(model))


def test_missing_folders_and_folders_as_files(capsys, tmp):
    model, _, _ = _folder(tmp)
    out = tmp / "out.tflite"
    _assert_refused(capsys, tmp, model, out, "--report", tmp / "nope" / "r.json", words=["no such folder"])
    _assert_refused(capsys, tmp, model, tmp / "nope" / "o.tflite", words=["no such folder"])
    (tmp / "dir").mkdir()
    _assert_refused(capsys, tmp, model, out, "--report", tmp / "dir", words=["is a directory"])
    _assert_refused(capsys, tmp, model, tmp / "dir", words=["is a directory"])
    _assert_refused(capsys, tmp, model, out, "--quantize", "int8", "--recipe", tmp / "missing.json",
                    words=["no such file"])
    _assert_refused(capsys, tmp, model, "/dev/null", words=["not a regular file"])
    assert os.path.exists("/dev/null")


def _unwritable_folder(tmp):
    if os.geteuid() != 0:
        folder = tmp / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    # root may write anywhere a permission bit forbids; sysfs refuses new files even to root
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return "/sys"
    os.close(fd)
    os.unlink(probe)
    pytest.skip("no folder here refuses new files to this user")


def test_unwritable_output_folder(capsys, tmp):
    model, _, _ = _folder(tmp)
    folder = _unwritable_folder(tmp)
    _assert_refused(capsys, tmp, model, f"{folder}/o.tflite", words=["cannot write into"])
    _assert_refused(capsys, tmp, model, tmp / "o.tflite", "--report", f"{folder}/r.json", words=["cannot write into"])


def test_a_failing_write_leaves_neither_model_nor_report(capsys, tmp, monkeypatch):
    model, _, _ = _folder(tmp)
    out, rep = tmp / "out.tflite", tmp / "r.json"

    def full_disk(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(rewrite, "write_json", full_disk)
    _assert_refused(capsys, tmp, model, out, "--quantize", "float16", "--report", rep, words=["No space left"])


def test_ctrl_c_exits_130_and_leaves_nothing(capsys, tmp, monkeypatch):
    model, _, _ = _folder(tmp)
    before = _snapshot(tmp)
    real_write = io.write

    def write_then_interrupt(m, path, **kw):
        real_write(m, path, **kw)
        raise KeyboardInterrupt
    monkeypatch.setattr(io, "write", write_then_interrupt)
    code, _, err = _run(capsys, model, tmp / "out.tflite", "--quantize", "float16", "--report", tmp / "r.json")
    assert code == 130 and "interrupted" in err
    assert _snapshot(tmp) == before


def test_model_and_report_are_written_together(capsys, tmp):
    model, _, _ = _folder(tmp)
    out, rep = tmp / "out.tflite", tmp / "r.json"
    code, _, err = _run(capsys, model, out, "--quantize", "float16", "--report", rep)
    assert code == 0, err
    assert json.loads(rep.read_text())["output"] == str(out)
    assert sorted(p.name for p in tmp.iterdir()) == sorted(["in.tflite", "recipe.json", "calib.npz", "out.tflite",
                                                           "r.json"])
    assert (tmp / "in.tflite").read_bytes() == SMALL.read_bytes()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_real_signal_mid_run_leaves_nothing(tmp, sig, code):
    """Interrupted while verifying (the model already written under its temporary name): exit 130 / 143, and
    neither the model, the report nor a temporary file is left."""
    model, _, _ = _folder(tmp)
    vgg = tmp / "vgg.tflite"
    vgg.write_bytes((FIXTURES / "vgg_digits.tflite").read_bytes())
    before = _snapshot(tmp)
    p = subprocess.Popen([sys.executable, "-m", "tfrewrite.cli", str(vgg), str(tmp / "o.tflite"), "--rank", "16",
                          "--verify", "--runs", str(verify.MAX_RUNS), "--report", str(tmp / "r.json")],
                         cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp.glob(".o.tflite.*")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)  # until the model is written under its temporary name: then it is verifying
    time.sleep(0.3)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert "nothing written" in err
    assert _snapshot(tmp) == before and sorted(p.name for p in tmp.iterdir()) == sorted(before)


def test_an_output_name_too_long_for_the_file_system(capsys, tmp):
    model, _, _ = _folder(tmp)
    _assert_refused(capsys, tmp, model, tmp / ("a" * 300 + ".tflite"), words=["too long"])


def test_ctrl_c_while_the_files_move_into_place_is_held_until_they_all_are(capsys, tmp, monkeypatch):
    """A Ctrl-C that arrives while the outputs are being moved into place is held back until they all are, then
    takes effect: exit 130, and the line says the outputs are complete (not "nothing written")."""
    model, _, _ = _folder(tmp)
    out, rep = tmp / "out.tflite", tmp / "r.json"
    real_replace = os.replace

    def replace_with_ctrl_c(src, dst):
        if Path(dst) == out:  # the staged model moving onto its target, the report still to come
            os.kill(os.getpid(), signal.SIGINT)
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace_with_ctrl_c)
    code, _, err = _run(capsys, model, out, "--quantize", "float16", "--report", rep)
    assert code == 130, err
    assert err.count("\n") == 1 and "interrupted after the outputs were moved into place" in err, err
    assert json.loads(rep.read_text())["output"] == str(out) and io.read(out) is not None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("when", ["measure_output_error", "verify_against", "write_json"])
def test_an_output_folder_removed_during_the_run_is_one_error_line(capsys, tmp, monkeypatch, when):
    """The output's folder removed after the checks (while the output error is measured, while --verify runs,
    before the files move into place): one `tfrewrite: error:` line naming the folder, exit 2, nothing left;
    it ended in "internal error" (the rewritten model "does not run", or a FileNotFoundError from the move)."""
    import shutil
    model, _, _ = _folder(tmp)
    folder = tmp / "out"
    folder.mkdir()
    real = getattr(rewrite, when)

    def remove_the_folder_first(*args):
        if when == "write_json":  # the report is written: the next step moves both into place
            real(*args)
            shutil.rmtree(folder)
            return None
        shutil.rmtree(folder)
        return real(*args)
    monkeypatch.setattr(rewrite, when, remove_the_folder_first)
    code, _, err = _run(capsys, model, folder / "o.tflite", "--quantize", "float16", "--report", folder / "r.json",
                        "--verify", "--runs", "1", "--samples", "2")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"tfrewrite: error: {folder}"), err
    assert "nothing written" in err and ".tmp" not in err
    assert not folder.exists()


def test_a_report_folder_removed_before_the_move_leaves_neither(capsys, tmp, monkeypatch):
    """The model and the report in different folders, the report's removed after it was written: neither moves
    into place (both or neither), one error line. Should a move still fail between the two (a folder removed in
    that instant), the line says which file is already in place."""
    import shutil
    model, _, _ = _folder(tmp)
    (tmp / "reports").mkdir()
    out, rep = tmp / "o.tflite", tmp / "reports" / "r.json"
    real = rewrite.write_json

    def then_remove(obj, path):
        real(obj, path)
        shutil.rmtree(tmp / "reports")
    monkeypatch.setattr(rewrite, "write_json", then_remove)
    code, _, err = _run(capsys, model, out, "--quantize", "float16", "--report", rep)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"tfrewrite: error: {rep}: "), err
    assert "nothing written" in err and not out.exists() and not list(tmp.glob(".*.tmp"))
    monkeypatch.setattr(rewrite, "write_json", real)
    (tmp / "reports").mkdir()
    real_replace = os.replace

    def report_move_fails(src, dst):
        if Path(dst) == rep:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", report_move_fails)
    code, _, err = _run(capsys, model, out, "--quantize", "float16", "--report", rep)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"tfrewrite: error: {rep}: cannot move the finished file into place") and \
        f"{out} already in place" in err, err
    assert io.read(out) is not None and not list(tmp.glob(".*.tmp")) and not list(tmp.glob("reports/.*.tmp"))
