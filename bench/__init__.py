"""bloodbench: honest, reproducible benchmarks of blood-cell image classifiers."""

from core.errors import BenchError
from ensembles import load_predictor

__all__ = ["BenchError", "load_predictor"]
__version__ = "0.1.0"
