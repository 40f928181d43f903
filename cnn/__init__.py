"""Keras 3 (TensorFlow) CNN candidates: model builders, training, Grad-CAM.

The candidate types are declared as entry points in ``pyproject.toml``; their modules
(and TensorFlow) load only when one is used.
"""
