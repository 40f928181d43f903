"""bloodbench: honest, reproducible benchmarks of blood-cell image classifiers."""

from core.errors import BenchError

__all__ = ["BenchError"]
__version__ = "0.1.0"
