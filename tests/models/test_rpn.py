"""RPN on a tiny CLIP (2 layers, width 64, 64x64 images: a 4x4 grid): every switch's shapes, where the
gradients go, the M2oE against its multi-scale baseline, kernels against the reference backend, the
loss's seen/unseen handling, overfitting one batch, torch.compile, and the public code's layout (its
key map, strict loading, its forward written out by hand, its trainable-parameter count)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_fast import ops
from ovseg_fast.models import create_model, list_models, model_config
from ovseg_fast.models.rpn import COCO_STUFF_UNSEEN, RPN, public_key_map
from tests.helpers import require_backend, tiny_clip, tolerances

TINY = tiny_clip(64)
NAMES15 = [f"class {i}" for i in range(15)]
NAMES20 = [f"class {i}" for i in range(20)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: with 2 OpenMP threads on a loaded machine every op waits for a descheduled
    # thread (20x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str = "rpn", seed: int = 0, **overrides) -> RPN:
    torch.manual_seed(seed)
    return create_model(name, clip=TINY, image_size=64, **overrides)


def images(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_registered_presets():
    assert {"rpn", "rpn_voc", "rpn_coco", "rpn_voc_public"} <= set(list_models())
    voc, coco = model_config("rpn_voc"), model_config("rpn_coco")
    assert (voc.num_classes, voc.unseen_classes) == (20, (15, 16, 17, 18, 19))
    assert (coco.num_classes, coco.unseen_classes) == (171, COCO_STUFF_UNSEEN) and len(COCO_STUFF_UNSEEN) == 15
    public = model_config("rpn_voc_public")
    assert (public.variant, public.moe, public.prompt_norm) == ("public", "none", False)
    model = tiny("rpn_voc")
    assert model.registered_name == "rpn_voc" and model.seen_classes == tuple(range(15))
    assert model.seen_class_names(NAMES20) == NAMES15


SWITCHES = [
    {},
    {"moe": "multi_scale"},
    {"moe": "none"},
    {"moe_k": 2, "moe_noisy": False},
    {"moe_layers": (1,), "moe_rank": 8, "moe_scales": (1.0, 0.5)},
    {"itp_image": False},
    {"itp_pixel": False},
    {"itp_image": False, "itp_pixel": False},
    {"apg": "linear"},
    {"rpm_layers": ()},
    {"visual_prompts": 0},
    {"prompt_norm": False},
    {"head": "lpm_a"},
    {"head": "lpm_b"},
    {"head": "tfpm_a"},
    {"head": "tfpm_b"},
    {"head": "tfpm_c", "logit_scale": 10.0},
    {"learnable_scale": True},
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_shapes_of_every_switch(switches):
    model = tiny(**switches)
    model.train()
    out = model(images(), NAMES15)
    assert out.shape == (2, 15, 4, 4) and out.dtype == torch.float32 and torch.isfinite(out).all()
    losses = model.loss(out, torch.randint(0, 15, (2, 64, 64)))
    sparse = model.config.moe == "sparse"
    assert set(losses) == {"loss_focal", "loss_dice"} | ({"loss_balance"} if sparse else set())
    model.eval()
    scores = model.predict(images(1, 96), NAMES20, mode="slide", crop=64, stride=32)
    assert scores.shape == (1, 20, 96, 96)
    assert model.predict(images(1, 80), NAMES15).shape == (1, 15, 80, 80)


def test_public_variant_shapes():
    model = tiny("rpn_voc_public").train()
    assert model(images(), NAMES15).shape == (2, 15, 4, 4)
    with pytest.raises(ValueError, match="4x4"):
        model(images(1, 96), NAMES15)


def test_other_grids_interpolate_P():
    model = tiny().eval()
    with torch.no_grad():
        p = model._relation_matrix((8, 8))
        assert p.shape == (64, 64)
        # Bilinear resizing keeps the mean of P over the grid, the rescaling keeps the sum of M^T P.
        torch.testing.assert_close(p.sum(0), model._relation_matrix((4, 4)).sum(0), rtol=1e-5, atol=1e-5)
        assert model(images(1, 128), NAMES15).shape == (1, 15, 8, 8)


def test_gradients_reach_every_trainable_parameter_and_no_clip_weight():
    # k = E so that every expert gets images; noisy gating so that the noise gate learns too.
    model = tiny(moe_k=4, learnable_scale=True).train()
    out = model(images(), NAMES15)
    sum(model.loss(out, torch.randint(0, 15, (2, 64, 64))).values()).backward()
    clip_ids = {id(p) for p in model.backbone.clip.parameters()}
    trainable = dict(model.named_parameters())
    for name, p in trainable.items():
        if id(p) in clip_ids:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert sum(p.requires_grad for p in model.parameters()) > 0


def test_sparse_moe_with_all_experts_and_equal_gates_equals_multi_scale():
    sparse = tiny(moe_k=4).eval()
    for moe in sparse.moe.values():
        torch.nn.init.zeros_(moe.gate.weight)  # equal gates: softmax 1/E for every expert
    dense = tiny(moe="multi_scale", seed=1).eval()
    state = {k: v for k, v in sparse.state_dict().items() if "gate" not in k}
    dense.load_state_dict(state, strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x, NAMES15), dense(x, NAMES15), rtol=1e-5, atol=1e-5)


def _training_step(model, x, targets, backend):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks and gate noise on both backends
    with ops.use_backend(backend):
        out = model(x, NAMES15)
        losses = model.loss(out, targets)
        total = sum(losses.values())
        total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_training_step_reference_equals_kernels():
    require_backend("lpm", "cpu")
    require_backend("topk_gating", "cpu")
    require_backend("moe_dispatch", "cpu")
    model = tiny(moe_k=2).train()
    x, targets = images(4), torch.randint(0, 15, (4, 64, 64), generator=torch.Generator().manual_seed(1))
    ref_losses, ref_grads = _training_step(model, x, targets, "reference")
    cpu_losses, cpu_grads = _training_step(model, x, targets, "cpu")
    tol = tolerances(torch.float32)
    assert set(ref_losses) == set(cpu_losses) == {"loss_focal", "loss_dice", "loss_balance"}
    for k in ref_losses:
        torch.testing.assert_close(cpu_losses[k], ref_losses[k], **tol, msg=k)
    assert set(ref_grads) == set(cpu_grads)
    for k, g in ref_grads.items():
        scale = max(g.abs().max().item(), 1e-6)
        torch.testing.assert_close(cpu_grads[k], g, rtol=tol["rtol"], atol=tol["atol"] * scale * 10, msg=k)


def test_loss_zero_shot_targets_and_self_training():
    model = tiny().train()
    targets = torch.tensor([[[0, 15], [19, 255]]])  # seen 0, unseen 15 and 19, ignored
    logits_all = torch.randn(1, 20, 2, 2)
    # All 20 classes scored without self-training: unseen channels dropped, unseen pixels ignored.
    logits, t = model._training_targets(logits_all, targets, 255)
    assert logits.shape[1] == 15 and t.tolist() == [[[0, 255], [255, 255]]]
    # Only the 15 seen classes scored (the trainer's RestrictClasses): targets already index them.
    seen_targets = torch.tensor([[[0, 14], [255, 3]]])
    logits, t = model._training_targets(logits_all[:, :15], seen_targets, 255)
    assert logits.shape[1] == 15 and torch.equal(t, seen_targets)
    # Self-training: unseen pixels take the model's best unseen class.
    st = tiny(self_training=True).train()
    logits_all = torch.full((1, 20, 2, 2), -5.0)
    logits_all[0, 17, 0, 1] = 3.0
    logits_all[0, 18, 1, 0] = 2.0
    logits_all[0, 3] = 9.0  # a confident seen class never becomes a pseudo-label
    logits, t = st._training_targets(logits_all, targets, 255)
    assert logits.shape[1] == 20 and t.tolist() == [[[0, 17], [18, 255]]]
    st_thr = tiny(self_training=True, pseudo_label_threshold=0.9)
    _, t = st_thr._training_targets(logits_all, targets, 255)
    assert t.tolist() == [[[0, 17], [255, 255]]]
    # Another class list (fully supervised on the classes given): targets as they are.
    logits, t = model._training_targets(torch.randn(1, 3, 2, 2), torch.tensor([[[0, 2], [1, 255]]]), 255)
    assert logits.shape[1] == 3 and t.tolist() == [[[0, 2], [1, 255]]]


def test_balancing_loss_only_after_a_training_forward():
    model = tiny()
    model.train()
    out = model(images(), NAMES15)
    assert "loss_balance" in model.loss(out, torch.zeros(2, 64, 64, dtype=torch.long))
    model.eval()
    with torch.no_grad():
        out = model(images(), NAMES15)
    assert "loss_balance" not in model.loss(out, torch.zeros(2, 64, 64, dtype=torch.long))


def test_predict_scores_subtract_the_seen_bias():
    model = tiny().eval()
    x = images(1)
    with torch.no_grad():
        logits = model(x, NAMES20)
    scores = model.predict(x, NAMES20)
    expected = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False).sigmoid()
    expected[:, :15] -= 0.1
    torch.testing.assert_close(scores, expected)
    # Another class list: plain sigmoid scores.
    scores = model.predict(x, NAMES15[:3])
    assert scores.min() >= 0 and scores.max() <= 1


def test_overfits_one_batch():
    # A synthetic image of two classes: dark left half (class 0), bright right half (class 1). Halves,
    # not a square: the bilinear upsampling of 4x4 logits cannot draw a square's corners, and that
    # floor (about 1 at this loss scale) would be what the test measures.
    model = tiny(num_classes=2, unseen_classes=()).train()
    x = torch.full((1, 3, 64, 64), -1.0)
    x[..., 32:] = 1.0
    target = torch.zeros(1, 64, 64, dtype=torch.long)
    target[..., 32:] = 1
    text = model.encode(["background", "bright"])
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(100):
        opt.zero_grad()
        loss = sum(model.loss(model(x, text), target).values())
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < history[0] / 10, history[::10]


@pytest.mark.slow
def test_torch_compile_forward():
    import torch._dynamo

    # config.patch, not monkeypatch: monkeypatch's undo deletes the module attribute, and every later
    # test that reads capture_scalar_outputs then fails.
    torch._dynamo.reset()
    model = tiny().eval()
    text = model.encode(NAMES15)
    x = images()
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        eager = model(x, text)
        compiled = torch.compile(model)(x, text)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="head"):
        tiny(head="lpm_d")
    with pytest.raises(ValueError, match="moe_k"):
        tiny(moe_k=5)
    with pytest.raises(ValueError, match="public"):
        tiny("rpn_voc_public", moe="sparse")
    with pytest.raises(ValueError, match="rpm_layers"):
        tiny(rpm_layers=(0, 1))
    with pytest.raises(ValueError, match="unseen_classes"):
        tiny(unseen_classes=(20,))
    with pytest.raises(TypeError, match="config field"):
        create_model("rpn", moe_experts=4)
    model = tiny()
    from ovseg_fast.models import TextEmbeddings

    with pytest.raises(ValueError, match="dimension"):
        model(images(), TextEmbeddings(torch.randn(3, 7), ("a", "b", "c")))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(images(1, 70), NAMES15)
    with pytest.raises(ValueError, match="num_classes"):
        model.seen_class_names(NAMES15)


# -- the public code's layout ------------------------------------------------------------------------
def _public_state_dict(model: RPN) -> dict[str, torch.Tensor]:
    """A checkpoint of the public code for the tiny config, with its key names and shapes written out
    here (width 64, embed 32, 2+2 layers, 10 prompts, grid 4x4), random values."""
    width, embed, text_width, vocab, ctx, hw = 64, 32, 64, 49408, 77, 16
    gen = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    sd = {
        "backbone.conv1.weight": r(width, 3, 16, 16),
        "backbone.class_embedding": r(width),
        "backbone.positional_embedding": r(hw + 1, width),
        "backbone.ln_pre.weight": r(width),
        "backbone.ln_pre.bias": r(width),
        "backbone.ln_post.weight": r(width),
        "backbone.ln_post.bias": r(width),
        "backbone.proj": r(width, embed),
        "backbone.deep_prompt_embeddings": r(2, 10, width),
        "backbone.prompt_proj.weight": r(width, width),
        "backbone.prompt_proj.bias": r(width),
        "backbone.prompt_norm.weight": r(width),
        "backbone.prompt_norm.bias": r(width),
        "text_encoder.token_embedding.weight": r(vocab, text_width),
        "text_encoder.positional_embedding": r(ctx, text_width),
        "text_encoder.ln_final.weight": r(text_width),
        "text_encoder.ln_final.bias": r(text_width),
        "text_encoder.text_projection": r(text_width, embed),
        "prompt_proj": r(hw, width),
        "prompt_norm.weight": r(width),
        "prompt_norm.bias": r(width),
        "decode_head.cls_proj.weight": r(embed, 2 * embed),
        "decode_head.cls_proj.bias": r(embed),
        "decode_head.cls_proj_1.weight": r(embed, embed),
        "decode_head.cls_proj_1.bias": r(embed),
        "decode_head.vis_proj_1.weight": r(embed, embed),
        "decode_head.vis_proj_1.bias": r(embed),
        "decode_head.tex_norm_1.weight": r(embed),
        "decode_head.tex_norm_1.bias": r(embed),
        "decode_head.vis_norm_1.weight": r(embed),
        "decode_head.vis_norm_1.bias": r(embed),
    }
    for tower, w in (("backbone", width), ("text_encoder", text_width)):
        for i in range(2):
            p = f"{tower}.transformer.resblocks.{i}."
            sd.update(
                {
                    p + "attn.in_proj_weight": r(3 * w, w),
                    p + "attn.in_proj_bias": r(3 * w),
                    p + "attn.out_proj.weight": r(w, w),
                    p + "attn.out_proj.bias": r(w),
                    p + "ln_1.weight": r(w),
                    p + "ln_1.bias": r(w),
                    p + "ln_2.weight": r(w),
                    p + "ln_2.bias": r(w),
                    p + "mlp.c_fc.weight": r(4 * w, w),
                    p + "mlp.c_fc.bias": r(4 * w),
                    p + "mlp.c_proj.weight": r(w, 4 * w),
                    p + "mlp.c_proj.bias": r(w),
                }
            )
    return sd


def test_public_key_map_loads_strictly(tmp_path):
    model = tiny("rpn_voc_public")
    sd = _public_state_dict(model)
    assert set(public_key_map(2, 2)) == set(sd)
    model.load_public_state_dict(sd)
    mine = model.state_dict()
    for theirs, ours in public_key_map(2, 2).items():
        assert torch.equal(mine[ours], sd[theirs]), (theirs, ours)
    # Through create_model(pretrained=...): an mmseg checkpoint file ({"state_dict": ..., "meta": ...}).
    path = tmp_path / "rpn_voc.pth"
    torch.save({"state_dict": sd}, path)
    torch.manual_seed(3)
    loaded = create_model("rpn_voc_public", clip=TINY, image_size=64, pretrained=str(path))
    assert torch.equal(loaded.head.text_proj2.weight, sd["decode_head.cls_proj_1.weight"])
    assert torch.equal(loaded.backbone.visual_prompts, sd["backbone.deep_prompt_embeddings"])
    # Strictness: a missing key, an unknown key, a wrong shape.
    for broken, match in (
        ({k: v for k, v in sd.items() if k != "prompt_norm.bias"}, "missing: unused_norm.bias"),
        (dict(sd, **{"decode_head.conv_seg.weight": torch.zeros(1)}), "does not know: decode_head.conv_seg"),
        (dict(sd, prompt_proj=torch.zeros(4, 64)), "shapes differ: relation_prompt"),
    ):
        with pytest.raises(ValueError, match=match):
            model.load_public_state_dict(broken)
    with pytest.raises(ValueError, match="public variant"):
        tiny().load_public_state_dict(sd)


def _public_forward_by_hand(model: RPN, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The public code's eval forward written out (CPTCLIPVisionTransformer.forward_*_for_mpt,
    CrossPromptCLIP.get_mask_prompt, CLIPHeadSeg.forward_cascade) on our model's weights."""
    v = model.backbone.clip.visual
    sd = {k: p for k, p in model.named_parameters()}
    b, hw = x.shape[0], 16
    tok = v.conv1(x).flatten(2).transpose(1, 2)
    cls0 = v.class_embedding + torch.zeros(b, 1, tok.shape[-1])
    tok = torch.cat([cls0, tok], 1)
    pos = v.positional_embedding.clone()
    pos[0] = pos[0] + v.class_embedding
    h = v.ln_pre(tok + pos)

    def post(out):
        f = v.ln_post(model.token_norm(out)) @ v.proj
        return F.normalize(f[:, -hw:], dim=-1), F.normalize(f[:, 0], dim=-1)

    def mask_prompt(vis, cls):
        a = t.unsqueeze(0) * cls.unsqueeze(1)
        return (vis @ a.transpose(1, 2)).transpose(1, 2) @ sd["relation_prompt"]

    vp = model.prompt_proj(model.backbone.visual_prompts)
    blocks = v.transformer.resblocks
    out = blocks[0](torch.cat([h[:, :1], vp[0].expand(b, -1, -1), h[:, -hw:]], 1))
    vis, cls = post(out)
    for idx in range(1, len(blocks)):
        mp = model.prompt_proj(mask_prompt(vis, cls))
        out = blocks[idx](torch.cat([out[:, :1], vp[idx].expand(b, -1, -1), mp, out[:, -hw:]], 1))
        vis, cls = post(out)
    head = model.head
    c = head.text_proj(torch.cat([t.unsqueeze(0) * cls.unsqueeze(1), t.unsqueeze(0).expand(b, -1, -1)], -1))
    c = head.text_norm(head.text_proj2(c))
    vt = head.image_norm(head.image_proj(vis))
    return ((vt @ c.transpose(1, 2)) * 32**-0.5).transpose(1, 2).reshape(b, -1, 4, 4)


def test_public_forward_matches_the_public_code_written_out():
    model = tiny("rpn_voc_public").eval()
    x = images()
    text = model.encode(NAMES15)
    with torch.no_grad():
        ours = model(x, text)
        theirs = _public_forward_by_hand(model, x, F.normalize(text.embeddings, dim=-1))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_trainable_parameters_of_the_full_size_models():
    public = create_model("rpn_voc_public")
    assert sum(p.numel() for p in public.parameters() if p.requires_grad) == 2_524_416  # the authors' log
    ours = create_model("rpn_voc")
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable < 13_800_000 / 2, trainable  # ZegCLIP: 13.8 M


def test_public_variant_from_a_clip_checkpoint(tmp_path):
    # A CLIP checkpoint at CLIP's own grid (here 2x2 for a 32-px tiny CLIP) initialises the public
    # variant with the positional embedding resized bilinearly to the working grid, as the public code.
    from ovseg_fast.models import CLIPBackbone

    torch.manual_seed(0)
    clip = CLIPBackbone(tiny_clip(32), image_size=32).clip
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    model = create_model("rpn_voc_public", clip=tiny_clip(32), image_size=64, pretrained=str(path))
    pos = model.backbone.clip.visual.positional_embedding
    assert pos.shape == (17, 64)
    torch.testing.assert_close(pos[0], clip.visual.positional_embedding[0])
    grid = clip.visual.positional_embedding[1:].reshape(1, 2, 2, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(pos[1:], expected.permute(0, 2, 3, 1).reshape(16, 64))
    assert torch.equal(model.backbone.clip.visual.conv1.weight, clip.visual.conv1.weight)
