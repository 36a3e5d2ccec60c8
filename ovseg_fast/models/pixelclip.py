"""PixelCLIP (Shin et al., NeurIPS 2024): CLIP taught pixel-level recognition from unlabeled masks.

The training step, as in the paper's figure and the authors' code (cvlab-kaist/PixelCLIP), with
images ``x`` (B, 3, H, W) and for each image a set of class-agnostic masks (SA-1B or DINO masks,
padded to (B, M, ...) with a validity mask):

1. **Teacher** (a momentum copy of the student's image encoder, no gradient) -> dense features
   ``F_t`` (B, h, w, D), upsampled bilinearly to the mask resolution S x S.
2. **Learnable class prompts**: k concepts, each the template "a photo of a {} in the scene" with
   ``n = 4`` learnable word embeddings in place of ``{}``, through CLIP's frozen text encoder ->
   ``T`` (k, D), L2-normalised.
3. **Mask pooling**: every mask m -> ``f_m = sum_p m(p) F_t(p) / |m|`` and its logits
   ``l_m = s cos(f_m, T)`` (s = 100 for the ViT).
4. **Online clustering**: ONE Sinkhorn problem over all masks of the global batch (every process's
   masks through ``process_group``, SwAV's balance): ``Q = sinkhorn(log_softmax(l), epsilon=1,
   n_iters=3)``, then a hard assignment ``c_m = argmax_j Q_mj``.
5. **Targets**: for image b and concept j, ``Y_bj = union of the masks m of b with c_m = j``.
6. **Student** (CLIP's image encoder; for the ViT only attention layers and the positional
   embedding train, the ConvNeXt trains whole) -> dense features ``F_s``; ``cos(F_s, T)`` per
   concept, upsampled by a light convolutional decoder to S x S -> ``P`` (B, k, S, S); loss =
   BCE(P, Y) over the pixels that some mask covers.
7. After the optimiser step the teacher follows: ``theta_t <- gamma theta_t + (1 - gamma) theta_s``
   (:meth:`PixelCLIP.update_teacher`, gamma = 0.999).

Inference drops teacher, prompts and decoder: the student's dense features against the user's class
names with prompt ensembling (the authors' evaluation: 8 templates, features upsampled to 64 x 64).

Dense features are the authors' form of the last ViT block (``forward_dense`` in their
``third_party/model.py``): for every patch token x_p of the last block's input, with x_cls its
[CLS] token, ``v_p = x_cls + out_proj(W_v ln_1(x_p) + b_v)``, ``v_p <- v_p + mlp(ln_2(v_p))``, then
``ln_post`` and ``proj``. (MaskCLIP's form, :meth:`CLIPBackbone.dense_features`, adds x_p instead.)

``pixelclip_convnext_b`` is the authors' ConvNeXt-B config (``pixelclip_convnext_base.yaml``):
open_clip's ``convnext_base_w_320`` CLIP (LAION-aesthetic weights, 640-d joint space) at 640 x 640,
the whole image tower trained, clustering logits 1 x cosine. Its dense features are the last stage's
map (stride 32) through the trunk's head norm and open_clip's projection at every pixel
(:func:`~ovseg_fast.models.clip.convnext_dense_features`, their ``encode_image(dense=True)``).

The authors' detectron2 checkpoints load with ``create_model("pixelclip", pretrained=path)`` (ViT-B/16)
or ``create_model("pixelclip_convnext_b", pretrained=path)`` (see :func:`convert_pixelclip_state_dict`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg_fast.compat.swav import pixelclip_sinkhorn
from ovseg_fast.data.masks import random_box_masks
from ovseg_fast.models import clip as clip_module
from ovseg_fast.models.base import Segmentor, TextEmbeddings, TrainingStep, check_class_names, check_images
from ovseg_fast.models.clip import CLIPBackbone, _block, _resize_pos, read_state_dict, resolve_checkpoint
from ovseg_fast.models.registry import register_model
from ovseg_fast.ops._checks import check_float, check_int, check_tensor

__all__ = [
    "EVAL_TEMPLATES",
    "ClusterResult",
    "MaskDecoder",
    "PixelCLIP",
    "PixelCLIPConfig",
    "PixelCLIPConvNeXtB",
    "PixelCLIPConvNeXtBConfig",
    "check_pixelclip_state_dict",
    "cluster_masks",
    "convert_pixelclip_state_dict",
    "interpolation_matrix",
    "pixelclip_config_overrides",
    "pixelclip_model_name",
    "read_pixelclip_checkpoint",
]

log = logging.getLogger(__name__)

#: The authors' evaluation templates (``MODEL.PROMPT_ENSEMBLE_TYPE imagenet_select`` in their eval.sh):
#: seven of CLIP's ImageNet templates and their training template.
EVAL_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "A photo of a {} in the scene",
)


@dataclasses.dataclass
class PixelCLIPConfig:
    """Config of ``pixelclip``; defaults are the authors' ViT-B/16 config (``pixelclip_vit_base.yaml``).

    - ``clip``: open_clip model name or config dict: a ViT ("ViT-B-16-quickgelu" is OpenAI's ViT-B/16)
      or a timm ConvNeXt ("convnext_base_w_320", see ``pixelclip_convnext_b``).
    - ``image_size``: side the images are resized to, in training and inference (``CLIP_RESOLUTION``).
    - ``mask_size``: side of masks, targets and predictions in training (``MASK_RESOLUTION``).
    - ``min_mask_area``: masks with fewer pixels at ``mask_size`` are dropped (the authors keep > 1).
    - ``num_concepts`` (k), ``prompt_length`` (n), ``prompt_template``: the learnable class prompts.
    - ``finetune``: which weights of the student's image tower train (the authors' ``CLIP_FINETUNE``):
      "attention" (the ViT's attention layers and positional embedding) or "full" (every weight of
      the tower; the ConvNeXt's setting).
    - ``momentum``: gamma of the teacher's EMA.
    - ``clustering_scale``: s in ``s cos`` before the clustering softmax (``MODEL.EPS``; 100 for ViT).
    - ``sinkhorn_iters``: Sinkhorn iterations of the clustering.
    - ``decoder_channels``: channels of the training decoder's three stages.
    - ``templates``: inference prompt templates (see :func:`~ovseg_fast.models.clip.resolve_templates`);
      class names with ", " are synonyms averaged per template, as the authors do.
    - ``feature_size``: inference upsamples the dense features to this side before the cosine (the
      authors' 64); None keeps the patch grid.
    - ``seed``: seed of the prompt initialisation (embeddings of random vocabulary tokens).
    """

    clip: Union[str, dict] = "ViT-B-16-quickgelu"
    image_size: int = 320
    mask_size: int = 256
    min_mask_area: int = 2
    num_concepts: int = 64
    prompt_length: int = 4
    prompt_template: str = "a photo of a {} in the scene"
    momentum: float = 0.999
    finetune: str = "attention"
    clustering_scale: float = 100.0
    sinkhorn_iters: int = 3
    decoder_channels: tuple[int, int, int] = (64, 64, 32)
    templates: Union[str, tuple[str, ...]] = EVAL_TEMPLATES
    feature_size: Optional[int] = 64
    seed: int = 0


@dataclasses.dataclass
class PixelCLIPConvNeXtBConfig(PixelCLIPConfig):
    """Config of ``pixelclip_convnext_b``: the authors' ConvNeXt-B config (``pixelclip_convnext_base.yaml``:
    ``CLIP_PRETRAINED convnext_base``, i.e. open_clip's ``convnext_base_w_320``, ``CLIP_RESOLUTION``
    640, ``CLIP_FINETUNE full``, ``EPS`` 1); the rest as ``pixelclip``."""

    clip: Union[str, dict] = "convnext_base_w_320"
    image_size: int = 640
    finetune: str = "full"
    clustering_scale: float = 1.0


@dataclasses.dataclass
class ClusterResult:
    """What :meth:`PixelCLIP.cluster` returns (no gradients).

    - ``logits``: (B, M, k) ``s cos(f_m, T)`` of every mask slot (0 for dropped ones);
    - ``keep``: (B, M) bool, the masks that took part (valid and at least ``min_mask_area`` pixels);
    - ``assignment``: (B, M) int64, the concept of each kept mask, -1 elsewhere;
    - ``plan``: (N, k) the Sinkhorn plan of the N kept masks, in ``keep``'s row-major order;
    - ``targets``: (B, k, S, S) bool, the union of each concept's masks per image;
    - ``masks``: (B, M, S, S) bool, the masks at the mask resolution.
    """

    logits: Tensor
    keep: Tensor
    assignment: Tensor
    plan: Tensor
    targets: Tensor
    masks: Tensor


def interpolation_matrix(n_in: int, n_out: int, *, dtype=torch.float32, device=None) -> Tensor:
    """(n_out, n_in) matrix W with ``W @ x`` = 1-D linear interpolation of x (align_corners=False).

    Bilinear resizing is separable, so ``F.interpolate(X, (S, S), mode="bilinear")`` equals
    ``W_h X W_w^T``; mask pooling of upsampled features can then run on the small grid:
    ``sum_p m(p) up(F)(p) = sum_q (W_h^T m W_w)(q) F(q)``.
    """
    eye = torch.eye(n_in, dtype=dtype, device=device).unsqueeze(1)  # (n_in, 1, n_in): basis signals
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].T.contiguous()


class MaskDecoder(nn.Module):
    """The training-only decoder: a (N, 1, h, w) cost map -> (N, 1, 4h, 4w) mask logits.

    conv3x3 -> [ConvTranspose 2x2 up, (conv3x3, GroupNorm, ReLU) x 2] x 2 -> conv3x3, channels
    ``channels`` (the authors' ``ConvHead``; GroupNorm with 16 channels per group).
    """

    def __init__(self, channels: Sequence[int] = (64, 64, 32)) -> None:
        super().__init__()
        c0, c1, c2 = (check_int(f"decoder_channels[{i}]", c, minimum=16) for i, c in enumerate(channels))
        for i, c in enumerate((c1, c2)):
            if c % 16:
                raise ValueError(f"decoder_channels[{i + 1}] must be a multiple of 16 (GroupNorm groups), got {c}")
        self.stem = nn.Conv2d(1, c0, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(c0, c1, 2, stride=2)
        self.block1 = _double_conv(c1)
        self.up2 = nn.ConvTranspose2d(c1, c2, 2, stride=2)
        self.block2 = _double_conv(c2)
        self.out = nn.Conv2d(c2, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block1(self.up1(self.stem(x)))
        return self.out(self.block2(self.up2(x)))


def _double_conv(c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.GroupNorm(c // 16, c),
        nn.ReLU(inplace=True),
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.GroupNorm(c // 16, c),
        nn.ReLU(inplace=True),
    )


def _process_group(process_group):
    """The given group, else the world when ``torch.distributed`` is initialised, else None."""
    if process_group is not None:
        return process_group
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


@register_model("pixelclip")
class PixelCLIP(Segmentor):
    """PixelCLIP on open_clip's ViT (or ConvNeXt, ``pixelclip_convnext_b``); see the module docstring.

    Training: ``losses = model.training_step(images, masks, valid)``, ``losses["loss_masks"].backward()``,
    ``optimizer.step()``, then ``model.update_teacher()``. Inference: ``forward`` / ``predict``.

    ``pretrained``: an open_clip CLIP checkpoint (to start training from CLIP), an authors' PixelCLIP
    checkpoint (``.pth`` of their detectron2 code), or a file written by ``ovseg-fast convert
    pixelclip`` / ``torch.save(model.state_dict())``; the kind is told by its keys.
    """

    config_class = PixelCLIPConfig
    trains_from_labels = False  # unlabeled masks, through training_step

    def __init__(self, config: PixelCLIPConfig, *, pretrained: Optional[Union[str, os.PathLike]] = None) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        state, clip_checkpoint = None, None
        if pretrained is not None:
            path = resolve_checkpoint(pretrained, "pixelclip")
            sd = read_state_dict(path)
            if _is_clip_state_dict(sd):
                clip_checkpoint = path
            else:
                _check_checkpoint_tower(sd, config.clip, path)
                state = (path, sd)
        with _quiet_random_weights(state is not None):
            self.backbone = CLIPBackbone(
                config.clip, clip_checkpoint, image_size=config.image_size, frozen=True, convnext=True
            )
        self.patch_size = self.backbone.patch_size
        self.output_stride = self.patch_size

        # Student: the ViT's attention layers and positional embedding train, or the whole tower.
        if config.finetune == "attention" and self.backbone.vision_tower != "vit":
            raise ValueError(
                f"finetune='attention' trains a ViT's attention layers; {self.backbone.model_name} has a "
                f"{self.backbone.vision_tower} image tower: use finetune='full' (pixelclip_convnext_b does)"
            )
        for name, p in self.backbone.clip.visual.named_parameters():
            if config.finetune == "full" or ".attn." in name or name == "positional_embedding":
                p.requires_grad_(True)
        self.teacher = copy.deepcopy(self.backbone.clip.visual).requires_grad_(False)

        gen = torch.Generator().manual_seed(config.seed)
        vocab = self.backbone.clip.token_embedding.weight.shape[0]
        # The authors' initialisation: embeddings of random vocabulary tokens (none of the last 10,
        # where the special tokens are).
        words = torch.randint(vocab - 10, (config.num_concepts, config.prompt_length), generator=gen)
        with torch.no_grad():
            init = self.backbone.clip.token_embedding(words.to(self.backbone.clip.token_embedding.weight.device))
        self.prompt_words = nn.Parameter(init.clone())
        self.decoder = MaskDecoder(config.decoder_channels)

        if state is not None:
            self.load_pixelclip_state_dict(state[1], source=str(state[0]))

    # -- parameters ------------------------------------------------------------------------------
    def load_pixelclip_state_dict(self, state_dict: dict[str, Tensor], *, source: str = "state_dict") -> None:
        """Loads ours or the authors' keys strictly (authors' keys are mapped by
        :func:`convert_pixelclip_state_dict`); a mismatch is a ``ValueError`` listing it."""
        if any(k.startswith(_THEIR_PREFIXES) for k in state_dict):
            state_dict = convert_pixelclip_state_dict(state_dict)
        _load_strict(self, state_dict, source)

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA step of the teacher: ``theta_t <- gamma theta_t + (1 - gamma) theta_s`` for every
        trainable student weight of the image tower (the frozen ones are equal in both), as one
        ``torch._foreach`` call per operation.

        The teacher is a submodule: ``model.train()`` puts it in training mode too, so a tower with
        stochastic depth (``convnext_base_w``'s drop path 0.1) drops paths in the teacher as well,
        as in the authors' code (their teacher is a deep copy run in the training loop's mode)."""
        gamma = self.config.momentum
        teacher = dict(self.teacher.named_parameters())
        pairs = [(teacher[n], p) for n, p in self.backbone.clip.visual.named_parameters() if p.requires_grad]
        t = [tp for tp, _ in pairs]
        s = [sp for _, sp in pairs]
        torch._foreach_mul_(t, gamma)
        torch._foreach_add_(t, s, alpha=1.0 - gamma)

    # -- the figure, step by step --------------------------------------------------------------------
    def dense_features(self, images: Tensor, *, teacher: bool = False) -> Tensor:
        """(B, h, w, D) dense features (not normalised) of the student, or of the teacher without
        gradient; ``images`` (B, 3, H, W) at any size that is a multiple of the patch size."""
        check_images("images", images, multiple_of=self.patch_size)
        if teacher:
            with torch.no_grad():
                return _dense(self.teacher, images, None)
        return _dense(self.backbone.clip.visual, images, self.backbone.positional_embedding)

    def concept_embeddings(self) -> Tensor:
        """(k, D) L2-normalised embeddings of the learnable class prompts (differentiable)."""
        return self.backbone.encode_words(self.prompt_words, self.config.prompt_template)

    @torch.no_grad()
    def cluster(
        self,
        teacher_features: Tensor,
        masks: Tensor,
        valid: Optional[Tensor],
        concepts: Tensor,
        *,
        process_group=None,
    ) -> ClusterResult:
        """Steps 3-5: mask pooling, one Sinkhorn problem over all masks, hard assignment, targets.

        Args:
            teacher_features: (B, h, w, D) teacher dense features.
            masks: (B, M, Hm, Wm) bool (or 0/1 float) masks at any resolution; resized (nearest) to
                ``mask_size``.
            valid: (B, M) bool, the real masks (None: all).
            concepts: (k, D) concept embeddings.
            process_group: the ``torch.distributed`` group whose ranks' masks form one problem
                (default: the world when initialised).
        """
        cfg = self.config
        masks, valid = self._check_masks(masks, valid, teacher_features.shape[0])
        return cluster_masks(
            teacher_features,
            masks,
            valid,
            concepts,
            mask_size=cfg.mask_size,
            min_mask_area=cfg.min_mask_area,
            scale=cfg.clustering_scale,
            n_iters=cfg.sinkhorn_iters,
            process_group=process_group,
        )

    def mask_logits(self, student_features: Tensor, concepts: Tensor) -> Tensor:
        """Step 6: (B, k, S, S) mask logits from the student's (B, h, w, D) features: the cosine
        map of every concept through the decoder, resized bilinearly to ``mask_size``."""
        b, h, w, _ = student_features.shape
        k = concepts.shape[0]
        cost = torch.einsum("kd,bhwd->bkhw", concepts.to(student_features.dtype), F.normalize(student_features, dim=-1))
        out = self.decoder(cost.reshape(b * k, 1, h, w))
        size = self.config.mask_size
        out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)
        return out.view(b, k, size, size)

    def training_step(
        self,
        images: Tensor,
        masks: Tensor,
        valid: Optional[Tensor] = None,
        *,
        student_images: Optional[Tensor] = None,
        process_group=None,
    ) -> dict[str, Tensor]:
        """One PixelCLIP training step (steps 1-6); returns ``{"loss_masks": loss}``.

        Args:
            images: (B, 3, H, W) CLIP-normalised images; resized bilinearly to ``image_size``.
            masks: (B, M, Hm, Wm) bool masks per image, padded (see
                :func:`ovseg_fast.data.masks.pad_masks`); pass them at ``mask_size`` to save memory.
            valid: (B, M) bool validity of the mask slots (None: all valid).
            student_images: the student's view (the authors' strongly augmented copy), same shape
                as ``images``; default ``images``.
            process_group: ranks whose masks are clustered together (default: the world when
                ``torch.distributed`` is initialised).

        The loss is the BCE averaged over the k concepts and the pixels covered by some mask, over
        the global batch: with a process group each rank's loss is its sum over the global count
        times the world size, so that averaging gradients over the ranks (DDP) gives the gradient
        of the mean over all processes' images (one process holding them all gets the same). 0
        when no pixel is covered. The teacher is not updated here: call :meth:`update_teacher`
        after the optimiser step.
        """
        check_images("images", images)
        if student_images is None:
            student_images = images
        else:
            check_images("student_images", student_images)
            if student_images.shape != images.shape:
                raise ValueError(
                    f"student_images must have the shape of images {tuple(images.shape)}, got "
                    f"{tuple(student_images.shape)}"
                )
        teacher_in, student_in = (self._resize_input(x) for x in (images, student_images))
        teacher_features = self.dense_features(teacher_in, teacher=True)
        concepts = self.concept_embeddings()
        clusters = self.cluster(teacher_features, masks, valid, concepts.detach(), process_group=process_group)
        predictions = self.mask_logits(self.dense_features(student_in), concepts)

        covered = clusters.targets.any(1)  # (B, S, S)
        targets = clusters.targets.float()
        bce = F.binary_cross_entropy_with_logits(predictions.float(), targets, reduction="none")
        total = (bce * covered.unsqueeze(1)).sum()
        count = covered.sum().to(torch.float64) * predictions.shape[1]
        group = _process_group(process_group)
        world = 1
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(count, group=group)
            world = dist.get_world_size(group)
        loss = total * (world / count.clamp(min=1).item())
        return {"loss_masks": loss}

    def example_training_step(
        self,
        images: Tensor,
        class_names: Sequence[str],
        *,
        generator: Optional[torch.Generator] = None,
        max_masks: int = 32,
    ) -> TrainingStep:
        """One :meth:`training_step` on ``images`` with random rectangles as masks (up to
        ``max_masks`` per image, at ``mask_size``), then :meth:`update_teacher` after the optimiser
        step. PixelCLIP learns no class names: ``class_names`` is not used."""
        check_images("images", images)
        masks, valid = random_box_masks(images.shape[0], max_masks, self.config.mask_size, generator=generator)
        masks, valid = masks.to(images.device), valid.to(images.device)
        return TrainingStep(lambda: self.training_step(images, masks, valid), self.update_teacher)

    # -- inference ----------------------------------------------------------------------------------
    def encode_classes(self, class_names: Sequence[str]) -> TextEmbeddings:
        """(C, D) class embeddings with the config's templates; a name with ", " lists synonyms,
        averaged per template before the templates are averaged (the authors' ``class_embeddings``)."""
        names = check_class_names("class_names", class_names)
        splits = [n.split(", ") if ", " in n else [n] for n in names]
        flat = [s for group in splits for s in group]
        owner = torch.tensor([i for i, group in enumerate(splits) for _ in group])
        per_template = []
        for template in clip_module.resolve_templates(self.config.templates):
            emb = self.backbone.encode_text(flat, [template])  # (S, D), normalised
            summed = emb.new_zeros((len(names), emb.shape[1])).index_add_(0, owner.to(emb.device), emb)
            per_template.append(F.normalize(summed, dim=-1))
        emb = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        return TextEmbeddings(emb, names)

    def segment(self, images: Tensor, text: TextEmbeddings) -> Tensor:
        """(B, C, f, f) logits: CLIP's logit scale x cosine of the student's dense features, taken at
        ``image_size`` and upsampled to ``feature_size`` f, with the class embeddings (the
        authors' evaluation path up to the scale, which does not change the argmax)."""
        if text.embeddings.shape[1] != self.backbone.embed_dim:
            raise ValueError(
                f"text embeddings have dimension {text.embeddings.shape[1]}, the model's is {self.backbone.embed_dim}"
            )
        feats = self.dense_features(self._resize_input(images)).permute(0, 3, 1, 2)
        if self.config.feature_size is not None:
            f = self.config.feature_size
            feats = F.interpolate(feats, size=(f, f), mode="bilinear", align_corners=False)
        feats = F.normalize(feats, dim=1)
        emb = F.normalize(text.embeddings.to(feats.dtype), dim=-1)
        return self.backbone.logit_scale.to(feats.dtype) * torch.einsum("bdhw,cd->bchw", feats, emb)

    # -- helpers ------------------------------------------------------------------------------------
    def _resize_input(self, images: Tensor) -> Tensor:
        s = self.config.image_size
        if tuple(images.shape[-2:]) == (s, s):
            return images
        return F.interpolate(images, size=(s, s), mode="bilinear", align_corners=False)

    @staticmethod
    def _check_masks(masks: Tensor, valid: Optional[Tensor], batch: int) -> tuple[Tensor, Tensor]:
        check_tensor("masks", masks, ndim=(4,), dtypes=None)
        if masks.dtype != torch.bool and not masks.dtype.is_floating_point:
            raise TypeError(f"masks must be bool (or 0/1 float), got {masks.dtype}")
        if masks.shape[0] != batch:
            raise ValueError(f"masks has batch {masks.shape[0]}, the images {batch}")
        if valid is None:
            valid = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
        check_tensor("valid", valid, ndim=(2,), dtypes=(torch.bool,))
        if tuple(valid.shape) != tuple(masks.shape[:2]):
            raise ValueError(f"valid must have shape (B, M) = {tuple(masks.shape[:2])}, got {tuple(valid.shape)}")
        if masks.device != valid.device:
            raise ValueError(f"valid is on {valid.device} but masks is on {masks.device}")
        return masks, valid


@torch.no_grad()
def cluster_masks(
    teacher_features: Tensor,
    masks: Tensor,
    valid: Tensor,
    concepts: Tensor,
    *,
    mask_size: int = 256,
    min_mask_area: int = 2,
    scale: float = 100.0,
    n_iters: int = 3,
    process_group=None,
) -> ClusterResult:
    """PixelCLIP's online clustering (steps 3-5 of the module docstring) on checked inputs.

    ``teacher_features`` (B, h, w, D); ``masks`` (B, M, Hm, Wm) bool or 0/1 float; ``valid`` (B, M)
    bool; ``concepts`` (k, D). Masks are resized (nearest) to ``mask_size``; the features are pooled
    as if upsampled bilinearly to ``mask_size`` (the authors' order), computed on the h x w grid.
    """
    b, h, w, d = teacher_features.shape
    n_slots = masks.shape[1]
    size = mask_size
    if tuple(masks.shape[-2:]) != (size, size):
        masks = F.interpolate(masks.to(torch.uint8), size=(size, size), mode="nearest").bool()
    else:
        masks = masks.bool()
    masks = masks.contiguous()
    device = masks.device

    # Pooling: sum_p m(p) up(F)(p) = sum_q (W_h^T m W_w)(q) F(q), so each mask is reduced to its
    # h x w weights and the features are never upsampled. The masks are the big tensor (48 x 128 x
    # 256 x 256 at the paper's batch): each valid one is read once, through a small reused float
    # buffer. Bilinear weights sum to 1 per output pixel, so the weights also sum to the area.
    feats = teacher_features.float()
    wy = interpolation_matrix(h, size, device=feats.device)  # (S, h)
    wx = interpolation_matrix(w, size, device=feats.device)  # (S, w)
    flat = masks.view(b * n_slots, size, size)
    weights = feats.new_zeros((b * n_slots, h, w))
    chunk = max(1, (1 << 21) // (size * size))  # ~8 MB of float masks
    buffer = feats.new_empty((chunk, size, size))
    for start, stop in _runs(valid.flatten(), chunk):
        m = buffer[: stop - start]
        m.copy_(flat[start:stop])
        weights[start:stop] = wy.T @ (m @ wx)
    area = weights.sum((-2, -1)).round_().view(b, n_slots)
    keep = valid & (area >= min_mask_area)
    pooled = torch.bmm(weights.view(b, n_slots, h * w), feats.view(b, h * w, d))
    pooled = pooled / area.clamp(min=1).unsqueeze(-1)
    logits = scale * (F.normalize(pooled, dim=-1) @ F.normalize(concepts.float(), dim=-1).T)
    logits = logits * keep.unsqueeze(-1)

    plan = pixelclip_sinkhorn(logits[keep], n_iters, process_group=_process_group(process_group))
    assignment = torch.full((b, n_slots), -1, dtype=torch.long, device=device)
    assignment[keep] = plan.argmax(-1)

    # Targets: the union (bitwise OR) of each concept's masks, on the bool bytes read 8 at a time.
    k = concepts.shape[0]
    targets = torch.zeros((b * k, size * size), dtype=torch.bool, device=device)
    aligned = (size * size) % 8 == 0 and masks.storage_offset() % 8 == 0
    word = torch.int64 if aligned else torch.uint8
    out_words, mask_words = targets.view(word), flat.view(b * n_slots, size * size).view(word)
    rows = (torch.arange(b, device=device).unsqueeze(1) * k + assignment)[keep].tolist()
    for row, slot in zip(rows, keep.flatten().nonzero().flatten().tolist()):
        out_words[row].bitwise_or_(mask_words[slot])
    return ClusterResult(logits, keep, assignment, plan, targets.view(b, k, size, size), masks)


def _runs(flags: Tensor, longest: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of the True entries of a 1-D bool tensor, each at most ``longest`` long
    (padding sits at the end of each image's slots, so the valid masks are read as plain slices)."""
    padded = torch.cat([flags.new_zeros(1), flags, flags.new_zeros(1)]).to(torch.int8)
    edges = torch.diff(padded).nonzero().flatten().tolist()
    out = []
    for start, stop in zip(edges[::2], edges[1::2]):
        out.extend((i, min(i + longest, stop)) for i in range(start, stop, longest))
    return out


def _dense(visual: nn.Module, images: Tensor, positional) -> Tensor:
    """The authors' dense features of an open_clip ``VisionTransformer`` (see the module docstring),
    or of a timm ConvNeXt tower (:func:`~ovseg_fast.models.clip.convnext_dense_features`).

    ``positional(grid)`` gives the ViT's resized positional embedding (the student's cached,
    gradient-aware one); None resizes ``visual``'s own (the teacher)."""
    if hasattr(visual, "trunk"):  # open_clip's TimmModel: the ConvNeXt
        return clip_module.convnext_dense_features(visual, images)
    b = images.shape[0]
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    if positional is not None:
        pos = positional((gh, gw))
    else:
        native = tuple(int(g) for g in visual.grid_size)
        pos = (
            visual.positional_embedding
            if (gh, gw) == native
            else _resize_pos(visual.positional_embedding, native, (gh, gw))
        )
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))
    blocks = visual.transformer.resblocks
    for blk in blocks[:-1]:
        x = _block(blk, x)
    last = blocks[-1]
    attn = last.attn
    c = x.shape[-1]
    bias = attn.in_proj_bias[2 * c :] if attn.in_proj_bias is not None else None
    v = attn.out_proj(F.linear(last.ln_1(x[:, 1:]), attn.in_proj_weight[2 * c :], bias))
    v = x[:, :1] + last.ls_1(v)
    v = v + last.ls_2(last.mlp(last.ln_2(v)))
    return (visual.ln_post(v) @ visual.proj).reshape(b, gh, gw, -1)


@register_model("pixelclip_convnext_b")
class PixelCLIPConvNeXtB(PixelCLIP):
    """``pixelclip_convnext_b``: PixelCLIP on open_clip's ConvNeXt-B CLIP (``convnext_base_w_320``), the
    whole image tower trained; ``pretrained`` may be the authors' ConvNeXt-B ``.pth``."""

    config_class = PixelCLIPConvNeXtBConfig


def _check_config(config: PixelCLIPConfig) -> None:
    check_int("image_size", config.image_size, minimum=1)
    check_int("mask_size", config.mask_size, minimum=1)
    check_int("min_mask_area", config.min_mask_area, minimum=1)
    check_int("num_concepts", config.num_concepts, minimum=1)
    check_int("prompt_length", config.prompt_length, minimum=1)
    check_int("sinkhorn_iters", config.sinkhorn_iters, minimum=1)
    check_int("seed", config.seed)
    check_float("clustering_scale", config.clustering_scale, positive=True)
    momentum = check_float("momentum", config.momentum, minimum=0.0)
    if momentum > 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if config.feature_size is not None:
        check_int("feature_size", config.feature_size, minimum=1)
    if not isinstance(config.prompt_template, str) or config.prompt_template.count("{}") != 1:
        raise ValueError(f"prompt_template must be a str with exactly one '{{}}', got {config.prompt_template!r}")
    if len(tuple(config.decoder_channels)) != 3:
        raise ValueError(f"decoder_channels must be 3 ints, got {config.decoder_channels!r}")
    if config.finetune not in ("attention", "full"):
        raise ValueError(f"finetune must be 'attention' or 'full', got {config.finetune!r}")


class _quiet_random_weights:
    """Silences the random-weights warning while the backbone is built only to receive a full
    PixelCLIP checkpoint right after (and leaves the once-only flag as it was)."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __enter__(self):
        if self.active:
            self._flag = clip_module._warned_random
            self._ctx = warnings.catch_warnings()
            self._ctx.__enter__()
            warnings.filterwarnings("ignore", ".*RANDOM weights")
        return self

    def __exit__(self, *exc):
        if self.active:
            self._ctx.__exit__(*exc)
            clip_module._warned_random = self._flag
        return False


# -- the authors' checkpoints ---------------------------------------------------------------------------
_STUDENT = "sem_seg_head.predictor.clip_model."
_PROMPTS = "sem_seg_head.predictor.prompt_tokens"
_TEACHER = "teacher_encoder."
_HEAD = "head."
_DINO = "dino."
_THEIR_PREFIXES = (_STUDENT, _PROMPTS, _TEACHER, _HEAD)
# The authors' ConvHead names -> MaskDecoder's.
_HEAD_NAMES = {
    "conv0.": "stem.",
    "up1.": "up1.",
    "conv1.double_conv.": "block1.",
    "up2.": "up2.",
    "conv2.double_conv.": "block2.",
    "proj.": "out.",
}


def _is_clip_state_dict(sd: dict[str, Tensor]) -> bool:
    return "visual.conv1.weight" in sd or "visual.trunk.stem.0.weight" in sd


def _checkpoint_tower(sd: dict[str, Tensor]) -> str:
    """``"convnext"`` for a PixelCLIP state dict (theirs or ours) of a timm ConvNeXt tower, else ``"vit"``."""
    return "convnext" if any("visual.trunk." in k or k.startswith("teacher.trunk.") for k in sd) else "vit"


def _check_checkpoint_tower(sd: dict[str, Tensor], clip: Union[str, dict], path) -> None:
    """A ConvNeXt checkpoint for a ViT config (or the reverse) is refused before anything is built."""
    name, config = clip_module._model_config(clip)
    tower = "convnext" if config["vision_cfg"].get("timm_model_name") else "vit"
    theirs = _checkpoint_tower(sd)
    if theirs != tower:
        model = _MODEL_OF_TOWER[theirs]
        raise ValueError(
            f"pretrained: {path} is a PixelCLIP checkpoint with a {theirs} image tower, but clip={name!r} has a "
            f"{tower} one: use create_model({model!r}, pretrained=...)"
        )


# The registered model whose config has each image tower.
_MODEL_OF_TOWER = {"vit": "pixelclip", "convnext": "pixelclip_convnext_b"}


def convert_pixelclip_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' detectron2 state dict (ViT-B/16 or ConvNeXt-B) -> this model's keys.

    ``sem_seg_head.predictor.clip_model.*`` -> ``backbone.clip.*`` (OpenAI CLIP's names, which are
    open_clip's; the ConvNeXt is open_clip's own CLIP, ``visual.trunk.*`` timm's ConvNeXt and
    ``visual.head.proj`` open_clip's projection); ``sem_seg_head.predictor.prompt_tokens`` (k, n,
    width) -> ``prompt_words``;
    ``teacher_encoder.visual.*`` -> ``teacher.*``; ``head.*`` (their ``ConvHead``) -> ``decoder.*``.
    Their teacher also carries copies of the frozen text embedding parts (``teacher_encoder.
    token_embedding`` etc.): each must equal the student's, and is then dropped. ``dino.*`` (the
    DINO ViT-S/16 that makes masks in their DINO-mask training, not a part of the segmenter) is
    dropped and logged. Any other key, or a text copy that differs, is a ``ValueError``.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    out: dict[str, Tensor] = {}
    copies: dict[str, Tensor] = {}
    unknown, dino = [], 0
    for key, value in state_dict.items():
        if key.startswith(_STUDENT):
            out["backbone.clip." + key[len(_STUDENT) :]] = value
        elif key == _PROMPTS:
            out["prompt_words"] = value
        elif key.startswith(_TEACHER + "visual."):
            out["teacher." + key[len(_TEACHER + "visual.") :]] = value
        elif key.startswith(_TEACHER):
            copies[key[len(_TEACHER) :]] = value
        elif key.startswith(_HEAD):
            rest = key[len(_HEAD) :]
            for theirs, ours in _HEAD_NAMES.items():
                if rest.startswith(theirs):
                    out["decoder." + ours + rest[len(theirs) :]] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith(_DINO):
            dino += 1
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not a PixelCLIP checkpoint: unknown keys {_head(sorted(unknown))}")
    for name, value in copies.items():
        own = out.get("backbone.clip." + name)
        if own is None or own.shape != value.shape or not torch.equal(own, value):
            raise ValueError(
                f"teacher_encoder.{name}: the teacher's copy of a frozen text weight must equal the student's "
                f"sem_seg_head.predictor.clip_model.{name}" + (" (missing)" if own is None else "")
            )
    if dino:
        log.info("PixelCLIP checkpoint: dropped %d tensors of the DINO mask generator (dino.*)", dino)
    return out


def _head(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _load_strict(module: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(state_dict) & set(own))
        if state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shapes differ: {_head(shapes)}")
        if missing:
            parts.append(f"missing from the checkpoint: {_head(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_head(unexpected)}")
        raise ValueError(f"pretrained: {source} does not fit this PixelCLIP config; " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def read_pixelclip_checkpoint(path: Union[str, os.PathLike]) -> dict[str, Tensor]:
    """The state dict of a PixelCLIP checkpoint file (theirs or ours), in this model's keys."""
    sd = read_state_dict(Path(path))
    if any(k.startswith(_THEIR_PREFIXES) for k in sd):
        sd = convert_pixelclip_state_dict(sd)
    return sd


def pixelclip_model_name(state_dict: dict[str, Tensor]) -> str:
    """The registered model a PixelCLIP state dict (theirs or ours) is of: ``"pixelclip"`` (ViT) or
    ``"pixelclip_convnext_b"`` (a timm ConvNeXt image tower)."""
    return _MODEL_OF_TOWER[_checkpoint_tower(state_dict)]


def pixelclip_config_overrides(state_dict: dict[str, Tensor]) -> dict:
    """The ``create_model(pixelclip_model_name(state_dict), **overrides)`` whose parameters have the
    shapes of ``state_dict`` (this model's keys): the prompts' k and n, the decoder's channels and,
    for a ViT, the CLIP architecture as an open_clip config dict (heads = width / 64, as OpenAI's
    CLIP). Used to check a converted checkpoint; attention heads and activations do not change
    shapes and are not known. A ConvNeXt's trunk cannot be told from its shapes (timm builds it by
    name): its CLIP is the config's, ``convnext_base_w_320`` unless the caller overrides ``clip``."""

    def get(key: str) -> Tensor:
        if key not in state_dict:
            raise ValueError(f"not a PixelCLIP checkpoint: it has no {key}")
        return state_dict[key]

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})

    prompts = get("prompt_words")
    channels = (
        int(get("decoder.stem.weight").shape[0]),
        int(get("decoder.up1.weight").shape[1]),
        int(get("decoder.up2.weight").shape[1]),
    )
    overrides = {"num_concepts": int(prompts.shape[0]), "prompt_length": int(prompts.shape[1])}
    overrides["decoder_channels"] = channels
    if _checkpoint_tower(state_dict) == "convnext":
        return overrides

    conv1 = get("backbone.clip.visual.conv1.weight")
    width, patch = int(conv1.shape[0]), int(conv1.shape[-1])
    grid = round((get("backbone.clip.visual.positional_embedding").shape[0] - 1) ** 0.5)
    mlp = get("backbone.clip.visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
    text_width = int(get("backbone.clip.ln_final.weight").shape[0])
    text_mlp = get("backbone.clip.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
    clip = {
        "embed_dim": int(get("backbone.clip.visual.proj").shape[1]),
        "vision_cfg": {
            "image_size": patch * grid,
            "layers": count("backbone.clip.visual.transformer.resblocks."),
            "width": width,
            "patch_size": patch,
            "mlp_ratio": mlp / width,
            "head_width": min(64, width),
        },
        "text_cfg": {
            "context_length": int(get("backbone.clip.positional_embedding").shape[0]),
            "vocab_size": int(get("backbone.clip.token_embedding.weight").shape[0]),
            "width": text_width,
            "heads": max(1, text_width // 64),
            "layers": count("backbone.clip.transformer.resblocks."),
            "mlp_ratio": text_mlp / text_width,
        },
    }
    return {"clip": clip, "image_size": patch * grid, **overrides}


def check_pixelclip_state_dict(
    state_dict: dict[str, Tensor], source: str = "state_dict", overrides: Optional[dict] = None
) -> dict:
    """Builds the PixelCLIP that ``state_dict`` (this model's keys) describes, with ``overrides`` (config
    fields, e.g. ``clip``) over the inferred ones, and loads it strictly: a ``ValueError`` lists what
    does not fit. Returns the config overrides used (see :func:`pixelclip_config_overrides`)."""
    from ovseg_fast.models.registry import create_model

    overrides = {**pixelclip_config_overrides(state_dict), **(overrides or {})}
    with _quiet_random_weights(True):
        model = create_model(pixelclip_model_name(state_dict), **overrides)
    _load_strict(model, state_dict, source)
    return overrides
