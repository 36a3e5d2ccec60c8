from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from ovseg_fast.cli import main as cli_main
from ovseg_fast.models.profile import ZEGCLIP, format_profile, profile
from ovseg_fast.ops import lpm_logits, lpm_logits_flops
from tests.helpers import tiny_clip

# A ViT of width 64, 2 layers, patch 16: the whole CLIP in a few milliseconds.
TINY_CLIP = tiny_clip(32, text_layers=1, context_length=16)
FAST = dict(min_runs=1, min_seconds=0.0)


class PixelLinear(nn.Module):
    """Logits = a Linear(3, C) on every pixel: 2 * B * H * W * 3 * C FLOPs (bias not counted)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(3, classes)

    def forward(self, images, text):
        assert len(text) == self.head.out_features
        return self.head(images.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class WithLPM(nn.Module):
    """A model that calls an ovseg-fast op (LPM logits) after a per-pixel Linear."""

    def __init__(self, classes: int, dim: int = 8) -> None:
        super().__init__()
        self.pixels = nn.Linear(3, dim)
        self.text = nn.Parameter(torch.randn(classes, dim))
        self.weight = nn.Parameter(torch.randn(dim, dim), requires_grad=False)

    def forward(self, images, text):
        b, _, h, w = images.shape
        pix = self.pixels(images.permute(0, 2, 3, 1)).reshape(b, h * w, -1)
        emb = self.text.unsqueeze(0).expand(b, -1, -1)
        return lpm_logits(pix, emb, self.weight).reshape(b, -1, h, w)


def test_flops_and_params_of_a_linear_model_by_hand():
    model = PixelLinear(5).train()
    r = profile(model, size=(8, 6), classes=5, batch=2, memory=False, **FAST)
    assert model.training  # measured in eval mode, then given back as it was
    assert r.gflops * 1e9 == pytest.approx(2 * 2 * 8 * 6 * 3 * 5)
    assert r.params_m * 1e6 == pytest.approx(3 * 5 + 5)
    assert r.trainable_params_m == r.params_m
    assert r.gemm_shape == (2 * 8 * 6, 3, 5)
    assert r.latency_ms > 0 and r.fps == pytest.approx(2 / (r.latency_ms / 1e3))
    assert r.gemm_gflops_per_s > 0 and r.efficiency == pytest.approx(r.achieved_gflops_per_s / r.gemm_gflops_per_s)
    assert r.module_gflops[0] == ("PixelLinear", pytest.approx(r.gflops))
    assert r.custom_op_calls == {} and r.reference_latency_ms is None


def test_custom_op_flops_are_counted_and_reference_compared():
    model = WithLPM(4)
    model.text.requires_grad_(False)
    b, h, w = 1, 4, 6
    r = profile(model, size=(h, w), classes=4, batch=b, compare="reference", **FAST)
    linear = 2 * b * h * w * 3 * 8
    expected = linear + lpm_logits_flops(b, 4, h * w, 8, 8, norm=False)
    assert r.gflops * 1e9 == pytest.approx(expected)
    assert r.custom_op_calls == {"lpm_logits": 1}
    assert "ovseg_fast.lpm_logits" in r.op_gflops
    assert r.op_gflops["ovseg_fast.lpm_logits"] * 1e9 == pytest.approx(lpm_logits_flops(b, 4, h * w, 8, 8, norm=False))
    assert r.params_m * 1e6 == pytest.approx(3 * 8 + 8 + 4 * 8 + 8 * 8)
    assert r.trainable_params_m * 1e6 == pytest.approx(3 * 8 + 8)
    assert r.reference_latency_ms > 0 and r.speedup == pytest.approx(r.reference_latency_ms / r.latency_ms)
    text = format_profile(r)
    assert "reference backend" in text and "lpm_logits x1" in text


def _tiny_clip(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights
        return profile(
            "clip", size=64, classes=3, clip=TINY_CLIP, image_size=64, templates=("a photo of a {}.",), **FAST, **kw
        )


def test_tiny_clip_counts_attention_and_breaks_down_by_module():
    r = _tiny_clip(depth=4, dtype=torch.bfloat16)
    assert r.model == "clip" and r.dtype == "bfloat16"
    tokens, width, layers = (64 // 16) ** 2 + 1, 64, 2
    # CPU attention is counted (torch's own counter leaves it at 0): q k^T and p v of every layer.
    attn = r.op_gflops["_scaled_dot_product_flash_attention_for_cpu"] * 1e9
    assert attn >= layers * 2 * (2 * tokens * tokens * width)
    # Every block's MLP (4x width) is in there: 2 GEMMs of 2 * tokens * width * 4 width each.
    assert r.gflops * 1e9 > layers * 2 * 2 * tokens * width * 4 * width
    names = [name.strip() for name, _ in r.module_gflops]
    assert names[0] == "CLIPSegmentor" and r.module_gflops[0][1] == pytest.approx(r.gflops)
    assert any("resblocks" in n for n in names)
    assert r.trainable_params_m == 0.0 and r.params_m > 0  # frozen CLIP
    assert r.peak_memory_mib is None or r.peak_memory_mib >= 0
    text = format_profile([r, r], breakdown=True)
    assert "ZegCLIP (quoted" in text and "110.4" in text and "13.8" in text


def test_cli_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "profile.json"
    args = ["profile", "clip", "--size", "32", "--classes", "2", "--min-seconds", "0", "--json", str(out)]
    args += ["--set", f"clip={TINY_CLIP!r}", "--set", "image_size=32", "--set", "templates=('a {}.',)"]
    args += ["--dtype", "float32", "bfloat16", "--compare", "reference", "--depth", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert cli_main(args) == 0
    captured = capsys.readouterr()
    assert "| clip | 1x3x32x32, C=2 | float32 |" in captured.out and "| bfloat16 |" in captured.out
    assert "profile clip: counting FLOPs" in captured.err  # progress goes to stderr
    data = json.loads(out.read_text())
    assert [r["dtype"] for r in data["results"]] == ["float32", "bfloat16"]
    assert data["results"][0]["gflops"] > 0 and data["results"][0]["speedup"] > 0
    assert data["results"][0]["quoted"][0]["gflops"] == ZEGCLIP.gflops
    assert [p.name for p in out.parent.iterdir()] == ["profile.json"]  # no temporary file left


def test_training_step_of_a_linear_model_by_hand_leaves_the_given_module_alone():
    model = PixelLinear(5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = profile(model, size=(8, 6), classes=5, batch=2, memory=False, train=True, **FAST)
    t = r.train
    # Backward: only the weight's gradient (the images need none), as many FLOPs as the forward.
    assert t.gflops * 1e9 == pytest.approx(2 * (2 * 2 * 8 * 6 * 3 * 5))
    assert t.losses == ("loss_ce",) and t.timed_runs >= 1
    assert t.step_ms > 0 and t.images_per_s == pytest.approx(2 / (t.step_ms / 1e3))
    assert t.efficiency == pytest.approx(t.achieved_gflops_per_s / r.gemm_gflops_per_s)
    assert t.reference_step_ms is None and t.speedup is None
    # The AdamW steps ran on a copy: the module passed in keeps its weights and its mode.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
    text = format_profile(r)
    assert "| PixelLinear (loss_ce) | 2x3x8x6, C=5 | float32 |" in text
    assert json.loads(json.dumps(r.to_dict()))["train"]["losses"] == ["loss_ce"]


def test_training_step_counts_the_custom_op_backward_and_compares_to_the_reference():
    model = WithLPM(4)
    r = profile(model, size=(4, 6), classes=4, batch=1, compare="reference", memory=False, train=True, **FAST)
    t = r.train
    assert t.gflops > r.gflops  # the backward of lpm_logits is counted through its registered formula
    assert t.reference_step_ms > 0 and t.speedup == pytest.approx(t.reference_step_ms / t.step_ms)
    assert "ms: " in format_profile(r).split("one training step")[1]


def test_training_step_of_a_segmentor_is_its_loss_on_random_labels():
    r = _tiny_clip(train=True, frozen=False)  # the whole tiny CLIP trains, through Segmentor.loss
    assert r.train.losses == ("loss_ce",)
    assert r.train.gflops > 2 * r.gflops  # backward through every layer: about twice the forward again


def test_training_step_needs_trainable_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        _tiny_clip(train=True)  # the training-free clip model: CLIP frozen, nothing to train
    with pytest.raises(TypeError, match="train must be a bool"):
        profile(PixelLinear(2), train="yes")


def test_cli_train_profiles_pixelclip_on_random_masks(capsys):
    args = ["profile", "pixelclip", "--size", "64", "--classes", "2", "--min-seconds", "0", "--train"]
    args += ["--set", f"clip={tiny_clip(64)!r}", "--set", "image_size=64", "--set", "templates=('a {}.',)"]
    args += ["--set", "num_concepts=8", "--set", "mask_size=32"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "| pixelclip (loss_masks) | 1x3x64x64, C=2 | float32 |" in out


def test_input_errors():
    model = PixelLinear(2)
    with pytest.raises(ValueError, match=r"dtype must be torch\.float32 or torch\.bfloat16"):
        profile(model, dtype=torch.float16)
    with pytest.raises(ValueError, match="compare must be one of 'reference'"):
        profile(model, compare="triton")
    with pytest.raises(ValueError, match="classes must be >= 1"):
        profile(model, classes=0)
    with pytest.raises(TypeError, match=r"size must be an int or \(H, W\)"):
        profile(model, size=(1, 2, 3))
    with pytest.raises(ValueError, match="apply to a model given by name"):
        profile(model, pretrained="x.pt")
    with pytest.raises(TypeError, match=r"model must be a registered model name or an nn\.Module"):
        profile(42)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        profile("nope")
    with pytest.raises(TypeError, match="results must be a ProfileResult"):
        format_profile([])
