"""Ensembles of candidates and the saved predictor.

Importing the package registers its ensemble types (``soft_voting``, ``stacking``: their
modules' decorators).
"""

from ensembles.base import Ensemble, cross_val_combine
from ensembles.predictor import Predictor, load_predictor, save_predictor
from ensembles.selection import greedy_selection
from ensembles.stacking import Stacking
from ensembles.voting import SoftVoting

__all__ = [
    "Ensemble",
    "Predictor",
    "SoftVoting",
    "Stacking",
    "cross_val_combine",
    "greedy_selection",
    "load_predictor",
    "save_predictor",
]
