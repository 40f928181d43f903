"""Classical baselines: scikit-learn / XGBoost pipelines on hand-crafted features.

Importing the package declares its candidate types; ``baselines.models`` (scikit-learn)
loads when one is used.
"""

from core.registry import register_lazy

register_lazy("feature_forest", "baselines.models:FeatureForest")
register_lazy("feature_svm", "baselines.models:FeatureSVM")
register_lazy("feature_xgb", "baselines.models:FeatureXGB")
