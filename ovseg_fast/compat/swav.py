"""SwAV's ``distributed_sinkhorn`` and PixelCLIP's online-clustering Sinkhorn on :func:`ovseg_fast.ops.sinkhorn`.

Which call reproduces which method (``logits`` are this process's (B, K) rows):

- SwAV (Caron et al. 2020): ``distributed_sinkhorn(out, epsilon, iterations)`` is
  ``sinkhorn(out, epsilon=epsilon, n_iters=iterations)``: ``exp(out / epsilon)`` balanced so that
  every cluster gets ``B_total / K`` and every row sums to 1.
- PixelCLIP (Shin et al. 2024): ``pixelclip_sinkhorn(logits, iterations)`` starts from the softmax
  over the clusters (its logits are ``100 x`` cosine similarities) and runs SwAV's iterations on it,
  with ``epsilon = 1``: ``sinkhorn(log_softmax(logits, -1), epsilon=1)``. It solves ONE problem over
  all rows of the batch (every mask of every image, on every process), not one problem per image.

Both run without gradient, as SwAV's and PixelCLIP's functions do (``@torch.no_grad``): the
assignment is a target. Across processes, every process passes its own rows and gets its rows of
the assignment, identical to one process holding all rows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ovseg_fast.ops._checks import check_float, check_int, check_tensor
from ovseg_fast.ops.sinkhorn import sinkhorn

__all__ = ["distributed_sinkhorn", "pixelclip_sinkhorn"]


def _group(process_group):
    """The given group, else the default group when ``torch.distributed`` is initialised, else None."""
    if process_group is not None:
        return process_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


@torch.no_grad()
def distributed_sinkhorn(
    out: Tensor, epsilon: float = 0.05, iterations: int = 3, process_group: Optional[object] = None
) -> Tensor:
    """SwAV's ``distributed_sinkhorn``: balanced soft assignment of this process's samples to K prototypes.

    Args:
        out: (B, K) prototype scores of this process's B samples (float32, float64, bfloat16, float16).
        epsilon: SwAV's ``epsilon`` (> 0): the assignment starts from ``exp(out / epsilon)``.
        iterations: SwAV's ``sinkhorn_iterations`` (>= 1), each a (prototype, sample) normalisation pair.
        process_group: the ``torch.distributed`` group the samples are split over; default: the whole
            world when ``torch.distributed`` is initialised, else this process alone.

    Returns:
        Q (B, K), dtype of ``out``, rows summing to 1 (SwAV's ``Q *= B; return Q.t()``), no gradient.
    """
    check_tensor("out", out, ndim=(2,))
    epsilon = check_float("epsilon", epsilon, positive=True)
    iterations = check_int("iterations", iterations, minimum=1)
    return sinkhorn(out, epsilon=epsilon, n_iters=iterations, process_group=_group(process_group))


@torch.no_grad()
def pixelclip_sinkhorn(logits: Tensor, iterations: int = 3, process_group: Optional[object] = None) -> Tensor:
    """PixelCLIP's online clustering: softmax over the clusters, then SwAV's iterations, one problem.

    Args:
        logits: (N, K) cluster logits of this process's N masks (all images of the batch flattened
            together; PixelCLIP uses ``100 x`` cosine similarity), floating dtype.
        iterations: Sinkhorn iterations (>= 1).
        process_group: as in :func:`distributed_sinkhorn` (default: the world when initialised).

    Returns:
        Q (N, K), dtype of ``logits``, rows summing to 1, no gradient. Equals
        ``sinkhorn(log_softmax(logits, -1), epsilon=1, n_iters=iterations)`` over the rows of all processes.
    """
    check_tensor("logits", logits, ndim=(2,))
    iterations = check_int("iterations", iterations, minimum=1)
    start = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
    q = sinkhorn(start, epsilon=1.0, n_iters=iterations, process_group=_group(process_group))
    return q.to(logits.dtype)
