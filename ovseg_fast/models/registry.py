"""The model registry: ``@register_model``, ``create_model`` and ``list_models``.

A model is an ``nn.Module`` class with a ``config_class`` (a dataclass whose defaults describe the
paper's setting) and a constructor ``Model(config, *, pretrained=None)``. ``create_model`` builds
the default config, applies the keyword overrides, and constructs the model, so each model file
only declares its config and its module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, TypeVar, Union

__all__ = ["create_model", "list_models", "model_config", "register_model"]

_MODELS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def _check_model_class(name: str, cls: type) -> None:
    config_class = getattr(cls, "config_class", None)
    if config_class is None or not dataclasses.is_dataclass(config_class):
        raise TypeError(f"model {name!r} ({cls.__name__}) must define config_class, a dataclass type")


def register_model(name_or_class: Union[str, T, None] = None) -> Union[T, Callable[[T], T]]:
    """Registers a model class under a name; use as ``@register_model`` or ``@register_model("name")``.

    The bare form uses the class attribute ``name`` if it has one, else the lower-cased class name.
    The class must define ``config_class`` (a dataclass type) and accept ``(config, *, pretrained=None)``.
    Registering a second class under a taken name is an error (so two model files cannot silently
    shadow each other); re-registering the same class is a no-op.
    """

    def decorate(cls: T, name: Optional[str]) -> T:
        if not isinstance(cls, type):
            raise TypeError(f"register_model decorates a class, got {type(cls).__name__}")
        name = name if name is not None else getattr(cls, "name", None) or cls.__name__.lower()
        if not isinstance(name, str) or not name:
            raise ValueError(f"model name must be a non-empty str, got {name!r}")
        _check_model_class(name, cls)
        known = _MODELS.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"model name {name!r} is already registered by {known.__module__}.{known.__qualname__}")
        _MODELS[name] = cls
        cls.registered_name = name  # what profile and the CLI print for an instance
        return cls

    if isinstance(name_or_class, type):
        return decorate(name_or_class, None)
    if name_or_class is not None and not isinstance(name_or_class, str):
        raise TypeError(f"register_model takes a name (str) or a class, got {type(name_or_class).__name__}")
    return lambda cls: decorate(cls, name_or_class)


def list_models() -> list[str]:
    """The registered model names, sorted."""
    _load_builtin_models()
    return sorted(_MODELS)


def _model_class(name: object) -> type:
    _load_builtin_models()
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    cls = _MODELS.get(name)
    if cls is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS)) or '(none)'}")
    return cls


def model_config(name: str, **overrides: Any) -> Any:
    """The config dataclass of model ``name``: its defaults with ``overrides`` applied.

    An override that is not a field of the config raises ``TypeError`` listing the fields.
    """
    config_class = _model_class(name).config_class
    fields = [f.name for f in dataclasses.fields(config_class)]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise TypeError(
            f"model {name!r} has no config field {', '.join(map(repr, unknown))}; "
            f"its config {config_class.__name__} has fields: {', '.join(fields)}"
        )
    return config_class(**overrides)


def create_model(name: str, *, pretrained: Optional[str] = None, **overrides: Any):
    """Builds the registered model ``name`` with its default config changed by ``overrides``.

    ``pretrained`` is passed to the model (for CLIP-based models: a local checkpoint path or a
    name under ``$OVSEG_WEIGHTS_DIR``; None builds random weights and warns). An unknown name lists
    the known models; an unknown override lists the config's fields.
    """
    config = model_config(name, **overrides)
    return _model_class(name)(config, pretrained=pretrained)


_BUILTIN_LOADED = False


def _load_builtin_models() -> None:
    # Importing a model file registers it; the built-in ones are imported on first use of the
    # registry rather than at package import, so ``import ovseg_fast.models`` stays cheap.
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


# Each model issue adds its module here.
_BUILTIN_MODULES: tuple[str, ...] = (
    "ovseg_fast.models.clip",
    "ovseg_fast.models.ldvc",
    "ovseg_fast.models.pixelclip",
    "ovseg_fast.models.rpn",
    "ovseg_fast.models.pnp_ovss",
)
