#!/usr/bin/env python
"""Build full-size benchmark models into bench/cache/ (git-ignored), on demand.

    python bench/make_models.py                 # all models, skipping ones already built
    python bench/make_models.py vgg16 --force   # rebuild one

Models are random-weight (weights=None, seeded with keras.utils.set_random_seed(0)) float32
conversions with tf.lite.TFLiteConverter.from_keras_model, input 224x224x3, batch 1:

    vgg16.tflite        keras.applications.VGG16        ~553 MB (138M params)
    mobilenetv2.tflite  keras.applications.MobileNetV2  ~14 MB  (3.5M params)

and their full-integer int8 twins (the same seeded weights; the converter's default full-integer
quantization — int8 activations and per-channel int8 weights, float input and output — calibrated on
8 seeded uniform [0, 1) images):

    vgg16_int8.tflite, mobilenetv2_int8.tflite

Needs the ``fixtures`` extra (tensorflow-cpu). Other code should call ``ensure(name)``, which
returns the path and only imports TensorFlow when the file is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "cache")
SEED = 0

MODELS = {
    "vgg16": "VGG16",
    "mobilenetv2": "MobileNetV2",
    "vgg16_int8": "VGG16",
    "mobilenetv2_int8": "MobileNetV2",
}
CALIBRATION_IMAGES = 8


def path_of(name: str) -> str:
    return os.path.join(CACHE, f"{name}.tflite")


def build(name: str) -> str:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SEED)
    app = getattr(keras.applications, MODELS[name])
    inp = keras.Input((224, 224, 3), batch_size=1, name="image")  # static batch 1 -> no SHAPE ops for Flatten
    model = app(weights=None, input_tensor=inp, classes=1000)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if name.endswith("_int8"):
        import numpy as np
        rng = np.random.default_rng(SEED)
        images = rng.random((CALIBRATION_IMAGES, 1, 224, 224, 3), dtype=np.float32)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x] for x in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    blob = converter.convert()
    os.makedirs(CACHE, exist_ok=True)
    out = path_of(name)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, out)  # atomic: a partial file is never mistaken for a finished one
    keras.backend.clear_session()
    return out


def ensure(name: str, force: bool = False) -> str:
    """Path to bench/cache/<name>.tflite, building it first if missing (or if force)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    p = path_of(name)
    if force or not os.path.exists(p):
        build(name)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"subset of {list(MODELS)} (default: all)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    a = ap.parse_args(argv)
    names = a.names or list(MODELS)
    bad = [n for n in names if n not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {list(MODELS)}")
    for n in names:
        p = path_of(n)
        if os.path.exists(p) and not a.force:
            print(f"{n}: exists, skipped   {p}  {os.path.getsize(p) / 1e6:.1f} MB", flush=True)
            continue
        t0 = time.time()
        ensure(n, force=True)
        print(f"{n}: built in {time.time() - t0:.0f} s  {p}  {os.path.getsize(p) / 1e6:.1f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
