"""Open-vocabulary segmentation models on top of the ops: the CLIP layer, the registry, the contract.

``create_model(name, pretrained=..., **overrides)`` builds a registered model; every model is a
:class:`Segmentor` (``forward(images, text)``, ``predict(images, class_names)``, ``loss(outputs,
targets)``). CLIP comes from open_clip (``pip install ovseg-fast[models]``), imported when a CLIP
model is first built, so this package imports without it.
"""

from ovseg_fast.models.base import Segmentor, TextEmbeddings
from ovseg_fast.models.clip import CLIPBackbone, ImageFeatures

# The function ``profile`` takes the package attribute the submodule would have: import the
# submodule's other names from ovseg_fast.models.profile itself.
from ovseg_fast.models.profile import ProfileResult, format_profile, profile
from ovseg_fast.models.registry import create_model, list_models, model_config, register_model

__all__ = [
    "CLIPBackbone",
    "ImageFeatures",
    "ProfileResult",
    "Segmentor",
    "TextEmbeddings",
    "create_model",
    "format_profile",
    "list_models",
    "model_config",
    "profile",
    "register_model",
]
