"""The CLIP layer: open_clip's CLIP run through our own loop over its blocks, with prompts and dense features.

:class:`CLIPBackbone` wraps an ``open_clip.CLIP`` (open_clip's config, weights format, tokenizer and
modules) and runs it itself so that the methods built on CLIP can reach inside:

- images of any size whose sides are multiples of the patch size (positional embedding resized
  bicubically to the grid, cached per grid), [CLS] and patch tokens after any layers and their
  joint-space projections, MaskCLIP's dense features of the last layer;
- deep visual prompts (VPT-deep) and per-layer prompt tokens from a callback (RPN);
- text with prompt ensembling, CoOp context, deep text prompts (LDVC) and learnable words inside a
  template (PixelCLIP), all through open_clip's tokenizer and text transformer weights;
- with ``convnext=True``, open_clip's timm ConvNeXt image towers (``convnext_base_w``, PixelCLIP's
  ConvNeXt-B): image embeddings and dense features (:func:`convnext_dense_features`), no tokens.

With no prompts and at the checkpoint's own resolution the outputs equal open_clip's
``encode_image`` / ``encode_text`` to float32 rounding (tests/models/test_clip.py).

The bare registered model ``clip`` (:class:`CLIPSegmentor`) is training-free MaskCLIP
segmentation: cosine of the dense features with the class embeddings.

open_clip is imported when a backbone is built, so ``import ovseg_fast.models`` works without it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg_fast.models.base import Segmentor, TextEmbeddings, check_class_names, check_images
from ovseg_fast.models.registry import register_model
from ovseg_fast.ops._checks import check_int, check_tensor

__all__ = [
    "CLIPBackbone",
    "CLIPSegmentor",
    "CLIPSegmentorConfig",
    "ImageFeatures",
    "TextEmbeddings",
    "convnext_dense_features",
    "resolve_templates",
]

WEIGHTS_DIR_ENV = "OVSEG_WEIGHTS_DIR"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
# The placeholder word whose token positions learnable embeddings take (one BPE token per "x").
_PLACEHOLDER = "X"
# Keys a TorchScript (OpenAI) archive's state dict carries beside the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

# Sequences per text-transformer call in encode_text.
_TEXT_CHUNK = 1024

_warned_random = False


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - exercised by users without the extra
        raise ImportError(
            "ovseg_fast.models' CLIP layer needs open_clip: pip install 'ovseg-fast[models]' "
            f"(or pip install open_clip_torch); importing it failed: {exc}"
        ) from exc
    return open_clip


def resolve_templates(templates: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """Prompt templates as format strings with one ``{}`` for the class name.

    ``None`` or ``"default"``: ``("a photo of a {}.",)``; ``"imagenet"``: CLIP's 80 ImageNet templates;
    ``"short"``: the 7-template subset from CLIP's prompt-engineering notebook (both from open_clip);
    or a sequence of strings, each with exactly one ``{}``.
    """
    if templates is None or templates == "default":
        return DEFAULT_TEMPLATES
    if templates in ("imagenet", "short"):
        meta = _open_clip().zero_shot_metadata
        table = meta.OPENAI_IMAGENET_TEMPLATES if templates == "imagenet" else meta.SIMPLE_IMAGENET_TEMPLATES
        return tuple(t("{}") for t in table)
    if isinstance(templates, str) or not isinstance(templates, Sequence) or len(templates) == 0:
        raise ValueError(
            "templates must be 'default', 'imagenet', 'short' or a non-empty list of strings with one '{}', "
            f"got {templates!r}"
        )
    for i, t in enumerate(templates):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"templates[{i}] must be a str with exactly one '{{}}', got {t!r}")
    return tuple(templates)


@dataclasses.dataclass
class ImageFeatures:
    """What :meth:`CLIPBackbone.encode_image_features` returns; lists follow ``layers``.

    - ``layers``: the block indices (0-based) the tokens were taken after;
    - ``cls_tokens``: (B, width) [CLS] tokens; ``patch_tokens``: (B, h, w, width) patch tokens;
    - ``cls_embeddings``: (B, D) and ``patch_embeddings``: (B, h, w, D), the same through
      ``ln_post`` and ``proj`` into the joint image-text space (not normalised);
    - ``image_embedding``: (B, D), the last layer's projected [CLS] (open_clip's ``encode_image``);
    - ``dense``: (B, h, w, D) MaskCLIP dense features of the last layer (not normalised), or None.
    """

    layers: tuple[int, ...]
    cls_tokens: list[Tensor]
    patch_tokens: list[Tensor]
    cls_embeddings: list[Tensor]
    patch_embeddings: list[Tensor]
    image_embedding: Tensor
    dense: Optional[Tensor]


PromptFn = Callable[[int, Tensor, Tensor], Optional[Tensor]]


class CLIPBackbone(nn.Module):
    """open_clip's CLIP with prompts, any input size and dense features.

    Args:
        name: an open_clip model name (``"ViT-B-16"``; use ``"ViT-B-16-quickgelu"`` for OpenAI's
            weights, as open_clip does) or an open_clip model config dict (``embed_dim``,
            ``vision_cfg``, ``text_cfg``, optional ``quick_gelu``), e.g. a tiny ViT for tests.
            Only ViTs with open_clip's default blocks, [CLS] pooling and its built-in text
            transformer are supported (and timm ConvNeXts with ``convnext=True``).
        pretrained: a local checkpoint file (``.pt``/``.pth``/``.bin``/``.safetensors``; open_clip's
            state dict, optionally wrapped as ``{"state_dict": ...}``, or an OpenAI TorchScript
            archive) or a file name looked up under ``$OVSEG_WEIGHTS_DIR`` (with or without suffix,
            also under a sub-directory named after the model). Nothing is ever downloaded.
            ``None`` builds random weights and warns once.
        image_size: the working input size; its positional embedding is resized once, here.
        frozen: freeze every CLIP weight (the prompts added below stay trainable).
        visual_prompts: VPT-deep, ``n`` learnable tokens per vision layer, ``(layers, n, width)``.
        text_context: CoOp, ``n`` learnable context tokens at the text input (before the class name).
        text_deep_prompts: ``n`` learnable tokens per text layer, ``(layers, n, text_width)``, at the
            same positions as CoOp's context (right after the start token): the first layer's are
            token embeddings (like CoOp's), the others replace those positions of the residual
            stream at the input of their layer (MaPLe/LDVC deep text prompts). Exclusive with
            ``text_context``.
        text_prompt_init: a hand-written prompt (e.g. ``"a photo of a"``) whose token embeddings
            initialise the CoOp context or every layer's deep text prompts; its token count must
            equal ``text_context`` or ``text_deep_prompts``.
        convnext: also accept open_clip's timm ConvNeXt image towers (a ``vision_cfg`` with
            ``timm_model_name`` a timm ConvNeXt, e.g. ``"convnext_base_w_320"``; timm's own
            pretrained weights are never loaded). Such a backbone gives image embeddings and dense
            features only (:func:`convnext_dense_features`); ``patch_size`` is then the trunk's
            output stride (32) and ``num_layers`` 0. Per-layer tokens, visual prompts, ``prompt_fn``,
            ``positional_embedding`` and ``project`` need a ViT. Models built on ViT tokens leave it
            False, so a ConvNeXt config gets a clear error there.

    ``vision_tower`` tells which tower was built: ``"vit"`` or ``"convnext"``.

    Images are float (B, 3, H, W) normalised with CLIP's mean/std (``OPENAI_DATASET_MEAN``/``STD``).
    """

    def __init__(
        self,
        name: Union[str, dict] = "ViT-B-16",
        pretrained: Optional[Union[str, os.PathLike]] = None,
        *,
        image_size: int = 512,
        frozen: bool = True,
        visual_prompts: int = 0,
        text_context: int = 0,
        text_deep_prompts: int = 0,
        text_prompt_init: Optional[str] = None,
        convnext: bool = False,
    ) -> None:
        super().__init__()
        check_int("image_size", image_size, minimum=1)
        check_int("visual_prompts", visual_prompts, minimum=0)
        check_int("text_context", text_context, minimum=0)
        check_int("text_deep_prompts", text_deep_prompts, minimum=0)
        for flag, value in (("frozen", frozen), ("convnext", convnext)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
        open_clip = _open_clip()
        self.model_name, config = _model_config(name)
        self.clip = _build_clip(self.model_name, config, convnext=convnext)
        self.vision_tower = _check_supported(self.model_name, self.clip)
        if pretrained is not None:
            path = resolve_checkpoint(pretrained, self.model_name)
            load_checkpoint(self.clip, path, self.model_name)
            self.checkpoint = str(path)
        else:
            self.checkpoint = None
            _warn_random_weights(self.model_name)
        self.tokenizer = _tokenizer(open_clip, name, config)

        visual = self.clip.visual
        if self.vision_tower == "vit":
            self.patch_size = int(visual.conv1.kernel_size[0])
            self.width = int(visual.conv1.out_channels)
            self.native_grid = tuple(int(g) for g in visual.grid_size)
            self.num_layers = len(visual.transformer.resblocks)
        else:  # a ConvNeXt: the "patch" is the output stride of its last stage
            self.patch_size = int(visual.trunk.feature_info[-1]["reduction"])
            self.width = int(visual.trunk.num_features)
            self.native_grid = tuple(int(s) // self.patch_size for s in visual.image_size)
            self.num_layers = 0
        self.embed_dim = int(config["embed_dim"])
        self.text_width = int(self.clip.token_embedding.weight.shape[1])
        self.num_text_layers = len(self.clip.transformer.resblocks)
        if image_size % self.patch_size:
            raise ValueError(f"image_size must be a multiple of the patch size {self.patch_size}, got {image_size}")
        self.image_size = image_size

        if frozen:
            for p in self.clip.parameters():
                p.requires_grad_(False)
        self.frozen = frozen

        self.visual_prompts: Optional[nn.Parameter] = None
        if visual_prompts:
            self._require_vit("visual_prompts")
            # VPT's initialisation: uniform with the Xavier bound of a patch-embedding-sized layer.
            bound = math.sqrt(6.0 / (3 * self.patch_size**2 + self.width))
            self.visual_prompts = nn.Parameter(
                torch.empty(self.num_layers, visual_prompts, self.width).uniform_(-bound, bound)
            )

        if text_context and text_deep_prompts:
            raise ValueError("text_context and text_deep_prompts are exclusive (deep prompts include the input layer)")
        init = None
        if text_prompt_init is not None:
            init = self.token_embeddings(text_prompt_init)
            wanted = text_context or text_deep_prompts
            if wanted != init.shape[0]:
                raise ValueError(
                    f"text_prompt_init {text_prompt_init!r} has {init.shape[0]} tokens: it initialises text_context "
                    f"or text_deep_prompts, so set one of them to {init.shape[0]} (got {wanted})"
                )
        self.text_context: Optional[nn.Parameter] = None
        self.text_deep_prompts: Optional[nn.Parameter] = None
        if text_context:
            ctx = init.clone() if init is not None else torch.randn(text_context, self.text_width) * 0.02
            self.text_context = nn.Parameter(ctx)
        if text_deep_prompts:
            if init is not None:
                deep = init.unsqueeze(0).repeat(self.num_text_layers, 1, 1)
            else:
                deep = torch.randn(self.num_text_layers, text_deep_prompts, self.text_width) * 0.02
            self.text_deep_prompts = nn.Parameter(deep)

        self._pos_cache: dict[tuple[int, int], tuple[tuple, Tensor]] = {}
        self._text_cache: collections.OrderedDict[tuple, Tensor] = collections.OrderedDict()
        self._text_cache_size = 32
        if self.vision_tower == "vit":
            self.positional_embedding((image_size // self.patch_size, image_size // self.patch_size))

    # -- parameters -----------------------------------------------------------------------------
    def added_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters this class adds to CLIP (prompts), whether trainable or not."""
        clip_ids = {id(p) for p in self.clip.parameters()}
        return (p for p in self.parameters() if id(p) not in clip_ids)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that require grad: with ``frozen=True`` only the added prompts."""
        return (p for p in self.parameters() if p.requires_grad)

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's learned temperature, exponentiated (100 for OpenAI's weights)."""
        return self.clip.logit_scale.exp()

    # -- image side ---------------------------------------------------------------------------
    def positional_embedding(self, grid: tuple[int, int]) -> Tensor:
        """The positional embedding (1 + h*w, width) for a grid of h x w patches.

        At the native grid it is the checkpoint's own; otherwise the patch part is resized
        bicubically (align_corners=False, as ZegCLIP/MaskCLIP do), cached per grid and
        recomputed when the weights change or need gradients.
        """
        self._require_vit("positional_embedding")
        pos = self.clip.visual.positional_embedding
        grid = (int(grid[0]), int(grid[1]))
        if grid == self.native_grid:
            return pos
        version = (pos._version, pos.data_ptr(), pos.dtype, pos.device)
        if pos.requires_grad and torch.is_grad_enabled():
            return _resize_pos(pos, self.native_grid, grid)
        hit = self._pos_cache.get(grid)
        if hit is not None and hit[0] == version:
            return hit[1]
        with torch.no_grad():
            resized = _resize_pos(pos, self.native_grid, grid)
        self._pos_cache[grid] = (version, resized)
        return resized

    def project(self, tokens: Tensor) -> Tensor:
        """Vision tokens (..., width) into the joint space (..., D): ``ln_post`` then ``proj``."""
        self._require_vit("project")
        visual = self.clip.visual
        return visual.ln_post(tokens) @ visual.proj

    def encode_image(self, images: Tensor, *, normalize: bool = False) -> Tensor:
        """(B, D) image embeddings: the last layer's projected [CLS] (open_clip's ``encode_image``)."""
        emb = self.encode_image_features(images, layers=(), dense=False).image_embedding
        return F.normalize(emb, dim=-1) if normalize else emb

    def dense_features(self, images: Tensor, *, prompt_fn: Optional[PromptFn] = None) -> Tensor:
        """(B, h, w, D) dense features of the last layer: MaskCLIP's for a ViT (see
        :meth:`encode_image_features`), :func:`convnext_dense_features` for a ConvNeXt."""
        return self.encode_image_features(images, layers=(), dense=True, prompt_fn=prompt_fn).dense

    def encode_image_features(
        self,
        images: Tensor,
        *,
        layers: Optional[Sequence[int]] = None,
        dense: bool = False,
        prompt_fn: Optional[PromptFn] = None,
    ) -> ImageFeatures:
        """Runs the vision transformer and collects tokens: the module's ``forward`` (see there)."""
        # Through __call__, so that hooks (FlopCounterMode's per-module breakdown) see the backbone.
        return self(images, layers=layers, dense=dense, prompt_fn=prompt_fn)

    def forward(
        self,
        images: Tensor,
        *,
        layers: Optional[Sequence[int]] = None,
        dense: bool = False,
        prompt_fn: Optional[PromptFn] = None,
    ) -> ImageFeatures:
        """Runs the vision transformer and collects tokens.

        Args:
            images: float (B, 3, H, W), H and W multiples of ``patch_size``.
            layers: block indices (0-based, negative from the end) after which [CLS] and patch
                tokens are returned; default the last block only.
            dense: also compute MaskCLIP's dense features of the last layer: the last block's
                value path without query-key attention, in MaskCLIP's (mmseg ViT,
                ``skip_last_attn``) form: ``v = x + out_proj(W_v ln_1(x) + b_v)``,
                ``v = v + mlp(ln_2(v))``, then ``ln_post`` and ``proj``, for the patch tokens, where
                ``x`` is the last block's input.
            prompt_fn: ``prompt_fn(layer_index, cls (B, width), patches (B, h, w, width))`` returns
                ``(B, m, width)`` tokens (or None) for that layer's input; like the deep visual
                prompts they are placed after [CLS], attend and are attended to, and are dropped
                after the layer.

        A ConvNeXt tower has no tokens: ``layers`` must be None or empty and ``prompt_fn`` None;
        ``image_embedding`` is open_clip's (average pool of the last stage, head norm,
        projection) and ``dense`` is :func:`convnext_dense_features`, from one trunk pass.

        Returns:
            :class:`ImageFeatures`.
        """
        check_images("images", images, multiple_of=self.patch_size)
        if self.vision_tower == "convnext":
            return self._convnext_features(images, layers, dense, prompt_fn)
        visual = self.clip.visual
        take = self._layer_indices(layers)
        b = images.shape[0]
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, width, h, w)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding((gh, gw)).to(x.dtype)
        x = visual.ln_pre(x)

        blocks = visual.transformer.resblocks
        cls_tokens, patch_tokens = [], []
        dense_out = None
        for i, blk in enumerate(blocks):
            extra = self._visual_prompt_tokens(i, x, gh, gw, prompt_fn)
            m = 0 if extra is None else extra.shape[1]
            if extra is not None:
                x = torch.cat([x[:, :1], extra.to(x.dtype), x[:, 1:]], dim=1)
            if dense and i == len(blocks) - 1:
                dense_out = _value_path(blk, x[:, 1 + m :])
            x = _block(blk, x)
            if m:
                x = torch.cat([x[:, :1], x[:, 1 + m :]], dim=1)
            if i in take:
                cls_tokens.append(x[:, 0])
                patch_tokens.append(x[:, 1:].reshape(b, gh, gw, -1))
        cls_embeddings = [self.project(t) for t in cls_tokens]
        patch_embeddings = [self.project(t) for t in patch_tokens]
        image_embedding = self.project(x[:, 0])
        if dense_out is not None:
            dense_out = self.project(dense_out).reshape(b, gh, gw, -1)
        return ImageFeatures(
            layers=tuple(sorted(take)),
            cls_tokens=cls_tokens,
            patch_tokens=patch_tokens,
            cls_embeddings=cls_embeddings,
            patch_embeddings=patch_embeddings,
            image_embedding=image_embedding,
            dense=dense_out,
        )

    def _convnext_features(
        self, images: Tensor, layers: Optional[Sequence[int]], dense: bool, prompt_fn: Optional[PromptFn]
    ) -> ImageFeatures:
        if prompt_fn is not None or (layers is not None and len(layers)):
            self._require_vit("layers and prompt_fn (per-layer tokens)")
        visual = self.clip.visual
        maps = visual.trunk.forward_features(images.to(visual.trunk.stem[0].weight.dtype))
        pooled = _convnext_project(visual, maps.mean((-2, -1), keepdim=True))[:, 0, 0]
        return ImageFeatures(
            layers=(),
            cls_tokens=[],
            patch_tokens=[],
            cls_embeddings=[],
            patch_embeddings=[],
            image_embedding=pooled,
            dense=_convnext_project(visual, maps) if dense else None,
        )

    def _require_vit(self, what: str) -> None:
        if self.vision_tower != "vit":
            raise ValueError(
                f"{what}: needs a ViT image tower; {self.model_name} has a {self.vision_tower} (image embeddings "
                "and dense features only)"
            )

    def _layer_indices(self, layers: Optional[Sequence[int]]) -> set[int]:
        n = self.num_layers
        if layers is None:
            return {n - 1}
        if isinstance(layers, int) or not isinstance(layers, Sequence):
            raise TypeError(f"layers must be a sequence of ints, got {type(layers).__name__}")
        out = set()
        for i in layers:
            check_int("layers[i]", i)
            if not -n <= i < n:
                raise ValueError(f"layers must be in [-{n}, {n}) for a {n}-layer ViT, got {i}")
            out.add(i % n)
        return out

    def _visual_prompt_tokens(
        self, i: int, x: Tensor, gh: int, gw: int, prompt_fn: Optional[PromptFn]
    ) -> Optional[Tensor]:
        b = x.shape[0]
        parts = []
        if self.visual_prompts is not None:
            parts.append(self.visual_prompts[i].unsqueeze(0).expand(b, -1, -1))
        if prompt_fn is not None:
            t = prompt_fn(i, x[:, 0], x[:, 1:].reshape(b, gh, gw, -1))
            if t is not None:
                check_tensor("prompt_fn's tokens", t, ndim=(3,))
                if t.shape[0] != b or t.shape[2] != self.width:
                    raise ValueError(
                        f"prompt_fn must return (B={b}, m, {self.width}) tokens at layer {i}, got {tuple(t.shape)}"
                    )
                parts.append(t)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # -- text side ----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """(N, context_length) int64 token ids by open_clip's tokenizer."""
        return self.tokenizer(list(texts)).to(self.clip.token_embedding.weight.device)

    def token_embeddings(self, text: str) -> Tensor:
        """(n, text_width) token embeddings of ``text`` without the start/end tokens (a copy)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text must be a non-empty str, got {text!r}")
        ids = self.tokenize([text])[0]
        eot = int(ids.argmax())
        with torch.no_grad():
            return self.clip.token_embedding(ids[1:eot]).clone()

    def _text_prompt_count(self) -> int:
        if self.text_context is not None:
            return self.text_context.shape[0]
        if self.text_deep_prompts is not None:
            return self.text_deep_prompts.shape[1]
        return 0

    def encode_text(
        self, class_names: Sequence[str], templates: Union[str, Sequence[str], None] = None
    ) -> Tensor:
        """(C, D) L2-normalised class embeddings with prompt ensembling.

        Each class name is put in every template (see :func:`resolve_templates`), encoded and
        L2-normalised; the mean over templates is L2-normalised again (CLIP's zero-shot
        classifier). With CoOp context or deep text prompts, their ``n`` learnable tokens come
        right after the start token, before the template's words (``"a photo of a {}."`` becomes
        ``[SOT] p_1..p_n a photo of a cat . [EOT]``).

        Results are cached per (class names, templates, weights' versions) and returned without a
        graph; while gradients are enabled and a text prompt needs them, nothing is cached.
        """
        names = check_class_names("class_names", class_names)
        temps = resolve_templates(templates)
        params = self._text_parameters()
        need_graph = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = (names, temps, tuple((id(p), p._version, p.data_ptr()) for p in params))
        if not need_graph:
            hit = self._text_cache.get(key)
            if hit is not None:
                self._text_cache.move_to_end(key)
                return hit
        n = self._text_prompt_count()
        prefix = " ".join([_PLACEHOLDER] * n) + " " if n else ""
        texts = [prefix + t.format(c) for t in temps for c in names]
        tokens = self.tokenize(texts)
        inserts = {}
        if self.text_context is not None:
            inserts[0] = self.text_context
        elif self.text_deep_prompts is not None:
            inserts = dict(enumerate(self.text_deep_prompts))
        with torch.set_grad_enabled(need_graph):
            # In chunks: 80 templates x 171 classes at once would hold GBs of MLP activations.
            chunks = tokens.split(_TEXT_CHUNK)
            emb = torch.cat([self._encode_tokens(chunk, inserts, start=1) for chunk in chunks])
            emb = F.normalize(emb, dim=-1).view(len(temps), len(names), -1)
            emb = F.normalize(emb.mean(0), dim=-1)
        if not need_graph:
            self._text_cache[key] = emb
            while len(self._text_cache) > self._text_cache_size:
                self._text_cache.popitem(last=False)
        return emb

    def encode_words(self, words: Tensor, template: str = "a photo of a {}.") -> Tensor:
        """(K, D) L2-normalised embeddings of learnable words inside a template (PixelCLIP's class prompts).

        ``words`` (K, n, text_width): the token embeddings of K "classes" of n tokens each; they
        take the place of ``{}`` in ``template``, whose other words are tokenised as usual.
        Differentiable in ``words``; never cached.
        """
        check_tensor("words", words, ndim=(3,))
        if words.shape[2] != self.text_width or words.shape[0] == 0 or words.shape[1] == 0:
            raise ValueError(f"words must have shape (K>0, n>0, {self.text_width}), got {tuple(words.shape)}")
        (template,) = resolve_templates([template])
        k, n, _ = words.shape
        n_pre = self._text_prompt_count()
        prefix = " ".join([_PLACEHOLDER] * n_pre) + " " if n_pre else ""
        before = prefix + template.split("{}")[0]
        pos = 1 + (len(self.token_embeddings(before)) if before.strip() else 0)
        tokens = self.tokenize([prefix + template.format(" ".join([_PLACEHOLDER] * n))])
        placeholder = int(self.tokenize([_PLACEHOLDER])[0, 1])
        if not bool((tokens[0, pos : pos + n] == placeholder).all()):
            raise ValueError(f"template {template!r}: the words' place could not be found after tokenising")
        inserts: dict[int, Tensor] = {}
        if self.text_context is not None:
            inserts[0] = self.text_context
        elif self.text_deep_prompts is not None:
            inserts = dict(enumerate(self.text_deep_prompts))
        emb = self._encode_tokens(tokens.expand(k, -1), inserts, start=1, words=(words, pos))
        return F.normalize(emb, dim=-1)

    def _text_parameters(self) -> list[Tensor]:
        params = list(self.clip.transformer.parameters())
        params += [self.clip.token_embedding.weight, self.clip.positional_embedding, self.clip.ln_final.weight]
        params += [p for p in (self.clip.text_projection, self.text_context, self.text_deep_prompts) if p is not None]
        return [p for p in params if isinstance(p, Tensor)]

    def _encode_tokens(
        self,
        tokens: Tensor,
        inserts: dict,
        *,
        start: int,
        words: Optional[tuple[Tensor, int]] = None,
    ) -> Tensor:
        """Text transformer on ``tokens`` (N, T): (N, D) projected end-of-text features (not normalised).

        ``inserts[layer]`` (n, width) replaces positions ``start..start+n`` at that layer's input
        (layer 0: the token embeddings, before the positional embedding is added, as CoOp does);
        ``words`` = ((N or 1, n, width), position) replaces that span of token embeddings.
        """
        clip = self.clip
        eot = tokens.argmax(dim=-1) if clip.text_pool_type == "argmax" else None
        mask = clip.attn_mask
        if mask is not None and eot is not None:
            # Under the causal mask no token before the end-of-text token sees the ones after it,
            # so the sequences can end there: exact, and several times faster than 77 positions.
            tokens = tokens[:, : int(eot.max()) + 1]
        t = tokens.shape[1]
        x = clip.token_embedding(tokens).to(clip.transformer.get_cast_dtype())
        spans = [] if words is None else [(words[1], words[0])]
        if 0 in inserts:
            spans.append((start, inserts[0].unsqueeze(0)))
        for pos, w in spans:  # input tokens: replaced before the positional embedding is added
            w = w.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :pos], w, x[:, pos + w.shape[1] :]], dim=1)
        x = x + clip.positional_embedding[:t].to(x.dtype)
        attn_mask = mask[:t, :t].to(x.dtype) if mask is not None else None
        for i, blk in enumerate(clip.transformer.resblocks):
            p = inserts.get(i) if i else None
            if p is not None:
                p = p.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :start], p, x[:, start + p.shape[1] :]], dim=1)
            x = _block(blk, x, attn_mask)
        x = clip.ln_final(x)
        if eot is not None:
            pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        else:
            from open_clip.transformer import text_global_pool

            pooled = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        proj = clip.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


# -- the transformer block, run from open_clip's modules -------------------------------------------
def _block(blk: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
    """open_clip's ResidualAttentionBlock on (B, L, width), attention through SDPA."""
    attn = blk.attn
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    o = attn.out_proj(o.transpose(1, 2).reshape(b, n, c))
    x = x + blk.ls_1(o)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def _value_path(blk: nn.Module, x: Tensor) -> Tensor:
    """MaskCLIP's last-block value path for tokens ``x`` (B, N, width): no query-key attention."""
    attn = blk.attn
    c = x.shape[-1]
    bias = attn.in_proj_bias[2 * c :] if attn.in_proj_bias is not None else None
    v = F.linear(blk.ln_1(x), attn.in_proj_weight[2 * c :], bias)
    v = x + blk.ls_1(attn.out_proj(v))
    return v + blk.ls_2(blk.mlp(blk.ln_2(v)))


def _resize_pos(pos: Tensor, native: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    cls, patches = pos[:1], pos[1:]
    width = pos.shape[1]
    patches = patches.reshape(1, native[0], native[1], width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)], dim=0)


# -- the ConvNeXt tower, run from open_clip's TimmModel -------------------------------------------
def convnext_dense_features(visual: nn.Module, images: Tensor) -> Tensor:
    """(B, h, w, D) dense features of an open_clip timm ConvNeXt tower ``visual`` (not normalised).

    The last stage's map (``trunk.forward_features``, stride 32) through what open_clip applies
    after its average pool, at every pixel instead: the trunk's head norm (a LayerNorm over
    channels), then open_clip's projection head. This is PixelCLIP's ConvNeXt dense path (their
    ``encode_image(dense=True)``); the image embedding is the same applied to the pooled map.
    """
    check_images("images", images)
    return _convnext_project(visual, visual.trunk.forward_features(images.to(visual.trunk.stem[0].weight.dtype)))


def _convnext_project(visual: nn.Module, maps: Tensor) -> Tensor:
    """(B, C, h, w) last-stage maps -> (B, h, w, D): the trunk's head norm, then open_clip's head."""
    return visual.head(visual.trunk.head.norm(maps).permute(0, 2, 3, 1))


# -- building and loading -----------------------------------------------------------------------
def _model_config(name: Union[str, dict]) -> tuple[str, dict]:
    if isinstance(name, dict):
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in name]
        if missing:
            raise ValueError(f"name: an open_clip model config needs {', '.join(missing)}, got keys {sorted(name)}")
        return "custom-config", dict(name)
    if not isinstance(name, str):
        raise TypeError(f"name must be an open_clip model name (str) or config (dict), got {type(name).__name__}")
    config = _open_clip().get_model_config(name)
    if config is None:
        raise ValueError(f"name: unknown open_clip model {name!r} (open_clip.list_models() lists them)")
    return name, config


def _build_clip(model_name: str, config: dict, *, convnext: bool = False) -> nn.Module:
    open_clip = _open_clip()
    config = dict(config)
    for key in ("custom_text", "multimodal_cfg"):
        if config.get(key):
            raise ValueError(f"{model_name}: open_clip configs with {key!r} are not supported (plain CLIP only)")
    vision = config["vision_cfg"]
    timm_name = vision.get("timm_model_name")
    # Refused before building: a ResNet or another timm tower would be built (seconds) only to be rejected.
    if timm_name and convnext and "convnext" in str(timm_name).lower():
        if vision.get("timm_model_pretrained"):
            raise ValueError(
                f"{model_name}: timm_model_pretrained would download timm's ImageNet weights; nothing is "
                "downloaded: leave it False and pass pretrained=<CLIP checkpoint file>"
            )
    elif isinstance(vision.get("layers"), (list, tuple)) or timm_name:
        towers = "ViT and timm ConvNeXt" if convnext else "ViT"
        raise ValueError(f"{model_name}: only {towers} image towers are supported (open_clip's own ViT)")
    return open_clip.CLIP(**config)


def _check_supported(model_name: str, clip: nn.Module) -> str:
    """The image tower's kind, ``"vit"`` or ``"convnext"``; anything else is a ``ValueError``."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = clip.visual
    text_blocks = clip.transformer.resblocks
    if _is_convnext_tower(visual):
        _check_blocks(model_name, "text", text_blocks, ResidualAttentionBlock)
        return "convnext"
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"{model_name}: only ViT image towers are supported, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool or visual.proj is None:
        raise ValueError(f"{model_name}: only [CLS]-pooled ViTs with a projection (CLIP's own) are supported")
    if not isinstance(visual.patch_dropout, nn.Identity):
        # Dense features need every patch of the grid; CLIP's own configs have no patch dropout.
        raise ValueError(f"{model_name}: configs with patch_dropout > 0 are not supported (tokens must keep the grid)")
    for tower, blocks in (("vision", visual.transformer.resblocks), ("text", text_blocks)):
        _check_blocks(model_name, tower, blocks, ResidualAttentionBlock)
    return "vit"


def _check_blocks(model_name: str, tower: str, blocks, block_type: type) -> None:
    for blk in blocks:
        if type(blk) is not block_type or hasattr(blk, "ln_1_kv"):
            raise ValueError(f"{model_name}: the {tower} tower must use open_clip's default blocks")


def _is_convnext_tower(visual: nn.Module) -> bool:
    """An open_clip TimmModel on a timm ConvNeXt whose head is what :func:`convnext_dense_features`
    runs per pixel: timm's norm-then-pool head (average pool, no hidden layer), open_clip's linear
    or MLP projection without attention pooling. A ConvNeXt with another head is a ``ValueError``."""
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        return False
    from timm.layers import NormMlpClassifierHead
    from timm.models.convnext import ConvNeXt

    if not isinstance(trunk, ConvNeXt):
        return False
    head = trunk.head
    if (
        not isinstance(head, NormMlpClassifierHead)
        or not isinstance(head.pre_logits, nn.Identity)
        or getattr(head.global_pool, "pool_type", "avg") != "avg"
        or "pool" in visual.head._modules
    ):
        raise ValueError(
            "ConvNeXt image towers are supported with timm's default head (norm after an average pool, no "
            "hidden layer) and open_clip's linear or MLP projection (timm_pool '' or 'avg')"
        )
    return True


def _tokenizer(open_clip, name: Union[str, dict], config: dict):
    if isinstance(name, str):
        return _named_tokenizer(name)
    if config["text_cfg"].get("hf_tokenizer_name"):
        raise ValueError("name: configs with a Hugging Face tokenizer are not supported (it would be downloaded)")
    return _simple_tokenizer(config["text_cfg"].get("context_length", 77))


# Building open_clip's tokenizer reads its 49k-merge BPE table (~0.5 s); tokenizers are stateless
# apart from their caches, so backbones share one per model name / context length.
@functools.cache
def _named_tokenizer(name: str):
    return _open_clip().get_tokenizer(name)


@functools.cache
def _simple_tokenizer(context_length: int):
    return _open_clip().tokenizer.SimpleTokenizer(context_length=context_length)


def _warn_random_weights(model_name: str) -> None:
    global _warned_random
    if _warned_random:
        return
    _warned_random = True
    warnings.warn(
        f"CLIPBackbone({model_name!r}, pretrained=None) has RANDOM weights: embeddings and segmentation output "
        "are meaningless. Pass pretrained=<checkpoint file> (or a file name under $OVSEG_WEIGHTS_DIR).",
        UserWarning,
        stacklevel=3,
    )


def resolve_checkpoint(pretrained: Union[str, os.PathLike], model_name: str = "") -> Path:
    """The checkpoint file ``pretrained`` names: an existing path, or a file under ``$OVSEG_WEIGHTS_DIR``.

    Under the directory, ``pretrained`` is tried as is, with each suffix (.pt, .pth, .bin,
    .safetensors), and the same inside a sub-directory named after the model. A miss is a
    ``FileNotFoundError`` listing every path tried.
    """
    if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained):
        raise TypeError(f"pretrained must be a path or a name (str), got {pretrained!r}")
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    tried = [str(path)]
    root = os.environ.get(WEIGHTS_DIR_ENV)
    if root and not path.is_absolute():
        bases = [Path(root)] + ([Path(root) / model_name] if model_name else [])
        for base in bases:
            for cand in [base / path] + [base / (str(path) + s) for s in CHECKPOINT_SUFFIXES]:
                if cand.is_file():
                    return cand
                tried.append(str(cand))
    where = f"${WEIGHTS_DIR_ENV}={root}" if root else f"${WEIGHTS_DIR_ENV} is not set"
    raise FileNotFoundError(
        f"pretrained: no checkpoint file {str(pretrained)!r} ({where}); tried: {', '.join(tried)}. "
        "Weights are never downloaded: put the open_clip checkpoint file there."
    )


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The state dict in a checkpoint file: safetensors, a torch state dict (optionally under
    ``"state_dict"``/``"model"``, with DDP's ``module.`` prefix) or an OpenAI TorchScript archive."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    elif zipfile.is_zipfile(path) and _is_torchscript(path):
        with warnings.catch_warnings():  # torch deprecates TorchScript, but OpenAI's files are scripted
            warnings.simplefilter("ignore", FutureWarning)
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        sd = {k: v for k, v in sd.items() if k not in _OPENAI_EXTRA_KEYS}
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"pretrained: cannot read {path} as a checkpoint: {exc}") from exc
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"pretrained: {path} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def load_checkpoint(clip: nn.Module, path: Path, model_name: str) -> None:
    """Loads ``path`` into ``clip`` strictly; a checkpoint of another architecture is a ``ValueError``
    naming the path and the missing, unexpected and differently shaped entries."""
    sd = read_state_dict(path)
    own = clip.state_dict()
    # Buffers the model rebuilds itself (the text causal mask) may be in a checkpoint: a scripted
    # (TorchScript) model saves them.
    transient = set(dict(clip.named_buffers())) - set(own)
    sd = {k: v for k, v in sd.items() if k not in transient}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def head(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")

        parts = []
        if shapes:
            parts.append(f"shapes differ: {head(shapes)}")
        if missing:
            parts.append(f"missing from the checkpoint: {head(missing)}")
        if unexpected:
            parts.append(f"not in the model: {head(unexpected)}")
        raise ValueError(f"pretrained: {path} is not a checkpoint of {model_name}; " + "; ".join(parts))
    clip.load_state_dict(sd, strict=True)


# -- the bare registered model: training-free MaskCLIP ---------------------------------------------
@dataclasses.dataclass
class CLIPSegmentorConfig:
    """Config of ``clip``: training-free MaskCLIP segmentation with a frozen CLIP.

    ``clip``: open_clip model name or config dict; ``image_size``: working input size;
    ``templates``: prompt templates for the class names (see :func:`resolve_templates`);
    ``frozen``: freeze CLIP (MaskCLIP's setting); False trains every weight (e.g. a tiny CLIP from
    scratch on the synthetic shapes data, configs/shapes_clip.toml).
    """

    clip: Union[str, dict] = "ViT-B-16"
    image_size: int = 512
    templates: Union[str, tuple[str, ...]] = "imagenet"
    frozen: bool = True


@register_model("clip")
class CLIPSegmentor(Segmentor):
    """MaskCLIP: logits = CLIP's logit scale x cosine(dense features, class embeddings).

    ``forward(images, text)`` returns (B, C, H / patch, W / patch) logits.
    """

    config_class = CLIPSegmentorConfig

    def __init__(self, config: CLIPSegmentorConfig, *, pretrained: Optional[str] = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = CLIPBackbone(config.clip, pretrained, image_size=config.image_size, frozen=config.frozen)
        self.patch_size = self.output_stride = self.backbone.patch_size

    def encode_classes(self, class_names: Sequence[str]) -> TextEmbeddings:
        emb = self.backbone.encode_text(class_names, self.config.templates)
        return TextEmbeddings(emb, tuple(class_names))

    def segment(self, images: Tensor, text: TextEmbeddings) -> Tensor:
        if text.embeddings.shape[1] != self.backbone.embed_dim:
            raise ValueError(
                f"text embeddings have dimension {text.embeddings.shape[1]}, the model's is {self.backbone.embed_dim}"
            )
        dense = F.normalize(self.backbone.dense_features(images), dim=-1)
        emb = F.normalize(text.embeddings.to(dense.dtype), dim=-1)
        return self.backbone.logit_scale.to(dense.dtype) * torch.einsum("bhwd,cd->bchw", dense, emb)
