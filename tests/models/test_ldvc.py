"""LDVC on a tiny CLIP: shapes of every ablation switch, which parameters train, LCSA with every window
equal to dense attention, the "pretrain" text prompts reproducing the hand-written sentence, kernels
against the reference backend, one-batch overfitting, and the input checks."""

from __future__ import annotations

import pytest
import torch

from ovseg_fast import ops
from ovseg_fast.models import TextEmbeddings, create_model, list_models, model_config
from ovseg_fast.models.ldvc import LDVC, DenseSelfAttention, frozen_text_layer_inputs
from ovseg_fast.ops import RoutedAttention
from tests.helpers import require_backend, tiny_clip

# 128x128 images: an 8x8 grid, routed in 4x4 windows of 2x2 tokens, each window attending to 4.
SIZE = 128
NAMES = ["cat", "traffic light", "dog"]
TINY = dict(clip=tiny_clip(SIZE), image_size=SIZE, num_windows=4, topk=4, visual_prompts=3, num_heads=4)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tensors this small cost less than a thread hand-off: on a loaded 2-core machine two threads
    # made a training step 6x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_ldvc(seed: int = 0, **overrides) -> LDVC:
    torch.manual_seed(seed)
    return create_model("ldvc", **{**TINY, **overrides})


def images(b: int = 2, h: int = SIZE, w: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_registered_presets():
    assert {"ldvc", "ldvc_voc", "ldvc_coco", "ldvc_coco_full"} <= set(list_models())
    assert model_config("ldvc_voc").visual_prompts == 40
    assert model_config("ldvc_coco").visual_prompts == 100
    assert model_config("ldvc_coco_full").visual_prompts == 100
    voc = model_config("ldvc_voc")
    assert (voc.text_prompts, voc.text_prompt, voc.decoder_blocks, voc.num_windows, voc.topk) == (
        6,
        "a photo of a",
        2,
        8,
        16,
    )
    model = create_model("ldvc_coco", **TINY)
    assert model.backbone.visual_prompts.shape[:2] == (2, 3)  # the override wins over the preset


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"vlpt": "visual"},
        {"vlpt": "text"},
        {"vlpt": "off"},
        {"attention": "dense"},
        {"topk": 1},
        {"decoder_blocks": 1},
        {"decoder_blocks": 3, "decoder_layers": (0, 1, 1)},
        {"text_prompt_init": "random"},
        {"text_prompts": 4},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_shapes_for_every_switch(overrides):
    model = tiny_ldvc(**overrides)
    x = images(2, SIZE, 96)  # a non-square grid: 8x6 tokens, short windows on the right
    logits = model(x, NAMES)
    assert logits.shape == (2, 3, 8, 6)
    assert torch.isfinite(logits).all()
    assert logits.abs().max() <= model.config.logit_scale + 1e-4  # cosine logits
    losses = model.loss(logits, torch.randint(0, 3, (2, SIZE, 96)))
    assert set(losses) == {"loss_focal", "loss_dice"}
    assert all(torch.isfinite(v) for v in losses.values())
    probs = model.predict(x, NAMES, mode="slide", crop=SIZE, stride=64)
    assert probs.shape == (2, 3, SIZE, 96)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, SIZE, 96))


def test_switches_build_what_they_say():
    assert tiny_ldvc(vlpt="off").backbone.visual_prompts is None
    assert tiny_ldvc(vlpt="off").text_prompt_offsets is None
    assert tiny_ldvc(vlpt="text").backbone.visual_prompts is None
    assert tiny_ldvc(vlpt="visual").text_prompt_offsets is None
    both = tiny_ldvc()
    assert both.text_prompt_offsets.shape == (2, 6, 64)  # text layers, slots, text width
    assert both.backbone.visual_prompts.shape == (2, 3, 64)
    assert all(isinstance(b.self_attn, RoutedAttention) and b.self_attn.topk == 4 for b in both.decoder.blocks)
    assert all(isinstance(b.self_attn, DenseSelfAttention) for b in tiny_ldvc(attention="dense").decoder.blocks)
    assert len(tiny_ldvc(decoder_blocks=3).decoder.blocks) == 3
    assert both.decoder_layers == (0, 1)  # evenly spaced over the 2 layers, ending at the last
    assert create_model("ldvc", **{**TINY, "clip": tiny_clip(SIZE, layers=12)}).decoder_layers == (5, 11)


def test_gradients_reach_exactly_the_trainable_parameters():
    model = tiny_ldvc()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_prefixes = ("backbone.visual_prompts", "text_prompt_offsets", "adapter", "decoder.")
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(expected_prefixes)}
    assert not any(n.startswith("backbone.clip.") for n in trainable)
    model.train()
    logits = model(images(), NAMES)
    sum(model.loss(logits, torch.randint(0, 3, (2, SIZE, SIZE))).values()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    # Every layer's prompts get their own gradient (deep prompts, not only the first layer's).
    assert (model.backbone.visual_prompts.grad.flatten(1).abs().sum(1) > 0).all()
    assert (model.text_prompt_offsets.grad.flatten(1).abs().sum(1) > 0).all()



def test_unfrozen_clip_trains_both_towers():
    # frozen=False: CLIP's own weights train beside LDVC's parts (a tiny CLIP from scratch on the
    # synthetic shapes data); the text tower's weights get gradients through the prompted encoder.
    model = tiny_ldvc(frozen=False)
    assert model.backbone.frozen is False
    params = dict(model.named_parameters())
    assert all(p.requires_grad for n, p in params.items() if n.startswith("backbone.clip."))
    model.train()
    logits = model(images(), NAMES)
    sum(model.loss(logits, torch.randint(0, 3, (2, SIZE, SIZE))).values()).backward()
    for name in ("backbone.clip.visual.conv1.weight",
                 "backbone.clip.visual.transformer.resblocks.0.attn.in_proj_weight",
                 "backbone.clip.token_embedding.weight", "backbone.clip.transformer.resblocks.0.mlp.c_fc.weight",
                 "decoder.blocks.0.self_attn.qkv.weight"):
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"{name} got no gradient"
    # The text tower frozen again (what configs/shapes_ldvc.toml's [model] freeze does): the class
    # embeddings still follow the trainable prompt offsets, and the frozen weights get no gradient.
    model.zero_grad(set_to_none=True)
    for n, p in params.items():
        if n.startswith(("backbone.clip.transformer.", "backbone.clip.token_embedding")):
            p.requires_grad_(False)
    sum(model.loss(model(images(), NAMES), torch.randint(0, 3, (2, SIZE, SIZE))).values()).backward()
    assert params["backbone.clip.transformer.resblocks.0.mlp.c_fc.weight"].grad is None
    assert model.text_prompt_offsets.grad is not None and model.text_prompt_offsets.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="frozen"):
        tiny_ldvc(frozen="no")

def test_lcsa_over_every_window_equals_dense_attention():
    routed = tiny_ldvc(topk=16).eval()  # 4x4 = 16 windows: every query window attends to all
    dense = tiny_ldvc(seed=5, attention="dense").eval()
    dense.load_state_dict(routed.state_dict())  # the same keys and shapes: one set of weights
    x = images()
    text = routed.encode(NAMES)
    with torch.no_grad():
        torch.testing.assert_close(routed(x, text), dense(x, text), rtol=1e-4, atol=1e-5)
    # And the routing does something: with top-1 the same weights give another result.
    sparse = tiny_ldvc(topk=1).eval()
    sparse.load_state_dict(routed.state_dict())
    with torch.no_grad():
        assert (sparse(x, text) - dense(x, text)).abs().max() > 1e-3


def test_pretrain_text_prompts_reproduce_the_hand_written_sentence():
    # "a photo of a" is 4 tokens: with 4 slots and zero offsets the prompted encoder computes the
    # frozen encoder's "a photo of a {class}." exactly (up to float rounding).
    model = tiny_ldvc(text_prompts=4, template="{}.").eval()
    assert model.text_prompt_offsets.abs().sum() == 0
    frozen = model.backbone.encode_text(NAMES, ["a photo of a {}."])
    ours = model.encode_classes(NAMES).embeddings
    torch.testing.assert_close(ours, frozen, rtol=0, atol=2e-6)
    # The per-layer content differs between layers (it is not the token embeddings repeated).
    base = model.text_prompt_base
    torch.testing.assert_close(base[0], model.backbone.token_embeddings("a photo of a"))
    assert (base[1] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(base, frozen_text_layer_inputs(model.backbone, "a photo of a"))
    # The prompts are live: a non-zero offset in the last layer changes the embedding.
    with torch.no_grad():
        model.text_prompt_offsets[-1].normal_()
    assert (model.encode_classes(NAMES).embeddings - frozen).abs().max() > 1e-3
    # Six slots (the paper's) keep the hand-written content in the last four, next to the class.
    six = tiny_ldvc(text_prompts=6)
    torch.testing.assert_close(six.text_prompt_base[:, 2:], base)
    # The random initialisation has nothing of it.
    rnd = tiny_ldvc(text_prompts=4, text_prompt_init="random")
    assert (rnd.text_prompt_base - base).abs().max() > 1e-2


def test_text_embeddings_cached_without_grad_and_differentiable_with():
    model = tiny_ldvc()
    with torch.no_grad():
        a = model.encode_classes(NAMES).embeddings
        b = model.encode_classes(NAMES).embeddings
    assert a is b and not a.requires_grad
    c = model.encode_classes(NAMES).embeddings
    assert c.requires_grad
    torch.testing.assert_close(c.detach(), a)
    with torch.no_grad():
        # An optimizer step (in place): the cache must not serve the old embeddings.
        model.text_prompt_offsets.add_(0.1 * torch.randn_like(model.text_prompt_offsets))
        d = model.encode_classes(NAMES).embeddings
    assert (d - a).abs().max() > 1e-4


def test_kernels_match_the_reference_backend():
    require_backend("routed_attention", "cpu")
    require_backend("lpm", "cpu")
    model = tiny_ldvc().train()
    x, targets = images(), torch.randint(0, 3, (2, SIZE, SIZE), generator=torch.Generator().manual_seed(2))

    def run(backend):
        model.zero_grad(set_to_none=True)
        with ops.use_backend(backend):
            loss = sum(model.loss(model(x, NAMES), targets).values())
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    loss_k, grads_k = run("cpu")
    loss_r, grads_r = run("reference")
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-5)
    assert grads_k.keys() == grads_r.keys()
    for name in grads_r:
        scale = max(grads_r[name].abs().max().item(), 1e-3)
        torch.testing.assert_close(grads_k[name], grads_r[name], rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_overfits_one_batch():
    model = tiny_ldvc().train()
    x = images(2, SIZE, SIZE, seed=3)
    # Block labels on the token grid (a class per 2x2 window-sized patch of 32x32 pixels).
    gen = torch.Generator().manual_seed(4)
    coarse = torch.randint(0, 3, (2, 4, 4), generator=gen)
    targets = coarse.repeat_interleave(32, 1).repeat_interleave(32, 2)
    targets[:, :4] = 255  # an ignored band
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=5e-3)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = sum(model.loss(model(x, NAMES), targets).values())
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    model.eval()
    with torch.no_grad():
        final = sum(model.loss(model(x, NAMES), targets).values()).item()
        pred = model.predict(x, NAMES).argmax(1)
    valid = targets != 255
    accuracy = (pred[valid] == targets[valid]).float().mean().item()
    assert final < 0.2 * first, (first, final)
    assert accuracy > 0.95, accuracy


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"vlpt": "deep"}, ValueError, "vlpt"),
        ({"attention": "sparse"}, ValueError, "attention"),
        ({"text_prompt_init": "zeros"}, ValueError, "text_prompt_init"),
        ({"topk": 17}, ValueError, "topk"),
        ({"decoder_layers": (0,)}, ValueError, "decoder_layers"),
        ({"decoder_layers": (0, 5)}, ValueError, "decoder_layers"),
        ({"text_prompts": 3}, ValueError, "text_prompt"),
        ({"text_prompts": 0}, ValueError, "text_prompts"),
        ({"visual_prompts": 0}, ValueError, "visual_prompts"),
        ({"template": "a photo"}, ValueError, "template"),
        ({"num_heads": 5}, ValueError, "num_heads"),
        ({"logit_scale": 0.0}, ValueError, "logit_scale"),
        ({"decoder_blocks": 0}, ValueError, "decoder_blocks"),
    ],
)
def test_config_checks(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_ldvc(**overrides)


def test_input_checks():
    model = tiny_ldvc()
    with pytest.raises(ValueError, match="dimension"):
        model(images(), TextEmbeddings(torch.randn(3, 16), tuple(NAMES)))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(images(2, 100, SIZE), NAMES)
    with pytest.raises(TypeError, match="class_names"):
        model.encode_classes("cat")
    logits = model(images(), NAMES)
    with pytest.raises(ValueError, match="batch"):
        model.loss(logits, torch.zeros(3, SIZE, SIZE, dtype=torch.long))
    with pytest.raises(TypeError, match="targets"):
        model.loss(logits, torch.zeros(2, SIZE, SIZE))
    with pytest.raises(TypeError, match="LDVCConfig"):
        LDVC({"vlpt": "both"})
