from __future__ import annotations

import dataclasses

import pytest

from ovseg_fast.models import Segmentor, create_model, list_models, model_config, register_model, registry


@pytest.fixture
def clean_registry(monkeypatch):
    """Models registered by a test vanish after it."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))


@dataclasses.dataclass
class ToyConfig:
    classes: int = 3
    depth: int = 2


class Toy(Segmentor):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig, *, pretrained=None):
        super().__init__()
        self.config = config
        self.pretrained = pretrained


def test_clip_is_built_in():
    assert "clip" in list_models()
    assert list_models() == sorted(list_models())
    config = model_config("clip")
    assert dataclasses.is_dataclass(config)
    assert repr(config).startswith("CLIPSegmentorConfig(clip='ViT-B-16', image_size=512")


def test_register_and_create_with_overrides(clean_registry):
    register_model("toy")(Toy)
    assert "toy" in list_models()
    model = create_model("toy", pretrained="weights.pt", depth=5)
    assert isinstance(model, Toy)
    assert model.config == ToyConfig(classes=3, depth=5)
    assert model.pretrained == "weights.pt"
    assert model.registered_name == "toy"


def test_bare_decorator_uses_the_class_name(clean_registry):
    @register_model
    class Other(Toy):
        pass

    assert "other" in list_models()
    assert register_model(Other) is Other  # the same class again is a no-op


def test_unknown_name_lists_the_known_models():
    with pytest.raises(ValueError, match=r"unknown model 'nope'; known models: .*clip"):
        create_model("nope")
    with pytest.raises(TypeError, match="name must be a str"):
        create_model(3)


def test_unknown_override_lists_the_config_fields(clean_registry):
    register_model("toy")(Toy)
    with pytest.raises(TypeError, match=r"no config field 'width'.*ToyConfig has fields: classes, depth"):
        create_model("toy", width=4)
    with pytest.raises(TypeError, match=r"no config field 'imagesize'.*fields: clip, image_size, templates"):
        model_config("clip", imagesize=4)


def test_registration_errors(clean_registry):
    register_model("toy")(Toy)

    class Again(Toy):
        pass

    with pytest.raises(ValueError, match=r"'toy' is already registered by .*Toy"):
        register_model("toy")(Again)

    class NoConfig(Segmentor):
        pass

    with pytest.raises(TypeError, match="must define config_class, a dataclass type"):
        register_model("bad")(NoConfig)
    with pytest.raises(TypeError, match="takes a name"):
        register_model(3)
    with pytest.raises(ValueError, match="non-empty str"):
        register_model("")(Toy)


def test_cli_prints_every_models_config_fields(capsys, clean_registry):
    from ovseg_fast.cli import main

    register_model("toy")(Toy)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "clip: CLIPSegmentorConfig - Config of ``clip``: training-free MaskCLIP" in out
    assert "  image_size: int = 512\n" in out
    assert "toy: ToyConfig\n  classes: int = 3\n  depth: int = 2" in out
    assert main(["models", "toy"]) == 0
    assert capsys.readouterr().out.startswith("toy: ToyConfig")
    assert main(["models", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model nope; known models: " in err
    assert err.split("known models: ")[1].strip().split(", ") == sorted(registry._MODELS)
