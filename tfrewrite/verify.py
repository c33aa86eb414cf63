"""Run models in the LiteRT interpreter, compare their outputs and time them.

The interpreter is imported here only, when a model is really run, so that `--help` and `inspect` stay fast.
Timings interleave the models run for run and quote medians; allocation and the first run (where XNNPACK
prepares its packed weights) are never timed.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def interpreter(model, xnnpack: bool = True, threads: int = 1):
    """An allocated interpreter for a path or the model's bytes; XNNPACK on or off."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    kwargs = {"model_path": str(model)} if isinstance(model, (str, Path)) else {"model_content": bytes(model)}
    it = Interpreter(**kwargs, num_threads=threads, experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    return it


def random_inputs(it, samples: int = 1, seed: int = 0) -> list[list[np.ndarray]]:
    """Seeded inputs of the right shapes and dtypes: `samples` lists, one array per model input."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(samples):
        arrays = []
        for d in it.get_input_details():
            shape = [s if s > 0 else 1 for s in d["shape"]]
            dtype = np.dtype(d["dtype"])
            if dtype.kind == "f":
                arrays.append(rng.standard_normal(shape).astype(dtype))
            elif dtype == np.bool_:
                arrays.append(rng.integers(0, 2, shape).astype(bool))
            else:
                info = np.iinfo(dtype)
                arrays.append(rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape).astype(dtype))
        out.append(arrays)
    return out


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


def time_interleaved(models: list, runs: int = 20, threads: int = 1, xnnpack: bool = True, seed: int = 0,
                     warmup: int = 2) -> list[float]:
    """Median latency in ms of each model, measured alternately on the same inputs."""
    its = [interpreter(m, xnnpack, threads) for m in models]
    inputs = [random_inputs(it, 1, seed)[0] for it in its]
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
