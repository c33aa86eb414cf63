"""Run models in the LiteRT interpreter, compare their outputs and time them.

The interpreter is imported here only, when a model is really run, so that `--help` and `inspect` stay fast.
Timings interleave the models run for run and quote medians; allocation and the first run (where XNNPACK
prepares its packed weights) are never timed.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# Bounds on what a command line may ask for: beyond them a run takes hours, or the runtime crashes (threads).
MAX_SAMPLES = 10_000
MAX_RUNS = 100_000
MAX_THREADS = 64


def check_run_options(samples: int, runs: int, threads: int = 1, seed: int = 0) -> None:
    """The one check of --samples, --runs, --threads and --seed (rewrite --verify and compare)."""
    for flag, value, top in (("--samples", samples, MAX_SAMPLES), ("--runs", runs, MAX_RUNS),
                             ("--threads", threads, MAX_THREADS)):
        if not 1 <= value <= top:
            raise ValueError(f"{flag} must be between 1 and {top}")
    if not 0 <= seed < 2**63:
        raise ValueError("--seed must be a non-negative integer")


class NotRunnable(RuntimeError):
    """A model the LiteRT interpreter refuses or fails on (a custom op without a kernel, an input it cannot
    take); the message says which model and the runtime's reason, on one line; `reason` is the runtime's alone."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def _runtime_reason(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("See instructions")]
    return " ".join(lines) or type(e).__name__


def interpreter(model, xnnpack: bool = True, threads: int = 1, name: str | None = None):
    """An allocated interpreter for a path or the model's bytes; XNNPACK on or off. `name` says what the model
    is in an error (a file the tool made itself must not be named as if the user gave it)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    kwargs = {"model_path": str(model)} if isinstance(model, (str, Path)) else {"model_content": bytes(model)}
    reason = None
    # With XNNPACK, the builtin kernels prepare the model first: XNNPACK's own failure path crashes the process
    # (SIGSEGV) when stderr is captured as here, on a model its kernels refuse (a FULLY_CONNECTED without its
    # weight input); the builtin kernels refuse the same models and say why.
    resolvers = [OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES] + ([OpResolverType.AUTO] if xnnpack else [])
    try:
        with _quiet_runtime_info():
            for resolver in resolvers:
                it = None
                it = Interpreter(**kwargs, num_threads=threads, experimental_op_resolver_type=resolver)
                it.allocate_tensors()
    except (RuntimeError, ValueError) as e:
        reason = _runtime_reason(e)
    if reason is None:
        return it
    # The failed interpreter must be gone before another is made: LiteRT crashes (SIGSEGV) allocating a second
    # one while one that failed to prepare is alive. Raised outside the `except`, so that no traceback (whose
    # frames hold it) stays attached to the error as its context.
    it = None
    gc.collect()
    name = name or (str(model) if isinstance(model, (str, Path)) else "the model")
    raise NotRunnable(f"{name} does not run in LiteRT: {reason}", reason)


@contextlib.contextmanager
def _quiet_runtime_info():
    """The runtime prints 'INFO: Created TensorFlow Lite XNNPACK delegate' on the process's stderr for every
    interpreter; drop those lines (anything else it prints is passed on)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            rest = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not line.startswith("INFO: ")]
            if rest:
                sys.stderr.write("".join(rest))


# Side of the generated images for an input whose height or width is dynamic: a common trained size between
# the 32-pixel digits of small nets and ImageNet's 224 (cost grows with its square in every data-free budget).
GENERATED_IMAGE_SIDE = 128


def _plausible_array(shape, dtype, spec: dict | None, rng) -> np.ndarray:
    """One seeded array; `spec` (analysis.input_ranges) says what range the model reads it in. Without one:
    standard normal floats, small non-negative integers. Unknown dims count as 1."""
    shape = [s if s > 0 else 1 for s in shape]
    dtype = np.dtype(dtype)
    spec = spec or {"kind": "normal" if dtype.kind == "f" else "integer"}
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind == "f":
        if spec["kind"] == "uniform":
            return rng.uniform(spec["low"], spec["high"], shape).astype(dtype)
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind not in "iu":
        return np.zeros(shape, dtype)
    from .analysis import SMALL_INTEGERS
    info = np.iinfo(dtype)
    low, high = (spec["low"], spec["high"]) if spec["kind"] in ("index", "integer") else SMALL_INTEGERS
    low, high = np.asarray(low, np.int64), np.asarray(high, np.int64)
    if (low.ndim or high.ndim) and (not shape or shape[-1] != max(low.size, high.size)):
        low, high = low.max(), high.min()  # per-component bounds that do not fit the last axis
    low, high = np.clip(low, info.min, info.max), np.clip(high, info.min, info.max)
    return rng.integers(low, np.maximum(high, low) + 1, shape).astype(dtype)


def _quantized_spec(detail) -> dict | None:
    """Quantized integer inputs span their whole quantized range (it maps the calibrated real range)."""
    scales = detail.get("quantization_parameters", {}).get("scales")
    dtype = np.dtype(detail["dtype"])
    if scales is None or not len(scales) or dtype.kind not in "iu":
        return None
    info = np.iinfo(dtype)
    return {"kind": "integer", "low": -info.max if dtype == np.int16 else info.min, "high": info.max}


def random_inputs(it, samples: int = 1, seed: int = 0) -> list[list[np.ndarray]]:
    """Seeded inputs of the right shapes and dtypes for an interpreter: `samples` lists, one array per model
    input (`Runner.random_samples` also keeps index inputs within what they index)."""
    rng = np.random.default_rng(seed)
    details = it.get_input_details()
    return [[_plausible_array(d["shape"], d["dtype"], _quantized_spec(d), rng) for d in details]
            for _ in range(samples)]


def invoke(it, inputs: list[np.ndarray]) -> list[np.ndarray]:
    try:
        for d, x in zip(it.get_input_details(), inputs):
            if list(x.shape) != list(d["shape"]):
                it.resize_tensor_input(d["index"], list(x.shape))
                it.allocate_tensors()
            it.set_tensor(d["index"], x)
        it.invoke()
    except (RuntimeError, ValueError) as e:
        raise NotRunnable(f"the model fails in LiteRT on these inputs: {_runtime_reason(e)}") from None
    return [np.array(it.get_tensor(d["index"])) for d in it.get_output_details()]


def run(model, inputs: list[list[np.ndarray]], xnnpack: bool = True, threads: int = 1) -> list[list[np.ndarray]]:
    """Outputs for each input sample."""
    it = interpreter(model, xnnpack, threads)
    return [invoke(it, x) for x in inputs]


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How close one output is to the reference: relative L2, max abs error, cosine similarity."""
    a = np.asarray(reference, np.float64).reshape(-1)
    b = np.asarray(candidate, np.float64).reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return {
        "rel_l2": float(np.linalg.norm(a - b) / na) if na > 0 else float(np.linalg.norm(b)),
        "max_abs": float(np.max(np.abs(a - b))) if a.size else 0.0,
        "cosine": float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb),
    }


def _scale_zero_point(detail) -> tuple[float, int] | None:
    """A quantized output's (scale, zero point); None for a float or unquantized one. Per-channel quantized
    outputs are not produced by the converters; their first scale is used."""
    params = detail.get("quantization_parameters") or {}
    scales, zeros = params.get("scales"), params.get("zero_points")
    if np.dtype(detail["dtype"]).kind not in "iu" or scales is None or not len(scales) or not scales[0]:
        return None
    return float(scales[0]), int(zeros[0]) if zeros is not None and len(zeros) else 0


def _dequantized(x: np.ndarray, quantization: tuple[float, int] | None) -> np.ndarray:
    if quantization is None:
        return x
    scale, zero_point = quantization
    return (np.asarray(x, np.float64) - zero_point) * scale


class DataError(ValueError):
    """A data or calibration file that does not fit the model; the message says what and where."""


def _aliases(names) -> dict[str, str]:
    """Names a data file may use for each input: the name itself, without ':0', without the
    'serving_default_' prefix ('serving_default_image:0' may be given as 'serving_default_image' or 'image')."""
    aliases = {}
    for n in names:
        base = n.split(":")[0]
        aliases.update({n: n, base: n})
        if base.startswith("serving_default_"):
            aliases[base[len("serving_default_"):]] = n
    return aliases


def _names_match(names, keys) -> bool:
    """Whether arrays named `keys` feed exactly the inputs `names`."""
    aliases = _aliases(names)
    return all(k in aliases for k in keys) and {aliases[k] for k in keys} == set(names)


class Runner:
    """One model in the interpreter, fed by input name. With a signature key, names are the signature's.
    Inputs are kept in the order of the subgraph's inputs, so sample lists line up with the graph's."""

    def __init__(self, model, xnnpack: bool = True, threads: int = 1, signature: str | None = None):
        from . import io
        self.model = io.read(model) if isinstance(model, (str, Path)) else io.read_buffer(bytes(model))
        self.it = interpreter(model, xnnpack, threads)
        self.xnnpack = xnnpack
        self.signatures = self.it.get_signature_list()
        if signature is not None and signature not in self.signatures:
            raise DataError(f"no signature {signature!r}; the model has {sorted(self.signatures) or 'none'}")
        self.signature = signature
        self.runner = self.it.get_signature_runner(signature) if signature is not None else None
        if self.runner is not None:
            sig = next(d for d in self.model.signature_defs if d.key == signature)
            self.subgraph = sig.subgraph
            tensor_of = dict(sig.inputs)
            details = self.runner.get_input_details()
            position = {id(t): i for i, t in enumerate(self.subgraph.inputs)}
            names = sorted(details, key=lambda n: (position.get(id(tensor_of.get(n)), len(position)), n))
            self.tensors = [tensor_of.get(n) for n in names]
            self.inputs = [(n, [int(v) for v in details[n]["shape"]], np.dtype(details[n]["dtype"])) for n in names]
            self.signature_shapes = [[int(v) for v in details[n].get("shape_signature", details[n]["shape"])]
                                     for n in names]
            self.input_quantization = [tuple(details[n].get("quantization", (0.0, 0))) for n in names]
            out_details = self.runner.get_output_details()
            self.outputs = sorted(out_details)
            self.output_quantization = [_scale_zero_point(out_details[n]) for n in self.outputs]
        else:
            self.subgraph = self.model.main
            details = self.it.get_input_details()
            self.tensors = list(self.subgraph.inputs)
            self.inputs = [(d["name"], [int(v) for v in d["shape"]], np.dtype(d["dtype"])) for d in details]
            self.signature_shapes = [[int(v) for v in d.get("shape_signature", d["shape"])] for d in details]
            self.input_quantization = [tuple(d.get("quantization", (0.0, 0))) for d in details]
            self.outputs = [d["name"] for d in self.it.get_output_details()]
            self.output_quantization = [_scale_zero_point(d) for d in self.it.get_output_details()]
        # A batch dimension fixed above 1 (input [3, H, W, C]): data files are fed in batches of that size.
        fixed = {s[0] for s in self.signature_shapes if len(s) >= 1 and s[0] > 1}
        self.batch = fixed.pop() if len(fixed) == 1 else 1
        self.mixed_batches = len(fixed) > 0

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self.runner is not None:
            try:
                result = self.runner(**{name: a for (name, _, _), a in zip(self.inputs, arrays)})
            except (RuntimeError, ValueError) as e:
                raise NotRunnable(f"signature {self.signature!r} fails in LiteRT on these inputs: "
                                  f"{_runtime_reason(e)}") from None
            return [np.array(result[name]) for name in self.outputs]
        return invoke(self.it, arrays)

    def real(self, outs: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Outputs as the real values they stand for: a quantized output's codes minus its zero point, times its
        scale (an int8 softmax with zero point -128 measured in codes understated its error three times)."""
        return [[_dequantized(o, q) for o, q in zip(out, self.output_quantization)] for out in outs]

    def per_sample(self, batches: list[list[np.ndarray]], count: int | None = None) -> list[list[np.ndarray]]:
        """The outputs of every sample in `batches`: a batch of the model's fixed size gives one output list per
        sample (dropping the padding after `count` samples) when every output leads with that batch size."""
        outs = [self(x) for x in batches]
        b = self.batch
        if b == 1 or not outs or any(o.ndim == 0 or o.shape[0] != b for o in outs[0]):
            return outs
        split = [[o[i:i + 1] for o in out] for out in outs for i in range(b)]
        return split[:count] if count is not None else split

    def input_specs(self) -> list[dict | None]:
        """The range the model reads each input in (analysis.input_ranges), None where nothing says."""
        from .analysis import input_ranges
        return input_ranges(self.subgraph, [t for t in self.tensors if t is not None]) \
            if all(t is not None for t in self.tensors) else [None] * len(self.inputs)

    def random_samples(self, samples: int, seed: int = 0) -> list[list[np.ndarray]]:
        """Seeded inputs in a range the model reads them in (analysis.input_ranges): index inputs stay within
        what they index, quantized inputs span their range."""
        rng = np.random.default_rng(seed)
        specs = self.input_specs()
        return [[_plausible_array(shape, dtype, spec, rng) for (_, shape, dtype), spec in zip(self.inputs, specs)]
                for _ in range(samples)]

    def generated_samples(self, samples: int, seed: int = 0) -> list[list[np.ndarray]]:
        """`random_samples`, with dead-leaves images for image-shaped float inputs (see `generated_samples`)."""
        out = self.random_samples(samples, seed)
        rng = np.random.default_rng(seed)
        sizes = self.image_sizes()
        for sample in out:
            for j, (_, shape, dtype) in enumerate(self.inputs):
                if sizes[j] is not None:
                    sample[j] = np.stack([dead_leaves(rng, *sizes[j], shape[3])
                                          for _ in range(max(shape[0], 1))]).astype(dtype)
        return out

    def image_sizes(self) -> list[tuple[int, int] | None]:
        """(height, width) of the images generated for each image-shaped float input ([N, H, W, 1..4]), None for
        other inputs. A dynamic side (-1 in the shape signature; the file's shape says 1) gets
        GENERATED_IMAGE_SIDE pixels: a 1x1 image judged every 3x3 conv on its centre tap alone."""
        sizes = []
        for (_, shape, dtype), wanted in zip(self.inputs, self.signature_shapes):
            if dtype.kind != "f" or len(shape) != 4 or not 1 <= shape[3] <= 4:
                sizes.append(None)
                continue
            side = [GENERATED_IMAGE_SIDE if len(wanted) == 4 and wanted[i] < 0 else shape[i] for i in (1, 2)]
            sizes.append(tuple(side) if min(side) > 1 else None)
        return sizes

    def generated_note(self) -> str | None:
        """What generated inputs assume that real ones may not bear out, or None: an input whose spatial size is
        dynamic (images of a guessed size), a float input neither image-shaped nor read in a stated range
        (standard-normal noise: on a model trained on non-negative features the error measured on it read 0.09
        where real-range inputs gave 0.76)."""
        sizes = self.image_sizes()
        guessed = [name for (name, shape, _), size in zip(self.inputs, sizes)
                   if size is not None and list(size) != list(shape[1:3])]
        noise = [name for (name, _, dtype), size, spec in zip(self.inputs, sizes, self.input_specs())
                 if dtype.kind == "f" and size is None and (spec is None or spec["kind"] == "normal")]
        said = []
        if guessed:
            said.append(f"input {', '.join(guessed)} has a dynamic spatial size: generated images are "
                        f"{GENERATED_IMAGE_SIDE}x{GENERATED_IMAGE_SIDE}")
        if noise:
            said.append(f"input {', '.join(noise)} is not image-shaped and states no range: it gets standard-normal "
                        "noise, and the error on real inputs can differ a lot")
        return "; ".join(said) + "; give real inputs for a measured error" if said else None

    def matches(self, keys) -> bool:
        """Whether arrays named `keys` feed exactly this runner's inputs."""
        return _names_match([n for n, _, _ in self.inputs], keys)

    def samples_from(self, path, limit: int | None = None) -> tuple[list[list[np.ndarray]], np.ndarray | None]:
        """Samples from an .npz: one array per input, named after the input (tensor or signature name), the
        first axis indexing samples; an optional `labels` array. Returned as batches of the model's batch size
        (1 unless fixed higher; the last batch padded by repeating its last sample) with one label per sample.
        Raises DataError with one clear reason."""
        batches, labels, _ = self.batches_of(load_npz(path), path, limit)
        return batches, labels

    def batches_of(self, data: dict, path, limit: int | None = None):
        """`samples_from` on arrays already loaded; also returns the number of samples the batches hold
        before padding (None when each sample is a whole input)."""
        data = dict(data)
        labels = data.pop("labels", None)
        names = [n for n, _, _ in self.inputs]
        aliases = _aliases(names)
        arrays = {}
        for key, value in data.items():
            name = aliases.get(key)
            if name is None:
                raise DataError(f"{path}: array {key!r} matches no model input (inputs: {names})")
            arrays[name] = value
        missing = [n for n in names if n not in arrays]
        if missing:
            raise DataError(f"{path}: no array for input(s) {missing}")
        if self.mixed_batches:
            raise DataError(f"{path}: the model's inputs have different fixed batch sizes "
                            f"{[s[0] for s in self.signature_shapes]}; cannot batch samples for it")
        # Each sample is either one whole input (the array has one more axis than the input: models without a
        # batch axis) or one item along the input's first axis (batched to the model's batch size).
        whole = all(arrays[n].ndim == len(sig) + 1 and _fits(arrays[n].shape[1:], sig)
                    for (n, _, _), sig in zip(self.inputs, self.signature_shapes))
        counts = set()
        for (name, shape, dtype), sig, (scale, zero) in zip(self.inputs, self.signature_shapes, self.input_quantization):
            a = arrays[name]
            if dtype.kind in "iu" and a.dtype.kind == "f" and scale > 0:
                # Real values for a quantized input: quantized with the input's own scale and zero point.
                if not np.all(np.isfinite(a)):
                    raise DataError(f"{path}: array {name!r} holds NaN or infinite values")
                info = np.iinfo(dtype)
                a = arrays[name] = np.clip(np.round(a / scale) + zero, info.min, info.max).astype(dtype)
            if a.ndim == 0 or a.shape[0] == 0:
                raise DataError(f"{path}: array {name!r} is empty")
            if not whole and (a.ndim != len(shape) or not _fits(a.shape[1:], sig[1:])):
                raise DataError(f"{path}: array {name!r} has shape {list(a.shape)}, the input wants "
                                f"{_wanted(shape)} (N samples first)")
            if a.dtype.kind not in "biuf" or (dtype.kind == "f") != (a.dtype.kind == "f"):
                raise DataError(f"{path}: array {name!r} has dtype {a.dtype}, the input wants {dtype}")
            arrays[name] = a = _cast(a, dtype, f"{path}: array {name!r}")
            counts.add(a.shape[0])
        if len(counts) != 1:
            raise DataError(f"{path}: inputs hold different numbers of samples {sorted(counts)}")
        n = counts.pop()
        if labels is not None and (labels.ndim != 1 or len(labels) != n or labels.dtype.kind not in "iu"):
            raise DataError(f"{path}: 'labels' must be {n} integer class indices")
        if limit is not None:
            n = min(n, limit)
            labels = labels[:n] if labels is not None else None
        if whole:
            return [[arrays[name][i] for name, _, _ in self.inputs] for i in range(n)], labels, None
        b = self.batch
        batches = []
        for start in range(0, n, b):
            batch = []
            for name, _, _ in self.inputs:
                chunk = arrays[name][start:min(start + b, n)]
                if len(chunk) < b:  # never resize a fixed batch: pad with the last sample
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk), axis=0)])
                batch.append(np.ascontiguousarray(chunk))
            batches.append(batch)
        return batches, labels, n


def _fits(shape, signature) -> bool:
    """Whether an array shape fits an input's shape signature (-1: any size)."""
    return len(shape) == len(signature) and all(s < 0 or s == d for d, s in zip(shape, signature))


def _wanted(shape) -> str:
    return "[N" + "".join(f", {d}" for d in shape[1:]) + "]" + (f" or [N, {', '.join(map(str, shape))}]"
                                                               if len(shape) <= 1 else "")


def open_data(model, path, signature: str | None = None, xnnpack: bool = True, threads: int = 1):
    """A Runner for the inputs a data file names, its batches and labels, and the number of samples before
    padding (`Runner.batches_of`). Without a
    signature the file may name the main subgraph's inputs or the inputs of any one signature."""
    data = load_npz(path)
    runner = Runner(model, xnnpack, threads, signature)
    keys = [k for k in data if k != "labels"]
    if signature is None and not runner.matches(keys):
        fitting = [key for key in runner.signatures
                   if _names_match(runner.signatures[key]["inputs"], keys)]
        if len(fitting) == 1:
            runner = Runner(model, xnnpack, threads, fitting[0])
        elif len(fitting) > 1:
            raise DataError(f"{path}: the arrays fit the inputs of signatures {sorted(fitting)}; "
                            f"choose one with --signature")
    batches, labels, count = runner.batches_of(data, path)
    return runner, batches, labels, count


def load_npz(path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file; anything unreadable (truncated, not a zip, pickled objects) is a DataError."""
    import zipfile
    import zlib
    try:
        with open(path, "rb") as f:
            if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
                raise DataError(f"{path}: not an .npz file (no zip header)")
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single array, not an .npz file of named arrays")
        with z:
            return {k: z[k] for k in z.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def _cast(a: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """`a` as the input's dtype; values the dtype cannot hold (1e300 in float32, 300 in int8, NaN) are refused
    here, after the cast, rather than found as a failure deep in a fit."""
    if dtype.kind in "iu" and a.dtype.kind in "biu":
        info = np.iinfo(dtype)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise DataError(f"{what} holds values outside the {dtype} range [{info.min}, {info.max}]")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = a.astype(dtype)
    if cast.dtype.kind == "f" and not np.all(np.isfinite(cast)):
        raise DataError(f"{what} holds NaN, infinite values or values too large for {dtype}")
    return cast


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def dead_leaves(rng, height: int, width: int, channels: int, shapes: int = 24) -> np.ndarray:
    """One [height, width, channels] image in [0, 1] of `shapes` random discs, boxes and strokes."""
    def colour():
        return rng.uniform(0, 1, channels if rng.random() < 0.5 else 1)
    img = np.empty((height, width, channels), np.float32)
    img[:] = colour()
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(shapes):
        value, kind = colour(), rng.integers(3)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        size = max(height, width) * rng.uniform(0.05, 0.4)
        if kind == 0:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < size ** 2
        elif kind == 1:
            mask = (abs(yy - cy) < size) & (abs(xx - cx) < size * rng.uniform(0.2, 1))
        else:
            angle = rng.uniform(0, np.pi)
            across = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
            mask = (across < max(1.0, 0.15 * size)) & ((yy - cy) ** 2 + (xx - cx) ** 2 < (2 * size) ** 2)
        img[mask] = value
    return img


# The data-free fits draw their generated inputs with FIT_SEED; every check (the rewrite's output error, --verify
# and compare without data) draws other ones with CHECK_SEED: measured on the inputs it was fitted on, a data-free
# pruning printed an output error of 0.0004 that was 0.43 on other generated images.
FIT_SEED = 0
CHECK_SEED = 1


def generated_samples(source, count: int, signature: str | None = None, seed: int = FIT_SEED
                      ) -> list[list[np.ndarray]]:
    """`count` inputs for a model without data: image-shaped float inputs ([N, H, W, 1..4]) get dead-leaves
    images (edges and flat regions, in [0, 1]; closer to natural images than noise), any other input the runner's
    seeded values in the range the model reads it in. The rewrite's output-error check, the data-free budget,
    --verify and compare without data all use these."""
    return Runner(source, xnnpack=True, signature=signature).generated_samples(count, seed)


def compare_outputs(outs_a: list[list[np.ndarray]], outs_b: list[list[np.ndarray]], names: list[str],
                    labels: np.ndarray | None = None) -> tuple[list[dict], dict | None]:
    """Fidelity of B against A per output over all samples; top-1/top-5 agreement for classifier-like outputs
    ([1, classes] per sample): top1_agree = B's top-1 is A's top-1; top5_agree = A's top-1 is in B's top-5."""
    rows, accuracy = [], None
    for j, name in enumerate(names):
        a = np.stack([o[j].reshape(-1) for o in outs_a]).astype(np.float64)
        b = np.stack([o[j].reshape(-1) for o in outs_b]).astype(np.float64)
        row = {"name": name, **fidelity(a, b), "top1_agree": None, "top5_agree": None}
        if a.shape[1] >= 2 and outs_a[0][j].ndim <= 2 and outs_a[0][j].shape[0] == 1:
            top_a = _topk(a, 1)[:, 0]
            row["top1_agree"] = float(np.mean(_topk(b, 1)[:, 0] == top_a))
            if a.shape[1] > 5:  # with 5 classes or fewer every class is in the top 5: agreement means nothing
                row["top5_agree"] = float(np.mean([t in s for t, s in zip(top_a, _topk(b, 5))]))
            if labels is not None and j == 0:
                accuracy = {}
                for key, scores in (("a", a), ("b", b)):
                    accuracy[key] = {"top1": float(np.mean(_topk(scores, 1)[:, 0] == labels)),
                                     "top5": float(np.mean([y in s for y, s in zip(labels, _topk(scores, 5))]))}
        rows.append(row)
    return rows, accuracy


def compare(model_a, model_b, data=None, samples: int = 8, seed: int = CHECK_SEED, runs: int = 20, threads: int = 1,
            xnnpack: bool = True, signature: str | None = None, timing: bool = True) -> dict:
    """Size, parameters, MACs, latency (interleaved medians) and output fidelity of B against A, on the data
    file's samples (for the timing runs too) or on seeded inputs in a range the model reads them in. Models
    whose inputs differ are each timed on their own inputs, and fidelity is left out with a note saying so."""
    from . import analysis, io
    result = {}
    for key, model in (("a", model_a), ("b", model_b)):
        m = io.read(model) if isinstance(model, (str, Path)) else io.read_buffer(model)
        totals = analysis.summary(m, zeros=False)["totals"]
        size = Path(model).stat().st_size if isinstance(model, (str, Path)) else len(model)
        result[key] = {"file_bytes": size, "params": totals["params"], "macs": totals["macs"], "latency_ms": None}
    labels = count = None
    if data is not None:
        ra, inputs_a, labels, count = open_data(model_a, data, signature, xnnpack, threads)
    else:
        ra = Runner(model_a, xnnpack, threads, signature)
        inputs_a = ra.generated_samples(samples, seed)
    rb = Runner(model_b, xnnpack, threads, ra.signature if ra.signature in _signature_keys(model_b) else signature)
    result["samples"] = count if count is not None else len(inputs_a)  # samples, or model runs on whole inputs
    if ra.inputs == rb.inputs:
        inputs_b = inputs_a
        outs_a, outs_b = ra.real(ra.per_sample(inputs_a, count)), rb.real(rb.per_sample(inputs_a, count))
        result["outputs"], accuracy = compare_outputs(outs_a, outs_b, ra.outputs,
                                                      labels if labels is not None and len(labels) == len(outs_a)
                                                      else None)
        if accuracy is not None:
            result["accuracy"] = accuracy
    else:
        inputs_b = None
        if data is not None:
            try:
                rb, inputs_b, _, _ = open_data(model_b, data, None, xnnpack, threads)
            except DataError:
                pass
        inputs_b = inputs_b or rb.generated_samples(1, seed)
        describe = lambda r: ", ".join(f"{n} {s} {d}" for n, s, d in r.inputs)
        result["outputs"] = []
        result["note"] = (f"the models have different inputs (A: {describe(ra)}; B: {describe(rb)}): output "
                          f"fidelity left out, each model timed on its own inputs")
    if timing:
        la, lb = time_interleaved([ra, rb], runs=runs, threads=threads, xnnpack=xnnpack, seed=seed,
                                  inputs=[inputs_a[0], inputs_b[0]])
        result["a"]["latency_ms"], result["b"]["latency_ms"] = la, lb
        result["speedup"] = la / lb if lb > 0 else None
    else:
        result["speedup"] = None
    return result


class CandidateFailed(Exception):
    """The model under test does not run where the reference does."""


def output_error(reference, candidate, inputs=None, samples: int = 4, signature: str | None = None,
                 seed: int = CHECK_SEED) -> dict:
    """Relative L2 error of every output of `candidate` against `reference` on `inputs` (Runner batches) or on
    `samples` generated ones; `worst` is None when the candidate's outputs are not finite where the reference's
    are. When the reference itself does not run (a custom op without a kernel, ...) nothing is measured and
    `reason` says why; when only the candidate fails, CandidateFailed."""
    try:
        ra = Runner(reference, True, 1, signature)
        note = None if inputs else ra.generated_note()
        inputs = inputs or ra.generated_samples(samples, seed)
        outs_a = ra.real(ra.per_sample(inputs))
        names = ra.outputs
        del ra  # one interpreter at a time: XNNPACK's packed weights of a large model are freed first
    except Exception as e:  # whatever the runtime raises for a model it cannot run
        return {"measured": False, "reason": f"the input model does not run in LiteRT: {first_line(e)}"}
    try:
        rb = Runner(candidate, True, 1, signature)
        outs_b = rb.real(rb.per_sample(inputs))
    except NotRunnable as e:  # the runtime's reason only: the candidate is the tool's temporary file
        raise CandidateFailed(first_line(e.reason)) from None
    except Exception as e:
        raise CandidateFailed(first_line(e)) from None
    rows = []
    for j, name in enumerate(names):
        shapes = [list(np.shape(outs[0][j])) for outs in (outs_a, outs_b)] if outs_a and outs_b else [[], []]
        if shapes[0] != shapes[1]:  # no pass may change what the model returns
            raise CandidateFailed(f"its output {name} has shape {shapes[1]} where the input model's has {shapes[0]}")
        a, b = _joined(outs_a, j), _joined(outs_b, j)
        broken = bool(np.any(~np.isfinite(b) & np.isfinite(a)))
        rows.append({"name": name, "rel_l2": None if broken else fidelity(a, b)["rel_l2"]})
    errors = [r["rel_l2"] for r in rows]
    worst = None if any(e is None for e in errors) else max(errors, default=0.0)
    result = {"measured": True, "samples": len(inputs), "worst": worst, "outputs": rows}
    if note:
        result["note"] = note
    return result


def delegate_disagreement(model, inputs=None, signature: str | None = None, samples: int = 4) -> dict | None:
    """How far `model`'s outputs with XNNPACK are from those of the builtin kernels alone: `steps`, the largest
    difference in steps of the int8 (or int16) tensor each output is made of (its own scale when quantized, the
    scale a DEQUANTIZE output reads), and `rel_l2`, the relative L2 distance of the real values. None when no
    output comes from an integer tensor. One op's rounding differs by a step; through ten int8 layers the TF
    converter's own VGG-style model differs by 6 steps at its softmax, so steps alone do not tell a fault."""
    on = Runner(model, True, 1, signature)
    inputs = inputs or on.generated_samples(samples, CHECK_SEED)
    steps = [_integer_step(t) for t in _output_tensors(on)]
    if not any(steps):
        return None
    outs_on = on.real(on.per_sample(inputs))
    del on
    off = Runner(model, False, 1, signature)
    outs_off = off.real(off.per_sample(inputs))
    worst_steps, worst_rel = 0.0, 0.0
    for j, step in enumerate(steps):
        if not step:
            continue
        a, b = _joined(outs_on, j), _joined(outs_off, j)
        worst_steps = max(worst_steps, float(np.max(np.abs(a - b), initial=0.0)) / step)
        worst_rel = max(worst_rel, fidelity(a, b)["rel_l2"])
    return {"steps": round(worst_steps, 3), "rel_l2": worst_rel}


def _joined(outs: list[list[np.ndarray]], j: int) -> np.ndarray:
    """Output `j` of every sample, as one float64 vector."""
    return np.concatenate([o[j].reshape(-1) for o in outs]).astype(np.float64)


def _output_tensors(runner: Runner) -> list:
    """The IR tensors behind the runner's outputs, in its order."""
    if runner.runner is not None:
        sig = next(d for d in runner.model.signature_defs if d.key == runner.signature)
        by_name = dict(sig.outputs)
        return [by_name.get(name) for name in runner.outputs]
    return list(runner.subgraph.outputs)


def _integer_step(t) -> float | None:
    """The real value of one step of the integer tensor `t` stands for (through a DEQUANTIZE), or None."""
    from . import schema
    if t is not None and t.producer is not None and t.producer.builtin == schema.BuiltinOperator.DEQUANTIZE:
        t = t.producer.inputs[0]
    q = t.quantization if t is not None else None
    if t is None or t.type not in (schema.TensorType.INT8, schema.TensorType.INT16, schema.TensorType.UINT8) \
            or q is None or q.scale is None or not len(q.scale):
        return None
    return float(q.scale[0]) or None


def first_line(e: Exception) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _signature_keys(model) -> set[str]:
    from . import io
    m = io.read(model) if isinstance(model, (str, Path)) else io.read_buffer(bytes(model))
    return {d.key for d in m.signature_defs}


def time_interleaved(models: list, runs: int = 20, threads: int = 1, xnnpack: bool = True, seed: int = 0,
                     warmup: int = 2, inputs: list | None = None) -> list[float]:
    """Median latency in ms of each model (a path, bytes or a Runner), measured alternately; each on its
    `inputs` entry (one array per input) or on seeded inputs in a range it reads them in. A signature runner is
    timed with its input and output copies; a plain interpreter on invoke alone."""
    runners = [m if isinstance(m, Runner) else Runner(m, xnnpack, threads) for m in models]
    inputs = inputs or [r.random_samples(1, seed)[0] for r in runners]
    # Warm-up runs are not timed: the first invoke after allocation lets XNNPACK pack its weights.
    for r, x in zip(runners, inputs):
        for _ in range(warmup):
            r(x)
    times = [[] for _ in runners]
    for k in range(runs):
        order = range(len(runners)) if k % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            r, x = runners[i], inputs[i]
            if r.runner is None:
                for d, a in zip(r.it.get_input_details(), x):
                    r.it.set_tensor(d["index"], a)
                t0 = time.perf_counter()
                r.it.invoke()
            else:
                t0 = time.perf_counter()
                r(x)
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t) * 1e3) for t in times]


def interface(model) -> dict[tuple, tuple]:
    """What a caller of `model` (a path, bytes or a Model) relies on: for every signature, each input and output by
    its signature name, and for subgraph 0 each input and output by position: (name, element type, shape
    signature — -1 for a dynamic dimension). The name of a subgraph's tensor counts only in a model without
    signatures, whose callers read them by tensor name (a signed model's are the signature's names; the
    full-integer tensors of ai-edge-quantizer's are named '<name>_dequant')."""
    from . import io, schema
    from .graph import Model
    if not isinstance(model, Model):
        model = io.read(model) if isinstance(model, (str, Path)) else io.read_buffer(bytes(model))
    type_names = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

    def seen(t) -> tuple:
        shape = t.shape_signature if t.shape_signature is not None and len(t.shape_signature) else t.shape
        return type_names.get(t.type, str(t.type)), [int(d) for d in shape]
    out: dict[tuple, tuple] = {}
    for sig in model.signature_defs:
        for role, items in (("input", sig.inputs), ("output", sig.outputs)):
            for name, t in items:
                out[(f"signature {sig.key!r} {role}", name)] = (name, *seen(t))
    if model.subgraphs:
        for role, tensors in (("input", model.main.inputs), ("output", model.main.outputs)):
            for i, t in enumerate(tensors):
                out[(role, i)] = (None if model.signature_defs else t.name, *seen(t))
    return out


def interface_changes(a: dict, b: dict) -> list[str]:
    """How the inputs and outputs of the model whose `interface` is `b` differ from those of `a`'s: one line
    each, empty when a caller of the one can call the other."""
    def where(key, name) -> str:
        return f"{key[0]} {name!r}" if name is not None else f"{key[0]} {key[1]}"  # by position when unnamed
    changes = []
    for key, (name, dtype, shape) in a.items():
        if key not in b:
            changes.append(f"{where(key, name)} is gone")
            continue
        new_name, new_dtype, new_shape = b[key]
        if (new_name, new_dtype, new_shape) != (name, dtype, shape):
            renamed = f"{new_name!r} " if new_name != name else ""
            changes.append(f"{where(key, name)}: {dtype} {shape} became {renamed}{new_dtype} {new_shape}")
    changes += [f"{where(key, b[key][0])} is new" for key in b if key not in a]
    return changes
