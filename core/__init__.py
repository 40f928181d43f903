"""The kernel every bloodbench plugin stands on.

``core`` imports no other bloodbench package. Models (``cnn``, ``baselines``), features
and ensembles build on it; the orchestrator (``bench``: runner, CLI, report) stands on
all of them. Dependencies point one way::

    core  <-  features, cnn, baselines, ensembles  <-  bench

Modules: ``errors`` (the one user-facing exception), ``io`` (atomic writes, staged
folders, hashes), ``progress`` (console, bars, stage timers), ``registry`` (type names -> classes),
``candidate`` (the Candidate interface and its declared capabilities), ``metrics``,
``calibration``, ``images`` (decoding and the preprocessing record), ``splits`` (folds
as ``(k, train, test)``), ``cache`` (where computed things are kept).
"""

from core import quiet

quiet.install()  # TensorFlow's start-up lines off the terminal (core.quiet)

from core.candidate import Candidate  # noqa: E402
from core.errors import BenchError  # noqa: E402
from core.registry import register  # noqa: E402

__all__ = ["BenchError", "Candidate", "register"]
