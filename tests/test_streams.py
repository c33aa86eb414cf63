"""stdout and stderr that cannot take what the run prints: the outputs stay as the run wrote them, and the run
ends with one line or quietly, never with a traceback or an internal error."""
import os
import subprocess
import sys

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
                    "written and complete")
    # Complete: byte for byte what a run with a working stdout writes.
    assert cli.main([str(SMALL), str(tmp / "again.tflite"), "--quantize", "float16"]) == 0
    capsys.readouterr()
    assert out.read_bytes() == (tmp / "again.tflite").read_bytes()
    io.read(out).validate()
    with open("/dev/full", "w") as full:
        done = _cli(["inspect", SMALL], stdout=full)
    assert done.returncode == 2
    _one_error_line(done.stderr, "could not write to stdout")


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
    with open("/dev/full", "w") as full:  # rank 1 kept by --force: output error ~0.7, "probably broken" on stderr
        done = _cli([SMALL, out, "--fc-rank", "1", "--force"], stdout=subprocess.PIPE, stderr=full)
    assert done.returncode == 0, done.stdout
    assert "output error: 0.6" in done.stdout
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
