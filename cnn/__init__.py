"""Keras 3 (TensorFlow) CNN candidates: model builders, training, Grad-CAM.

Importing the package declares its candidate types; their modules (and TensorFlow) load
only when one is used.
"""

from core.registry import register_lazy

register_lazy("scratch_cnn", "cnn.candidate:ScratchCNN")
register_lazy("transfer_frozen", "cnn.transfer:FrozenTransferCNN")
register_lazy("transfer_finetune", "cnn.transfer:FineTuneTransferCNN")
