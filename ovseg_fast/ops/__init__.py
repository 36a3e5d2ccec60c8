"""The public ops of ovseg-fast.

Each op is one function (plus an ``nn.Module`` where parameters belong) with a plain-PyTorch
reference, a fused C++ CPU kernel and a fused Triton GPU kernel behind it, chosen per call (see
:mod:`ovseg_fast.backends`; override with :func:`use_backend` or ``OVSEG_BACKEND``).
"""

from ovseg_fast.backends import BackendError, use_backend
from ovseg_fast.ops.dense_crf import DenseCRF, dense_crf, dense_crf_flops, gaussian_blur
from ovseg_fast.ops.lpm import (
    LinearProjectionModule,
    hadamard_concat_linear,
    hadamard_concat_linear_flops,
    lpm_logits,
    lpm_logits_flops,
)
from ovseg_fast.ops.moe import (
    GatingOutput,
    MixtureOfExperts,
    moe_combine,
    moe_combine_flops,
    moe_dispatch,
    topk_gating,
    topk_gating_flops,
)
from ovseg_fast.ops.routed_attention import RoutedAttention, routed_attention, routed_attention_flops
from ovseg_fast.ops.sinkhorn import Sinkhorn, sinkhorn, sinkhorn_flops

__all__ = [
    "BackendError",
    "DenseCRF",
    "GatingOutput",
    "LinearProjectionModule",
    "MixtureOfExperts",
    "RoutedAttention",
    "Sinkhorn",
    "dense_crf",
    "dense_crf_flops",
    "gaussian_blur",
    "hadamard_concat_linear",
    "hadamard_concat_linear_flops",
    "lpm_logits",
    "lpm_logits_flops",
    "moe_combine",
    "moe_combine_flops",
    "moe_dispatch",
    "routed_attention",
    "routed_attention_flops",
    "sinkhorn",
    "sinkhorn_flops",
    "topk_gating",
    "topk_gating_flops",
    "use_backend",
]
