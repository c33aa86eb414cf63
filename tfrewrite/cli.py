"""Command line: argument parsing and printing only; the work happens in `rewrite`, `analysis`, `verify`."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

EXIT_OK, EXIT_FAULT, EXIT_USAGE, EXIT_VERIFY, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143


class UsageError(Exception):
    pass


class StdoutLost(Exception):
    """stdout refused what was printed (a full disk, a closed file): after a rewrite, its outputs are complete."""


class Terminated(BaseException):
    """SIGTERM (a build system's timeout): unwinds like Ctrl-C, so temporary files are removed."""


def _raise_terminated(signum, frame):
    raise Terminated()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for bad input
        raise UsageError(message)

    def print_help(self, file=None):  # argparse drops a failed write: `--help > /dev/full` is an error as for any output
        with _printing():
            print(self.format_help(), end="", file=file or sys.stdout)


def _auto_or(kind):
    """An argument type: a number of `kind`, or the word 'auto' (the budget chooses it per layer)."""
    def parse(text: str):
        if text == "auto":
            return text
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither {'an integer' if kind is int else 'a number'} "
                                             "nor 'auto'") from None
    parse.__name__ = kind.__name__
    return parse


def _rewrite_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tfrewrite", description=(
        "Rewrite a .tflite model to make it smaller and faster, without retraining. "
        "Other commands: 'tfrewrite inspect MODEL', 'tfrewrite compare A B'."))
    p.add_argument("input", help="the .tflite model to read (never written)")
    p.add_argument("output", help="where to write the rewritten model (atomically)")
    g = p.add_argument_group("low rank (FULLY_CONNECTED: SVD; CONV_2D: CP or Tucker-2)")
    g.add_argument("--rank", type=_auto_or(int), help="rank for every rewritten layer; 'auto': chosen per layer "
                   "by --target-size/--target-macs (their default; with --prune auto it mixes both)")
    g.add_argument("--fc-rank", type=int, help="rank for FULLY_CONNECTED layers")
    g.add_argument("--conv-rank", type=int, help="rank for CONV_2D layers (CP/Tucker-2 rank for kxk, SVD rank for 1x1)")
    g.add_argument("--ratio", type=float, help="per layer, the rank that cuts its parameters X-fold, fitted to the "
                   "layer's outputs (on --calibration, else on generated images); a layer whose fit loses too much "
                   "is left as it is (--force rewrites it)")
    g.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this share of the squared norm")
    g.add_argument("--conv-method", choices=["cp", "tucker2"], help="decomposition of kxk convs (default cp)")
    g = p.add_argument_group("pruning (stored in TFLite's sparse format)")
    g.add_argument("--prune", type=_auto_or(float), metavar="S", help="per layer, zero the smallest weights to "
                   "sparsity S; 'auto' with --target-size X: each layer's sparsity chosen for the least damage")
    g.add_argument("--prune-block", metavar="1x4", help="prune FULLY_CONNECTED weights in whole 1x4 blocks")
    g.add_argument("--prune-depthwise", action="store_true", help="prune DEPTHWISE_CONV_2D too (off by default)")
    g.add_argument("--sparse-encode", action="store_true",
                   help="store weights that already hold enough zeros in the sparse format (implied by --prune)")
    g = p.add_argument_group("structured pruning (whole channels removed: a smaller dense model)")
    g.add_argument("--prune-channels", type=_auto_or(float), metavar="F", help="remove share F of every channel "
                   "group (with --calibration: chosen and refitted on the data); auto: each group's share chosen "
                   "by --target-macs / --target-size")
    g.add_argument("--channel-multiple", type=int, metavar="N",
                   help="kept channel counts are multiples of N (default 8)")
    g = p.add_argument_group("quantization (weights only)")
    g.add_argument("--quantize", choices=["float16", "int8", "full-int8"],
                   help="store weights as float16 or int8; full-int8: the whole model to int8 activations and "
                        "weights after the other passes (needs --calibration and ai-edge-quantizer)")
    g.add_argument("--per-tensor", choices=["auto"], help="full-integer int8 models with --target-size and "
                   "--calibration: the budget may also requantize a layer's weights per tensor (one scale instead "
                   "of one per output channel, 24 bytes less per channel) where its measured damage is least")
    s = p.add_argument_group("selection")
    s.add_argument("--only", metavar="REGEX", help="rewrite only ops whose output tensor name matches")
    s.add_argument("--skip", metavar="REGEX", help="leave ops whose output tensor name matches")
    s.add_argument("--min-params", type=int, default=0, metavar="N", help="leave layers with fewer weights alone")
    s.add_argument("--recipe", metavar="FILE.json", help="per-layer settings (schemas/recipe.schema.json); "
                   "the command-line options are the defaults")
    s.add_argument("--force", action="store_true", help="keep rewrites that save nothing, make the file larger, or "
                   "break the model (output error above 0.5; for checks)")
    d = p.add_argument_group("data-aware fitting (a few real inputs, no retraining)")
    d.add_argument("--calibration", metavar="FILE.npz", help="sample inputs (arrays named after the model inputs); "
                   "low-rank layers are then fitted to their outputs on them, with bias correction")
    d.add_argument("--sequential", action="store_true", help="fit each layer on the activations of the already "
                   "rewritten layers before it")
    d.add_argument("--activation-percentile", type=float, metavar="P", help="full-integer models: the int8 "
                   "tensors a low-rank chain adds cover their calibration values from the (100-P)-th to the P-th "
                   "percentile (default 100: min/max)")
    d.add_argument("--target-size", type=float, metavar="X", help="choose every layer's rank so the file gets X "
                   "times smaller with the least measured damage")
    d.add_argument("--target-macs", type=float, metavar="X", help="the same for X times fewer MACs")
    v = p.add_argument_group("verification (a fidelity gate for build pipelines)")
    v.add_argument("--verify", action="store_true", help="compare the rewritten model with the input after writing")
    v.add_argument("--data", metavar="FILE.npz", help="inputs for --verify (arrays named after the model inputs; "
                   "optional 'labels'); default: seeded generated inputs")
    v.add_argument("--max-error", type=float, metavar="X", help="fail (exit 3, no output) when an output's "
                   "relative L2 error exceeds X")
    v.add_argument("--min-top5-agree", type=float, metavar="Y", help="fail (exit 3, no output) when top-5 "
                   "agreement with the input model is below Y")
    v.add_argument("--signature", metavar="KEY", help="the signature whose inputs the --calibration and --data "
                   "files name (default: the main subgraph's, or the one signature they fit)")
    v.add_argument("--samples", type=int, default=8, help="random samples when no --data (default 8)")
    v.add_argument("--runs", type=int, default=10, help="timed runs per model (default 10)")
    o = p.add_argument_group("output")
    o.add_argument("--report", metavar="FILE.json", help="write a JSON report of every considered op")
    o.add_argument("--quiet", action="store_true", help="print only the total line")
    return p


def _inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tfrewrite inspect", description="One row per operator, then totals.")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _compare_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tfrewrite compare", description="Size, parameters, MACs, latency and output fidelity of "
                "model B against model A, run in the LiteRT interpreter.")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--data", metavar="FILE.npz", help="inputs (arrays named after the model inputs or the "
                   "signature's inputs, first axis = samples) and optional integer 'labels'")
    p.add_argument("--samples", type=int, default=8, help="seeded generated samples when no --data (default 8)")
    # 1, not 0: the data-free fits use seed 0's generated inputs (verify.CHECK_SEED; verify is not imported here).
    p.add_argument("--seed", type=int, default=1, help="seed of the generated samples (default 1; the data-free "
                   "fits use seed 0's, so the default measures on inputs they did not see)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model, interleaved (default 20)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-xnnpack", action="store_true", help="use the builtin kernels only")
    p.add_argument("--signature", metavar="KEY", help="which signature to run (models with several)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


# ------------------------------------------------------------------------------------------ printing
def _fmt_int(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt_bytes(n) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _table(headers, rows) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) if i in (2, 3) or not c[:1].isdigit() else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def print_inspect(summary: dict) -> None:
    rows = []
    for r in summary["ops"]:
        weight = f"{'x'.join(map(str, r['weight_shape']))} {r['weight_dtype']}{' sparse' if r['weight_sparse'] else ''}" if r["weight_shape"] else "-"
        zeros = f"{100 * r['zero_fraction']:.1f}%" if r["zero_fraction"] is not None else "-"
        channels = "→".join("?" if c is None else str(c) for c in r["channels"]) if r.get("channels") else "-"
        rows.append([r["subgraph"], r["index"], r["op"], _short(r["output"]), weight, channels,
                     _fmt_int(r["params"]), _fmt_int(r["macs"]) if r["macs"] else "-", zeros])
    print(_table(["sg", "#", "op", "output", "weight", "channels", "params", "MACs", "zeros"], rows))
    t = summary["totals"]
    print(f"total: {len(summary['ops'])} ops, {_fmt_int(t['params'])} params, {_fmt_int(t['macs'])} MACs, "
          f"weights {_fmt_bytes(t['weight_bytes'])}, file {_fmt_bytes(summary['file_bytes'])}")


def print_report(report: dict, quiet: bool = False) -> None:
    from . import rewrite
    layers = report["layers"]
    if not quiet and layers:
        data_aware = any("output_error" in e for e in layers)
        budget = any("damage" in e for e in layers)
        headers = ["sg", "#", "op", "output", "weight", "action", "rank", "params", "MACs", "w.err"]
        headers += ["out.err"] if data_aware else []
        headers += ["damage", "share"] if budget else []
        rows = []
        for e in layers:
            shape = "x".join(map(str, e["weight_shape"])) if e["weight_shape"] else "-"
            rank = e.get("rank")
            rank = "x".join(map(str, rank)) if isinstance(rank, list) else (rank if rank is not None else "-")
            if "channels_before" in e:  # structured pruning: a group's channel count
                rank = f"{e['channels_before']}→{e['channels_after']} ch"
            elif e["kind"] == "prune" and e["action"] == "pruned":
                rank = f"{100 * e['sparsity_after']:.0f}% zeros"
            err = f"{e['rel_error']:.3f}" if e.get("rel_error") is not None else "-"
            action = e["action"] if e["action"] != "skipped" else f"skipped: {e['reason']}"
            row = [e["subgraph"], e["index"], e["op"], _short(e["output"], 40), shape, action, rank,
                   f"{_fmt_int(e['params_before'])}→{_fmt_int(e['params_after'])}",
                   f"{_fmt_int(e['macs_before'])}→{_fmt_int(e['macs_after'])}", err]
            if data_aware:
                row.append(f"{e['output_error']:.3f}" if e.get("output_error") is not None else "-")
            if budget:
                row += [f"{e['damage']:.3f}" if "damage" in e else "-",
                        f"{100 * e['budget_share']:.1f}%" if "budget_share" in e else "-"]
            rows.append(row)
        print(_table(headers, rows))
    t = report["totals"]
    params = f"params {_fmt_int(t['params_before'])} → {_fmt_int(t['params_after'])}"
    # Pruned weights keep their dense shape: count what is left when zeros are a real share (not a few biases).
    if "nonzero_params_after" in t and t["params_after"] - t["nonzero_params_after"] > 0.01 * t["params_after"]:
        params = (f"nonzero params {_fmt_int(t['nonzero_params_before'])} → {_fmt_int(t['nonzero_params_after'])} "
                  f"({_fmt_int(t['params_before'])} → {_fmt_int(t['params_after'])} with zeros)")
    print(f"total: file {_fmt_bytes(t['file_bytes_before'])} → {_fmt_bytes(t['file_bytes_after'])} "
          f"({t['file_bytes_before'] / max(t['file_bytes_after'], 1):.2f}x smaller), {params}, "
          f"MACs {_fmt_int(t['macs_before'])} → {_fmt_int(t['macs_after'])}")
    error = report.get("output_error")
    if error and error["measured"]:
        worst = f"{error['worst']:.3g}" if error["worst"] is not None else "NaN/inf"
        others = error.get("generated_signatures")
        also = f"; signatures {', '.join(others)} on generated inputs" if others else ""
        print(f"output error: {worst} (relative L2 of the worst output on {rewrite.measured_on(error)}{also})")
        if error.get("note"):
            print(f"  note: {error['note']}")
    elif error:
        print(f"output error: not measured ({error['reason']})")
    budget = report.get("budget")
    if budget:
        print(f"budget: {budget['target']}, {'reached' if budget['reached'] else 'NOT reached'}: "
              f"{budget['achieved']:.2f}x at damage level {budget['damage_level']:.3f} "
              f"(estimated {budget['estimate']:.2f}x; damage {budget['damage']})")
        if budget.get("note"):
            print(budget["note"])
    for note in report.get("notes", []):
        print(note)
    for warning in report.get("warnings", []):
        _say(f"tfrewrite: warning: {warning}")


def print_compare(r: dict) -> None:
    rows = []
    for key in ("a", "b"):
        m = r[key]
        lat = f"{m['latency_ms']:.3f}" if m["latency_ms"] is not None else "-"
        rows.append([key.upper(), _fmt_bytes(m["file_bytes"]), _fmt_int(m["params"]), _fmt_int(m["macs"]), lat])
    print(_table(["model", "file", "params", "MACs", "latency ms"], rows))
    if r.get("speedup"):
        print(f"speed-up B vs A: {r['speedup']:.2f}x (median of interleaved runs)")
    if r.get("note"):
        print(r["note"])
    if not r["outputs"]:
        return
    rows = []
    for o in r["outputs"]:
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"
        rows.append([_short(o["name"], 40), f"{o['rel_l2']:.3g}", f"{o['max_abs']:.3g}", f"{o['cosine']:.6f}",
                     pct(o["top1_agree"]), pct(o["top5_agree"])])
    print(_table(["output", "rel L2", "max abs", "cosine", "top-1 agree", "top-5 agree"], rows))
    if "accuracy" in r:
        acc = r["accuracy"]
        print(f"accuracy on {r['samples']} labelled samples: A top-1 {100 * acc['a']['top1']:.2f}% top-5 "
              f"{100 * acc['a']['top5']:.2f}%, B top-1 {100 * acc['b']['top1']:.2f}% top-5 {100 * acc['b']['top5']:.2f}%")


def _say(line: str) -> None:
    """One line on stderr; a stderr that cannot take it (closed, full) leaves only the exit status to tell."""
    if sys.stderr is None:  # closed (`2>&-`): print(file=None) would write to stdout
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _stop_printing() -> None:
    """Point stdout at the null device (Python's own advice for a broken pipe): what is still buffered for it
    would fail again when the interpreter flushes it on exit, with a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (a library caller's capture): nothing to do
        pass


@contextlib.contextmanager
def _printing(written: str = ""):
    """Print to stdout, flushed at the end. A reader that went away (`| head -1`) propagates as BrokenPipeError
    (ended quietly by `_main`); a stdout that refuses the text (disk full, `> /dev/full`) is StdoutLost, its
    message saying what the run wrote all the same (`written`)."""
    try:
        yield
        if sys.stdout is not None:  # None: the caller closed it (`>&-`), and print() drops everything
            sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        _stop_printing()
        raise StdoutLost(f"could not write to stdout ({e.strerror or e})" + (f"; {written}" if written else "")
                         ) from None


# ------------------------------------------------------------------------------------------ commands
def cmd_compare(argv) -> int:
    args = _compare_parser().parse_args(argv)
    from . import io, verify
    try:
        verify.check_run_options(args.samples, args.runs, args.threads, args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for path in (args.a, args.b):
        io.read(path)  # a clear error for a bad file before the interpreter sees it
    result = verify.compare(args.a, args.b, data=args.data, samples=args.samples, seed=args.seed, runs=args.runs,
                            threads=args.threads, xnnpack=not args.no_xnnpack, signature=args.signature)
    with _printing():
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print_compare(result)
    return EXIT_OK


def cmd_inspect(argv) -> int:
    args = _inspect_parser().parse_args(argv)
    from . import analysis, io
    model = io.read(args.model)
    summary = analysis.summary(model, file_bytes=os.path.getsize(args.model))
    with _printing():
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            print_inspect(summary)
    return EXIT_OK


def _complete(paths) -> str:
    """'a and b were written and are complete', for the outputs a run has moved into place."""
    names = " and ".join(str(p) for p in paths)
    return f"{names} {'were' if len(paths) > 1 else 'was'} written and {'are' if len(paths) > 1 else 'is'} complete"


def cmd_rewrite(argv) -> int:
    args = _rewrite_parser().parse_args(argv)
    from . import rewrite
    try:
        options = rewrite.Options.from_namespace(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    written = []  # the outputs the run has moved into place: complete from then on
    try:
        try:
            report = rewrite.run(args.input, args.output, options,
                                 progress=sys.stderr is not None and sys.stderr.isatty(), committed=written)
        except (rewrite.RecipeError, rewrite.OptionError) as e:
            raise UsageError(str(e)) from None
        except rewrite.RewriteFault as e:
            _say(f"tfrewrite: internal error: {e}")
            return EXIT_FAULT
        except rewrite.VerifyFailed as e:
            _say(f"tfrewrite: verification failed: {e}; no output written")
            return EXIT_VERIFY
        with _printing(_complete(written)):
            print_report(report, quiet=args.quiet)
            if "verify" in report:
                print_compare(report["verify"])
    except (KeyboardInterrupt, Terminated) as e:
        if not written:  # before the commit: nothing is left (`_main` says so)
            raise
        # After it the outputs are complete: the run ends as the signal asks, saying what it leaves.
        interrupted = isinstance(e, KeyboardInterrupt)
        _say(f"tfrewrite: {'interrupted' if interrupted else 'terminated'} after the outputs were moved into "
             f"place: {_complete(written)}")
        return EXIT_INTERRUPTED if interrupted else EXIT_TERMINATED
    return EXIT_OK


def _fill_closed_standard_fds() -> None:
    """A standard descriptor the caller closed (`2>&-`) gets the null device: a file the run opens would take its
    number otherwise, and LiteRT's log lines (written to descriptor 2) would go into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


def main(argv=None) -> int:
    import signal
    _fill_closed_standard_fds()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
        installed = True
    except ValueError:  # not the main thread: leave signals alone
        installed = False
    try:
        return _main(argv)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _main(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):  # a layer name or our own '…' on an ASCII-only terminal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from .io import ModelError, PathError
    from .verify import DataError, NotRunnable
    try:
        if argv[:1] == ["inspect"]:
            return cmd_inspect(argv[1:])
        if argv[:1] == ["compare"]:
            return cmd_compare(argv[1:])
        return cmd_rewrite(argv)
    except (UsageError, ModelError, PathError, DataError, NotRunnable, StdoutLost) as e:
        _say(f"tfrewrite: error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say("tfrewrite: interrupted; nothing written")
        return EXIT_INTERRUPTED
    except Terminated:
        _say("tfrewrite: terminated; nothing written")
        return EXIT_TERMINATED
    except BrokenPipeError:  # the reader stopped reading (`| head -1`): what it read is what it asked for
        _stop_printing()
        return EXIT_OK
    except Exception as e:  # an internal fault: one line unless asked for the traceback
        if os.environ.get("TFREWRITE_DEBUG"):
            raise
        _say(f"tfrewrite: internal error: {type(e).__name__}: {e} (set TFREWRITE_DEBUG=1 for a traceback)")
        return EXIT_FAULT


def entry() -> int:
    """The process's entry point (the `tfrewrite` command, `python -m tfrewrite.cli`): `main`, then Ctrl-C and
    SIGTERM ignored while the interpreter shuts down. The run is over and what it wrote is final; a signal then
    would only turn its status into a kill, or add a KeyboardInterrupt traceback from an exit handler."""
    import signal
    status = main()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    return status


if __name__ == "__main__":
    sys.exit(entry())
