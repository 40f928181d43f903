"""bloodbench: honest, reproducible benchmarks of blood-cell image classifiers."""

import baselines  # noqa: F401  (the plugin packages declare their types when imported)
import cnn  # noqa: F401
import ensembles  # noqa: F401
from core.errors import BenchError
from ensembles import load_predictor

__all__ = ["BenchError", "load_predictor"]
__version__ = "0.1.0"
