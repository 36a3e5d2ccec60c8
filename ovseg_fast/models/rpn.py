"""RPN, the Relationship Prompt Network (Li et al., NeurIPS 2024), on a frozen CLIP and the ovseg-fast ops.

RPN adapts a frozen CLIP to open-vocabulary segmentation with prompts alone: no mask proposals, no
decoder. Both CLIP towers stay frozen; what trains is a few prompt tokens, the relationship prompt
module and a linear head. With t (C, D) the frozen class embeddings and, for layer l, cls_l (B, D)
and v_l (B, hw, D) the [CLS] and patch tokens of the layer's output after ``ln_post`` + ``proj``
(both L2-normalised, as the public code does), the network reads top to bottom as the paper's figure:

1. **Deep visual prompts** (VPT-deep): ``n`` learnable tokens per layer, through a Linear shared with
   the relationship prompts (+ LayerNorm in the complete model) and dropout 0.1, placed after [CLS].
2. **ITP**, image-to-pixel semantic attention: image level ``a_l = t * cls_l`` (B, C, D), pixel level
   the relationship map ``M_l = v_l a_l^T`` (B, hw, C).
3. **APG**, adaptive prompt generation: ``R_l = M_l^T P`` (B, C, width), P a learnable (hw, width)
   parameter (or an ``nn.Linear``); R_l goes through the shared prompt projection and is
   concatenated as C extra tokens to the input of layer l + 1 (dropped again after that layer).
4. **M2oE**, multi-scale mixture of experts, after every chosen block: patch tokens down to r
   channels, E experts (average pool to scale s, 3x3 depthwise conv, GELU, upsample), one expert
   per image picked by a (noisy) top-k gate on the image's pooled features (``ops.topk_gating``),
   images grouped per expert (``ops.moe_dispatch``) and merged (``ops.moe_combine``), projected up
   and added to the patch tokens. The gate's load-balancing loss joins the training loss.
5. **Head**, LPMc on the last layer: text branch ``LN(W [t * cls; t])``
   (``ops.hadamard_concat_linear``), image branch ``LN(V v)``, logits their scaled dot products
   (``ops.lpm_logits``); per-class sigmoid.

Registered names (config presets of one module, :class:`RPN`):

- ``rpn`` and ``rpn_voc``: the complete model, PASCAL VOC 15 seen / 5 unseen classes (ZegCLIP's split:
  unseen are labels 15-19, potted plant, sheep, sofa, train, tv monitor);
- ``rpn_coco``: the complete model, COCO-Stuff 156 seen / 15 unseen (ZegCLIP's split);
- ``rpn_voc_public``: the architecture of the public code (github.com/liblacklucy/RPN): no M2oE,
  relationship prompts into layers 1-11, an extra LayerNorm (eps 1e-6) before ``ln_post`` at every
  layer, one Linear for both kinds of prompts, a two-Linear text branch, sigmoid scores with 0.1
  subtracted on the seen classes; it loads the public code's checkpoints (mmseg state dicts) with
  :func:`public_key_map`, strictly, and has 2,524,416 trainable parameters, as the authors' log.

Choices the issue left open (documented API):

* The classes: the config holds ``num_classes`` and ``unseen_classes`` (dataset label ids), not
  names; the caller passes the names. ``loss``'s targets index the classes the outputs score: train
  zero-shot on the seen classes only (``model.seen_class_names(names)``, targets remapped to them
  with unseen pixels 255, as the trainer's ``RestrictClasses`` does), because the relationship
  prompts are built from the classes passed and all classes would show unseen text in training.
  Outputs over all ``num_classes`` classes with dataset labels are reduced to the seen classes
  (unseen pixels ignored) unless ``self_training`` is on: then the unseen pixels get pseudo-labels,
  the model's own argmax over the unseen classes of its detached scores (ZegCLIP's and RPN's
  transductive rule; pixels whose best unseen score is below ``pseudo_label_threshold`` are
  ignored, 0 keeps every one as they do).
* The balancing loss: ``forward`` in training mode with gradients enabled stores the gates' Switch
  load-balancing loss (mean over the M2oE layers) on the module; ``loss`` adds it as
  ``loss_balance = balance_weight * that`` (so ``loss`` refers to the most recent training forward).
* Grids other than the config's: P is resized bilinearly as an (h0, w0, width) map and multiplied
  by ``h0 w0 / (h w)``, so ``M^T P`` keeps its scale (complete model); ``rpn_voc_public`` refuses
  other grids, as its P has exactly (512/16)^2 rows.
* M2oE: the experts' outputs are weighted by the gate's softmax probabilities of the chosen experts
  without renormalisation (Switch Transformer), so with k = 1 the gate also learns through the
  output; the up projection starts small (std 1e-3), so training starts near the frozen CLIP.
* Training-free heads (``tfpm_a/b/c``, no parameters): LPM with every projection replaced by the
  identity (``[I I]`` for the concatenation): ``scale * cos(v, e)`` with ``e = t``, ``t * cls`` or
  ``t * cls + t``, scale CLIP's logit scale unless ``logit_scale`` is set.
* Predictions (``predict``) are per-class sigmoid scores, minus ``seen_score_bias`` on the seen
  classes when all ``num_classes`` classes are scored; sliding windows (crop 512, stride 426 by
  default) average scores, as mmseg averages RPN's outputs.
* APG fusion: only concatenation (the paper's best) is implemented; the paper's multiply/add
  variants are not defined in the issue or the public code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg_fast.models import clip as clip_module
from ovseg_fast.models.base import Segmentor, TextEmbeddings, _resize
from ovseg_fast.models.clip import CLIPBackbone, _block, read_state_dict, resolve_checkpoint
from ovseg_fast.models.losses import DICE_WEIGHT, FOCAL_WEIGHT, focal_dice_losses
from ovseg_fast.models.registry import register_model
from ovseg_fast.ops._checks import check_choice, check_float, check_int
from ovseg_fast.ops.lpm import LinearProjectionModule, hadamard_concat_linear, lpm_logits
from ovseg_fast.ops.moe import moe_combine, moe_dispatch, topk_gating

__all__ = [
    "COCO_STUFF_UNSEEN",
    "RPN",
    "VOC_UNSEEN",
    "RPNCOCOConfig",
    "RPNConfig",
    "RPNVOCPublicConfig",
    "public_key_map",
]

#: ZegCLIP's zero-shot split of PASCAL VOC 2012 (20 classes): the unseen label ids.
VOC_UNSEEN = (15, 16, 17, 18, 19)
#: ZegCLIP's zero-shot split of COCO-Stuff (171 classes): the unseen label ids.
COCO_STUFF_UNSEEN = (19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160)

HEADS = ("lpm_a", "lpm_b", "lpm_c", "tfpm_a", "tfpm_b", "tfpm_c")
MOE_MODES = ("sparse", "multi_scale", "none")


@dataclasses.dataclass
class RPNConfig:
    """Config of ``rpn`` / ``rpn_voc`` (the complete model, VOC 15/5); every field is a switch of the paper.

    - ``clip``, ``image_size``, ``templates``: the frozen CLIP (open_clip name or config dict), the
      working input size (P has ``(image_size / patch)^2`` rows), the class-name prompts (the public
      code's ``"a photo of a {}"``).
    - ``variant``: ``"complete"`` or ``"public"`` (the public code's architecture, see the module doc).
    - ``visual_prompts``: deep prompt tokens per layer (0: none); ``prompt_dropout``; ``prompt_norm``:
      a LayerNorm after the shared prompt Linear (complete model; the public code has none).
    - ``rpm_layers``: the layers that receive relationship prompts from the previous layer's output
      (None: every layer but the first, which has no previous layer).
    - ``itp_image`` / ``itp_pixel``: the ITP levels. Without the image level ``a_l = t``; without the
      pixel level ``R_l = a_l W_r`` (a learnable Linear D -> width) instead of ``M_l^T P``.
    - ``apg``: P as a ``"parameter"`` (hw, width) or an ``nn.Linear(hw, width)`` (``"linear"``).
    - ``moe``: ``"sparse"`` (top-k gated M2oE), ``"multi_scale"`` (every expert, averaged: the paper's
      ablation baseline) or ``"none"``; ``moe_layers`` (None: every layer), ``moe_rank`` r,
      ``moe_scales`` (one expert per scale), ``moe_k``, ``moe_noisy`` (noisy gating in training),
      ``balance_weight`` (of the gates' load-balancing loss).
    - ``head``: ``"lpm_a"``, ``"lpm_b"``, ``"lpm_c"`` or the training-free ``"tfpm_a/b/c"``;
      ``logit_scale`` (None: ``D^-0.5`` for LPM, CLIP's logit scale for TFPM), ``learnable_scale``.
    - ``focal_weight``, ``dice_weight``: the loss weights (ZegCLIP's/RPN's 100 and 1).
    - ``num_classes``, ``unseen_classes``: the dataset's classes and the unseen label ids;
      ``self_training``, ``pseudo_label_threshold``: transductive self-training;
      ``seen_score_bias``: subtracted from the seen classes' scores in ``predict``.
    """

    clip: Union[str, dict] = "ViT-B-16"
    image_size: int = 512
    templates: Union[str, tuple[str, ...]] = ("a photo of a {}",)
    variant: str = "complete"
    visual_prompts: int = 10
    prompt_dropout: float = 0.1
    prompt_norm: bool = True
    rpm_layers: Optional[tuple[int, ...]] = None
    itp_image: bool = True
    itp_pixel: bool = True
    apg: str = "parameter"
    moe: str = "sparse"
    moe_layers: Optional[tuple[int, ...]] = None
    moe_rank: int = 64
    moe_scales: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
    moe_k: int = 1
    moe_noisy: bool = True
    balance_weight: float = 0.01
    head: str = "lpm_c"
    logit_scale: Optional[float] = None
    learnable_scale: bool = False
    focal_weight: float = FOCAL_WEIGHT
    dice_weight: float = DICE_WEIGHT
    num_classes: int = 20
    unseen_classes: tuple[int, ...] = VOC_UNSEEN
    self_training: bool = False
    pseudo_label_threshold: float = 0.0
    seen_score_bias: float = 0.1


@dataclasses.dataclass
class RPNCOCOConfig(RPNConfig):
    """``rpn_coco``: the complete model on COCO-Stuff, 156 seen / 15 unseen classes."""

    num_classes: int = 171
    unseen_classes: tuple[int, ...] = COCO_STUFF_UNSEEN


@dataclasses.dataclass
class RPNVOCPublicConfig(RPNConfig):
    """``rpn_voc_public``: the public code's architecture (OpenAI's QuickGELU ViT-B/16, no M2oE)."""

    clip: Union[str, dict] = "ViT-B-16-quickgelu"
    variant: str = "public"
    prompt_norm: bool = False
    moe: str = "none"


# -- M2oE -----------------------------------------------------------------------------------------
class ScaleExpert(nn.Module):
    """One M2oE expert on (n, r, h, w) maps: average pool to ``scale``, 3x3 depthwise conv, GELU,
    bilinear upsampling back to (h, w)."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, z: Tensor) -> Tensor:
        h, w = z.shape[-2:]
        ph, pw = max(1, round(h * self.scale)), max(1, round(w * self.scale))
        y = z
        if (ph, pw) != (h, w):
            if h % ph == 0 and w % pw == 0:
                y = F.avg_pool2d(z, (h // ph, w // pw))
            else:
                y = F.adaptive_avg_pool2d(z, (ph, pw))
        y = F.gelu(_depthwise3x3(y, self.conv.weight, self.conv.bias))
        if (ph, pw) != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return y

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _depthwise3x3(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``F.conv2d(z, weight, bias, padding=1, groups=C)`` as nine shifted multiply-adds.

    The experts' maps are small (at most the patch grid, r channels), so this costs little, and
    unlike ``aten.convolution`` it compiles: inductor mis-plans the layout of a convolution whose
    batch is a data-dependent expert group size (a stride assertion fails at run time).
    """
    h, w = z.shape[-2:]
    zp = F.pad(z, (1, 1, 1, 1))
    k = weight.reshape(1, -1, 9, 1, 1)
    out = bias.view(1, -1, 1, 1) + zp[..., :h, :w] * k[:, :, 0]
    for i in range(1, 9):
        dy, dx = divmod(i, 3)
        out = out + zp[..., dy : dy + h, dx : dx + w] * k[:, :, i]
    return out


class M2oE(nn.Module):
    """Multi-scale mixture of experts on the patch tokens of one layer.

    ``forward(patches (B, hw, width), grid) -> (delta (B, hw, width), balancing loss or None)``:
    ``z = down(patches)`` as (B, r, h, w); ``"sparse"``: gate ``g = topk_gating(W_g mean(z))`` per
    image, ``y_b = sum_{e in topk} g_be expert_e(z_b)`` through ``moe_dispatch`` / ``moe_combine``;
    ``"multi_scale"``: ``y_b = mean_e expert_e(z_b)``; ``delta = up(y)``.
    """

    def __init__(self, width: int, rank: int, scales: Sequence[float], k: int, mode: str, noisy: bool) -> None:
        super().__init__()
        self.mode = mode
        self.k = k
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width)
        nn.init.normal_(self.up.weight, std=1e-3)
        nn.init.zeros_(self.up.bias)
        self.experts = nn.ModuleList(ScaleExpert(rank, s) for s in scales)
        e = len(self.experts)
        self.gate = nn.Linear(rank, e, bias=False) if mode == "sparse" else None
        self.noise_gate = nn.Linear(rank, e, bias=False) if mode == "sparse" and noisy else None
        if self.noise_gate is not None:
            nn.init.zeros_(self.noise_gate.weight)  # Shazeer et al.: training starts at the noise floor

    def forward(self, patches: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Optional[Tensor]]:
        b = patches.shape[0]
        # Contiguous (B, r, h, w): the transposed view is channels-last, and inductor's layout plan for
        # the experts' convolutions then disagrees with what moe_dispatch's copy really has.
        z = self.down(patches).transpose(1, 2).reshape(b, -1, *grid).contiguous()
        loss = None
        if self.gate is None:
            y = torch.stack([expert(z) for expert in self.experts]).mean(0)
        else:
            pooled = z.mean((2, 3))
            noise_logits = self.noise_gate(pooled) if self.noise_gate is not None else None
            g = topk_gating(
                self.gate(pooled), self.k, noise_logits=noise_logits, normalize=False, training=self.training
            )
            z_sorted, offsets, order = moe_dispatch(z, g.indices, len(self.experts))
            bounds = offsets.tolist()
            torch._check(bounds[0] == 0)
            torch._check(bounds[-1] == z_sorted.shape[0])
            outs = []
            for e, expert in enumerate(self.experts):
                lo, hi = bounds[e], bounds[e + 1]
                torch._check(lo >= 0)
                torch._check(hi >= lo)
                torch._check(hi <= z_sorted.shape[0])
                outs.append(expert(z_sorted.narrow(0, lo, hi - lo)))
            y = moe_combine(torch.cat(outs), g.weights, order, b)
            loss = g.load_balancing_loss
        return self.up(y.flatten(2).transpose(1, 2)), loss


# -- heads ----------------------------------------------------------------------------------------
class PublicLPMHead(nn.Module):
    """The public code's head (``CLIPHeadSeg`` with ``use_proj=False``): text branch
    ``LN(T (C_w [t * cls; t] + c_b) + T_b)``, two Linears that compose into one, run as one fused
    ``hadamard_concat_linear`` with ``W = T C_w``; image branch ``LN(V v)``; logits scaled by D^-0.5."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.text_proj = nn.Linear(2 * dim, dim)  # public: decode_head.cls_proj
        self.text_proj2 = nn.Linear(dim, dim)  # public: decode_head.cls_proj_1
        self.text_norm = nn.LayerNorm(dim)
        self.image_proj = nn.Linear(dim, dim)
        self.image_norm = nn.LayerNorm(dim)
        for lin in (self.text_proj, self.text_proj2, self.image_proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.scale = dim**-0.5

    def forward(self, pixels: Tensor, text: Tensor, cls: Tensor) -> Tensor:
        weight = self.text_proj2.weight @ self.text_proj.weight
        bias = self.text_proj2.weight @ self.text_proj.bias + self.text_proj2.bias
        emb = hadamard_concat_linear(
            text, cls, weight, bias, mode="c", norm_weight=self.text_norm.weight, norm_bias=self.text_norm.bias
        )
        return lpm_logits(
            pixels,
            emb,
            self.image_proj.weight,
            self.image_proj.bias,
            norm_weight=self.image_norm.weight,
            norm_bias=self.image_norm.bias,
            scale=self.scale,
        )


# -- the model ------------------------------------------------------------------------------------
@register_model("rpn")
class RPN(Segmentor):
    """RPN on a frozen CLIP (see the module doc). ``forward(images, text)`` returns (B, C, H/16, W/16)
    logits (per-class sigmoid); ``loss`` gives ``loss_focal``, ``loss_dice`` and ``loss_balance``."""

    config_class = RPNConfig

    def __init__(self, config: RPNConfig, *, pretrained: Optional[str] = None) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        public = config.variant == "public"
        self.public = public
        clip_cfg = config.clip
        if public:
            # The public code stores the positional embedding at the working grid (resized once,
            # bilinearly, from CLIP's 14x14), so its checkpoints hold a (1 + hw, width) table.
            clip_cfg = _config_at_size(config.clip, config.image_size)
        public_ckpt = None
        if public and pretrained is not None:
            public_ckpt = read_state_dict(resolve_checkpoint(pretrained, str(config.clip)))
            with _no_random_warning():
                self.backbone = CLIPBackbone(
                    clip_cfg, None, image_size=config.image_size, visual_prompts=config.visual_prompts
                )
        else:
            self.backbone = CLIPBackbone(
                clip_cfg, pretrained, image_size=config.image_size, visual_prompts=config.visual_prompts
            )
        bb = self.backbone
        self.patch_size = self.output_stride = bb.patch_size
        width, dim, layers = bb.width, bb.embed_dim, bb.num_layers
        self.grid = (config.image_size // bb.patch_size,) * 2

        self.prompt_proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")  # the public code's init
        nn.init.zeros_(self.prompt_proj.bias)
        self.prompt_norm = nn.LayerNorm(width) if config.prompt_norm else None
        self.prompt_dropout = nn.Dropout(config.prompt_dropout)
        # The public code normalises every layer's tokens (eps 1e-6) before ln_post.
        self.token_norm = nn.LayerNorm(width, eps=1e-6) if public else None

        self.rpm_layers = _layer_set("rpm_layers", config.rpm_layers, layers, default=range(1, layers))
        if 0 in self.rpm_layers:
            raise ValueError("rpm_layers: layer 0 has no previous layer to build relationship prompts from")
        hw = self.grid[0] * self.grid[1]
        bound = math.sqrt(6.0 / (3 * bb.patch_size**2 + width))
        self.relation_prompt: Union[nn.Parameter, nn.Linear, None] = None
        self.relation_linear: Optional[nn.Linear] = None
        if self.rpm_layers and config.itp_pixel:
            if config.apg == "parameter":
                self.relation_prompt = nn.Parameter(torch.empty(hw, width).uniform_(-bound, bound))
            else:
                self.relation_prompt = nn.Linear(hw, width)
        elif self.rpm_layers:
            self.relation_linear = nn.Linear(dim, width)
        # The public segmentor defines a LayerNorm it never uses; it is trainable, counted in the
        # authors' 2,524,416 and saved in their checkpoints, so it is kept for strict loading.
        self.unused_norm = nn.LayerNorm(width) if public else None

        self.moe_layers = (
            set()
            if config.moe == "none"
            else _layer_set("moe_layers", config.moe_layers, layers, default=range(layers))
        )
        self.moe = nn.ModuleDict(
            {
                str(i): M2oE(width, config.moe_rank, config.moe_scales, config.moe_k, config.moe, config.moe_noisy)
                for i in sorted(self.moe_layers)
            }
        )

        self.log_scale: Optional[nn.Parameter] = None
        if public:
            self.head = PublicLPMHead(dim)
        elif config.head.startswith("lpm"):
            scale = config.logit_scale if config.logit_scale is not None else dim**-0.5
            if config.learnable_scale:
                self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
                scale = 1.0
            self.head = LinearProjectionModule(dim, dim, mode=config.head[-1], logit_scale=scale)
            for lin in (self.head.text_proj, self.head.image_proj):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        else:
            scale = config.logit_scale if config.logit_scale is not None else float(bb.logit_scale)
            if config.learnable_scale:
                self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
                scale = 1.0
            self.head = LinearProjectionModule(dim, dim, mode="training_free", logit_scale=scale)

        unseen = set(config.unseen_classes)
        self.seen_classes = tuple(i for i in range(config.num_classes) if i not in unseen)
        self._balance_loss: Optional[Tensor] = None
        if public_ckpt is not None:
            if any(k.startswith(("backbone.", "decode_head.", "text_encoder.")) for k in public_ckpt):
                self.load_public_state_dict(public_ckpt)
            else:
                self._load_clip_at_grid(public_ckpt)

    # -- classes ------------------------------------------------------------------------------
    def encode_classes(self, class_names: Sequence[str]) -> TextEmbeddings:
        emb = self.backbone.encode_text(class_names, self.config.templates)
        return TextEmbeddings(emb, tuple(class_names))

    def seen_class_names(self, class_names: Sequence[str]) -> list[str]:
        """The seen classes of the dataset's ``num_classes`` names (in label order): what to pass to a
        zero-shot training forward (all of them with ``self_training``)."""
        names = list(class_names)
        if len(names) != self.config.num_classes:
            raise ValueError(
                f"class_names must have the config's num_classes={self.config.num_classes} names, got {len(names)}"
            )
        if self.config.self_training:
            return names
        return [names[i] for i in self.seen_classes]

    # -- the network ----------------------------------------------------------------------------
    def _prompt_tokens(self, p: Tensor, batch: Optional[int] = None) -> Tensor:
        """The shared projection of visual and relationship prompts: Linear (+ LayerNorm) + dropout.
        With ``batch``, ``p`` (..., n, width) is projected once and repeated per image before the
        dropout (independent masks per image, as the public code)."""
        p = self.prompt_proj(p)
        if self.prompt_norm is not None:
            p = self.prompt_norm(p)
        if batch is not None:
            p = p.unsqueeze(-3).expand(*p.shape[:-2], batch, *p.shape[-2:])
        return self.prompt_dropout(p)

    def _joint(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[CLS] (B, D) and patch tokens (B, hw, D) of ``x`` (B, 1 + hw, width) in the joint space,
        L2-normalised."""
        if self.token_norm is not None:
            x = self.token_norm(x)
        e = self.backbone.project(x)
        return F.normalize(e[:, 0], dim=-1), F.normalize(e[:, 1:], dim=-1)

    def _relation_matrix(self, grid: tuple[int, int]) -> Tensor:
        """P (hw, width) for ``grid``: the learnt one, resized (and rescaled) for other grids."""
        p = self.relation_prompt
        p = p if isinstance(p, nn.Parameter) else p.weight.t()
        if grid == self.grid:
            return p
        if self.public:
            raise ValueError(
                f"images: rpn_voc_public's relationship prompt P has {self.grid[0]}x{self.grid[1]} rows "
                f"(image_size {self.config.image_size}); got a {grid[0]}x{grid[1]} patch grid"
            )
        m = p.t().reshape(1, -1, *self.grid)
        m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
        return m.reshape(p.shape[1], -1).t() * (self.grid[0] * self.grid[1] / (grid[0] * grid[1]))

    def relationship_prompts(self, text: Tensor, cls: Tensor, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        """ITP + APG: (B, C, width) prompts from t (C, D), cls_l (B, D) and v_l (B, hw, D).

        ``a = t * cls`` (image level), ``M = v a^T`` (pixel level), ``R = M^T P``.
        """
        a = (
            text.unsqueeze(0) * cls.unsqueeze(1)
            if self.config.itp_image
            else text.unsqueeze(0).expand(cls.shape[0], -1, -1)
        )
        if self.relation_linear is not None:
            return self.relation_linear(a)
        m = torch.bmm(patches, a.transpose(1, 2))  # (B, hw, C)
        r = m.transpose(1, 2) @ self._relation_matrix(grid)
        if isinstance(self.relation_prompt, nn.Linear):
            r = r + self.relation_prompt.bias
        return r

    def features(self, images: Tensor, text: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """The prompted vision tower: last layer's (cls (B, D), patches (B, hw, D), grid), normalised."""
        bb = self.backbone
        visual = bb.clip.visual
        b = images.shape[0]
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls_embedding = visual.class_embedding.to(x.dtype)
        if self.public:
            # The public code (as ZegCLIP) adds class_embedding to the [CLS] position embedding as well.
            cls_embedding = cls_embedding * 2
        x = torch.cat([cls_embedding.view(1, 1, -1).expand(b, -1, -1), x], dim=1)
        x = visual.ln_pre(x + bb.positional_embedding(grid).to(x.dtype))

        visual_prompts = None
        if bb.visual_prompts is not None:
            visual_prompts = self._prompt_tokens(bb.visual_prompts, batch=b)
        balance = []
        relation = None
        n_layers = len(visual.transformer.resblocks)
        cls = patches = None
        for i, blk in enumerate(visual.transformer.resblocks):
            parts = [x[:, :1]]
            if visual_prompts is not None:
                parts.append(visual_prompts[i].to(x.dtype))
            if relation is not None:
                parts.append(relation.to(x.dtype))
                relation = None
            parts.append(x[:, 1:])
            y = _block(blk, torch.cat(parts, dim=1))
            x = torch.cat([y[:, :1], y[:, y.shape[1] - grid[0] * grid[1] :]], dim=1)
            if i in self.moe_layers:
                delta, loss = self.moe[str(i)](x[:, 1:], grid)
                x = torch.cat([x[:, :1], x[:, 1:] + delta], dim=1)
                if loss is not None:
                    balance.append(loss)
            if i + 1 in self.rpm_layers or i == n_layers - 1:
                cls, patches = self._joint(x)
                if i + 1 in self.rpm_layers:
                    relation = self._prompt_tokens(self.relationship_prompts(text, cls, patches, grid))
        self._balance_loss = torch.stack(balance).mean() if balance and self.training else None
        return cls, patches, grid

    def segment(self, images: Tensor, text: TextEmbeddings) -> Tensor:
        t = text.embeddings
        if t.shape[1] != self.backbone.embed_dim:
            raise ValueError(f"text embeddings have dimension {t.shape[1]}, the model's is {self.backbone.embed_dim}")
        t = F.normalize(t.to(images.dtype), dim=-1)
        cls, patches, grid = self.features(images, t)
        b, d = cls.shape
        if self.public:
            logits = self.head(patches, t, cls)
        else:
            pixels = patches.transpose(1, 2).reshape(b, d, *grid)
            head_text = t
            if self.config.head == "tfpm_b":
                head_text = t.unsqueeze(0) * cls.unsqueeze(1)
            elif self.config.head == "tfpm_c":
                head_text = t.unsqueeze(0) * cls.unsqueeze(1) + t.unsqueeze(0)
            logits = self.head(pixels, head_text, cls)
        if self.log_scale is not None:
            logits = logits * self.log_scale.exp()
        return logits.reshape(b, -1, *grid)

    # -- training -----------------------------------------------------------------------------
    def loss(self, outputs: Tensor, targets: Tensor, *, ignore_index: int = 255) -> dict[str, Tensor]:
        """``loss_focal`` (x ``focal_weight``) + ``loss_dice`` (x ``dice_weight``) of the sigmoid
        logits, plus ``loss_balance`` (x ``balance_weight``) when the last forward was a training
        forward through sparse M2oE. ``targets`` (B, H, W) int64 index the classes the outputs
        score, or are dataset label ids when all ``num_classes`` are scored (see the module doc for
        the seen/unseen handling); the logits are resized bilinearly to them."""
        outputs, targets = self._check_loss_inputs(outputs, targets, ignore_index)
        logits = _resize(outputs.float(), targets.shape[-2:])
        logits, targets = self._training_targets(logits, targets, ignore_index)
        losses = focal_dice_losses(
            logits,
            targets,
            ignore_index=ignore_index,
            focal_weight=self.config.focal_weight,
            dice_weight=self.config.dice_weight,
        )
        if self._balance_loss is not None:
            losses["loss_balance"] = self.config.balance_weight * self._balance_loss
        return losses

    def _training_targets(self, logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
        c = logits.shape[1]
        n_all, seen = self.config.num_classes, self.seen_classes
        if len(seen) == n_all or c != n_all:
            return logits, targets
        in_range = (targets >= 0) & (targets < n_all)
        label = targets.clamp(0, n_all - 1)
        is_unseen = torch.ones(n_all, dtype=torch.bool, device=targets.device)
        is_unseen[list(seen)] = False
        unseen_pixel = in_range & is_unseen[label]
        if self.config.self_training:
            with torch.no_grad():
                scores = logits.detach().sigmoid()
                scores[:, list(seen)] = -1.0
                best, pseudo = scores.max(1)
                pseudo = torch.where(best >= self.config.pseudo_label_threshold, pseudo, ignore_index)
            return logits, torch.where(unseen_pixel, pseudo, targets)
        logits = logits[:, list(seen)]
        lut = torch.full((n_all,), ignore_index, dtype=targets.dtype, device=targets.device)
        lut[list(seen)] = torch.arange(len(seen), dtype=targets.dtype, device=targets.device)
        return logits, torch.where(in_range, lut[label], targets)

    # -- inference ------------------------------------------------------------------------------
    def scores(self, logits: Tensor) -> Tensor:
        """Per-class sigmoid scores of ``logits`` (B, C, ...), minus ``seen_score_bias`` on the seen
        classes when all ``num_classes`` classes are scored (the public code's 0.1)."""
        s = logits.float().sigmoid()
        if s.shape[1] == self.config.num_classes and self.config.seen_score_bias:
            s[:, list(self.seen_classes)] -= self.config.seen_score_bias
        return s

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        class_names: Union[TextEmbeddings, Sequence[str]],
        *,
        mode: str = "whole",
        crop: int = 512,
        stride: int = 426,
    ) -> Tensor:
        """Scores (B, C, H, W) at the input size: :meth:`scores` of the logits, averaged over sliding
        windows (the public code's crop 512, stride 426) for ``mode="slide"``; argmax over C gives
        the labels. Otherwise as :meth:`Segmentor.predict`."""
        return super().predict(images, class_names, mode=mode, crop=crop, stride=stride)

    def _probabilities(self, logits: Tensor) -> Tensor:
        return logits  # already scores: _padded_logits turns each window's logits into scores

    def _padded_logits(self, images: Tensor, text: TextEmbeddings) -> Tensor:
        # predict's windows average RPN's scores, as mmseg's slide inference averages its outputs.
        return self.scores(super()._padded_logits(images, text))

    # -- the public code's checkpoints ------------------------------------------------------------
    def _load_clip_at_grid(self, state_dict: dict[str, Tensor]) -> None:
        """A CLIP checkpoint (open_clip's keys) into the public variant's CLIP, whose positional
        embedding lives at the working grid: resized bilinearly (align_corners=False), as the public
        code's ``init_weights`` does, then loaded strictly."""
        clip = self.backbone.clip
        key = "visual.positional_embedding"
        own = clip.state_dict()
        pos = state_dict.get(key)
        if pos is not None and pos.ndim == 2 and pos.shape != own[key].shape:
            n = math.isqrt(pos.shape[0] - 1)
            if n * n + 1 != pos.shape[0]:
                raise ValueError(f"pretrained: {key} of shape {tuple(pos.shape)} is not a square grid plus [CLS]")
            grid = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=self.grid, mode="bilinear", align_corners=False)
            state_dict = dict(state_dict)
            state_dict[key] = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[1]).to(pos.dtype)])
        transient = set(dict(clip.named_buffers())) - set(own)
        state_dict = {k: v for k, v in state_dict.items() if k not in transient}
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(
                "pretrained is neither a checkpoint of the public RPN nor of this CLIP; "
                f"missing: {missing[:6]}, unexpected: {unexpected[:6]}"
            )
        clip.load_state_dict(state_dict, strict=True)

    def load_public_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Loads a checkpoint of the public code (its mmseg ``state_dict``) strictly through
        :func:`public_key_map`; only for ``variant="public"``. Every key must map and every
        parameter and buffer of the model must be covered, except CLIP's ``logit_scale`` (the public
        code has none; RPN does not use it); shapes must agree."""
        if not self.public:
            raise ValueError("load_public_state_dict: only the public variant (rpn_voc_public) has the public layout")
        if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
            raise TypeError("state_dict must be a dict of tensors (the public code's mmseg state dict)")
        if "state_dict" in state_dict and isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]
        mapping = public_key_map(
            len(self.backbone.clip.visual.transformer.resblocks), len(self.backbone.clip.transformer.resblocks)
        )
        own = self.state_dict()
        unknown = sorted(k for k in state_dict if k not in mapping)
        mapped = {mapping[k]: v for k, v in state_dict.items() if k in mapping}
        optional = {"backbone.clip.logit_scale"}
        missing = sorted(k for k in own if k not in mapped and k not in optional)
        shapes = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in mapped.items()
            if k in own and own[k].shape != v.shape
        ]
        not_in_model = sorted(k for k in mapped if k not in own)
        if unknown or missing or shapes or not_in_model:
            parts = []
            for label, items in (
                ("keys the key map does not know", unknown),
                ("missing", missing),
                ("shapes differ", shapes),
                ("mapped keys not in the model", not_in_model),
            ):
                if items:
                    parts.append(
                        f"{label}: " + ", ".join(items[:6]) + (f", ... ({len(items)})" if len(items) > 6 else "")
                    )
            raise ValueError("state_dict is not a checkpoint of the public RPN at this config; " + "; ".join(parts))
        for k in optional:
            if k in own and k not in mapped:
                mapped[k] = own[k]
        self.load_state_dict(mapped, strict=True)


# -- presets --------------------------------------------------------------------------------------
@register_model("rpn_voc")
class RPNVOC(RPN):
    """``rpn_voc``: the complete RPN on PASCAL VOC (15 seen / 5 unseen); the same config as ``rpn``."""

    config_class = RPNConfig


@register_model("rpn_coco")
class RPNCOCO(RPN):
    """``rpn_coco``: the complete RPN on COCO-Stuff (156 seen / 15 unseen)."""

    config_class = RPNCOCOConfig


@register_model("rpn_voc_public")
class RPNVOCPublic(RPN):
    """``rpn_voc_public``: the public code's RPN (VOC); ``pretrained`` may be its mmseg checkpoint."""

    config_class = RPNVOCPublicConfig


# -- helpers --------------------------------------------------------------------------------------
def public_key_map(vision_layers: int = 12, text_layers: int = 12) -> dict[str, str]:
    """The public code's state-dict keys (mmseg ``CrossPromptCLIP``) -> ours (:class:`RPN`, public variant).

    ``backbone.*`` (the image tower, its deep prompts ``deep_prompt_embeddings``, ``prompt_proj``
    and the per-layer ``prompt_norm``), ``text_encoder.*`` (the text tower), the segmentor's own
    ``prompt_proj`` (P) and unused ``prompt_norm``, and ``decode_head.*`` (``cls_proj`` then
    ``cls_proj_1`` / ``tex_norm_1`` on the text side, ``vis_proj_1`` / ``vis_norm_1`` on the image side).
    """
    m: dict[str, str] = {}
    v = "backbone.clip.visual."
    for k in ("conv1.weight", "class_embedding", "positional_embedding", "proj"):
        m[f"backbone.{k}"] = v + k
    for ln in ("ln_pre", "ln_post"):
        for p in ("weight", "bias"):
            m[f"backbone.{ln}.{p}"] = f"{v}{ln}.{p}"
    block_keys = [
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_1.weight",
        "ln_1.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ]
    for i in range(vision_layers):
        for k in block_keys:
            m[f"backbone.transformer.resblocks.{i}.{k}"] = f"{v}transformer.resblocks.{i}.{k}"
    for i in range(text_layers):
        for k in block_keys:
            m[f"text_encoder.transformer.resblocks.{i}.{k}"] = f"backbone.clip.transformer.resblocks.{i}.{k}"
    m["text_encoder.token_embedding.weight"] = "backbone.clip.token_embedding.weight"
    m["text_encoder.positional_embedding"] = "backbone.clip.positional_embedding"
    m["text_encoder.text_projection"] = "backbone.clip.text_projection"
    m["backbone.deep_prompt_embeddings"] = "backbone.visual_prompts"
    m["prompt_proj"] = "relation_prompt"
    for p in ("weight", "bias"):
        m[f"text_encoder.ln_final.{p}"] = f"backbone.clip.ln_final.{p}"
        m[f"backbone.prompt_proj.{p}"] = f"prompt_proj.{p}"
        m[f"backbone.prompt_norm.{p}"] = f"token_norm.{p}"
        m[f"prompt_norm.{p}"] = f"unused_norm.{p}"
        m[f"decode_head.cls_proj.{p}"] = f"head.text_proj.{p}"
        m[f"decode_head.cls_proj_1.{p}"] = f"head.text_proj2.{p}"
        m[f"decode_head.tex_norm_1.{p}"] = f"head.text_norm.{p}"
        m[f"decode_head.vis_proj_1.{p}"] = f"head.image_proj.{p}"
        m[f"decode_head.vis_norm_1.{p}"] = f"head.image_norm.{p}"
    return m


def _check_config(config: RPNConfig) -> None:
    if not isinstance(config, RPNConfig):
        raise TypeError(f"config must be an RPNConfig, got {type(config).__name__}")
    check_choice("variant", config.variant, ("complete", "public"))
    check_int("visual_prompts", config.visual_prompts, minimum=0)
    check_float("prompt_dropout", config.prompt_dropout, minimum=0.0)
    if config.prompt_dropout >= 1:
        raise ValueError(f"prompt_dropout must be in [0, 1), got {config.prompt_dropout}")
    check_choice("apg", config.apg, ("parameter", "linear"))
    check_choice("moe", config.moe, MOE_MODES)
    check_int("moe_rank", config.moe_rank, minimum=1)
    if not isinstance(config.moe_scales, Sequence) or not config.moe_scales:
        raise ValueError(f"moe_scales must be a non-empty sequence of scales in (0, 1], got {config.moe_scales!r}")
    for s in config.moe_scales:
        if not isinstance(s, (int, float)) or not 0 < s <= 1:
            raise ValueError(f"moe_scales must hold scales in (0, 1], got {config.moe_scales!r}")
    check_int("moe_k", config.moe_k, minimum=1)
    if config.moe == "sparse" and config.moe_k > len(config.moe_scales):
        raise ValueError(f"moe_k must be <= the number of experts ({len(config.moe_scales)}), got {config.moe_k}")
    check_float("balance_weight", config.balance_weight, minimum=0.0)
    check_choice("head", config.head, HEADS)
    if config.logit_scale is not None:
        check_float("logit_scale", config.logit_scale, positive=True)
    check_float("focal_weight", config.focal_weight, minimum=0.0)
    check_float("dice_weight", config.dice_weight, minimum=0.0)
    check_int("num_classes", config.num_classes, minimum=1)
    unseen = tuple(config.unseen_classes)
    for c in unseen:
        check_int("unseen_classes[i]", c, minimum=0)
        if c >= config.num_classes:
            raise ValueError(f"unseen_classes must be label ids < num_classes={config.num_classes}, got {c}")
    if len(set(unseen)) != len(unseen) or len(unseen) >= config.num_classes:
        raise ValueError(f"unseen_classes must be distinct and leave at least one seen class, got {unseen}")
    check_float("pseudo_label_threshold", config.pseudo_label_threshold, minimum=0.0)
    check_float("seen_score_bias", config.seen_score_bias, minimum=0.0)
    for name in ("prompt_norm", "itp_image", "itp_pixel", "moe_noisy", "learnable_scale", "self_training"):
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"{name} must be a bool, got {type(getattr(config, name)).__name__}")
    if config.variant == "public":
        wanted = {
            "moe": "none",
            "head": "lpm_c",
            "apg": "parameter",
            "itp_image": True,
            "itp_pixel": True,
            "learnable_scale": False,
            "prompt_norm": False,
            "logit_scale": None,
        }
        wrong = [f"{k}={getattr(config, k)!r} (must be {v!r})" for k, v in wanted.items() if getattr(config, k) != v]
        if wrong:
            raise ValueError("variant='public' is the public code's architecture; " + ", ".join(wrong))


def _layer_set(name: str, layers: Optional[Sequence[int]], n: int, *, default) -> set[int]:
    if layers is None:
        return set(default)
    if isinstance(layers, int) or not isinstance(layers, Sequence):
        raise TypeError(f"{name} must be a sequence of layer indices or None, got {type(layers).__name__}")
    out = set()
    for i in layers:
        check_int(f"{name}[i]", i)
        if not 0 <= i < n:
            raise ValueError(f"{name} must hold layer indices in [0, {n}), got {i}")
        out.add(i)
    return out


def _config_at_size(name: Union[str, dict], image_size: int) -> dict:
    """An open_clip config (dict) whose image tower is built for ``image_size``."""
    cfg = dict(clip_module._model_config(name)[1])
    cfg["vision_cfg"] = dict(cfg["vision_cfg"], image_size=image_size)
    return cfg


@contextlib.contextmanager
def _no_random_warning():
    # The backbone is built empty only to be filled from a checkpoint right after: no warning, and
    # the once-per-process flag is left as it was for genuinely random models.
    before = clip_module._warned_random
    clip_module._warned_random = True
    try:
        yield
    finally:
        clip_module._warned_random = before
