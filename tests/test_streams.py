"""After the outputs are moved into place the run only prints: a stdout or stderr that cannot take it, or a Ctrl-C
then, leaves the outputs complete, and the run ends with one line saying so or quietly, never with a traceback, an
internal error or a kill."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from conftest import FIXTURES, ROOT
from tfrewrite import cli, io

SMALL = FIXTURES / "two_signatures.tflite"


def _cli(argv, stdout, stderr=subprocess.PIPE, **kw):
    """The command as a user runs it (its own process: the interpreter's last flush of stdout is part of it)."""
    return subprocess.run([sys.executable, "-m", "tfrewrite.cli", *map(str, argv)], stdout=stdout, stderr=stderr,
                          text=True, cwd=ROOT, timeout=300, **kw)


def _one_error_line(stderr: str, *words):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tfrewrite: error: "), stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_a_full_stdout_is_one_error_line_and_the_outputs_stay_complete(tmp, capsys):
    """`tfrewrite in out ... > /dev/full`: the model and the report were committed before the summary is printed;
    they stay, complete, and the run says so in one line (exit 2) instead of an internal error."""
    out, rep = tmp / "out.tflite", tmp / "r.json"
    with open("/dev/full", "w") as full:
        done = _cli([SMALL, out, "--quantize", "float16", "--report", rep], stdout=full)
    assert done.returncode == 2, done.stderr
    _one_error_line(done.stderr, "could not write to stdout", "No space left on device", str(out), str(rep),
                    "were written and are complete")
    # Complete: byte for byte what a run with a working stdout writes.
    assert cli.main([str(SMALL), str(tmp / "again.tflite"), "--quantize", "float16"]) == 0
    capsys.readouterr()
    assert out.read_bytes() == (tmp / "again.tflite").read_bytes()
    io.read(out).validate()
    with open("/dev/full", "w") as full:
        done = _cli(["inspect", SMALL], stdout=full)
    assert done.returncode == 2
    _one_error_line(done.stderr, "could not write to stdout")
    for argv in (["--help"], ["inspect", "--help"], ["compare", "--help"]):  # argparse prints and exits itself
        with open("/dev/full", "w") as full:
            done = _cli(argv, stdout=full)
        assert done.returncode == 2, argv
        _one_error_line(done.stderr, "could not write to stdout")
    done = _cli(["--help"], stdout=subprocess.PIPE)
    assert done.returncode == 0 and "usage: tfrewrite" in done.stdout and done.stderr == ""


def test_a_reader_that_stops_reading_ends_the_run_quietly(tmp):
    """`tfrewrite ... | head -1`: the reader has gone before the summary is written (a pipe whose reading end is
    closed): no traceback, no error line, exit 0, and the model is written."""
    out = tmp / "out.tflite"
    for argv in ([SMALL, out, "--quantize", "float16"], ["inspect", SMALL]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            done = _cli(argv, stdout=write_end)
        finally:
            os.close(write_end)
        assert done.returncode == 0 and done.stderr == "", (argv, done.stderr)
    io.read(out).validate()


def test_an_unwritable_stderr_does_not_change_the_outcome(tmp):
    """A warning that stderr cannot take (a full disk) is lost, not a fault: the run still succeeds."""
    out = tmp / "out.tflite"
    # Rank-1 FC layers kept by --force: output error above 1, "probably broken" on stderr.
    with open("/dev/full", "w") as full:
        done = _cli([FIXTURES / "resnet_concat_digits.tflite", out, "--fc-rank", "1", "--force"],
                    stdout=subprocess.PIPE, stderr=full)
    assert done.returncode == 0, done.stdout
    assert re.search(r"output error: 1\.\d+ ", done.stdout), done.stdout
    io.read(out).validate()


def test_closed_standard_streams(tmp):
    """`tfrewrite ... >&- 2>&-`: nothing to print to, and no file the run opens takes their descriptors (LiteRT
    logs to descriptor 2); the run succeeds and writes the model a normal run writes."""
    out, again = tmp / "out.tflite", tmp / "again.tflite"
    assert _cli([SMALL, again, "--quantize", "float16"], stdout=subprocess.PIPE).returncode == 0
    for closing in (">&-", "2>&-", ">&- 2>&-"):
        done = subprocess.run(["/bin/sh", "-c", f'exec "$0" -m tfrewrite.cli "$1" "$2" --quantize float16 {closing}',
                               sys.executable, str(SMALL), str(out)], cwd=ROOT, timeout=300)
        assert done.returncode == 0, closing
        assert out.read_bytes() == again.read_bytes(), closing


def _full_pipe():
    """A pipe whose buffer is already full: a process writing to it blocks until the other end is read."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    for chunk in (65536, 4096, 1):
        try:
            while True:
                os.write(write_end, b"x" * chunk)
        except BlockingIOError:
            pass
    os.set_blocking(write_end, True)
    return read_end, write_end


def _read_all(fd):
    while os.read(fd, 1 << 16):
        pass


def test_ctrl_c_while_the_summary_prints_leaves_complete_outputs_and_says_so(tmp, capsys):
    """A real Ctrl-C after the commit, while the summary is being written (to a reader that is not reading: the
    run blocks in its write): exit 130 with one line naming the outputs as complete, which they are. (Before:
    "interrupted; nothing written", beside two complete files.)"""
    out, rep = tmp / "out.tflite", tmp / "r.json"
    assert cli.main([str(SMALL), str(tmp / "again.tflite"), "--quantize", "float16"]) == 0
    capsys.readouterr()
    read_end, write_end = _full_pipe()
    p = subprocess.Popen([sys.executable, "-m", "tfrewrite.cli", str(SMALL), str(out), "--quantize", "float16",
                          "--report", str(rep)], stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    os.close(write_end)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and rep.exists()) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)  # committed: from here on the run only prints, and the full pipe holds it
        time.sleep(0.5)
        assert p.poll() is None, p.stderr.read()
        p.send_signal(signal.SIGINT)
        # The interrupted process still flushes what it buffered on its way out: read it all meanwhile.
        drain = threading.Thread(target=_read_all, args=(read_end,), daemon=True)
        drain.start()
        err = p.stderr.read()
        p.wait(timeout=60)
        drain.join(timeout=60)
    finally:
        os.close(read_end)
    assert p.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tfrewrite: interrupted after the outputs were moved into place")
    assert f"{out} and {rep} were written and are complete" in lines[0]
    assert out.read_bytes() == (tmp / "again.tflite").read_bytes()
    assert json.loads(rep.read_text())["output"] == str(out)
    assert not list(tmp.glob(".*.tmp"))


def test_ctrl_c_during_interpreter_shutdown_changes_nothing(tmp):
    """A Ctrl-C once the command has returned (here from an exit handler that runs as the interpreter shuts
    down) is ignored: the run's status stays 0 and no KeyboardInterrupt traceback follows a finished run."""
    out = tmp / "out.tflite"
    late_ctrl_c = ("import atexit, os, runpy, signal, sys, time\n"
                   "def ctrl_c():\n"
                   "    os.kill(os.getpid(), signal.SIGINT)\n"
                   "    time.sleep(0.2)\n"
                   "atexit.register(ctrl_c)\n"
                   "sys.argv = ['tfrewrite'] + sys.argv[1:]\n"
                   "runpy.run_module('tfrewrite.cli', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", late_ctrl_c, str(SMALL), str(out), "--quantize", "float16"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "KeyboardInterrupt" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "total:" in done.stdout
    io.read(out).validate()
