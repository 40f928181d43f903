"""Classical baselines: scikit-learn / XGBoost pipelines on hand-crafted features.

The candidate types are declared as entry points in ``pyproject.toml``;
``baselines.models`` (scikit-learn) loads when one is used.
"""
