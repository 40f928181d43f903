"""TensorFlow process settings: quiet logs, thread counts, seeds."""

from __future__ import annotations

import os
import random

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

_CONFIGURED = False


def configure(threads: int | None = None) -> None:
    """Set TensorFlow's thread pools once per process (``$BLOODBENCH_TF_THREADS`` wins)."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    import tensorflow as tf
    threads = int(os.environ.get("BLOODBENCH_TF_THREADS", 0)) or threads
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
        except RuntimeError:  # already initialised by an earlier op
            pass
    _CONFIGURED = True


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (via Keras)."""
    import keras
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % (2**32))
    keras.utils.set_random_seed(seed)
