"""Keras 3 (TensorFlow) CNN candidates: model builders, training, Grad-CAM."""
