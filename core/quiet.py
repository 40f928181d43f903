"""TensorFlow's start-up lines kept off the user's terminal, without changing numerics.

TensorFlow 2.x writes from C++, straight to file descriptor 2, while it loads: absl's
"All log messages before absl::InitializeLog() ..." and oneDNN's "custom operations are on"
notice, in every process that imports it (so twice for two workers), whatever
``TF_CPP_MIN_LOG_LEVEL`` says. Turning oneDNN off would silence the notice but change the
numbers. Instead, :func:`install` puts a finder in front of the import system: the first
``import tensorflow`` (directly or through Keras) runs with descriptor 2 pointed at a
temporary file; afterwards the lines are read back, the known start-up notices
(:data:`NOISE`) dropped, and every other line written to stderr as it was (a real error at
import is never lost). ``BLOODBENCH_VERBOSITY=1`` (``-v``) keeps them all.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from contextlib import contextmanager

VERBOSITY_ENV = "BLOODBENCH_VERBOSITY"

#: start-up notices of TensorFlow / XLA / absl that say nothing about the user's work
NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|TF-TRT Warning: Could not find TensorRT"
    r"|Could not find cuda drivers on your machine"
    r"|cuda_(executor|driver|blas|dnn|fft)\.cc.*(failed call to cuInit|no CUDA-capable device)"
    r"|successful NUMA node read from SysFS"
    # grappler's lines while a graph is converted (bench export: tf2onnx)
    r"|Number of eligible GPUs \(core count"
    r"|single_machine\.cc:\d+\] Starting new session"
)


def verbose() -> bool:
    return os.environ.get(VERBOSITY_ENV, "").strip() in ("1", "2")


@contextmanager
def filtered_stderr():
    """Descriptor 2 goes to a temporary file inside the block; then every line that is not
    start-up noise is written back to stderr."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (embedded use)
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [
                line
                for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not NOISE.search(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _Loader(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        with filtered_stderr():
            self.real.exec_module(module)


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, through the rest of the import system, and loads it
    under :func:`filtered_stderr`."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _QuietTensorFlow()


def install() -> None:
    """Quiet the first import of TensorFlow in this process (nothing when it is already
    imported or the user asked for everything: ``-v``)."""
    if "tensorflow" in sys.modules or verbose() or _FINDER in sys.meta_path:
        return
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


__all__ = ["install", "uninstall", "filtered_stderr", "NOISE", "VERBOSITY_ENV"]
