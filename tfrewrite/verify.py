"""Run models in the LiteRT interpreter, compare their outputs and time them.

The interpreter is imported here only, when a model is really run, so that `--help` and `inspect` stay fast.
Timings interleave the models run for run and quote medians; allocation and the first run (where XNNPACK
prepares its packed weights) are never timed.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def interpreter(model, xnnpack: bool = True, threads: int = 1):
    """An allocated interpreter for a path or the model's bytes; XNNPACK on or off."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    kwargs = {"model_path": str(model)} if isinstance(model, (str, Path)) else {"model_content": bytes(model)}
    with _quiet_runtime_info():
        it = Interpreter(**kwargs, num_threads=threads, experimental_op_resolver_type=resolver)
        it.allocate_tensors()
    return it


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


def _random_arrays(specs, rng) -> list[np.ndarray]:
    """One seeded array per (shape, dtype): normal floats, small integers, booleans; unknown dims count as 1."""
    arrays = []
    for shape, dtype in specs:
        shape = [s if s > 0 else 1 for s in shape]
        dtype = np.dtype(dtype)
        if dtype.kind == "f":
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == np.bool_:
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        else:
            info = np.iinfo(dtype)
            arrays.append(rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape).astype(dtype))
    return arrays


def random_inputs(it, samples: int = 1, seed: int = 0) -> list[list[np.ndarray]]:
    """Seeded inputs of the right shapes and dtypes: `samples` lists, one array per model input."""
    rng = np.random.default_rng(seed)
    specs = [(d["shape"], d["dtype"]) for d in it.get_input_details()]
    return [_random_arrays(specs, rng) for _ in range(samples)]


def invoke(it, inputs: list[np.ndarray]) -> list[np.ndarray]:
    for d, x in zip(it.get_input_details(), inputs):
        if list(x.shape) != list(d["shape"]):
            it.resize_tensor_input(d["index"], list(x.shape))
            it.allocate_tensors()
        it.set_tensor(d["index"], x)
    it.invoke()
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


class DataError(ValueError):
    """A data or calibration file that does not fit the model; the message says what and where."""


class Runner:
    """One model in the interpreter, fed by input name. With a signature key, names are the signature's."""

    def __init__(self, model, xnnpack: bool = True, threads: int = 1, signature: str | None = None):
        self.it = interpreter(model, xnnpack, threads)
        signatures = self.it.get_signature_list()
        if signature is not None and signature not in signatures:
            raise DataError(f"no signature {signature!r}; the model has {sorted(signatures) or 'none'}")
        if signature is None and len(signatures) > 1:
            # Several entry points and none chosen: run the first subgraph, as a plain invoke does.
            signature = None
        self.runner = self.it.get_signature_runner(signature) if signature is not None else None
        if self.runner is not None:
            details = self.runner.get_input_details()
            self.inputs = [(name, [int(v) for v in d["shape"]], np.dtype(d["dtype"])) for name, d in sorted(details.items())]
            self.outputs = sorted(self.runner.get_output_details())
        else:
            self.inputs = [(d["name"], [int(v) for v in d["shape"]], np.dtype(d["dtype"])) for d in self.it.get_input_details()]
            self.outputs = [d["name"] for d in self.it.get_output_details()]

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self.runner is not None:
            result = self.runner(**{name: a for (name, _, _), a in zip(self.inputs, arrays)})
            return [np.array(result[name]) for name in self.outputs]
        return invoke(self.it, arrays)

    def random_samples(self, samples: int, seed: int = 0) -> list[list[np.ndarray]]:
        rng = np.random.default_rng(seed)
        return [_random_arrays([(shape, dtype) for _, shape, dtype in self.inputs], rng) for _ in range(samples)]

    def samples_from(self, path, limit: int | None = None) -> tuple[list[list[np.ndarray]], np.ndarray | None]:
        """Samples from an .npz: one array per input, named after the input (tensor or signature name), the
        first axis indexing samples; an optional `labels` array. Raises DataError with one clear reason."""
        data = load_npz(path)
        labels = data.pop("labels", None)
        names = [n for n, _, _ in self.inputs]
        aliases = {}
        for n in names:  # 'serving_default_image:0' may be given as 'serving_default_image' or 'image'
            base = n.split(":")[0]
            aliases[base] = n
            if base.startswith("serving_default_"):
                aliases[base[len("serving_default_"):]] = n
        arrays = {}
        for key, value in data.items():
            name = key if key in names else aliases.get(key)
            if name is None:
                raise DataError(f"{path}: array {key!r} matches no model input (inputs: {names})")
            arrays[name] = value
        missing = [n for n in names if n not in arrays]
        if missing:
            raise DataError(f"{path}: no array for input(s) {missing}")
        counts = set()
        for name, shape, dtype in self.inputs:
            a = arrays[name]
            if a.ndim == 0 or a.shape[0] == 0:
                raise DataError(f"{path}: array {name!r} is empty")
            per_sample = [d if d > 0 else None for d in shape[1:]]
            if a.ndim != len(shape) or any(p is not None and p != d for p, d in zip(per_sample, a.shape[1:])):
                raise DataError(f"{path}: array {name!r} has shape {list(a.shape)}, the input wants [N, "
                                f"{', '.join(str(d) for d in shape[1:])}]")
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
        samples = [[arrays[name][i:i + 1] for name, _, _ in self.inputs] for i in range(n)]
        return samples, labels


def load_npz(path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file; anything unreadable (truncated, not a zip, pickled objects) is a DataError."""
    import zipfile
    import zlib
    try:
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
            row["top5_agree"] = float(np.mean([t in s for t, s in zip(top_a, _topk(b, 5))]))
            if labels is not None and j == 0:
                accuracy = {}
                for key, scores in (("a", a), ("b", b)):
                    accuracy[key] = {"top1": float(np.mean(_topk(scores, 1)[:, 0] == labels)),
                                     "top5": float(np.mean([y in s for y, s in zip(labels, _topk(scores, 5))]))}
        rows.append(row)
    return rows, accuracy


def compare(model_a, model_b, data=None, samples: int = 8, seed: int = 0, runs: int = 20, threads: int = 1,
            xnnpack: bool = True, signature: str | None = None, timing: bool = True) -> dict:
    """Size, parameters, MACs, latency (interleaved medians) and output fidelity of B against A."""
    from . import analysis, io
    result = {}
    for key, model in (("a", model_a), ("b", model_b)):
        m = io.read(model) if isinstance(model, (str, Path)) else io.read_buffer(model)
        totals = analysis.summary(m, zeros=False)["totals"]
        size = Path(model).stat().st_size if isinstance(model, (str, Path)) else len(model)
        result[key] = {"file_bytes": size, "params": totals["params"], "macs": totals["macs"], "latency_ms": None}
    ra = Runner(model_a, xnnpack, threads, signature)
    rb = Runner(model_b, xnnpack, threads, signature)
    if [(n, s, d) for n, s, d in ra.inputs] != [(n, s, d) for n, s, d in rb.inputs]:
        raise DataError("the two models have different inputs")
    labels = None
    if data is not None:
        inputs, labels = ra.samples_from(data)
    else:
        inputs = ra.random_samples(samples, seed)
    outs_a = [ra(x) for x in inputs]
    outs_b = [rb(x) for x in inputs]
    result["outputs"], accuracy = compare_outputs(outs_a, outs_b, ra.outputs, labels)
    if accuracy is not None:
        result["accuracy"] = accuracy
    result["samples"] = len(inputs)
    if timing:
        la, lb = time_interleaved([model_a, model_b], runs=runs, threads=threads, xnnpack=xnnpack, seed=seed)
        result["a"]["latency_ms"], result["b"]["latency_ms"] = la, lb
        result["speedup"] = la / lb if lb > 0 else None
    else:
        result["speedup"] = None
    return result


def time_interleaved(models: list, runs: int = 20, threads: int = 1, xnnpack: bool = True, seed: int = 0,
                     warmup: int = 2) -> list[float]:
    """Median latency in ms of each model, measured alternately on the same inputs."""
    its = [interpreter(m, xnnpack, threads) for m in models]
    inputs = [random_inputs(it, 1, seed)[0] for it in its]
    # Warm-up runs are not timed: the first invoke after allocation lets XNNPACK pack its weights.
    for it, x in zip(its, inputs):
        for _ in range(warmup):
            invoke(it, x)
    times = [[] for _ in its]
    for r in range(runs):
        order = range(len(its)) if r % 2 == 0 else reversed(range(len(its)))
        for i in order:
            it, x = its[i], inputs[i]
            for d, a in zip(it.get_input_details(), x):
                it.set_tensor(d["index"], a)
            t0 = time.perf_counter()
            it.invoke()
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t) * 1e3) for t in times]
