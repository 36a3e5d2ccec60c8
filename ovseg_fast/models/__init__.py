"""Open-vocabulary segmentation models on top of the ops: the CLIP layer, the registry, the contract.

``create_model(name, pretrained=..., **overrides)`` builds a registered model; every model is a
:class:`Segmentor` (``forward(images, text)``, ``predict(images, class_names)``, ``loss(outputs,
targets)``). CLIP comes from open_clip (``pip install ovseg-fast[models]``), imported when a CLIP
model is first built, so this package imports without it.
"""

from ovseg_fast.models.base import Segmentor, TextEmbeddings
from ovseg_fast.models.registry import create_model, list_models, model_config, register_model

__all__ = [
    "Segmentor",
    "TextEmbeddings",
    "create_model",
    "list_models",
    "model_config",
    "register_model",
]
