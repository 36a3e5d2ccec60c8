"""LDVC: Language-Driven Visual Consensus for zero-shot semantic segmentation (Zhang et al., TCSVT 2024).

The paper released no code; this is a reimplementation from its description, read top to bottom as
its figure:

1. **Vision-language prompt tuning (VLPT).** CLIP's towers (ViT-B/16) stay frozen (``frozen=False``
   trains them too). The image tower gets VPT-deep prompts (``visual_prompts`` learnable tokens in
   every layer, random init); the text tower gets deep prompts (``text_prompts`` tokens in every
   layer, right after the start token).
   The text prompts are ``P_l = P_l^0 + Delta_l``: ``Delta_l`` is learnable and starts at 0,
   ``P_l^0`` is fixed: with ``text_prompt_init="pretrain"`` the *content* the hand-written prompt
   ``"a photo of a"`` has at the input of layer ``l`` of the frozen text encoder (layer 0: its
   token embeddings), so that at ``Delta = 0`` the class embedding of ``[SOT] P cat. [EOT]`` is the
   frozen encoder's embedding of ``"a photo of a cat."`` (causal attention: tokens before the class
   name never see it, so the frozen hidden states of the prompt alone are those of the full
   sentence); with ``"random"``, ``P^0 ~ N(0, 0.02^2)`` (the paper's ablation).
2. **Text adapter.** The class embeddings ``t`` (C, D) meet the image's global embedding ``g`` (B, D):
   ``t' = LayerNorm(W [t * g; t] + b)`` (:func:`ovseg_fast.ops.hadamard_concat_linear`, mode ``c``).
3. **Local consensus transformer decoder (LCTD).** ``x_0`` = MaskCLIP's dense features of the last
   layer (B, h, w, D); block ``i`` takes the patch tokens ``z_i`` of one intermediate CLIP layer:

   .. math::
       x &= x + \\mathrm{Conv}_{1\\times1}(\\mathrm{LN}(z_i)) \\\\
       x &= x + \\mathrm{LCSA}(\\mathrm{LN}(x)) \\\\
       x &= x + \\mathrm{CA}(\\mathrm{LN}(x), t') \\\\
       x &= x + \\mathrm{MLP}(\\mathrm{LN}(x))

   LCSA, the local consensus self-attention, is bi-level routing attention
   (:class:`ovseg_fast.ops.RoutedAttention`): ``num_windows`` x ``num_windows`` windows (8 x 8 windows
   of 4 x 4 tokens on the 32 x 32 grid of a 512 x 512 image), each query window attends to the
   tokens of its ``topk`` (16) best windows, routed by window-averaged queries and keys, plus LEPE.
   CA is multi-head cross-attention with the image tokens as queries and the adapted class
   embeddings ``t'`` as keys and values (``scaled_dot_product_attention``).
4. **Logits.** ``s_{bc}(p) = tau * cos(LN(x)(p), t'_{bc})`` (B, C, h, w); trained with sigmoid focal
   (weight 100) + dice (weight 1) on the logits upsampled to the labels; slide inference from
   :class:`~ovseg_fast.models.base.Segmentor`.

Choices the paper leaves open, and ours: the decoder width is CLIP's joint-space width D (512), as
``x_0`` and ``t'`` live there; block ``i`` takes CLIP layer ``round((i + 1) L / n) - 1`` (layers 6
and 12 of 12 for 2 blocks, 1-based); ``z_i`` is layer-normalised before its 1x1 conv (the raw
residual stream's scale grows with depth); ``g`` and ``t`` are L2-normalised; ``tau`` = 10 fixed;
linear weights truncated-normal (0.02). With more text prompt slots than the hand-written prompt
has tokens (the paper's 6 vs the 4 of ``"a photo of a"``), the prompt's content takes the last
slots (next to the class name) and the leading ones start random, so the exact reproduction of the
hand-written sentence holds when the counts are equal (``text_prompts=4``).

Registered as ``ldvc`` and ``ldvc_voc`` (VOC 15 seen / 5 unseen: 40 visual prompts per layer),
``ldvc_coco`` (COCO-Stuff 156 / 15: 100) and ``ldvc_coco_full`` (COCO-Stuff 171 fully supervised:
100); the splits are the data's business, the presets differ in their defaults only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg_fast.models.base import Segmentor, TextEmbeddings, _resize, check_class_names
from ovseg_fast.models.clip import _PLACEHOLDER, CLIPBackbone, _block
from ovseg_fast.models.losses import DICE_WEIGHT, FOCAL_WEIGHT, focal_dice_losses
from ovseg_fast.models.registry import register_model
from ovseg_fast.ops import RoutedAttention, hadamard_concat_linear
from ovseg_fast.ops._checks import check_choice, check_float, check_int, check_tensor

__all__ = [
    "LDVC",
    "ClassCrossAttention",
    "DenseSelfAttention",
    "LDVCConfig",
    "LocalConsensusBlock",
    "LocalConsensusDecoder",
    "frozen_text_layer_inputs",
]

VLPT_MODES = ("both", "visual", "text", "off")
TEXT_INITS = ("pretrain", "random")
ATTENTIONS = ("lcsa", "dense")


@dataclasses.dataclass
class LDVCConfig:
    """Config of ``ldvc`` and ``ldvc_voc``: LDVC on ViT-B/16 at 512x512, PASCAL VOC's 40 visual prompts.

    ``ldvc_coco`` and ``ldvc_coco_full`` differ only in ``visual_prompts`` (100).

    - ``clip``, ``image_size``: open_clip model name (or config dict) and working input size.
    - ``vlpt``: which towers get deep prompts: ``"both"``, ``"visual"``, ``"text"`` or ``"off"``.
    - ``visual_prompts``: VPT-deep tokens per vision layer (40 VOC, 100 COCO-Stuff).
    - ``text_prompts``: deep prompt tokens per text layer (6); ``text_prompt_init``: ``"pretrain"``
      (the frozen encoder's per-layer content of ``text_prompt``) or ``"random"``;
      ``text_prompt``: the hand-written prompt (``"a photo of a"``); ``template``: what follows the
      prompt slots, ``{}`` the class name.
    - ``decoder_blocks``: LCTD blocks (2); ``decoder_layers``: the CLIP layer (0-based) each block
      takes, default evenly spaced ending at the last; ``num_heads``, ``mlp_ratio``: of the blocks.
    - ``attention``: ``"lcsa"`` (routed) or ``"dense"`` (plain self-attention, same weights);
      ``num_windows`` (8: windows per side), ``topk`` (16), ``lepe_kernel`` (5, 0 = no LEPE).
    - ``logit_scale``: tau of the cosine logits; ``focal_weight``, ``dice_weight``: 100 and 1.
    - ``frozen``: freeze CLIP's weights (the paper's setting); False trains them too, e.g. a tiny
      random CLIP learnt from scratch on the synthetic shapes data (configs/shapes_ldvc.toml, whose
      ``[model] freeze`` keeps the text tower fixed).
    """

    clip: Union[str, dict] = "ViT-B-16"
    image_size: int = 512
    vlpt: str = "both"
    visual_prompts: int = 40
    text_prompts: int = 6
    text_prompt_init: str = "pretrain"
    text_prompt: str = "a photo of a"
    template: str = "{}."
    decoder_blocks: int = 2
    decoder_layers: Optional[tuple[int, ...]] = None
    num_heads: int = 8
    mlp_ratio: float = 4.0
    attention: str = "lcsa"
    num_windows: int = 8
    topk: int = 16
    lepe_kernel: int = 5
    logit_scale: float = 10.0
    focal_weight: float = FOCAL_WEIGHT
    dice_weight: float = DICE_WEIGHT
    frozen: bool = True


@dataclasses.dataclass
class LDVCCocoConfig(LDVCConfig):
    """``ldvc_coco``: COCO-Stuff 156 seen / 15 unseen classes, 100 visual prompts per layer."""

    visual_prompts: int = 100


@dataclasses.dataclass
class LDVCCocoFullConfig(LDVCCocoConfig):
    """``ldvc_coco_full``: COCO-Stuff, all 171 classes supervised, 100 visual prompts per layer."""


# -- the decoder ----------------------------------------------------------------------------------
class DenseSelfAttention(RoutedAttention):
    """Plain (dense) self-attention with :class:`RoutedAttention`'s weights (``qkv``, LEPE, ``proj``):
    the LCTD ablation without routing. Every token attends to every token through SDPA; a state dict
    moves between the two modules, and LCSA with ``topk`` = all windows computes the same function."""

    def __init__(self, dim: int, num_heads: int, lepe_kernel: int = 5) -> None:
        super().__init__(dim, num_heads, num_windows=1, topk=1, lepe_kernel=lepe_kernel)

    def _attend(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        if self.lepe is not None:
            v_map = qkv.select(2, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
            out = out + self.lepe(v_map).permute(0, 2, 3, 1)
        return self.proj(out)


class ClassCrossAttention(nn.Module):
    """Multi-head cross-attention: image tokens x (B, N, D) query the class embeddings t (B, C, D).

    ``softmax(q k^T / sqrt(d)) v`` per head, with ``q = W_q x``, ``k = W_k t``, ``v = W_v t`` and the
    output projection; the attention over the C classes pulls each pixel toward its class anchors.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        b, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(x).view(b, n, heads, d).transpose(1, 2)
        k, v = self.kv(t).view(b, t.shape[1], 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class LocalConsensusBlock(nn.Module):
    """One LCTD block on (B, h, w, D) features; see the module docstring for its four residual steps."""

    def __init__(
        self,
        dim: int,
        clip_width: int,
        *,
        num_heads: int,
        mlp_ratio: float,
        attention: str,
        num_windows: int,
        topk: int,
        lepe_kernel: int,
    ) -> None:
        super().__init__()
        self.lateral_norm = nn.LayerNorm(clip_width)
        self.lateral = nn.Linear(clip_width, dim)  # a 1x1 conv on channels-last tokens
        self.norm1 = nn.LayerNorm(dim)
        if attention == "lcsa":
            self.self_attn: RoutedAttention = RoutedAttention(
                dim, num_heads, num_windows, topk, lepe_kernel=lepe_kernel
            )
        else:
            self.self_attn = DenseSelfAttention(dim, num_heads, lepe_kernel=lepe_kernel)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = ClassCrossAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        hidden = round(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = x + self.lateral(self.lateral_norm(z))
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x).view(b, h * w, c), t).view(b, h, w, c)
        return x + self.mlp(self.norm3(x))


class LocalConsensusDecoder(nn.Module):
    """The LCTD: ``blocks`` :class:`LocalConsensusBlock` s, then a LayerNorm.

    ``forward(x (B, h, w, D), zs [(B, h, w, clip_width)] * blocks, t (B, C, D)) -> (B, h, w, D)``.
    """

    def __init__(self, dim: int, clip_width: int, blocks: int, **block_kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LocalConsensusBlock(dim, clip_width, **block_kwargs) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_weights)

    def forward(self, x: Tensor, zs: Sequence[Tensor], t: Tensor) -> Tensor:
        for blk, z in zip(self.blocks, zs):
            x = blk(x, z, t)
        return self.norm(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# -- the text prompts -----------------------------------------------------------------------------
@torch.no_grad()
def frozen_text_layer_inputs(backbone: CLIPBackbone, text: str) -> Tensor:
    """(layers, n, text_width): what the n tokens of ``text`` are at the input of every layer of the
    frozen text encoder when ``[SOT] text`` is encoded (layer 0: the token embeddings, before the
    positional embedding, which is where deep prompts replace them)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty str, got {text!r}")
    clip = backbone.clip
    tokens = backbone.tokenize([text])
    eot = int(tokens[0].argmax())
    tokens = tokens[:, : eot + 1]
    n = eot - 1
    x = clip.token_embedding(tokens).to(clip.transformer.get_cast_dtype())
    states = [x[0, 1 : 1 + n]]
    x = x + clip.positional_embedding[: tokens.shape[1]].to(x.dtype)
    mask = clip.attn_mask
    mask = mask[: tokens.shape[1], : tokens.shape[1]].to(x.dtype) if mask is not None else None
    for blk in list(clip.transformer.resblocks)[:-1]:
        x = _block(blk, x, mask)
        states.append(x[0, 1 : 1 + n])
    return torch.stack(states).clone()


def _check_config(config: LDVCConfig) -> None:
    check_choice("vlpt", config.vlpt, VLPT_MODES)
    check_choice("text_prompt_init", config.text_prompt_init, TEXT_INITS)
    check_choice("attention", config.attention, ATTENTIONS)
    check_int("image_size", config.image_size, minimum=1)
    check_int("visual_prompts", config.visual_prompts, minimum=0)
    check_int("text_prompts", config.text_prompts, minimum=0)
    check_int("decoder_blocks", config.decoder_blocks, minimum=1)
    check_int("num_heads", config.num_heads, minimum=1)
    check_int("num_windows", config.num_windows, minimum=1)
    check_int("topk", config.topk, minimum=1)
    check_int("lepe_kernel", config.lepe_kernel, minimum=0)
    check_float("mlp_ratio", config.mlp_ratio, positive=True)
    check_float("logit_scale", config.logit_scale, positive=True)
    check_float("focal_weight", config.focal_weight, minimum=0.0)
    check_float("dice_weight", config.dice_weight, minimum=0.0)
    if config.topk > config.num_windows**2:
        raise ValueError(f"topk ({config.topk}) must be at most num_windows ** 2 = {config.num_windows ** 2}")
    if not isinstance(config.template, str) or config.template.count("{}") != 1:
        raise ValueError(f"template must be a str with exactly one '{{}}', got {config.template!r}")
    if not isinstance(config.text_prompt, str) or not config.text_prompt.strip():
        raise ValueError(f"text_prompt must be a non-empty str, got {config.text_prompt!r}")
    if config.vlpt in ("both", "text") and config.text_prompts == 0:
        raise ValueError(f"vlpt={config.vlpt!r} needs text_prompts >= 1")
    if config.vlpt in ("both", "visual") and config.visual_prompts == 0:
        raise ValueError(f"vlpt={config.vlpt!r} needs visual_prompts >= 1")


def _decoder_layers(config: LDVCConfig, num_layers: int) -> tuple[int, ...]:
    n = config.decoder_blocks
    if config.decoder_layers is None:
        return tuple(max(round((i + 1) * num_layers / n) - 1, 0) for i in range(n))
    layers = config.decoder_layers
    if isinstance(layers, (str, int)) or not isinstance(layers, Sequence) or len(layers) != n:
        raise ValueError(f"decoder_layers must be {n} CLIP layer indices (one per decoder block), got {layers!r}")
    out = []
    for i in layers:
        check_int("decoder_layers[i]", i)
        if not -num_layers <= i < num_layers:
            raise ValueError(f"decoder_layers must be in [-{num_layers}, {num_layers}), got {i}")
        out.append(i % num_layers)
    return tuple(out)


# -- the model ------------------------------------------------------------------------------------
@register_model("ldvc")
class LDVC(Segmentor):
    """LDVC (see the module docstring). ``forward(images, text)`` gives logits (B, C, H/16, W/16).

    ``encode_classes`` runs the prompted text encoder (differentiable in the text prompts while
    gradients are enabled, cached otherwise). Trainable: the visual prompts, the text prompt offsets,
    the text adapter and the decoder; CLIP is frozen unless ``config.frozen`` is False.
    """

    config_class = LDVCConfig

    def __init__(self, config: LDVCConfig, *, pretrained: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(config, LDVCConfig):
            raise TypeError(f"config must be an LDVCConfig, got {type(config).__name__}")
        _check_config(config)
        self.config = config
        visual = config.visual_prompts if config.vlpt in ("both", "visual") else 0
        self.backbone = CLIPBackbone(
            config.clip, pretrained, image_size=config.image_size, frozen=config.frozen, visual_prompts=visual
        )
        bb = self.backbone
        self.patch_size = self.output_stride = bb.patch_size
        self.decoder_layers = _decoder_layers(config, bb.num_layers)
        dim = bb.embed_dim
        if dim % config.num_heads:
            raise ValueError(f"num_heads ({config.num_heads}) must divide CLIP's embedding width {dim}")

        # Text prompts: fixed P^0 (a buffer, so checkpoints carry it) plus the learnable offsets.
        self.text_prompt_offsets: Optional[nn.Parameter] = None
        if config.vlpt in ("both", "text"):
            n = config.text_prompts
            base = torch.randn(bb.num_text_layers, n, bb.text_width) * 0.02
            if config.text_prompt_init == "pretrain":
                content = frozen_text_layer_inputs(bb, config.text_prompt)
                m = content.shape[1]
                if m > n:
                    raise ValueError(
                        f"text_prompt {config.text_prompt!r} has {m} tokens but text_prompts is {n}: "
                        f"set text_prompts >= {m} or use a shorter prompt"
                    )
                base[:, n - m :] = content
            self.register_buffer("text_prompt_base", base)
            self.text_prompt_offsets = nn.Parameter(torch.zeros_like(base))
        else:
            self.text_prompt_base = None
        self._text_cache: dict[tuple, Tensor] = {}

        self.adapter = nn.Linear(2 * dim, dim)
        self.adapter_norm = nn.LayerNorm(dim)
        _init_weights(self.adapter)
        self.decoder = LocalConsensusDecoder(
            dim,
            bb.width,
            config.decoder_blocks,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            attention=config.attention,
            num_windows=config.num_windows,
            topk=config.topk,
            lepe_kernel=config.lepe_kernel,
        )

    # -- text ---------------------------------------------------------------------------------------
    def text_prompts(self) -> Optional[Tensor]:
        """(text layers, n, text_width): the deep text prompts ``P^0 + Delta``, or None without them."""
        if self.text_prompt_offsets is None:
            return None
        return self.text_prompt_base + self.text_prompt_offsets

    def encode_classes(self, class_names: Sequence[str]) -> TextEmbeddings:
        """(C, D) L2-normalised embeddings of ``[SOT] P_1..P_n template(class) [EOT]``."""
        bb = self.backbone
        names = check_class_names("class_names", class_names)
        prompts = self.text_prompts()
        watched = [self.text_prompt_offsets, self.text_prompt_base] if prompts is not None else []
        watched += bb._text_parameters()  # CLIP's text weights: frozen or not, a checkpoint load changes them
        # A graph when anything of the text path trains: the prompt offsets, or the text tower itself
        # (frozen=False without a freeze of it).
        need_graph = torch.is_grad_enabled() and any(p.requires_grad for p in watched)
        key = (names, tuple((id(p), p._version, p.data_ptr()) for p in watched))
        if not need_graph and key in self._text_cache:
            return TextEmbeddings(self._text_cache[key], names)
        n = 0 if prompts is None else prompts.shape[1]
        prefix = " ".join([_PLACEHOLDER] * n) + " " if n else ""
        tokens = bb.tokenize([prefix + self.config.template.format(c) for c in names])
        inserts = {} if prompts is None else dict(enumerate(prompts))
        with torch.set_grad_enabled(need_graph):
            emb = F.normalize(bb._encode_tokens(tokens, inserts, start=1), dim=-1)
        if not need_graph:
            self._text_cache = {key: emb}  # one entry: the class list of the current evaluation
        return TextEmbeddings(emb, names)

    # -- image --------------------------------------------------------------------------------------
    def adapt_classes(self, t: Tensor, g: Tensor) -> Tensor:
        """The text adapter: ``LayerNorm(W [t * g; t] + b)``, t (C, D), g (B, D) -> (B, C, D)."""
        return hadamard_concat_linear(
            t,
            g,
            self.adapter.weight,
            self.adapter.bias,
            mode="c",
            norm_weight=self.adapter_norm.weight,
            norm_bias=self.adapter_norm.bias,
            eps=self.adapter_norm.eps,
        )

    def segment(self, images: Tensor, text: TextEmbeddings) -> Tensor:
        dim = self.backbone.embed_dim
        check_tensor("text.embeddings", text.embeddings, ndim=(2,))
        if text.embeddings.shape[1] != dim:
            raise ValueError(f"text embeddings have dimension {text.embeddings.shape[1]}, the model's is {dim}")
        feats = self.backbone.encode_image_features(images, layers=self.decoder_layers, dense=True)
        by_layer = dict(zip(feats.layers, feats.patch_tokens))
        zs = [by_layer[i] for i in self.decoder_layers]
        x = feats.dense
        t = F.normalize(text.embeddings.to(x.dtype), dim=-1)
        g = F.normalize(feats.image_embedding, dim=-1)
        t_adapted = self.adapt_classes(t, g)
        x = self.decoder(x, zs, t_adapted)
        logits = torch.einsum("bhwd,bcd->bchw", F.normalize(x, dim=-1), F.normalize(t_adapted, dim=-1))
        return self.config.logit_scale * logits

    def loss(self, outputs: Tensor, targets: Tensor, *, ignore_index: int = 255) -> dict[str, Tensor]:
        """Sigmoid focal (x ``focal_weight``, 100) + dice (x ``dice_weight``, 1) of the logits
        upsampled bilinearly to the labels: ``{"loss_focal", "loss_dice"}``."""
        outputs, targets = self._check_loss_inputs(outputs, targets, ignore_index)
        logits = _resize(outputs, targets.shape[-2:]).float()
        return focal_dice_losses(
            logits,
            targets,
            ignore_index=ignore_index,
            focal_weight=self.config.focal_weight,
            dice_weight=self.config.dice_weight,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"vlpt={c.vlpt!r}, visual_prompts={c.visual_prompts}, text_prompts={c.text_prompts} "
            f"({c.text_prompt_init}: {c.text_prompt!r}), decoder_layers={self.decoder_layers}, "
            f"attention={c.attention!r}, num_windows={c.num_windows}, topk={c.topk}"
        )


@register_model("ldvc_voc")
class LDVCVoc(LDVC):
    """``ldvc_voc``: PASCAL VOC 2012, 15 seen / 5 unseen classes (the ``ldvc`` defaults)."""

    config_class = LDVCConfig


@register_model("ldvc_coco")
class LDVCCoco(LDVC):
    """``ldvc_coco``: COCO-Stuff 164k, 156 seen / 15 unseen classes; 100 visual prompts per layer."""

    config_class = LDVCCocoConfig


@register_model("ldvc_coco_full")
class LDVCCocoFull(LDVC):
    """``ldvc_coco_full``: COCO-Stuff 164k, all 171 classes supervised; 100 visual prompts per layer."""

    config_class = LDVCCocoFullConfig
