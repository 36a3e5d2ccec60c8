"""The CLIP layer against open_clip's own forward (exactness), and its additions against by-hand loops
over open_clip's blocks: sizes, layers, MaskCLIP dense features, visual and text prompts, checkpoints."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import open_clip  # the models extra, part of dev (scripts/setup_env.sh installs it)
import pytest
import torch
import torch.nn.functional as F

from ovseg_fast.models import CLIPBackbone, create_model
from ovseg_fast.models import clip as clip_module
from ovseg_fast.models.clip import resolve_templates
from tests.helpers import tiny_clip

# A ViT of width 64, 2 layers, patch 16 (4x4 grid at 64x64), text width 64, 2 layers.
TINY = tiny_clip(64)
NAMES = ["cat", "traffic light", "dog"]


def _close(actual, expected, scale=None):
    """Equal to float32 rounding of a few-layer network: relative to the tensor's magnitude."""
    scale = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-6 * max(scale, 1.0))


def tiny(**kwargs) -> CLIPBackbone:
    torch.manual_seed(0)
    return CLIPBackbone(TINY, image_size=64, **kwargs).eval()


def _manual_image(bb, images, prompts=None):
    """open_clip's own modules, block by block; ``prompts[i]`` (B, m, width) after [CLS] at layer i."""
    visual = bb.clip.visual
    x = visual._embeds(images)
    for i, blk in enumerate(visual.transformer.resblocks):
        m = 0
        if prompts is not None:
            m = prompts[i].shape[1]
            x = torch.cat([x[:, :1], prompts[i], x[:, 1:]], dim=1)
        x = blk(x)
        x = torch.cat([x[:, :1], x[:, 1 + m :]], dim=1)
    return x


# -- exactness ----------------------------------------------------------------------------------
def test_tiny_equals_open_clip_encode_image_and_encode_text():
    bb = tiny()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _close(bb.encode_image(images), bb.clip.encode_image(images))
        expected = F.normalize(bb.clip.encode_text(bb.tokenizer(NAMES)), dim=-1)
        _close(bb.encode_text(NAMES, templates=["{}"]), expected, scale=1.0)


def test_vit_b16_equals_open_clip_at_224():
    torch.manual_seed(0)
    bb = CLIPBackbone("ViT-B-16", image_size=224).eval()
    assert (bb.patch_size, bb.width, bb.embed_dim, bb.num_layers, bb.native_grid) == (16, 768, 512, 12, (14, 14))
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _close(bb.encode_image(images), bb.clip.encode_image(images))
        expected = F.normalize(bb.clip.encode_text(bb.tokenizer(["cat", "traffic light"])), dim=-1)
        _close(bb.encode_text(["cat", "traffic light"], templates=["{}"]), expected, scale=1.0)


# -- image side ---------------------------------------------------------------------------------
def test_any_size_matches_open_clip_built_for_that_size():
    bb = tiny()
    pos = bb.positional_embedding((6, 8))
    assert pos.shape == (1 + 48, 64)
    grid = bb.clip.visual.positional_embedding[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    by_hand = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[1:], by_hand.permute(0, 2, 3, 1).reshape(48, 64))
    torch.testing.assert_close(pos[:1], bb.clip.visual.positional_embedding[:1])

    other = open_clip.CLIP(**{**TINY, "vision_cfg": {**TINY["vision_cfg"], "image_size": (96, 128)}}).eval()
    state = dict(bb.clip.state_dict(), **{"visual.positional_embedding": pos})
    other.load_state_dict(state)
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        feats = bb.encode_image_features(images, layers=[0, -1])
        out = other.visual.forward_intermediates(images, indices=[0, 1])
    assert feats.layers == (0, 1)
    for ours, theirs in zip(feats.patch_tokens, out["image_intermediates"]):
        assert ours.shape == (2, 6, 8, 64)
        _close(ours, theirs.permute(0, 2, 3, 1))
    _close(feats.image_embedding, out["image_features"])
    _close(feats.patch_embeddings[1], bb.project(feats.patch_tokens[1]))
    _close(feats.cls_embeddings[1], feats.image_embedding)


def test_positional_embedding_is_cached_per_grid_and_follows_the_weights():
    bb = tiny()
    assert bb.positional_embedding((4, 4)) is bb.clip.visual.positional_embedding  # native: the weight itself
    first = bb.positional_embedding((6, 8))
    assert bb.positional_embedding((6, 8)) is first
    assert bb.positional_embedding((8, 8)) is not first
    with torch.no_grad():
        bb.clip.visual.positional_embedding.mul_(2)
    again = bb.positional_embedding((6, 8))
    torch.testing.assert_close(again, 2 * first)


def test_dense_features_are_maskclips_value_path():
    bb = tiny()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = bb.dense_features(images)
        visual = bb.clip.visual
        x = visual._embeds(images)
        for blk in visual.transformer.resblocks[:-1]:
            x = blk(x)
        last = visual.transformer.resblocks[-1]
        c = x.shape[-1]
        w_v, b_v = last.attn.in_proj_weight[2 * c :], last.attn.in_proj_bias[2 * c :]
        v = x + last.attn.out_proj(last.ln_1(x) @ w_v.T + b_v)
        v = v + last.mlp(last.ln_2(v))
        expected = (visual.ln_post(v[:, 1:]) @ visual.proj).reshape(2, 4, 4, -1)
    assert dense.shape == (2, 4, 4, 32)
    _close(dense, expected)


def test_deep_visual_prompts_sit_after_cls_and_are_dropped_after_each_layer():
    bb = tiny(visual_prompts=3)
    assert bb.visual_prompts.shape == (2, 3, 64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = bb.encode_image(images)
        prompts = [bb.visual_prompts[i].expand(2, -1, -1) for i in range(2)]
        x = _manual_image(bb, images, prompts)
        _close(ours, visual_proj(bb, x[:, 0]))
        assert not torch.allclose(ours, bb.clip.encode_image(images), atol=1e-3)  # the prompts do act


def visual_proj(bb, cls):
    return bb.clip.visual.ln_post(cls) @ bb.clip.visual.proj


def test_prompt_fn_gets_each_layers_tokens_and_adds_its_own():
    bb = tiny()
    images = torch.randn(2, 3, 64, 96)
    extra = torch.randn(2, 2, 2, 64)
    seen = []

    def prompt_fn(layer, cls, patches):
        seen.append((layer, tuple(cls.shape), tuple(patches.shape)))
        return extra[layer]

    with torch.no_grad():
        feats = bb.encode_image_features(images, prompt_fn=prompt_fn, dense=True)
        bb.clip.visual.positional_embedding.data = bb.positional_embedding((4, 6)).clone()  # for _manual_image
        x = _manual_image(bb, images, list(extra))
    assert seen == [(0, (2, 64), (2, 4, 6, 64)), (1, (2, 64), (2, 4, 6, 64))]
    _close(feats.image_embedding, visual_proj(bb, x[:, 0]))
    _close(feats.patch_tokens[0], x[:, 1:].reshape(2, 4, 6, 64))
    assert feats.dense.shape == (2, 4, 6, 32)


def test_prompt_fn_returning_none_changes_nothing_and_wrong_shapes_are_errors():
    bb = tiny()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            bb.encode_image_features(images, prompt_fn=lambda *a: None).image_embedding, bb.encode_image(images)
        )
    with pytest.raises(ValueError, match=r"prompt_fn must return \(B=1, m, 64\) tokens at layer 0, got \(1, 2, 32\)"):
        bb.encode_image_features(images, prompt_fn=lambda *a: torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match=r"layers must be in \[-2, 2\)"):
        bb.encode_image_features(images, layers=[2])
    with pytest.raises(ValueError, match="images: height and width must be multiples of the patch size 16"):
        bb.encode_image(torch.randn(1, 3, 64, 60))


def test_frozen_trains_only_the_added_prompts():
    bb = tiny(visual_prompts=2, text_context=3)
    added = list(bb.trainable_parameters())
    assert [tuple(p.shape) for p in added] == [(2, 2, 64), (3, 64)]
    assert all(not p.requires_grad for p in bb.clip.parameters())
    loss = bb.encode_image(torch.randn(1, 3, 64, 64)).sum() + bb.encode_text(["cat"]).sum()
    loss.backward()
    assert bb.visual_prompts.grad.abs().sum() > 0 and bb.text_context.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.clip.parameters())

    unfrozen = tiny(frozen=False)
    assert len(list(unfrozen.trainable_parameters())) == len(list(unfrozen.clip.parameters()))


# -- text side ----------------------------------------------------------------------------------
def test_prompt_ensembling_averages_normalised_templates():
    bb = tiny()
    templates = ["a photo of a {}.", "art of the {}."]
    with torch.no_grad():
        per_template = [F.normalize(bb.clip.encode_text(bb.tokenizer([t.format(c) for c in NAMES])), dim=-1)
                        for t in templates]
        expected = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        _close(bb.encode_text(NAMES, templates), expected, scale=1.0)
    assert len(resolve_templates("imagenet")) == 80 and resolve_templates("imagenet")[0] == "a bad photo of a {}."
    assert len(resolve_templates("short")) == 7
    assert resolve_templates(None) == ("a photo of a {}.",)
    with pytest.raises(ValueError, match=r"templates\[0\] must be a str with exactly one '\{\}'"):
        resolve_templates(["a photo"])
    with pytest.raises(ValueError, match="class_names must not be empty"):
        bb.encode_text([])


def test_text_is_encoded_in_chunks_with_the_same_result(monkeypatch):
    bb = tiny()
    with torch.no_grad():
        whole = bb.encode_text(NAMES, "short")
        monkeypatch.setattr(clip_module, "_TEXT_CHUNK", 4)  # 21 sequences in 6 calls of varying lengths
        bb._text_cache.clear()
        _close(bb.encode_text(NAMES, "short"), whole, scale=1.0)


def test_text_cache_is_keyed_on_names_templates_and_weights():
    bb = tiny()
    first = bb.encode_text(NAMES)
    assert bb.encode_text(NAMES) is first
    assert bb.encode_text(NAMES[:2]) is not first
    with torch.no_grad():
        bb.clip.text_projection.mul_(-1)
    torch.testing.assert_close(bb.encode_text(NAMES), -first)


def test_coop_context_initialised_from_a_prompt_equals_that_prompt():
    bb = tiny(text_context=4, text_prompt_init="a photo of a")
    plain = tiny()
    with torch.no_grad():
        _close(bb.encode_text(NAMES, ["{}."]), plain.encode_text(NAMES, ["a photo of a {}."]), scale=1.0)
    emb = bb.encode_text(NAMES, ["{}."])
    assert emb.requires_grad  # learnable context: not cached, differentiable
    with pytest.raises(ValueError, match="has 4 tokens: it initialises text_context or text_deep_prompts"):
        tiny(text_context=3, text_prompt_init="a photo of a")
    with pytest.raises(ValueError, match="exclusive"):
        tiny(text_context=2, text_deep_prompts=2)


def test_deep_text_prompts_replace_their_positions_at_every_layer():
    bb = tiny(text_deep_prompts=2)
    deep = bb.text_deep_prompts
    assert deep.shape == (2, 2, 64)
    clip = bb.clip
    with torch.no_grad():
        ours = bb.encode_text(["cat", "dog"], ["a {}."])
        tokens = bb.tokenizer(["X X a cat.", "X X a dog."])
        x = clip.token_embedding(tokens)
        x = torch.cat([x[:, :1], deep[0].expand(2, -1, -1), x[:, 3:]], dim=1) + clip.positional_embedding
        for i, blk in enumerate(clip.transformer.resblocks):  # all 77 positions, no truncation
            if i:
                x = torch.cat([x[:, :1], deep[i].expand(2, -1, -1), x[:, 3:]], dim=1)
            x = blk(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)[torch.arange(2), tokens.argmax(-1)] @ clip.text_projection
        _close(ours, F.normalize(x, dim=-1), scale=1.0)
    init = tiny(text_deep_prompts=4, text_prompt_init="a photo of a")
    torch.testing.assert_close(init.text_deep_prompts[1], init.token_embeddings("a photo of a"))


def test_learnable_words_inside_a_template():
    bb = tiny()
    words = torch.stack([bb.token_embeddings("cat"), bb.token_embeddings("dog")]).requires_grad_()
    emb = bb.encode_words(words, "a photo of a {}.")
    _close(emb.detach(), bb.encode_text(["cat", "dog"], ["a photo of a {}."]), scale=1.0)
    emb.sum().backward()
    assert words.grad.abs().sum() > 0
    two = bb.token_embeddings("traffic light").unsqueeze(0)
    assert two.shape == (1, 2, 64)
    expected = bb.encode_text(["traffic light"], ["{} in a video game."])
    _close(bb.encode_words(two, "{} in a video game.").detach(), expected, scale=1.0)
    with pytest.raises(ValueError, match=r"words must have shape \(K>0, n>0, 64\)"):
        bb.encode_words(torch.zeros(2, 1, 32))


# -- weights ------------------------------------------------------------------------------------
def test_random_weights_warn_once(monkeypatch):
    monkeypatch.setattr(clip_module, "_warned_random", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny()
        tiny()
    messages = [str(w.message) for w in caught if "RANDOM" in str(w.message)]
    assert len(messages) == 1 and "meaningless" in messages[0]


@pytest.mark.parametrize("form", ["pt", "state_dict", "module_prefix", "safetensors", "torchscript"])
def test_checkpoint_loads_from_a_local_file(tmp_path, form):
    source = tiny()
    state = {k: v.clone() for k, v in source.clip.state_dict().items()}
    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.pt")
    if form == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif form == "state_dict":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif form == "torchscript":  # OpenAI's files are scripted models
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
            torch.jit.save(torch.jit.script(source.clip), str(path))
    elif form == "module_prefix":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    torch.manual_seed(1)
    loaded = CLIPBackbone(TINY, path, image_size=64)
    assert loaded.checkpoint == str(path)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), source.encode_image(images))


def test_checkpoint_name_is_resolved_under_the_weights_dir(tmp_path, monkeypatch):
    source = tiny()
    (tmp_path / "custom-config").mkdir()
    torch.save(source.clip.state_dict(), tmp_path / "custom-config" / "mine.bin")
    monkeypatch.setenv("OVSEG_WEIGHTS_DIR", str(tmp_path))
    loaded = CLIPBackbone(TINY, "mine", image_size=64)
    assert loaded.checkpoint == str(tmp_path / "custom-config" / "mine.bin")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint file 'other'.*tried: .*other\.safetensors"):
        CLIPBackbone(TINY, "other", image_size=64)


def test_missing_file_and_other_architecture_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("OVSEG_WEIGHTS_DIR", raising=False)
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint file '{missing}'.*OVSEG_WEIGHTS_DIR is not set"):
        CLIPBackbone(TINY, missing)
    wider = copy.deepcopy(TINY)
    wider["vision_cfg"]["width"] = 128
    path = tmp_path / "wider.pt"
    torch.save(open_clip.CLIP(**wider).state_dict(), path)
    with pytest.raises(ValueError, match=rf"{path} is not a checkpoint of custom-config; shapes differ: .*conv1"):
        CLIPBackbone(TINY, path)
    state = tiny().clip.state_dict()
    state.pop("logit_scale")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: logit_scale; not in the model: extra\.weight"):
        CLIPBackbone(TINY, path)


def test_constructor_checks():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        CLIPBackbone("ViT-Q-99")
    with pytest.raises(ValueError, match="needs vision_cfg"):
        CLIPBackbone({"embed_dim": 8, "text_cfg": {}})
    with pytest.raises(ValueError, match="image_size must be a multiple of the patch size 16"):
        CLIPBackbone(TINY, image_size=70)
    with pytest.raises(ValueError, match="only ViT image towers"):
        CLIPBackbone("RN50")
    with pytest.raises(ValueError, match="patch_dropout > 0 are not supported"):
        CLIPBackbone({**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_dropout": 0.5}})


def test_ops_and_models_import_without_open_clip():
    code = (
        "import sys; sys.modules['open_clip'] = None\n"
        "import ovseg_fast.ops, ovseg_fast.models\n"
        "assert 'clip' in ovseg_fast.models.list_models()\n"
        "try:\n    ovseg_fast.models.create_model('clip')\nexcept ImportError as e:\n    print(e)\n"
    )
    env = dict(os.environ, OVSEG_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pip install 'ovseg-fast[models]'" in out.stdout


# -- the bare `clip` segmentor -----------------------------------------------------------------
def test_clip_model_is_maskclip_cosine_logits():
    torch.manual_seed(0)
    model = create_model("clip", clip=TINY, image_size=64, templates=("a photo of a {}.",)).eval()
    assert (model.patch_size, model.output_stride) == (16, 16)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(images, NAMES)
        dense = F.normalize(model.backbone.dense_features(images), dim=-1)
        text = model.backbone.encode_text(NAMES, ["a photo of a {}."])
        expected = model.backbone.logit_scale * torch.einsum("bhwd,cd->bchw", dense, text)
    assert logits.shape == (2, 3, 4, 6)
    _close(logits, expected)
    probs = model.predict(images, NAMES, mode="slide", crop=64, stride=32)
    assert probs.shape == (2, 3, 64, 96)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 96))
    losses = model.loss(logits, torch.randint(0, 3, (2, 64, 96)))
    assert losses["loss_ce"].item() > 0
    assert list(model.trainable_parameters()) == []
