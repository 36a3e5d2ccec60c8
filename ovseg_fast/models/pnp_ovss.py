"""PnP-OVSS (Luo et al., "Emergent Open-Vocabulary Semantic Segmentation from Off-the-shelf
Vision-Language Models", CVPR 2024): training-free segmentation read off BLIP's image-text matching.

For an image and the class names present in it (given by the user, or by a classifier), in order:

1. **Salience.** Every class ``c`` is put in a prompt (``"a picture of {}"``) and BLIP scores the pair
   with its image-text matching (ITM) head, ``s_c`` = the "match" logit. In the cross-attention of
   text-encoder layer ``l``, head ``h``, let ``A_c`` (T tokens x N patches) be the attention of the
   prompt's tokens on the image patches. GradCAM on it is::

       G_c = mean over the class name's tokens t of  A_c[t, :] * ReLU(d s_c / d A_c[t, :])   -> (h, w) grid

2. **Salience DropOut.** ``passes`` rounds: after each one the patches the maps so far attend most
   (summed over the image's classes) are dropped, ``drop_fraction`` of the patches still kept, by
   masking them out of every cross-attention layer (their attention is exactly 0); the next round
   recomputes the maps on what is left, and the maps of all rounds are summed, so that the mask
   covers the whole object rather than only its most salient part.
3. **Blur and threshold.** Each class map is resized bilinearly to the image, min-max normalised to
   [0, 1], blurred with :func:`ovseg_fast.ops.gaussian_blur` (sigma = ``blur_sigma`` x the longer
   image side, the public code's ``0.05 * max(H, W)``), normalised again, and thresholded: the
   score of class c is its blurred map where it is >= ``threshold``, else 0. Pixels where no class
   passes are background.
4. **Dense CRF** (``crf=True``): :func:`ovseg_fast.ops.dense_crf` on the photo refines the softmax of
   the scores (the public code's kernel settings: smoothness 3 px weight 7, appearance 50 px / 5
   levels weight 10, 10 iterations).

All classes of an image go through BLIP together: the image tower runs once per image, and each
Salience DropOut round is one text-encoder forward and one backward (``torch.autograd.grad`` of the
summed ITM scores with respect to layer ``l``'s attention) for all classes at once.

Choices the issue leaves open, and how they are made here:

- ``predict(images, class_names)`` treats ``class_names`` as the classes present in *every* image
  of the batch; per-image lists are accepted too (``[["cat", "dog"], ["person"]]``), and the output
  then covers the union of the lists in order of first appearance, with probability 0 for a class
  on an image whose list lacks it.
- Background: the class named ``config.background`` (default ``"background"``), when it is in the
  list, is never prompted to BLIP; it takes the pixels where no class passes its threshold. Without
  it those pixels go to the class of highest blurred map (no background class, as the public code
  does on context data sets with many classes).
- The logits ``segment`` returns are ``log Q`` of the CRF marginals with the CRF on, the scores
  above with it off, so ``predict``'s softmax is the CRF's output, or the CRF's input.
- Salience DropOut masks the cross-attention as the issue asks (the public code zeroes the photo's
  pixels and reruns the image tower instead); the dropped patches are shared by all classes of the
  image, as in the public code.
- The ITM input ids are the tokenizer's own (``[CLS]`` first), as transformers'
  ``BlipForImageTextRetrieval`` runs them.

Weights: ``pretrained`` is a local transformers checkpoint directory of ``BlipForImageTextRetrieval``
(e.g. a download of ``Salesforce/blip-itm-large-coco``, with its tokenizer files), or a directory name
under ``$OVSEG_WEIGHTS_DIR``; nothing is downloaded. ``None`` builds random weights (with a warning)
and, there being no vocabulary, a hashing word tokenizer stands in for BERT's.

Images are normalised with CLIP's mean/std, which is also BLIP's; the CRF sees them de-normalised to
uint8 RGB.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg_fast.models.base import Segmentor, TextEmbeddings, check_class_names, check_images
from ovseg_fast.models.registry import register_model
from ovseg_fast.ops import dense_crf, gaussian_blur
from ovseg_fast.ops._checks import check_float, check_int

__all__ = [
    "PnPOVSS",
    "PnPOVSSBase",
    "PnPOVSSBaseConfig",
    "PnPOVSSConfig",
    "blip_config",
    "denormalize",
    "image_mask",
]

WEIGHTS_DIR_ENV = "OVSEG_WEIGHTS_DIR"
# CLIP's (and BLIP's) image normalisation, to recover the photo for the CRF.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP's ITM checkpoints as transformers configures them (Salesforce/blip-itm-{base,large}-coco):
# a BERT-base text encoder with cross-attention on a ViT-B/16 or ViT-L/16 image tower at 384 px.
_BLIP_VISION = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}

_warned_random = False


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised by users without the extra
        raise ImportError(
            f"PnP-OVSS runs BLIP from transformers: pip install 'ovseg-fast[models]'; importing it failed: {exc}"
        ) from exc
    return transformers


def blip_config(blip: Union[str, dict]):
    """A ``transformers.BlipConfig`` for ``"base"`` (ViT-B/16) or ``"large"`` (ViT-L/16) ITM at 384 px,
    or from a dict ``{"vision_config": {...}, "text_config": {...}, ...}`` of BlipConfig arguments
    (the text encoder's ``encoder_hidden_size`` follows the vision width unless given)."""
    transformers = _transformers()
    if isinstance(blip, str):
        if blip not in _BLIP_VISION:
            raise ValueError(f"blip must be 'base', 'large' or a dict of BlipConfig arguments, got {blip!r}")
        vision = dict(_BLIP_VISION[blip], image_size=384, patch_size=16)
        # BERT-base: transformers' BlipTextConfig defaults to 8 heads, the checkpoints have 12
        kwargs: dict[str, Any] = {"vision_config": vision, "text_config": {"num_attention_heads": 12}}
    elif isinstance(blip, dict):
        kwargs = copy.deepcopy(blip)
        kwargs.setdefault("vision_config", {})
        kwargs.setdefault("text_config", {})
    else:
        raise TypeError(f"blip must be 'base', 'large' or a dict of BlipConfig arguments, got {type(blip).__name__}")
    width = kwargs["vision_config"].get("hidden_size", 768)
    kwargs["text_config"].setdefault("encoder_hidden_size", width)
    return transformers.BlipConfig(**kwargs)


def denormalize(images: Tensor) -> Tensor:
    """CLIP-normalised float (B, 3, H, W) images back to uint8 RGB, as the CRF wants them."""
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((images.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


class _HashTokenizer:
    """Stands in for BERT's WordPiece when there is no checkpoint (hence no vocabulary): lower-cased
    words and punctuation, each hashed (CRC-32) to an id, between BERT's [CLS] (101) and [SEP] (102)."""

    _WORD = re.compile(r"\w+|[^\w\s]")

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.cls_token_id, self.sep_token_id, self.pad_token_id = 101, 102, 0
        self._first = min(1000, vocab_size // 2)  # ids below stay free for the special tokens

    def encode(self, text: str) -> list[int]:
        span = self.vocab_size - self._first
        return [self._first + zlib.crc32(w.encode()) % span for w in self._WORD.findall(text.lower())]


class _Prompts:
    """The prompts of a list of classes, tokenized: ids and mask (C, T) and the weights (C, T) that
    average a token map over the class name's tokens."""

    def __init__(self, ids: Tensor, mask: Tensor, weights: Tensor) -> None:
        self.ids, self.mask, self.weights = ids, mask, weights


@dataclasses.dataclass
class PnPOVSSConfig:
    """PnP-OVSS on BLIP ViT-L/16 ITM (the paper's setting).

    ``blip``: ``"large"``, ``"base"`` or a dict of ``transformers.BlipConfig`` arguments (used only
    without a checkpoint). ``template``: the prompt, one ``{}`` for the class name. ``layer``: the
    text-encoder layer whose cross-attention gives the GradCAM (0-based; the public code's 8th).
    ``head``: its head, or None for the mean over heads. ``passes``: Salience DropOut rounds (1 = no
    dropout). ``drop_fraction``: the share of the still-kept patches dropped after each round.
    ``blur_sigma``: the blur's std as a fraction of the longer image side (0 = no blur).
    ``threshold``: in [0, 1], on the normalised blurred maps. ``crf``: refine with the dense CRF;
    ``crf_*``: its settings (see :func:`ovseg_fast.ops.dense_crf`). ``background``: the class name
    that takes the pixels no class claims.
    """

    blip: Union[str, dict] = "large"
    template: str = "a picture of {}"
    layer: int = 7
    head: Optional[int] = 9
    passes: int = 4
    drop_fraction: float = 0.5
    blur_sigma: float = 0.05
    threshold: float = 0.5
    crf: bool = True
    crf_iters: int = 10
    crf_gaussian_sxy: float = 3.0
    crf_gaussian_compat: float = 7.0
    crf_bilateral_sxy: float = 50.0
    crf_bilateral_srgb: float = 5.0
    crf_bilateral_compat: float = 10.0
    background: str = "background"


@dataclasses.dataclass
class PnPOVSSBaseConfig(PnPOVSSConfig):
    """PnP-OVSS on BLIP ViT-B/16 ITM."""

    blip: Union[str, dict] = "base"


def _check_config(config: PnPOVSSConfig, text_layers: int, heads: int) -> None:
    if not isinstance(config.template, str) or config.template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}' for the class name, got {config.template!r}")
    check_int("layer", config.layer, minimum=0)
    if config.layer >= text_layers - 1:
        # Past the last layer's cross-attention only the [CLS] token reaches the ITM head, so the
        # gradient on the class name's tokens there is exactly 0.
        raise ValueError(
            f"layer must be < {text_layers - 1} (the text encoder has {text_layers} layers, and in the last one "
            f"only [CLS] reaches the ITM score, so the class tokens' GradCAM is 0), got {config.layer}"
        )
    if config.head is not None:
        check_int("head", config.head, minimum=0)
        if config.head >= heads:
            raise ValueError(f"head must be None or < {heads} (the cross-attention's heads), got {config.head}")
    check_int("passes", config.passes, minimum=1)
    frac = check_float("drop_fraction", config.drop_fraction, minimum=0.0)
    if frac >= 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {frac}")
    check_float("blur_sigma", config.blur_sigma, minimum=0.0)
    thr = check_float("threshold", config.threshold, minimum=0.0)
    if thr > 1.0:
        raise ValueError(f"threshold must be in [0, 1] (the maps are normalised), got {thr}")
    if not isinstance(config.crf, bool):
        raise TypeError(f"crf must be a bool, got {type(config.crf).__name__}")
    check_int("crf_iters", config.crf_iters, minimum=0)
    if not isinstance(config.background, str) or not config.background.strip():
        raise ValueError(f"background must be a non-empty class name, got {config.background!r}")


def _resolve_pretrained(pretrained: Union[str, os.PathLike]) -> Path:
    path = Path(pretrained).expanduser()
    if not path.exists() and os.environ.get(WEIGHTS_DIR_ENV):
        path = Path(os.environ[WEIGHTS_DIR_ENV]) / str(pretrained)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"pretrained must be a local transformers checkpoint directory of BlipForImageTextRetrieval (with "
            f"config.json, the weights and the tokenizer files), or such a directory under ${WEIGHTS_DIR_ENV}; "
            f"got {str(pretrained)!r}"
        )
    return path


@register_model("pnp_ovss")
class PnPOVSS(Segmentor):
    """PnP-OVSS: see the module docstring. ``self.blip`` is transformers' ``BlipForImageTextRetrieval``
    (frozen), ``self.config`` the :class:`PnPOVSSConfig` read at every call (so a tuner may change it)."""

    config_class = PnPOVSSConfig
    output_stride = 1

    def __init__(self, config: PnPOVSSConfig, *, pretrained: Optional[Union[str, os.PathLike]] = None) -> None:
        super().__init__()
        transformers = _transformers()
        if pretrained is not None:
            path = _resolve_pretrained(pretrained)
            self.blip = transformers.BlipForImageTextRetrieval.from_pretrained(path, local_files_only=True)
            # transformers 5 builds an empty BertTokenizer (every word [UNK]) from a directory without
            # vocabulary files instead of failing, so their presence is checked here.
            if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
                raise FileNotFoundError(
                    f"no tokenizer files (tokenizer.json or vocab.txt) in the checkpoint directory {str(path)!r}: "
                    "save the BlipProcessor's tokenizer there too"
                )
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:
            self.blip = transformers.BlipForImageTextRetrieval(blip_config(config.blip))
            self.tokenizer = _HashTokenizer(self.blip.config.text_config.vocab_size)
            _warn_random_weights(type(self).registered_name)
        self.blip.eval().requires_grad_(False)
        self.config = config
        text = self.blip.config.text_config
        self.patch_size = self.blip.config.vision_config.patch_size
        self.num_heads = text.num_attention_heads
        self.text_layers = text.num_hidden_layers
        _check_config(config, self.text_layers, self.num_heads)

    # -- text -------------------------------------------------------------------------------------
    def _tokens(self, text: str) -> list[int]:
        if isinstance(self.tokenizer, _HashTokenizer):
            return self.tokenizer.encode(text)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompts(self, class_names: Sequence[str]) -> _Prompts:
        """The prompts of ``class_names`` tokenized ([CLS] prompt [SEP], padded), with the weights
        that average over the class name's tokens (all prompt tokens if they cannot be located)."""
        names = _check_unique(check_class_names("class_names", class_names))
        template = self.config.template
        prefix = len(self._tokens(template.split("{}")[0])) if template.split("{}")[0].strip() else 0
        cls_id = self.tokenizer.cls_token_id
        sep_id = self.tokenizer.sep_token_id
        rows, spans = [], []
        for name in names:
            body = self._tokens(template.format(name))
            word = self._tokens(name)
            start = 1 + prefix
            if body[prefix : prefix + len(word)] == word and word:
                spans.append((start, start + len(word)))
            else:  # the class name merged with the template's text: average the whole prompt
                spans.append((1, 1 + len(body)))
            rows.append([cls_id, *body, sep_id])
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        weights = torch.zeros(len(rows), length)
        for i, (row, (a, b)) in enumerate(zip(rows, spans)):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            weights[i, a:b] = 1.0 / (b - a)
        return _Prompts(ids, mask, weights)

    def encode_classes(self, class_names: Sequence[str]) -> TextEmbeddings:
        """BLIP's image-text contrastive (ITC) embeddings of the prompts, (C, 256) L2-normalised. The
        segmentation itself uses the class names these carry (the ITM runs on image and text jointly)."""
        names = [n for n in check_class_names("class_names", class_names)]
        p = self.prompts(names)
        with torch.no_grad():
            out = self.blip.text_encoder(input_ids=p.ids, attention_mask=p.mask)
            emb = F.normalize(self.blip.text_proj(out.last_hidden_state[:, 0]), dim=-1)
        return TextEmbeddings(emb, tuple(names))

    # -- salience -----------------------------------------------------------------------------------
    def image_embeds(self, images: Tensor) -> Tensor:
        """BLIP's image tower: (B, 1 + h*w, D) tokens ([CLS] first), no gradient needed."""
        with torch.no_grad():
            return self.blip.vision_model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state

    def gradcam(self, image_embeds: Tensor, prompts: _Prompts, keep: Tensor) -> Tensor:
        """GradCAM of every class on one image, one forward and one backward for all classes.

        Args:
            image_embeds: (1 + N, D) the image's tokens from :meth:`image_embeds`.
            prompts: the C classes' prompts (:meth:`prompts`).
            keep: (C, N) bool, the patches each class's cross-attention may see (False: dropped).

        Returns:
            (C, N) float32: ``sum_t w_t A[t, :] * ReLU(d s / d A[t, :])`` of layer ``config.layer``'s
            cross-attention ``A`` (head ``config.head``, or the mean over heads), ``s`` the ITM match
            logit, ``w`` the class-token weights; the image [CLS] token's column is left out.
        """
        cfg = self.config
        # The image tokens go in once (batch 1): every cross-attention computes their keys and values
        # once and broadcasts them over the C prompts, instead of once per class. A leaf that
        # requires grad puts the cross-attentions in the graph while the frozen weights keep every
        # parameter gradient from being computed.
        enc = image_embeds.detach().unsqueeze(0).requires_grad_()
        captured: list[Tensor] = []
        layer = self.blip.text_encoder.encoder.layer[cfg.layer].crossattention.self
        handles = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out[1]))]
        try:
            with torch.enable_grad(), image_mask(self.blip, keep):
                out = self.blip.text_encoder(
                    input_ids=prompts.ids.to(enc.device),
                    attention_mask=prompts.mask.to(enc.device),
                    encoder_hidden_states=enc,
                )
                score = self.blip.itm_head(out.last_hidden_state[:, 0])[:, 1]
                (grad,) = torch.autograd.grad(score.sum(), captured[0])
        finally:
            for handle in handles:
                handle.remove()
        attn = captured[0].detach()  # (C, heads, T, 1 + N)
        cam = (attn * grad.clamp(min=0))[..., 1:]
        cam = cam.mean(1) if cfg.head is None else cam[:, cfg.head]
        return torch.einsum("ctn,ct->cn", cam.float(), prompts.weights.to(cam.device))

    def salience(self, image_embeds: Tensor, prompts: _Prompts) -> tuple[Tensor, Tensor]:
        """Salience DropOut on one image: the GradCAM maps of ``config.passes`` rounds, summed, (C, N),
        and the (passes, N) bool masks of the patches each round kept."""
        cfg = self.config
        c = prompts.ids.shape[0]
        n = image_embeds.shape[0] - 1
        keep = torch.ones(n, dtype=torch.bool, device=image_embeds.device)
        total = image_embeds.new_zeros(c, n, dtype=torch.float32)
        kept = []
        for p in range(cfg.passes):
            kept.append(keep.clone())
            cam = self.gradcam(image_embeds, prompts, keep.expand(c, n))
            total += cam
            if p + 1 == cfg.passes:
                break
            remaining = int(keep.sum())
            # at least one patch stays visible: a row of the attention with nothing to attend is NaN
            drop = min(round(cfg.drop_fraction * remaining), remaining - 1)
            if drop > 0:
                union = total.sum(0).masked_fill(~keep, -math.inf)
                keep[union.topk(drop).indices] = False
        return total, torch.stack(kept)

    def salience_maps(self, images: Tensor, class_names: Sequence[str]) -> Tensor:
        """(B, C, h, w) summed GradCAM maps of ``images`` (B, 3, H, W) on the patch grid (h = H / patch)."""
        _check_size(check_images("images", images), self.patch_size)
        check_images("images", images, multiple_of=self.patch_size)
        _check_grad_possible()
        prompts = self.prompts(class_names)
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        embeds = self.image_embeds(images)
        return torch.stack([self.salience(e, prompts)[0] for e in embeds]).view(len(images), -1, h, w)

    # -- post-processing ------------------------------------------------------------------------------
    def blurred(self, maps: Tensor, size: Sequence[int]) -> Tensor:
        """(B, C, H, W) float32 in [0, 1]: each (B, C, h, w) map resized bilinearly to ``size`` (H, W),
        min-max normalised, blurred (sigma = ``blur_sigma * max(H, W)``) and normalised again."""
        x = _minmax(F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=False))
        if self.config.blur_sigma > 0:
            x = _minmax(gaussian_blur(x, self.config.blur_sigma * max(size)))
        return x

    def scores(self, maps: Tensor, size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Thresholded class scores at ``size`` and the background mask: scores (B, C, H, W) are the
        :meth:`blurred` maps where they are >= ``threshold``, else 0; background (B, 1, H, W) bool is
        where no class passes."""
        x = self.blurred(maps, size)
        passed = x >= self.config.threshold
        return x * passed, ~passed.any(1, keepdim=True)

    def segment(self, images: Tensor, text: TextEmbeddings) -> Tensor:
        """Logits (B, C, H, W) at the input size: :meth:`salience_maps` of the classes other than the
        background, then :meth:`postprocess`."""
        _check_config(self.config, self.text_layers, self.num_heads)
        names = list(_check_unique(text.class_names))
        return self.postprocess(self.salience_maps(images, self.foreground(names)), images, names)

    def foreground(self, class_names: Sequence[str]) -> list[str]:
        """``class_names`` without the background class (the classes BLIP is asked about)."""
        bg = self.config.background.strip().lower()
        fg = [n for n in class_names if n.strip().lower() != bg]
        if not fg:
            raise ValueError(
                f"class_names has only the background class {self.config.background!r}: nothing to segment"
            )
        return fg

    def postprocess(self, maps: Tensor, images: Tensor, class_names: Sequence[str]) -> Tensor:
        """Logits (B, C, H, W) from the salience ``maps`` (B, C_fg, h, w) of ``foreground(class_names)``.

        Without the CRF they are the thresholded :meth:`blurred` maps, with a background channel of
        1 where no class passes and 0 elsewhere (no background class: those pixels keep their
        blurred maps, so they go to the highest one); with the CRF, ``log`` of the marginals of
        :func:`~ovseg_fast.ops.dense_crf` run on the softmax of those scores and the de-normalised photo.
        """
        cfg = self.config
        names = list(class_names)
        bg_key = cfg.background.strip().lower()
        bg = [i for i, n in enumerate(names) if n.strip().lower() == bg_key]
        fg = [i for i in range(len(names)) if i not in bg]
        b, _, h, w = images.shape
        if maps.dim() != 4 or maps.shape[:2] != (b, len(fg)):
            raise ValueError(
                f"maps must have shape ({b}, {len(fg)}, h, w) for {len(fg)} foreground classes, got {tuple(maps.shape)}"
            )
        blurred = self.blurred(maps, (h, w))
        passed = blurred >= cfg.threshold
        scores, background = blurred * passed, ~passed.any(1, keepdim=True)
        logits = scores.new_zeros(b, len(names), h, w)
        if bg:
            logits[:, fg] = scores
            logits[:, bg[0]] = background[:, 0].float()
        else:
            logits[:, fg] = torch.where(background, blurred, scores)
        if cfg.crf:
            q = dense_crf(
                logits.softmax(1),
                denormalize(images),
                n_iters=cfg.crf_iters,
                gaussian_sxy=cfg.crf_gaussian_sxy,
                gaussian_compat=cfg.crf_gaussian_compat,
                bilateral_sxy=cfg.crf_bilateral_sxy,
                bilateral_srgb=cfg.crf_bilateral_srgb,
                bilateral_compat=cfg.crf_bilateral_compat,
            )
            logits = q.clamp_min(1e-12).log()
        return logits

    # -- the contract, with per-image class lists ---------------------------------------------------------
    def predict(self, images: Tensor, class_names: Any, *, mode: str = "whole", crop: int = 512, stride: int = 341):
        """Class probabilities (B, C, H, W), as :meth:`Segmentor.predict`; ``class_names`` are the
        classes present in every image, or one list per image (the output then covers the union of
        the lists in order of first appearance, 0 for a class an image's list lacks)."""
        _check_size(check_images("images", images), self.patch_size)
        if isinstance(class_names, TextEmbeddings) or _is_name_list(class_names):
            return super().predict(images, class_names, mode=mode, crop=crop, stride=stride)
        if not isinstance(class_names, Sequence) or len(class_names) != images.shape[0]:
            raise ValueError(
                f"class_names must be a list of class names or one list per image ({images.shape[0]} lists), "
                f"got {class_names!r}"
            )
        lists = [_check_unique(check_class_names(f"class_names[{i}]", c)) for i, c in enumerate(class_names)]
        union = list(dict.fromkeys(n for names in lists for n in names))
        out = images.new_zeros(images.shape[0], len(union), *images.shape[-2:], dtype=torch.float32)
        for i, names in enumerate(lists):
            probs = super().predict(images[i : i + 1], list(names), mode=mode, crop=crop, stride=stride)
            out[i, [union.index(n) for n in names]] = probs[0]
        return out


@register_model("pnp_ovss_base")
class PnPOVSSBase(PnPOVSS):
    """PnP-OVSS on BLIP ViT-B/16 ITM (:class:`PnPOVSSBaseConfig`)."""

    config_class = PnPOVSSBaseConfig


@contextlib.contextmanager
def image_mask(blip, keep: Tensor) -> Iterator[None]:
    """Within the block, every cross-attention of ``blip``'s text encoder sees only the image
    patches ``keep`` (C, N) bool allows (the image [CLS] token always): the dropped ones get an
    additive -inf-like bias, so their attention is exactly 0.

    A forward pre-hook hands the bias to each ``BlipTextSelfAttention`` as its
    ``encoder_attention_mask``: transformers 5.x's ``BlipTextAttention`` passes the model's image
    mask on as ``attention_mask``, which the cross-attention discards in favour of its own (unset)
    ``encoder_attention_mask``, so a mask given to the model is silently ignored.
    """
    c, n = keep.shape
    dtype = blip.text_encoder.embeddings.word_embeddings.weight.dtype
    bias = torch.zeros(c, 1, 1, 1 + n, dtype=dtype, device=keep.device)
    bias[:, 0, 0, 1:].masked_fill_(~keep, torch.finfo(dtype).min)

    def hook(_module, args, kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            kwargs = dict(kwargs, encoder_attention_mask=bias)
        return args, kwargs

    handles = [
        layer.crossattention.self.register_forward_pre_hook(hook, with_kwargs=True)
        for layer in blip.text_encoder.encoder.layer
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _minmax(x: Tensor) -> Tensor:
    """Each (H, W) map of (B, C, H, W) scaled to [0, 1] (a constant map becomes 0)."""
    lo = x.amin((-2, -1), keepdim=True)
    hi = x.amax((-2, -1), keepdim=True)
    span = hi - lo
    # random or tiny weights give maps of ~1e-14: no absolute floor, only constant maps map to 0
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


def _is_name_list(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(v, str) for v in value)


def _check_unique(names: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        key = n.strip().lower()
        if key in seen:
            raise ValueError(f"class_names has {n!r} twice (positions {seen[key]} and {i}); class names must be unique")
        seen[key] = i
    return tuple(names)


def _check_size(images: Tensor, patch: int) -> None:
    h, w = images.shape[-2:]
    if h < patch or w < patch:
        raise ValueError(
            f"images of {h}x{w} pixels are too small for BLIP's {patch}x{patch} patch grid: each side needs at "
            f"least {patch} pixels"
        )


def _check_grad_possible() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "PnP-OVSS needs gradients (GradCAM of the ITM score) and cannot run under torch.inference_mode(); "
            "torch.no_grad() is fine"
        )


def _warn_random_weights(name: str) -> None:
    global _warned_random
    if _warned_random:
        return
    _warned_random = True
    warnings.warn(
        f"{name}(pretrained=None) has RANDOM weights and a hashing tokenizer: its segmentation is meaningless. "
        "Pass pretrained=<local transformers BlipForImageTextRetrieval checkpoint directory>.",
        UserWarning,
        stacklevel=3,
    )
