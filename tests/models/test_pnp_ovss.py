"""PnP-OVSS on a tiny random BLIP (transformers' own config classes, 2 vision and 3 text layers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from ovseg_fast.models import Segmentor, create_model, list_models
from ovseg_fast.models.pnp_ovss import PnPOVSS

# initializer_range 0.2: transformers' 0.02 gives maps of ~1e-7, too close to 0 to compare meaningfully
_INIT = {"initializer_range": 0.2}
TINY_BLIP = {
    "vision_config": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 64,
        "patch_size": 16,
        **_INIT,
    },
    "text_config": {
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        **_INIT,
    },
    **_INIT,
}
CLASSES = ["cat", "dog", "traffic light"]


def tiny(**overrides) -> PnPOVSS:
    torch.manual_seed(0)
    settings = {"blip": TINY_BLIP, "layer": 1, "head": 1, "passes": 3, "blur_sigma": 0.05, "threshold": 0.4}
    return create_model("pnp_ovss_base", **dict(settings, **overrides))


def images(b: int = 1, h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def test_registered():
    assert {"pnp_ovss", "pnp_ovss_base"} <= set(list_models())
    model = tiny()
    assert isinstance(model, Segmentor) and model.patch_size == 16
    assert not any(p.requires_grad for p in model.parameters())


def test_gradcam_equals_hand_computed():
    model = tiny(passes=1)
    x = images()
    prompts = model.prompts(["traffic light"])
    ours = model.salience_maps(x, ["traffic light"])[0, 0].flatten()

    # By hand, through transformers' own ITM forward: retain the attention's gradient, then
    # attention x ReLU(gradient), the chosen head, the class name's tokens, the image [CLS] column dropped.
    saved = []

    def keep(_m, _i, out):
        out[1].retain_grad()
        saved.append(out[1])

    layer = model.blip.text_encoder.encoder.layer[1].crossattention.self
    handle = layer.register_forward_hook(keep)
    try:
        out = model.blip(
            input_ids=prompts.ids,
            pixel_values=x.requires_grad_(),
            attention_mask=prompts.mask,
            interpolate_pos_encoding=True,
        )
        out.itm_score[0, 1].backward()
    finally:
        handle.remove()
    attn, grad = saved[0].detach(), saved[0].grad
    tokens = prompts.weights[0].nonzero().flatten()
    assert len(tokens) == len(model._tokens("traffic light")) == 2
    expected = (attn[0, 1] * grad[0, 1].clamp(min=0))[tokens, 1:].mean(0)
    assert expected.abs().max() > 1e-4  # a real map, not zeros on both sides
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)

    model.config.head = None  # the mean over heads
    ours_mean = model.salience_maps(x, ["traffic light"])[0, 0].flatten()
    expected_mean = (attn[0] * grad[0].clamp(min=0)).mean(0)[tokens, 1:].mean(0)
    torch.testing.assert_close(ours_mean, expected_mean, rtol=1e-4, atol=1e-7)


def test_batched_classes_equal_a_loop_over_classes():
    model = tiny(passes=3, drop_fraction=0.3)
    x = images()
    embeds = model.image_embeds(x)[0]
    batched, kept = model.salience(embeds, model.prompts(CLASSES))
    assert kept.shape == (3, 24) and kept[0].all() and kept[1].sum() == 24 - 7 and kept[2].sum() == 17 - 5

    # The same rounds with one class per BLIP call, the dropped patches chosen from all classes' maps.
    keep = torch.ones(24, dtype=torch.bool)
    total = torch.zeros(3, 24)
    for p in range(3):
        assert torch.equal(keep, kept[p])
        for c, name in enumerate(CLASSES):
            total[c] += model.gradcam(embeds, model.prompts([name]), keep[None])[0]
        if p < 2:
            union = total.sum(0).masked_fill(~keep, -float("inf"))
            keep[union.topk(round(0.3 * int(keep.sum()))).indices] = False
    torch.testing.assert_close(batched, total, rtol=1e-4, atol=1e-7)


def test_dropped_patches_are_excluded():
    model = tiny()
    embeds = model.image_embeds(images())[0]
    keep = torch.ones(2, 24, dtype=torch.bool)
    keep[0, [0, 5, 23]] = False
    keep[1, 7:20] = False
    saved = []
    handles = [
        layer.crossattention.self.register_forward_hook(lambda _m, _i, out: saved.append(out[1].detach()))
        for layer in model.blip.text_encoder.encoder.layer
    ]
    try:
        cam = model.gradcam(embeds, model.prompts(CLASSES[:2]), keep)
    finally:
        for h in handles:
            h.remove()
    assert len(saved) == 3
    for attn in saved:  # (C, heads, T, 1 + N): every layer, head and token
        image_attn = attn[..., 1:]
        assert torch.all(image_attn[0][..., [0, 5, 23]] == 0) and torch.all(image_attn[1][..., 7:20] == 0)
        assert torch.all(image_attn[0][..., 1:5] > 0)
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
    assert torch.all(cam[~keep] == 0) and cam[keep].max() > 0


def _expected_labels(model: PnPOVSS, maps: torch.Tensor, size, background: bool) -> torch.Tensor:
    """Blur + threshold with scipy, one class at a time."""
    cfg = model.config
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[0].numpy().astype(np.float64)
    blurred = []
    for m in up:
        m = (m - m.min()) / (m.max() - m.min())
        b = gaussian_filter(m, cfg.blur_sigma * max(size))
        blurred.append((b - b.min()) / (b.max() - b.min()))
    blurred = np.stack(blurred)
    passed = blurred >= cfg.threshold
    scores = blurred * passed
    labels = scores.argmax(0)
    none = ~passed.any(0)
    if background:
        return torch.from_numpy(np.where(none, len(maps[0]), labels))
    return torch.from_numpy(np.where(none, blurred.argmax(0), labels))


@pytest.mark.parametrize("background", [True, False])
def test_pipeline_without_crf_is_blur_and_threshold(background):
    model = tiny(crf=False, blur_sigma=0.08)
    x = images()
    names = CLASSES + (["background"] if background else [])
    logits = model(x, names)
    assert logits.shape == (1, len(names), 64, 96)
    maps = model.salience_maps(x, CLASSES)
    expected = _expected_labels(model, maps, (64, 96), background)
    labels = logits.argmax(1)[0]
    assert (labels == expected).float().mean() > 0.999  # float32 vs float64 at the threshold's edge
    if background:
        assert 0 < (labels == 3).float().mean() < 1
    probs = model.predict(x, names)
    torch.testing.assert_close(probs, logits.softmax(1))


def test_crf_on_gives_marginals_and_per_image_lists():
    model = tiny(crf=True)
    x = images(2)
    probs = model.predict(x, ["cat", "background", "dog"])
    assert probs.shape == (2, 3, 64, 96)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 96))
    per_image = model.predict(x, [["dog", "background"], ["cat", "traffic light"]])
    assert per_image.shape == (2, 4, 64, 96)  # union: dog, background, cat, traffic light
    assert torch.all(per_image[0, 2:] == 0) and torch.all(per_image[1, :2] == 0)
    torch.testing.assert_close(per_image[0, :2], model.predict(x[:1], ["dog", "background"])[0])


def test_predict_pads_to_the_patch_grid():
    model = tiny(crf=False)
    probs = model.predict(images(1, 50, 70), ["cat", "background"])
    assert probs.shape == (1, 2, 50, 70) and torch.isfinite(probs).all()


def test_bad_inputs():
    model = tiny()
    x = images()
    with pytest.raises(ValueError, match="must not be empty"):
        model(x, [])
    with pytest.raises(ValueError, match="'cat' twice"):
        model(x, ["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="twice"):
        model.predict(x, [["cat", "Cat"]])
    with pytest.raises(ValueError, match="too small for BLIP's 16x16 patch grid"):
        model.predict(images(1, 8, 64), ["cat"])
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        model(images(1, 8, 64), ["cat"])  # forward takes whole patches, predict pads
    with pytest.raises(ValueError, match="only the background"):
        model(x, ["background"])
    with pytest.raises(ValueError, match="one list per image"):
        model.predict(images(2), [["cat"]])
    with pytest.raises(RuntimeError, match="inference_mode"), torch.inference_mode():
        model(x, ["cat"])
    with pytest.raises(ValueError, match="layer must be < 2"):
        tiny(layer=2)
    with pytest.raises(ValueError, match="head must be None or < 2"):
        tiny(head=2)
    with pytest.raises(ValueError, match="drop_fraction"):
        tiny(drop_fraction=1.0)
    with pytest.raises(ValueError, match="template"):
        tiny(template="a picture")
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        create_model("pnp_ovss_base", pretrained="/nonexistent/blip")


def test_checkpoint_directory(tmp_path):
    model = tiny(passes=1, crf=False)
    model.blip.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        create_model("pnp_ovss_base", pretrained=str(tmp_path), layer=1, head=1)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "traffic", "light", "cat"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    loaded = create_model("pnp_ovss_base", pretrained=str(tmp_path), layer=1, head=1, passes=1, crf=False)
    for (name, a), b in zip(model.blip.state_dict().items(), loaded.blip.state_dict().values()):
        assert torch.equal(a, b), name
    prompts = loaded.prompts(["traffic light", "cat"])
    assert prompts.ids.tolist() == [[2, 5, 6, 7, 8, 9, 3], [2, 5, 6, 7, 10, 3, 0]]
    assert prompts.weights[0, 4:6].tolist() == [0.5, 0.5] and prompts.weights[1, 4].item() == 1.0
    assert loaded(images(), ["cat", "background"]).shape == (1, 2, 64, 96)


@pytest.mark.slow
def test_paper_configs_build():
    for name, width in (("pnp_ovss", 1024), ("pnp_ovss_base", 768)):
        model = create_model(name)
        assert model.blip.config.vision_config.hidden_size == width
        assert model.blip.config.text_config.encoder_hidden_size == width
        assert model.num_heads == 12 and model.text_layers == 12  # BERT-base, the checkpoints' text encoder
        del model
