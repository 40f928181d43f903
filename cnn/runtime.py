"""TensorFlow process settings: quiet logs, thread counts, op determinism, seeds.

A CNN work unit gives the same numbers whichever backend runs it (this process, a spawned
``--workers`` process, a Dask worker) because everything its result depends on is fixed
by the unit, never by the backend:

* TensorFlow's thread pools: ``$BLOODBENCH_TF_THREADS`` intra-op threads (default
  :data:`DEFAULT_TF_THREADS`, whatever the core count or the number of workers). CPU
  kernels split their sums by thread count, so two counts give results that differ in
  the last bits, and training amplifies that.
* TensorFlow's op determinism (``tf.config.experimental.enable_op_determinism``).
* The seeds: Python, NumPy, TensorFlow and Keras from the unit's seed, and a Python
  generator of its own for the default seeds Keras gives layers and initialisers (they
  would otherwise come from the process's shared ``random``, from which a Dask worker's
  event loop also draws, at times that vary).
"""

from __future__ import annotations

import os
import random
import threading

from core.candidate import on_release
from core.errors import BenchError
from core.progress import warn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

DEFAULT_TF_THREADS = 1
THREADS_ENV = "BLOODBENCH_TF_THREADS"

_applied: tuple[int, int] | None = None  # (intra, inter) this process runs with
_warned: set[tuple[int, int]] = set()


def tf_threads(threads: int | None = None) -> int:
    """Intra-op threads of a CNN unit: ``threads``, else ``$BLOODBENCH_TF_THREADS``, else
    :data:`DEFAULT_TF_THREADS`. ``0`` leaves TensorFlow's default (every core of the
    machine, so results then depend on the machine)."""
    if threads is None:
        raw = os.environ.get(THREADS_ENV, "").strip()
        if not raw:
            return DEFAULT_TF_THREADS
        try:
            threads = int(raw)
        except ValueError:
            raise BenchError(
                f"{THREADS_ENV} must be a whole number of threads, got {raw!r}"
            ) from None
    if threads < 0:
        raise BenchError(f"{THREADS_ENV} must be 0 (TensorFlow's default) or more, got {threads}")
    return int(threads)


def configure(threads: int | None = None) -> None:
    """Fix this process's TensorFlow thread pools and turn on op determinism.

    ``threads`` (default :func:`tf_threads`: ``$BLOODBENCH_TF_THREADS`` or 1) intra-op
    threads and ``min(2, threads)`` inter-op threads. TensorFlow takes thread settings
    only before its runtime starts: call this before the first TensorFlow op (every CNN
    candidate does, in ``fit`` and when loading). Called again with the same counts it
    does nothing; with other counts once the runtime has started, it warns (once per
    layout) that the process keeps its first layout.
    """
    global _applied
    import tensorflow as tf

    intra = tf_threads(threads)
    inter = max(1, min(2, intra)) if intra else 0
    if _applied != (intra, inter):
        try:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
            tf.config.threading.set_inter_op_parallelism_threads(inter)
            _applied = (intra, inter)
        except RuntimeError:  # the runtime started with other counts: they stay
            have = (
                tf.config.threading.get_intra_op_parallelism_threads(),
                tf.config.threading.get_inter_op_parallelism_threads(),
            )
            if (intra, inter) not in _warned:
                _warned.add((intra, inter))
                warn(
                    f"TensorFlow already runs with {have[0] or 'default'} intra-op / "
                    f"{have[1] or 'default'} inter-op threads in this process, not "
                    f"{intra or 'default'} / {inter or 'default'} ({THREADS_ENV}): its CNN "
                    f"results may differ from those of other processes"
                )
    if hasattr(tf.config.experimental, "enable_op_determinism"):  # TF >= 2.9
        tf.config.experimental.enable_op_determinism()


class _KerasSeeds(threading.local):
    """What Keras calls ``python_random``: this thread's own generator once
    :func:`set_seeds` has run in it, the process's ``random`` before."""

    rng = None

    def randint(self, a: int, b: int) -> int:
        return (self.rng or random).randint(a, b)


_keras_seeds = _KerasSeeds()


def _own_keras_seed_stream(seed: int) -> None:
    from keras.src.random import seed_generator  # where Keras draws its default seeds

    if getattr(seed_generator, "python_random", None) is not _keras_seeds:
        if not hasattr(seed_generator, "python_random"):  # another Keras: nothing to do
            return
        seed_generator.python_random = _keras_seeds
    _keras_seeds.rng = random.Random(seed)


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras (``keras.utils.set_random_seed``), and give
    this thread's Keras default seeds a generator of their own, seeded by ``seed``."""
    import keras
    import numpy as np

    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    keras.utils.set_random_seed(seed)
    _own_keras_seed_stream(seed)


@on_release
def release_keras() -> None:
    """Free what Keras and TensorFlow keep after a process's models are gone (called by
    ``core.candidate.release_memory`` between work units and tuning trials).

    Besides Keras' own state (``clear_session``), this drops TensorFlow's
    ``CustomGradient-*`` entries from its global gradient registry. Every trace of a Keras
    train step registers one (the optimizer's gradient all-reduce is a
    ``tf.custom_gradient``), and its closure holds the traced graph: without this, each
    model a process trains stays in memory for the life of the process (0.2 to 0.5 GB per
    CNN unit, and ever slower garbage collection). The entries are only read while a graph
    is being differentiated, during its trace, so none is needed once its model is gone.
    TensorFlow issue 97697; tf-keras pull request 898 does the same in ``clear_session``.
    """
    import sys

    if "keras" not in sys.modules:
        return
    sys.modules["keras"].utils.clear_session(free_memory=True)
    try:
        from tensorflow.python.framework import ops

        registry = ops._gradient_registry._registry  # private: guarded below
    except (ImportError, AttributeError):  # another TensorFlow: nothing to purge
        return
    for name in [n for n in registry if str(n).startswith("CustomGradient-")]:
        registry.pop(name, None)
