"""Ensembles of candidates and the saved predictor."""

from ensembles.base import Ensemble, cross_val_combine
from ensembles.predictor import Predictor, load_predictor, save_predictor
from ensembles.voting import SoftVoting

__all__ = ["Ensemble", "Predictor", "SoftVoting", "cross_val_combine", "load_predictor",
           "save_predictor"]
