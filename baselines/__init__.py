"""Classical baselines: scikit-learn / XGBoost pipelines on hand-crafted features."""

from baselines.models import FeatureClassifier, FeatureForest

__all__ = ["FeatureClassifier", "FeatureForest"]
