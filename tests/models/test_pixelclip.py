"""PixelCLIP: training step shapes, clustering (pooling, balance, targets), EMA teacher, global
clustering across gloo processes, backends, ragged masks, the authors' checkpoints, inference; the
ConvNeXt-B variant (``pixelclip_convnext_b``) on a tiny timm ConvNeXt."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from ovseg_fast import ops
from ovseg_fast.cli import main as cli_main
from ovseg_fast.models import clip as clip_module
from ovseg_fast.models import create_model
from ovseg_fast.models.pixelclip import PixelCLIP, convert_pixelclip_state_dict, interpolation_matrix
from tests.helpers import run_gloo_workers, tiny_clip

K = 8
# pixelclip_convnext_b's tiny CLIP: open_clip's timm tower on timm's test_convnext (dims 24..64, 0.21 M
# parameters with the projection; timm's pretrained stays False), stride 32, so a 2 x 2 map at 64 x 64;
# tiny_clip's text tower.
TINY_CONVNEXT = {
    **tiny_clip(64),
    "vision_cfg": {
        "timm_model_name": "test_convnext",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 64,
    },
}


def _model(seed: int = 0, name: str = "pixelclip", **overrides) -> PixelCLIP:
    torch.manual_seed(seed)
    clip = TINY_CONVNEXT if name == "pixelclip_convnext_b" else tiny_clip(64)
    kw = dict(clip=clip, image_size=64, mask_size=32, num_concepts=K)
    return create_model(name, **{**kw, **overrides})


def _convnext(seed: int = 0, **overrides) -> PixelCLIP:
    return _model(seed, "pixelclip_convnext_b", **overrides)


def _batch(b: int = 2, m: int = 5, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 64, 64, generator=g)
    masks = torch.rand(b, m, size, size, generator=g) > 0.6
    return images, masks


def _quiet_model(name: str) -> PixelCLIP:
    # For module-scoped fixtures, built before conftest's per-test silencing of the random-weights warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*RANDOM weights")
        return _model(name=name)


@pytest.fixture(scope="module")
def model():
    return _quiet_model("pixelclip")


@pytest.fixture(scope="module")
def convnext():
    return _quiet_model("pixelclip_convnext_b")


def test_registered_defaults_are_the_authors_vit_config():
    from ovseg_fast.models import model_config

    cfg = model_config("pixelclip")
    assert (cfg.num_concepts, cfg.prompt_length, cfg.momentum, cfg.clustering_scale) == (64, 4, 0.999, 100.0)
    assert (cfg.image_size, cfg.mask_size, cfg.sinkhorn_iters) == (320, 256, 3)


def test_shapes(model):
    images, masks = _batch()
    concepts = model.concept_embeddings()
    assert concepts.shape == (K, 32) and torch.allclose(concepts.norm(dim=-1), torch.ones(K))
    student = model.dense_features(images)
    assert student.shape == (2, 4, 4, 32)
    clusters = model.cluster(model.dense_features(images, teacher=True), masks, None, concepts.detach())
    assert clusters.targets.shape == (2, K, 32, 32) and clusters.assignment.shape == (2, 5)
    assert clusters.plan.shape == (int(clusters.keep.sum()), K)
    assert model.mask_logits(student, concepts).shape == (2, K, 32, 32)
    loss = model.training_step(images, masks)["loss_masks"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert model(images, ["cat", "dog"]).shape == (2, 2, 64, 64)  # feature_size 64
    probs = model.predict(torch.randn(1, 3, 40, 56), ["cat", "dog", "sky"])
    assert probs.shape == (1, 3, 40, 56) and torch.allclose(probs.sum(1), torch.ones(1, 40, 56))


def test_dense_features_follow_the_authors_last_block(model):
    """Tokens before the last block are CLIPBackbone's; the last block is the authors' forward_dense:
    v = x_cls + out_proj(W_v ln_1(x_p) + b_v), v + mlp(ln_2(v)), ln_post, proj."""
    images, _ = _batch(b=1)
    bb = model.backbone
    tokens = bb.encode_image_features(images, layers=(bb.num_layers - 2,))
    x = torch.cat([tokens.cls_tokens[0].unsqueeze(1), tokens.patch_tokens[0].flatten(1, 2)], dim=1)
    blk = bb.clip.visual.transformer.resblocks[-1]
    c = x.shape[-1]
    q_k_v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
    v = x[:, :1] + blk.attn.out_proj(q_k_v[..., 2 * c :])
    v = v + blk.mlp(blk.ln_2(v))
    expected = bb.project(v[:, 1:]).reshape(1, 4, 4, -1)
    torch.testing.assert_close(model.dense_features(images), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.dense_features(images, teacher=True), expected, rtol=1e-4, atol=1e-5)


def test_mask_pooling_equals_pooling_the_upsampled_features(model):
    """The pooling on the patch grid through interpolation_matrix equals the public code's: bilinear
    upsampling to the mask size, then the mean over each mask."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 4, 5, 32, generator=g)
    masks = torch.rand(2, 6, 32, 32, generator=g) > 0.5
    concepts = model.concept_embeddings().detach()
    out = model.cluster(feats, masks, None, concepts)
    up = F.interpolate(feats.permute(0, 3, 1, 2), size=(32, 32), mode="bilinear", align_corners=False)
    m = masks.float()
    pooled = torch.einsum("bdhw,bmhw->bmd", up, m / m.sum((-2, -1), keepdim=True))
    logits = 100 * F.normalize(pooled, dim=-1) @ concepts.T
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-3)
    w = interpolation_matrix(5, 32)
    x = torch.randn(5, 3, generator=g)
    torch.testing.assert_close(w @ x, F.interpolate(x.T.unsqueeze(0), size=32, mode="linear")[0].T)


def test_clustering_is_balanced_as_sinkhorn_promises():
    model = _model(num_concepts=K, sinkhorn_iters=50, mask_size=16)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(4, 4, 4, 32, generator=g)
    masks = torch.rand(4, 16, 16, 16, generator=g) > 0.7
    out = model.cluster(feats, masks, None, model.concept_embeddings().detach())
    n = int(out.keep.sum())
    assert n == 64
    # One problem over all masks of the batch: every concept gets n / k of the mass, every mask 1.
    torch.testing.assert_close(out.plan.sum(0), torch.full((K,), n / K), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.plan.sum(1), torch.ones(n))
    hard = torch.bincount(out.assignment[out.keep], minlength=K)
    greedy = torch.bincount(out.logits[out.keep].argmax(-1), minlength=K)
    assert hard.min() >= 1 and hard.max() < greedy.max()
    # With the paper's 3 iterations the columns are already far more even than the softmax's.
    model3 = _model(num_concepts=K, mask_size=16)
    out3 = model3.cluster(feats, masks, None, model.concept_embeddings().detach())
    soft = out3.logits[out3.keep].softmax(-1).sum(0)
    assert (out3.plan.sum(0) - n / K).abs().max() < 0.5 * (soft - n / K).abs().max()


def test_targets_are_the_union_of_each_concepts_masks(model):
    images, masks = _batch(b=2, m=6)
    valid = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    out = model.cluster(model.dense_features(images, teacher=True), masks, valid, model.concept_embeddings().detach())
    assert (out.assignment[~out.keep] == -1).all()
    for b in range(2):
        for j in range(K):
            chosen = masks[b][(out.assignment[b] == j) & out.keep[b]]
            expected = chosen.any(0) if len(chosen) else torch.zeros(32, 32, dtype=torch.bool)
            assert torch.equal(out.targets[b, j].bool(), expected)


def test_ema_update_matches_its_formula():
    followed = _check_ema(_model())
    assert "positional_embedding" in followed and all(".attn." in n for n in followed - {"positional_embedding"})


def _check_ema(model: PixelCLIP) -> set[str]:
    """Moves the teacher away, runs update_teacher and checks every teacher weight against its
    formula; returns the names of those that followed the student."""
    student = dict(model.backbone.clip.visual.named_parameters())
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    model.update_teacher()
    gamma = model.config.momentum
    followed = set()
    for name, p in model.teacher.named_parameters():
        if student[name].requires_grad:
            torch.testing.assert_close(p, gamma * before[name] + (1 - gamma) * student[name])
            followed.add(name)
        else:  # frozen in the student: equal in both, the teacher's own copy is left alone
            assert torch.equal(p, before[name])
    return followed


def test_teacher_receives_no_gradient_and_student_trains_attention_and_position():
    model = _model()
    images, masks = _batch()
    model.training_step(images, masks)["loss_masks"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    visual = {n for n in trained if n.startswith("backbone.clip.visual.")}
    assert visual and all(".attn." in n or n.endswith("positional_embedding") for n in visual)
    assert "prompt_words" in trained and any(n.startswith("decoder.") for n in trained)
    assert not any(n.startswith("backbone.clip.transformer.") or "token_embedding" in n for n in trained)


def test_ragged_mask_counts():
    model = _model()
    images, masks = _batch(b=3, m=6)
    valid = torch.zeros(3, 6, dtype=torch.bool)
    valid[1, 0] = True
    valid[2] = True
    loss = model.training_step(images, masks, valid)["loss_masks"]
    loss.backward()
    assert torch.isfinite(loss) and model.prompt_words.grad is not None
    out = model.cluster(model.dense_features(images, teacher=True), masks, valid, model.concept_embeddings().detach())
    assert out.keep.sum(1).tolist() == [0, 1, 6]
    assert not out.targets[0].any()
    # No mask anywhere: nothing to learn, a zero loss, still differentiable.
    model.zero_grad()
    loss = model.training_step(images, masks, torch.zeros(3, 6, dtype=torch.bool))["loss_masks"]
    loss.backward()
    assert float(loss.detach()) == 0.0
    # Masks too small at the mask resolution are dropped like padding.
    tiny = torch.zeros(3, 2, 32, 32, dtype=torch.bool)
    tiny[:, 0, 3, 3] = True
    tiny[:, 1, :8, :8] = True
    out = model.cluster(model.dense_features(images, teacher=True), tiny, None, model.concept_embeddings().detach())
    assert out.keep.tolist() == [[False, True]] * 3


def test_reference_backend_and_kernels_agree():
    model = _model()
    images, masks = _batch(b=2, m=7)
    losses, assignments = [], []
    for backend in ("reference", "cpu"):
        with ops.use_backend(backend):
            model.zero_grad()
            feats = model.dense_features(images, teacher=True)
            out = model.cluster(feats, masks, None, model.concept_embeddings().detach())
            loss = model.training_step(images, masks)["loss_masks"]
            loss.backward()
            losses.append((loss.detach(), model.prompt_words.grad.clone()))
            assignments.append(out.assignment)
    assert torch.equal(assignments[0], assignments[1])
    torch.testing.assert_close(losses[0][0], losses[1][0])
    torch.testing.assert_close(losses[0][1], losses[1][1])


def test_input_checks(model):
    images, masks = _batch()
    feats = model.dense_features(images, teacher=True)
    c = model.concept_embeddings().detach()
    with pytest.raises(ValueError, match="masks has batch 1"):
        model.cluster(feats, masks[:1], None, c)
    with pytest.raises(ValueError, match=r"valid must have shape \(B, M\)"):
        model.cluster(feats, masks, torch.ones(2, 4, dtype=torch.bool), c)
    with pytest.raises(TypeError, match="masks must be bool"):
        model.cluster(feats, masks.long(), None, c)
    with pytest.raises(ValueError, match="student_images must have the shape"):
        model.training_step(images, masks, student_images=images[:1])
    with pytest.raises(ValueError, match="momentum"):
        _model(momentum=1.5)


# -- distributed: the clustering is one problem over every process's masks -------------------------
_WORKER = """
import sys, warnings
import torch, torch.distributed as dist
warnings.filterwarnings("ignore")
from tests.models.test_pixelclip import _model, _batch, _sgd_step
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
model = _model()
images, masks = _batch(b=4, m=5, seed=7)
valid = torch.ones(4, 5, dtype=torch.bool)
valid[1, 2:] = False
valid[2, 1:] = False
sl = slice(2 * rank, 2 * rank + 2)
loss = model.training_step(images[sl], masks[sl], valid[sl])["loss_masks"]
loss.backward()
for p in model.parameters():
    if p.grad is not None:
        dist.all_reduce(p.grad)
        p.grad /= 2
torch.save(_sgd_step(model), f"{out}.{rank}")
dist.barrier()
dist.destroy_process_group()
"""


def _sgd_step(model: PixelCLIP) -> dict:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 10.0 * p.grad
    model.update_teacher()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_give_the_update_of_one_process_holding_all_images(tmp_path):
    results = run_gloo_workers(_WORKER, tmp_path)
    model = _model()
    images, masks = _batch(b=4, m=5, seed=7)
    valid = torch.ones(4, 5, dtype=torch.bool)
    valid[1, 2:] = False
    valid[2, 1:] = False
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.training_step(images, masks, valid)["loss_masks"].backward()
    single = _sgd_step(model)
    moved = [n for n in single if not torch.equal(single[n], start[n])]
    assert "prompt_words" in moved and any(n.startswith("backbone.clip.visual") for n in moved)
    for rank_result in results:
        for name, value in single.items():
            torch.testing.assert_close(rank_result[name], value, rtol=1e-4, atol=1e-5, msg=name)


# -- the authors' checkpoints ---------------------------------------------------------------------------
def _their_state_dict(model: PixelCLIP) -> dict:
    """A state dict with the key names and shapes of the authors' detectron2 PixelCLIP (ViT): their
    ``PixelCLIP`` module holds ``sem_seg_head.predictor.{clip_model (OpenAI CLIP), prompt_tokens}``,
    ``teacher_encoder`` (a CLIP copy whose text transformer is removed) and ``head`` (ConvHead)."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for key, value in model.backbone.clip.state_dict().items():
        sd["sem_seg_head.predictor.clip_model." + key] = torch.randn(value.shape, generator=g)
    for key, value in list(sd.items()):
        rest = key[len("sem_seg_head.predictor.clip_model.") :]
        if rest.startswith("visual."):
            sd["teacher_encoder." + rest] = torch.randn(value.shape, generator=g)
        elif not rest.startswith("transformer."):  # token_embedding, positional_embedding, ln_final, ...
            sd["teacher_encoder." + rest] = value.clone()
    sd["sem_seg_head.predictor.prompt_tokens"] = torch.randn(K, 4, 64, generator=g)
    c0, c1, c2 = 64, 64, 32
    head = {
        "conv0.weight": (c0, 1, 3, 3), "conv0.bias": (c0,),
        "up1.weight": (c0, c1, 2, 2), "up1.bias": (c1,),
        "conv1.double_conv.0.weight": (c1, c1, 3, 3), "conv1.double_conv.1.weight": (c1,),
        "conv1.double_conv.1.bias": (c1,), "conv1.double_conv.3.weight": (c1, c1, 3, 3),
        "conv1.double_conv.4.weight": (c1,), "conv1.double_conv.4.bias": (c1,),
        "up2.weight": (c1, c2, 2, 2), "up2.bias": (c2,),
        "conv2.double_conv.0.weight": (c2, c2, 3, 3), "conv2.double_conv.1.weight": (c2,),
        "conv2.double_conv.1.bias": (c2,), "conv2.double_conv.3.weight": (c2, c2, 3, 3),
        "conv2.double_conv.4.weight": (c2,), "conv2.double_conv.4.bias": (c2,),
        "proj.weight": (1, c2, 3, 3), "proj.bias": (1,),
    }  # fmt: skip
    for key, shape in head.items():
        sd["head." + key] = torch.randn(shape, generator=g)
    return sd


def test_authors_checkpoint_loads_strictly_and_runs_their_inference(tmp_path, model):
    theirs = _their_state_dict(model)
    path = tmp_path / "pixelclip_vit_base.pth"
    torch.save({"model": theirs, "iteration": 10000}, path)
    loaded = _model(seed=1, pretrained=str(path))
    own = loaded.state_dict()
    assert torch.equal(own["prompt_words"], theirs["sem_seg_head.predictor.prompt_tokens"])
    assert torch.equal(own["teacher.conv1.weight"], theirs["teacher_encoder.visual.conv1.weight"])
    assert torch.equal(own["decoder.block2.3.weight"], theirs["head.conv2.double_conv.3.weight"])
    assert torch.equal(own["backbone.clip.visual.proj"], theirs["sem_seg_head.predictor.clip_model.visual.proj"])
    # Their evaluation path: image at 320 (here 64) -> student dense features -> 64x64 (here
    # feature_size) bilinear -> cosine with the class embeddings.
    images, _ = _batch(b=1)
    text = loaded.encode(["cat", "dog"])
    feats = loaded.dense_features(images).permute(0, 3, 1, 2)
    feats = F.normalize(F.interpolate(feats, size=(64, 64), mode="bilinear", align_corners=False), dim=1)
    cos = torch.einsum("bdhw,cd->bchw", feats, text.embeddings)
    torch.testing.assert_close(loaded(images, text), loaded.backbone.logit_scale * cos)


def test_authors_checkpoint_errors(tmp_path, model):
    theirs = _their_state_dict(model)
    bad = dict(theirs)
    del bad["head.proj.bias"]
    bad["sem_seg_head.predictor.prompt_tokens"] = torch.zeros(K, 3, 64)
    path = tmp_path / "bad.pth"
    torch.save({"model": bad}, path)
    expected = r"shapes differ: prompt_words.*missing from the checkpoint: decoder\.out\.bias"
    with pytest.raises(ValueError, match=expected):
        _model(pretrained=str(path))
    extra = dict(theirs, **{"sem_seg_head.foo": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unknown keys sem_seg_head\.foo"):
        convert_pixelclip_state_dict(extra)
    changed = dict(theirs)
    changed["teacher_encoder.token_embedding.weight"] = changed["teacher_encoder.token_embedding.weight"] + 1
    with pytest.raises(ValueError, match=r"teacher_encoder\.token_embedding\.weight"):
        convert_pixelclip_state_dict(changed)
    # DINO's mask generator is not part of the segmenter: dropped.
    assert convert_pixelclip_state_dict(dict(theirs, **{"dino.cls_token": torch.zeros(1)})).keys() == (
        convert_pixelclip_state_dict(theirs).keys()
    )


def test_own_state_dict_round_trips(tmp_path, model):
    path = tmp_path / "ours.pt"
    torch.save(model.state_dict(), path)
    loaded = _model(seed=3, pretrained=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_synonyms_are_averaged_per_template(model):
    emb = model.encode_classes(["dog, puppy", "cat"]).embeddings
    per_template = []
    for t in model.config.templates:
        e = model.backbone.encode_text(["dog", "puppy", "cat"], [t])
        per_template.append(F.normalize(torch.stack([e[0] + e[1], e[2]]), dim=-1))
    expected = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    torch.testing.assert_close(emb, expected)
    torch.testing.assert_close(emb[1], model.backbone.encode_text(["cat"], model.config.templates)[0])


# -- pixelclip_convnext_b: the ConvNeXt-B variant, on TINY_CONVNEXT --------------------------------------
def test_convnext_registered_defaults_are_the_authors_convnext_config():
    import open_clip

    from ovseg_fast.models import model_config

    cfg = model_config("pixelclip_convnext_b")
    # pixelclip_convnext_base.yaml: CLIP_PRETRAINED convnext_base (open_clip's convnext_base_w_320),
    # CLIP_RESOLUTION 640, CLIP_FINETUNE full, EPS 1; the rest from the ViT config.
    assert (cfg.clip, cfg.image_size, cfg.finetune, cfg.clustering_scale) == ("convnext_base_w_320", 640, "full", 1.0)
    assert (cfg.num_concepts, cfg.prompt_length, cfg.momentum, cfg.mask_size) == (64, 4, 0.999, 256)
    vision = open_clip.get_model_config(cfg.clip)["vision_cfg"]
    assert vision["timm_model_name"] == "convnext_base" and not vision["timm_model_pretrained"]
    assert model_config("pixelclip").finetune == "attention"


def test_convnext_shapes(convnext):
    images, masks = _batch()
    concepts = convnext.concept_embeddings()
    assert convnext.patch_size == convnext.output_stride == 32
    assert concepts.shape == (K, 32)
    student = convnext.dense_features(images)
    assert student.shape == (2, 2, 2, 32)
    teacher = convnext.dense_features(images, teacher=True)
    clusters = convnext.cluster(teacher, masks, None, concepts.detach())
    assert clusters.targets.shape == (2, K, 32, 32) and clusters.plan.shape == (int(clusters.keep.sum()), K)
    # Logits 1 x cosine (EPS 1), not 100 x as for the ViT.
    assert clusters.logits.abs().max() <= 1 + 1e-5
    assert convnext.mask_logits(student, concepts).shape == (2, K, 32, 32)
    loss = convnext.training_step(images, masks)["loss_masks"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert convnext(images, ["cat", "dog"]).shape == (2, 2, 64, 64)  # feature_size 64
    text = convnext.encode(["cat", "dog", "sky"])
    assert convnext.segment(images, text).shape == (2, 3, 64, 64)
    probs = convnext.predict(torch.randn(1, 3, 40, 56), ["cat", "dog", "sky"])
    assert probs.shape == (1, 3, 40, 56) and torch.allclose(probs.sum(1), torch.ones(1, 40, 56))


def test_convnext_dense_features_are_the_last_map_through_head_norm_and_projection(convnext):
    """The authors' encode_image(dense=True): trunk.forward_features -> trunk.head.norm -> visual.head
    per pixel; pooled, the same path is open_clip's encode_image."""
    images = torch.randn(2, 3, 64, 96)
    visual = convnext.backbone.clip.visual
    with torch.no_grad():
        maps = visual.trunk.forward_features(images)
        expected = visual.head(visual.trunk.head.norm(maps).permute(0, 2, 3, 1))
        dense = convnext.dense_features(images)
        torch.testing.assert_close(dense, expected)
        assert dense.shape == (2, 2, 3, 32)
        torch.testing.assert_close(convnext.dense_features(images, teacher=True), expected)
        torch.testing.assert_close(convnext.backbone.dense_features(images), expected)
        torch.testing.assert_close(convnext.backbone.encode_image(images), convnext.backbone.clip.encode_image(images))
    with pytest.raises(ValueError, match="multiples of the patch size 32"):
        convnext.dense_features(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="needs a ViT image tower"):
        convnext.backbone.encode_image_features(images, layers=(0,))


def test_convnext_gradients_reach_exactly_the_trainable_parameters():
    """The whole image tower (trunk and projection head) trains, with the prompts and the decoder;
    nothing else gets a gradient, the teacher none."""
    model = _convnext()
    images, masks = _batch()
    model.training_step(images, masks)["loss_masks"].backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    visual = {"backbone.clip.visual." + n for n, _ in model.backbone.clip.visual.named_parameters()}
    decoder = {"decoder." + n for n, _ in model.decoder.named_parameters()}
    assert trained == trainable == visual | decoder | {"prompt_words"}
    assert any(".trunk.stem." in n for n in trained) and "backbone.clip.visual.head.proj.weight" in trained
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    # EMA over the whole tower: every teacher weight follows its formula.
    assert _check_ema(model) == {n for n, _ in model.backbone.clip.visual.named_parameters()}


def test_convnext_config_checks():
    with pytest.raises(ValueError, match="finetune='attention' trains a ViT's attention layers"):
        create_model("pixelclip", clip=TINY_CONVNEXT, image_size=64, mask_size=32, num_concepts=K)
    with pytest.raises(ValueError, match="finetune must be 'attention' or 'full'"):
        _convnext(finetune="all")
    with pytest.raises(ValueError, match="image_size must be a multiple of the patch size 32"):
        _convnext(image_size=80)
    with pytest.raises(ValueError, match="only ViT image towers are supported"):
        clip_module.CLIPBackbone(TINY_CONVNEXT, image_size=64)  # models on ViT tokens refuse it
    pretrained = {**TINY_CONVNEXT, "vision_cfg": {**TINY_CONVNEXT["vision_cfg"], "timm_model_pretrained": True}}
    with pytest.raises(ValueError, match="nothing is downloaded"):
        _convnext(clip=pretrained)


def test_convnext_random_weights_warn(monkeypatch):
    monkeypatch.setattr(clip_module, "_warned_random", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _convnext()
    messages = [str(w.message) for w in caught if "RANDOM weights" in str(w.message)]
    assert len(messages) == 1 and "meaningless" in messages[0]


def test_convnext_authors_checkpoint_loads_strictly_and_runs_their_inference(tmp_path, convnext):
    """Their ConvNeXt-B checkpoint: ``clip_model`` is open_clip's CLIP (``visual.trunk.*`` timm's
    ConvNeXt, ``visual.head.proj`` open_clip's projection), the teacher its copy without the text
    transformer, prompt tokens (k, n, 640) at full size."""
    theirs = _their_state_dict(convnext)
    assert "sem_seg_head.predictor.clip_model.visual.trunk.stages.3.blocks.1.mlp.fc2.weight" in theirs
    assert "teacher_encoder.visual.head.proj.weight" in theirs
    path = tmp_path / "pixelclip_convnext_base.pth"
    torch.save({"model": theirs, "iteration": 10000}, path)
    loaded = _convnext(seed=1, pretrained=str(path))
    own = loaded.state_dict()
    prefix = "sem_seg_head.predictor.clip_model."
    assert torch.equal(own["prompt_words"], theirs["sem_seg_head.predictor.prompt_tokens"])
    assert torch.equal(own["teacher.trunk.stem.0.weight"], theirs["teacher_encoder.visual.trunk.stem.0.weight"])
    assert torch.equal(own["backbone.clip.visual.head.proj.weight"], theirs[prefix + "visual.head.proj.weight"])
    assert torch.equal(own["backbone.clip.visual.trunk.head.norm.bias"], theirs[prefix + "visual.trunk.head.norm.bias"])
    assert torch.equal(own["decoder.block1.0.weight"], theirs["head.conv1.double_conv.0.weight"])
    # Their evaluation path: student dense features -> 64 x 64 (feature_size) bilinear -> cosine.
    images, _ = _batch(b=1)
    visual = loaded.backbone.clip.visual
    with torch.no_grad():
        feats = visual.head(visual.trunk.head.norm(visual.trunk.forward_features(images)).permute(0, 2, 3, 1))
        text = loaded.encode(["cat", "dog"])
        feats = F.interpolate(feats.permute(0, 3, 1, 2), size=(64, 64), mode="bilinear", align_corners=False)
        cos = torch.einsum("bdhw,cd->bchw", F.normalize(feats, dim=1), text.embeddings)
        torch.testing.assert_close(loaded(images, text), loaded.backbone.logit_scale * cos)


def test_convnext_authors_checkpoint_errors(tmp_path, convnext, model):
    theirs = _their_state_dict(convnext)
    bad = dict(theirs)
    del bad["sem_seg_head.predictor.clip_model.visual.trunk.stages.2.blocks.0.gamma"]
    bad["teacher_encoder.visual.head.proj.weight"] = torch.zeros(32, 16)
    path = tmp_path / "bad.pth"
    torch.save({"model": bad}, path)
    expected = (
        r"shapes differ: teacher\.head\.proj\.weight: checkpoint \(32, 16\) vs model \(32, 64\).*"
        r"missing from the checkpoint: backbone\.clip\.visual\.trunk\.stages\.2\.blocks\.0\.gamma"
    )
    with pytest.raises(ValueError, match=expected):
        _convnext(pretrained=str(path))
    extra = dict(theirs, **{"sem_seg_head.predictor.clip_model.visual.trunk.extra.weight": torch.zeros(1)})
    torch.save({"model": extra}, path)
    with pytest.raises(ValueError, match=r"not in the model: backbone\.clip\.visual\.trunk\.extra\.weight"):
        _convnext(pretrained=str(path))
    # A ConvNeXt checkpoint for the ViT model, and the reverse: refused before building, naming the model.
    torch.save({"model": theirs}, path)
    with pytest.raises(ValueError, match=r"convnext image tower.*create_model\('pixelclip_convnext_b'"):
        _model(pretrained=str(path))
    vit = tmp_path / "vit.pth"
    torch.save({"model": _their_state_dict(model)}, vit)
    with pytest.raises(ValueError, match=r"vit image tower.*create_model\('pixelclip'"):
        _convnext(pretrained=str(vit))


def test_convnext_convert_cli_round_trip(tmp_path, convnext, capsys):
    theirs = _their_state_dict(convnext)
    src, dst = tmp_path / "pixelclip_convnext_base.pth", tmp_path / "pixelclip_convnext_base.safetensors"
    torch.save({"model": theirs}, src)
    # The trunk is built by name (timm), so a checkpoint of a tiny one is checked against its config.
    args = ["convert", "pixelclip", str(src), str(dst), "--clip", repr(TINY_CONVNEXT)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "create_model('pixelclip_convnext_b'" in out and "'num_concepts': 8" in out
    loaded = _convnext(seed=2, pretrained=str(dst))
    for key, value in convert_pixelclip_state_dict(theirs).items():
        assert torch.equal(loaded.state_dict()[key], value), key
    bad = dict(theirs)
    bad["sem_seg_head.predictor.clip_model.visual.trunk.stem.0.weight"] = torch.zeros(24, 3, 2, 2)
    torch.save({"model": bad}, src)
    assert cli_main([*args, "--force"]) == 1
    assert "shapes differ: backbone.clip.visual.trunk.stem.0.weight" in capsys.readouterr().err


def test_convnext_profile_cli_at_a_tiny_size(capsys):
    args = ["profile", "pixelclip_convnext_b", "--size", "64", "--classes", "2", "--min-seconds", "0"]
    args += ["--set", f"clip={TINY_CONVNEXT!r}", "--set", "image_size=64", "--set", "templates=('a {}.',)"]
    args += ["--set", "num_concepts=8", "--set", "feature_size=16"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "| pixelclip_convnext_b | 1x3x64x64, C=2 | float32 |" in out
