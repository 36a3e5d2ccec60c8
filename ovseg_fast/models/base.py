"""The segmentor contract every model follows: ``forward``, ``predict``, ``loss``.

A model subclasses :class:`Segmentor` and implements two methods:

- ``encode_classes(class_names) -> TextEmbeddings``: the class names as text embeddings;
- ``segment(images, text) -> logits (B, C, h, w)``: images already checked, text already encoded.

The base class supplies the input checks, the conversion of a class-name list into embeddings,
whole-image and sliding-window inference at the input size (``predict``), a cross-entropy
``loss`` that models with their own losses override, and ``example_training_step``: one training
step's work on random targets, which ``profile(train=True)`` times (models trained from something
other than label maps, as PixelCLIP from masks, override it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg_fast.models.losses import cross_entropy
from ovseg_fast.ops._checks import check_choice, check_int, check_tensor

__all__ = ["Segmentor", "TextEmbeddings", "TrainingStep", "check_class_names", "check_images"]

IMAGE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class TextEmbeddings:
    """Encoded classes: ``embeddings`` (C, D) float, row ``i`` the (usually L2-normalised) embedding
    of ``class_names[i]`` in the joint image-text space."""

    embeddings: Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        check_tensor("embeddings", self.embeddings, ndim=(2,))
        names = check_class_names("class_names", self.class_names)
        object.__setattr__(self, "class_names", names)
        if self.embeddings.shape[0] != len(names):
            raise ValueError(
                f"embeddings has {self.embeddings.shape[0]} rows but class_names has {len(names)} names"
            )

    def __len__(self) -> int:
        return len(self.class_names)

    def to(self, *args, **kwargs) -> TextEmbeddings:
        return TextEmbeddings(self.embeddings.to(*args, **kwargs), self.class_names)


def _no_op() -> None:
    return None


@dataclasses.dataclass(frozen=True)
class TrainingStep:
    """One training step of a model on a fixed batch, for timing it: ``losses()`` runs the forward
    and returns the named losses (their sum is what is back-propagated); after the optimiser step,
    ``after_optimizer_step()`` does what the model needs then (PixelCLIP's teacher EMA)."""

    losses: Callable[[], dict[str, Tensor]]
    after_optimizer_step: Callable[[], None] = _no_op


def check_class_names(name: str, value: object) -> tuple[str, ...]:
    """``value`` must be a non-empty sequence of non-empty strings (a bare str is refused)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of class names (str), got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(v).__name__}")
        if not v.strip():
            raise ValueError(f"{name}[{i}] must not be blank")
    return tuple(value)


def check_images(name: str, images: object, *, multiple_of: int = 1) -> Tensor:
    """``images`` must be float (B, 3, H, W), B >= 1, with H and W multiples of ``multiple_of``."""
    check_tensor(name, images, ndim=(4,), dtypes=IMAGE_DTYPES)
    b, c, h, w = images.shape
    if c != 3:
        raise ValueError(f"{name} must have 3 channels (B, 3, H, W), got shape {tuple(images.shape)}")
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(images.shape)}")
    if h % multiple_of or w % multiple_of:
        raise ValueError(
            f"{name}: height and width must be multiples of the patch size {multiple_of}, got {h}x{w}"
        )
    return images


class Segmentor(nn.Module):
    """Base class of the open-vocabulary segmentors.

    Attributes a subclass sets: ``patch_size`` (input sides must be multiples of it) and
    ``output_stride`` (input size / logits size).
    """

    patch_size: int = 1
    output_stride: int = 1
    #: Whether the model learns from label maps through ``loss`` (what ``ovseg-fast train`` does).
    #: Models trained otherwise (PixelCLIP: unlabeled masks, its own ``training_step``) set False.
    trains_from_labels: bool = True

    # -- to implement -------------------------------------------------------------------------
    def encode_classes(self, class_names: Sequence[str]) -> TextEmbeddings:
        raise NotImplementedError(f"{type(self).__name__} must implement encode_classes")

    def segment(self, images: Tensor, text: TextEmbeddings) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement segment")

    # -- the contract -------------------------------------------------------------------------
    def encode(self, text: Union[TextEmbeddings, Sequence[str]]) -> TextEmbeddings:
        """``text`` as ``TextEmbeddings`` (a list of class names is encoded; embeddings pass through)."""
        if isinstance(text, TextEmbeddings):
            return text
        names = check_class_names("text", text)
        return self.encode_classes(list(names))

    def forward(self, images: Tensor, text: Union[TextEmbeddings, Sequence[str]]) -> Tensor:
        """Segmentation logits.

        Args:
            images: float (B, 3, H, W), normalised with CLIP's mean/std; H and W multiples of
                ``patch_size``.
            text: the classes, a ``TextEmbeddings`` or a list of C class names.

        Returns:
            logits (B, C, H / output_stride, W / output_stride).
        """
        check_images("images", images, multiple_of=self.patch_size)
        return self.segment(images, self.encode(text))

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        class_names: Union[TextEmbeddings, Sequence[str]],
        *,
        mode: str = "whole",
        crop: int = 512,
        stride: int = 341,
    ) -> Tensor:
        """Class probabilities (B, C, H, W) at the input size, softmax over C.

        ``mode="whole"`` runs the image at once; ``"slide"`` runs ``crop`` x ``crop`` windows every
        ``stride`` pixels (the last window of a row/column is shifted back to end at the border) and
        averages the logits of overlapping windows, then softmaxes (mmsegmentation's
        ``slide_inference``). Images (or windows) whose sides are not multiples of ``patch_size``
        are zero-padded at the bottom/right for the forward and the padding is cut off again.
        The model runs in eval mode for the call and its previous mode is restored.
        """
        check_images("images", images)
        check_choice("mode", mode, ("whole", "slide"))
        check_int("crop", crop, minimum=1)
        check_int("stride", stride, minimum=1)
        text = self.encode(class_names)
        was_training = self.training
        self.eval()
        try:
            if mode == "whole":
                logits = self._padded_logits(images, text)
            else:
                logits = self._slide_logits(images, text, crop, stride)
        finally:
            self.train(was_training)
        return self._probabilities(logits)

    def _probabilities(self, logits: Tensor) -> Tensor:
        """``predict``'s output from the (window-averaged) logits: a softmax over the classes here;
        models that score classes independently override it."""
        return logits.float().softmax(1)

    def loss(self, outputs: Tensor, targets: Tensor, *, ignore_index: int = 255) -> dict[str, Tensor]:
        """Named losses of ``outputs`` (logits (B, C, h, w)) against ``targets`` (B, H, W) int64.

        The logits are resized bilinearly to the targets' size; pixels equal to ``ignore_index``
        do not count (the loss is 0 when every pixel is ignored). This default is the pixel-wise cross
        entropy (:func:`ovseg_fast.models.losses.cross_entropy`), ``{"loss_ce": ...}``.
        """
        outputs, targets = self._check_loss_inputs(outputs, targets, ignore_index)
        logits = _resize(outputs, targets.shape[-2:])
        return {"loss_ce": cross_entropy(logits.float(), targets, ignore_index=ignore_index)}

    def example_training_step(
        self, images: Tensor, class_names: Sequence[str], *, generator: Optional[torch.Generator] = None
    ) -> TrainingStep:
        """The trainer's step on ``images`` with random label maps over ``class_names`` as targets:
        ``loss(self(images, class_names), targets)`` (the text encoded inside the step, since prompt
        tuning trains through it). Models trained from other targets override this."""
        check_images("images", images)
        names = check_class_names("class_names", class_names)
        b, _, h, w = images.shape
        targets = torch.randint(len(names), (b, h, w), generator=generator).to(images.device)
        return TrainingStep(lambda: self.loss(self(images, list(names)), targets))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters an optimiser should update (those with ``requires_grad``)."""
        return (p for p in self.parameters() if p.requires_grad)

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _check_loss_inputs(outputs: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
        check_tensor("outputs", outputs, ndim=(4,))
        check_tensor("targets", targets, ndim=(3,), dtypes=(torch.int64,))
        check_int("ignore_index", ignore_index)
        if outputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"outputs has batch {outputs.shape[0]} but targets has batch {targets.shape[0]} "
                f"(outputs {tuple(outputs.shape)}, targets {tuple(targets.shape)})"
            )
        if outputs.device != targets.device:
            raise ValueError(f"targets is on {targets.device} but outputs is on {outputs.device}")
        return outputs, targets

    def _padded_logits(self, images: Tensor, text: TextEmbeddings) -> Tensor:
        """Logits at the images' own size, padding to a multiple of the patch size if needed."""
        h, w = images.shape[-2:]
        p = self.patch_size
        ph, pw = math.ceil(h / p) * p, math.ceil(w / p) * p
        if (ph, pw) != (h, w):
            images = F.pad(images, (0, pw - w, 0, ph - h))
        logits = _resize(self.segment(images, text), (ph, pw))
        return logits[..., :h, :w]

    def _slide_logits(self, images: Tensor, text: TextEmbeddings, crop: int, stride: int) -> Tensor:
        b, _, h, w = images.shape
        rows = max(h - crop + stride - 1, 0) // stride + 1
        cols = max(w - crop + stride - 1, 0) // stride + 1
        total = None
        count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
        for r in range(rows):
            for c in range(cols):
                y1, x1 = r * stride, c * stride
                y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                crop_logits = self._padded_logits(images[:, :, y1:y2, x1:x2], text).float()
                if total is None:
                    total = images.new_zeros((b, crop_logits.shape[1], h, w), dtype=torch.float32)
                total[:, :, y1:y2, x1:x2] += crop_logits
                count[:, :, y1:y2, x1:x2] += 1
        return total / count


def _resize(logits: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
