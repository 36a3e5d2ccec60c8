"""The segmentor contract on toy models (no CLIP): checks, whole and sliding-window predict, loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovseg_fast.models import Segmentor, TextEmbeddings


@dataclasses.dataclass
class PixelConfig:
    patch: int = 1


class PixelSegmentor(Segmentor):
    """Logits = a 1x1 conv of the image average-pooled over patches: a local function of the pixels."""

    config_class = PixelConfig

    def __init__(self, config: PixelConfig | None = None, *, pretrained=None):
        super().__init__()
        self.patch_size = self.output_stride = (config or PixelConfig()).patch
        self.proj = nn.Linear(3, 8)
        self.calls = []

    def encode_classes(self, class_names):
        gen = torch.Generator().manual_seed(len(class_names))
        return TextEmbeddings(torch.randn(len(class_names), 8, generator=gen), tuple(class_names))

    def segment(self, images, text):
        self.calls.append((tuple(images.shape), self.training))
        x = F.avg_pool2d(images, self.patch_size)
        feats = self.proj(x.permute(0, 2, 3, 1))
        return torch.einsum("bhwd,cd->bchw", feats, text.embeddings)


class CropMean(PixelSegmentor):
    """Logits of a crop = the crop's mean (the same at every pixel): shows which crops a pixel saw."""

    def segment(self, images, text):
        self.calls.append((tuple(images.shape), self.training))
        mean = images.mean(dim=(1, 2, 3))
        return mean.view(-1, 1, 1, 1).expand(-1, len(text), *images.shape[-2:]).clone()


def test_forward_takes_names_or_embeddings():
    model = PixelSegmentor()
    images = torch.randn(2, 3, 6, 5)
    by_names = model(images, ["cat", "dog", "car"])
    assert by_names.shape == (2, 3, 6, 5)
    text = model.encode(["cat", "dog", "car"])
    torch.testing.assert_close(model(images, text), by_names)
    assert model.encode(text) is text


@pytest.mark.parametrize(
    ("images", "text", "error", "match"),
    [
        ([1.0], ["a"], TypeError, "images must be a torch.Tensor"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int64), ["a"], TypeError, "images must have dtype"),
        (torch.zeros(3, 8, 8), ["a"], ValueError, "images must have 4 dimensions"),
        (torch.zeros(2, 1, 8, 8), ["a"], ValueError, "images must have 3 channels"),
        (torch.zeros(0, 3, 8, 8), ["a"], ValueError, "images must not be empty"),
        (torch.zeros(1, 3, 8, 6), ["a"], ValueError, "images: height and width must be multiples of the patch size 4"),
        (torch.zeros(1, 3, 8, 8), [], ValueError, "text must not be empty"),
        (torch.zeros(1, 3, 8, 8), "cat", TypeError, "text must be a list of class names"),
        (torch.zeros(1, 3, 8, 8), ["cat", 3], TypeError, r"text\[1\] must be a str"),
        (torch.zeros(1, 3, 8, 8), ["cat", " "], ValueError, r"text\[1\] must not be blank"),
    ],
)
def test_forward_checks_its_inputs(images, text, error, match):
    with pytest.raises(error, match=match):
        PixelSegmentor(PixelConfig(patch=4))(images, text)


def test_text_embeddings_check_their_rows():
    with pytest.raises(ValueError, match="embeddings has 2 rows but class_names has 3 names"):
        TextEmbeddings(torch.zeros(2, 4), ("a", "b", "c"))
    with pytest.raises(ValueError, match="embeddings must have 2 dimensions"):
        TextEmbeddings(torch.zeros(2), ("a", "b"))
    text = TextEmbeddings(torch.zeros(2, 4), ["a", "b"])
    assert text.class_names == ("a", "b") and len(text) == 2
    assert text.to(torch.float64).embeddings.dtype == torch.float64


def test_predict_whole_is_the_softmax_of_the_upsampled_logits():
    model = PixelSegmentor(PixelConfig(patch=4))
    images = torch.randn(2, 3, 16, 24)
    names = ["a", "b", "c"]
    probs = model.predict(images, names)
    logits = F.interpolate(model(images, names), size=(16, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(probs, logits.softmax(1))
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 16, 24))


def test_predict_pads_sizes_that_are_not_multiples_of_the_patch():
    model = PixelSegmentor(PixelConfig(patch=4))
    images = torch.randn(1, 3, 13, 22)
    probs = model.predict(images, ["a", "b"])
    assert probs.shape == (1, 2, 13, 22)
    padded = F.pad(images, (0, 2, 0, 3))
    assert model.calls[-1][0] == tuple(padded.shape)
    logits = F.interpolate(model(padded, ["a", "b"]), size=(16, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(probs, logits[..., :13, :22].softmax(1))


def test_predict_slide_equals_whole_for_a_local_model():
    model = PixelSegmentor()
    images = torch.randn(2, 3, 40, 57)
    whole = model.predict(images, ["a", "b", "c"], mode="whole")
    slide = model.predict(images, ["a", "b", "c"], mode="slide", crop=16, stride=11)
    torch.testing.assert_close(slide, whole)


def test_predict_slide_averages_the_logits_of_overlapping_crops():
    model = CropMean()
    images = torch.randn(1, 3, 4, 10)
    probs = model.predict(images, ["a", "b"], mode="slide", crop=6, stride=4)
    # windows along the width: [0, 6) and [4, 10) (mmseg shifts the last one back to the border)
    assert [c[0] for c in model.calls] == [(1, 3, 4, 6), (1, 3, 4, 6)]
    m1, m2 = images[..., 0:6].mean(), images[..., 4:10].mean()
    expected = torch.empty(1, 2, 4, 10)
    expected[..., :4], expected[..., 4:6], expected[..., 6:] = m1, (m1 + m2) / 2, m2
    torch.testing.assert_close(probs, expected.softmax(1))


def test_predict_runs_in_eval_mode_and_restores_the_mode():
    model = PixelSegmentor().train()
    model.predict(torch.randn(1, 3, 4, 4), ["a"])
    assert model.calls[-1][1] is False and model.training
    with pytest.raises(ValueError, match="mode must be one of 'whole', 'slide'"):
        model.predict(torch.randn(1, 3, 4, 4), ["a"], mode="tiles")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        model.predict(torch.randn(1, 3, 4, 4), ["a"], mode="slide", stride=0)


def test_loss_is_cross_entropy_at_the_label_size_with_ignored_pixels():
    model = PixelSegmentor(PixelConfig(patch=2))
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    targets = torch.randint(0, 3, (2, 8, 10))
    targets[0, :4] = 255
    losses = model.loss(logits, targets)
    assert set(losses) == {"loss_ce"}
    up = F.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["loss_ce"], F.cross_entropy(up, targets, ignore_index=255))
    losses["loss_ce"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    everything_ignored = torch.full((2, 8, 10), 7)
    assert model.loss(logits, everything_ignored, ignore_index=7)["loss_ce"].item() == 0.0


def test_loss_checks_its_inputs():
    model = PixelSegmentor()
    with pytest.raises(TypeError, match="targets must have dtype int64"):
        model.loss(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="outputs has batch 1 but targets has batch 2"):
        model.loss(torch.randn(1, 2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="outputs must have 4 dimensions"):
        model.loss(torch.randn(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int64))


def test_trainable_parameters_are_those_that_need_grad():
    model = PixelSegmentor()
    model.proj.bias.requires_grad_(False)
    assert [p is model.proj.weight for p in model.trainable_parameters()] == [True]
