"""One-line adoption of the fused ops in existing model code (after Liger-Kernel's ``apply_liger_kernel_to_*``).

    import ovseg_fast.patch
    ovseg_fast.patch.biformer(model)   # every bi-level routing attention now runs the fused kernel

The modules are swapped in place and keep their parameters; build the optimizer after patching (the
NCHW variant's 1x1-conv weights become new ``nn.Parameter`` views of the same storage). State dicts
keep BiFormer's keys and shapes, so checkpoints load into and out of a patched model.
"""

from __future__ import annotations

from torch import nn

from ovseg_fast.ops._checks import check_choice
from ovseg_fast.ops.routed_attention import PADDINGS, RoutedAttention, biformer_variant

__all__ = ["biformer"]


def biformer(model: nn.Module, *, padding: str = "masked") -> int:
    """Replaces, in place, every BiFormer bi-level routing attention in ``model`` by a :class:`RoutedAttention`.

    Recognises BiFormer's ``BiLevelRoutingAttention`` ((B, H, W, C) input) and its NCHW variant by
    their attributes (BiFormer need not be installed) and builds each replacement with
    :meth:`RoutedAttention.from_biformer`: same parameters, same scale (``qk_dim ** -0.5``), same
    windows, top-k and LEPE. Every module is checked before the first is replaced: an unsupported
    setting raises ``ValueError`` naming it and leaves ``model`` unchanged.

    Args:
        model: any ``nn.Module`` (a module that is itself a BiFormer attention cannot be replaced in
            place: use ``RoutedAttention.from_biformer``).
        padding: ``"masked"`` (default: padding tokens of sizes that are not multiples of the window
            count take no part) or ``"biformer"`` (BiFormer's zero-padding of the input before the
            projections, reproducing its outputs on such sizes); equal on multiples of the window count.

    Returns:
        The number of modules replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice("padding", padding, PADDINGS)
    if biformer_variant(model) is not None:
        raise ValueError("model is itself a BiFormer attention module; use RoutedAttention.from_biformer(model)")
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if biformer_variant(child) is not None
    ]
    replacements = [RoutedAttention.from_biformer(child, padding=padding) for _, _, child in targets]
    for (parent, name, _), new in zip(targets, replacements):
        setattr(parent, name, new)
    return len(targets)
