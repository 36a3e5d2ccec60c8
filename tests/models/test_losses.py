from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from ovseg_fast.models.losses import (
    DICE_WEIGHT,
    FOCAL_WEIGHT,
    binary_cross_entropy,
    cross_entropy,
    dice_loss,
    focal_dice_losses,
    one_hot_targets,
    sigmoid_focal_loss,
)

IGNORE = 255


def _inputs(b=2, c=4, h=5, w=6, ignore_fraction=0.2, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(b, c, h, w, generator=gen) * 2).to(dtype)
    targets = torch.randint(0, c, (b, h, w), generator=gen)
    targets[torch.rand(b, h, w, generator=gen) < ignore_fraction] = IGNORE
    return logits, targets


# Straightforward per-pixel formulas with Python loops: the spec the vectorised losses are checked against.


def _pixels(targets):
    b, h, w = targets.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(targets[i, y, x])
                if t != IGNORE:
                    yield i, y, x, t


def _focal_element(x, positive, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    p_t = p if positive else 1 - p
    a_t = alpha if positive else 1 - alpha
    return -a_t * (1 - p_t) ** gamma * math.log(p_t)


def _loop_focal_masks(logits, targets):
    b, c = logits.shape[:2]
    total = 0.0
    for i in range(b):
        pix = [(y, x, t) for (j, y, x, t) in _pixels(targets) if j == i]
        if not pix:
            continue
        for k in range(c):
            total += sum(_focal_element(float(logits[i, k, y, x]), t == k) for y, x, t in pix) / len(pix)
    masks = sum(len({t for (j, _, _, t) in _pixels(targets) if j == i}) for i in range(b))
    return total / max(masks, 1)


def _loop_dice_masks(logits, targets, smooth=1.0):
    b = logits.shape[0]
    total, masks = 0.0, 0
    for i in range(b):
        pix = [(y, x, t) for (j, y, x, t) in _pixels(targets) if j == i]
        for k in sorted({t for _, _, t in pix}):
            p = [1 / (1 + math.exp(-float(logits[i, k, y, x]))) for y, x, _ in pix]
            yk = [1.0 if t == k else 0.0 for _, _, t in pix]
            inter = sum(a * bb for a, bb in zip(p, yk))
            total += 1 - (2 * inter + smooth) / (sum(p) + sum(yk) + smooth)
            masks += 1
    return total / max(masks, 1)


def _loop_ce(logits, targets):
    terms = []
    for i, y, x, t in _pixels(targets):
        z = logits[i, :, y, x].double()
        terms.append(float(torch.logsumexp(z, 0) - z[t]))
    return sum(terms) / len(terms)


def _loop_bce(logits, targets):
    c = logits.shape[1]
    terms = []
    for i, y, x, t in _pixels(targets):
        for k in range(c):
            z = float(logits[i, k, y, x])
            yk = 1.0 if t == k else 0.0
            terms.append(max(z, 0) - z * yk + math.log1p(math.exp(-abs(z))))
    return sum(terms) / len(terms)


def test_focal_matches_loop_formula():
    logits, targets = _inputs()
    got = sigmoid_focal_loss(logits, targets, ignore_index=IGNORE)
    assert got.item() == pytest.approx(_loop_focal_masks(logits, targets), rel=1e-10)


def test_focal_matches_torchvision_when_nothing_ignored():
    logits, targets = _inputs(ignore_fraction=0.0)
    onehot = one_hot_targets(targets, logits.shape[1]).to(logits.dtype)
    for reduction in ("mean", "sum", "none"):
        ours = sigmoid_focal_loss(logits, targets, reduction=reduction)
        ref = torchvision.ops.sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction=reduction)
        torch.testing.assert_close(ours, ref)
    ours = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=1.5, reduction="mean")
    ref = torchvision.ops.sigmoid_focal_loss(logits, onehot, alpha=-1, gamma=1.5, reduction="mean")
    torch.testing.assert_close(ours, ref)


def test_focal_ignores_pixels_like_dropping_them():
    logits, targets = _inputs()
    valid = targets != IGNORE
    onehot = one_hot_targets(targets, logits.shape[1]).to(logits.dtype)
    ref = torchvision.ops.sigmoid_focal_loss(logits, onehot, reduction="none").permute(0, 2, 3, 1)[valid]
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, reduction="mean"), ref.mean())
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, reduction="sum"), ref.sum())
    none = sigmoid_focal_loss(logits, targets, reduction="none")
    assert none.shape == logits.shape and bool((none.permute(0, 2, 3, 1)[~valid] == 0).all())


def test_dice_matches_loop_formula():
    logits, targets = _inputs()
    got = dice_loss(logits, targets, ignore_index=IGNORE)
    assert got.item() == pytest.approx(_loop_dice_masks(logits, targets), rel=1e-10)
    got = dice_loss(logits, targets, smooth=0.5)
    assert got.item() == pytest.approx(_loop_dice_masks(logits, targets, smooth=0.5), rel=1e-10)
    per_mask = dice_loss(logits, targets, reduction="none")
    assert per_mask.shape == logits.shape[:2]
    torch.testing.assert_close(dice_loss(logits, targets, reduction="mean"), per_mask.mean())


def test_cross_entropy_and_bce_match_loop_formulas():
    logits, targets = _inputs()
    assert cross_entropy(logits, targets).item() == pytest.approx(_loop_ce(logits, targets), rel=1e-10)
    assert binary_cross_entropy(logits, targets).item() == pytest.approx(_loop_bce(logits, targets), rel=1e-10)


def test_cross_entropy_matches_torch_with_weights_and_smoothing():
    logits, targets = _inputs()
    weight = torch.rand(logits.shape[1], dtype=logits.dtype) + 0.5
    for kwargs in ({}, {"weight": weight}, {"label_smoothing": 0.1}):
        ref = F.cross_entropy(logits, targets, ignore_index=IGNORE, **kwargs)
        torch.testing.assert_close(cross_entropy(logits, targets, **kwargs), ref)
    ref = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(cross_entropy(logits, targets, reduction="none"), ref)


def test_bce_pos_weight_matches_torch():
    logits, targets = _inputs(ignore_fraction=0.0)
    pw = torch.rand(logits.shape[1], dtype=logits.dtype) + 0.5
    onehot = one_hot_targets(targets, logits.shape[1]).to(logits.dtype)
    ref = F.binary_cross_entropy_with_logits(logits, onehot, pos_weight=pw.view(-1, 1, 1))
    torch.testing.assert_close(binary_cross_entropy(logits, targets, pos_weight=pw), ref)


def test_focal_dice_pair_uses_zegclip_weights():
    logits, targets = _inputs()
    out = focal_dice_losses(logits, targets)
    assert set(out) == {"loss_focal", "loss_dice"}
    assert (FOCAL_WEIGHT, DICE_WEIGHT) == (100.0, 1.0)
    torch.testing.assert_close(out["loss_focal"], 100.0 * sigmoid_focal_loss(logits, targets))
    torch.testing.assert_close(out["loss_dice"], dice_loss(logits, targets))


LOSSES = [
    pytest.param(lambda x, t, **k: sigmoid_focal_loss(x, t, **k), id="focal"),
    pytest.param(lambda x, t, **k: sigmoid_focal_loss(x, t, reduction="mean", **k), id="focal_mean"),
    pytest.param(lambda x, t, **k: dice_loss(x, t, **k), id="dice"),
    pytest.param(lambda x, t, **k: dice_loss(x, t, smooth=0.0, **k), id="dice_smooth0"),
    pytest.param(lambda x, t, **k: binary_cross_entropy(x, t, **k), id="bce"),
    pytest.param(lambda x, t, **k: cross_entropy(x, t, **k), id="ce"),
    pytest.param(lambda x, t, **k: cross_entropy(x, t, weight=torch.ones(4), **k), id="ce_weighted"),
]


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_all_ignored_gives_zero_loss_and_zero_gradients(loss_fn):
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    targets = torch.full((2, 3, 3), 7, dtype=torch.int64)
    loss = loss_fn(logits, targets, ignore_index=7)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and bool((logits.grad == 0).all())


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_gradients_finite_and_only_on_valid_pixels_for_pixelwise_losses(loss_fn):
    logits, targets = _inputs(dtype=torch.float32)
    logits = (logits * 20).requires_grad_(True)  # saturated sigmoids / softmaxes
    loss = loss_fn(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_ignored_logits_do_not_change_the_loss(loss_fn):
    logits, targets = _inputs(dtype=torch.float32)
    other = logits.clone()
    ignored = (targets == IGNORE).unsqueeze(1).expand_as(logits)
    other[ignored] = torch.randn(int(ignored.sum())) * 10
    torch.testing.assert_close(loss_fn(logits, targets), loss_fn(other, targets))


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_ignore_index_inside_the_class_range(loss_fn):
    logits, targets = _inputs(dtype=torch.float32, ignore_fraction=0.0)
    as_255 = targets.clone()
    as_255[targets == 1] = IGNORE
    torch.testing.assert_close(loss_fn(logits, targets, ignore_index=1), loss_fn(logits, as_255))


def test_bfloat16_logits_computed_in_float32():
    logits, targets = _inputs(dtype=torch.float32)
    low = logits.bfloat16()
    for fn in (sigmoid_focal_loss, dice_loss, binary_cross_entropy, cross_entropy):
        out = fn(low, targets)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(low.float(), targets))


def test_input_errors():
    logits, targets = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="logits must have 4 dimensions"):
        cross_entropy(logits[0], targets)
    with pytest.raises(TypeError, match="targets must have dtype int64"):
        dice_loss(logits, targets.int())
    with pytest.raises(TypeError, match="logits must have dtype"):
        dice_loss(logits.long(), targets)
    with pytest.raises(ValueError, match=r"targets must have shape \(B, H, W\)"):
        sigmoid_focal_loss(logits, targets[:, :-1])
    bad = targets.clone()
    bad[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"targets must hold class indices in \[0, 4\) or ignore_index=255, got 9"):
        binary_cross_entropy(logits, bad)
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match="got -1"):
        cross_entropy(logits, bad)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sigmoid_focal_loss(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(logits, targets, reduction="masks")
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        sigmoid_focal_loss(logits, targets, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha must be <= 1"):
        sigmoid_focal_loss(logits, targets, alpha=2.0)
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\)"):
        cross_entropy(logits, targets, weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"pos_weight must have shape \(C,\)"):
        binary_cross_entropy(logits, targets, pos_weight=torch.ones(5))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        dice_loss(logits, targets, ignore_index=255.0)
    with pytest.raises(ValueError, match="at least one class"):
        dice_loss(logits[:, :0], targets)
