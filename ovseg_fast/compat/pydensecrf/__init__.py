"""pydensecrf's API on :func:`ovseg_fast.ops.dense_crf`: code written for pydensecrf runs unchanged after

    import ovseg_fast.compat.pydensecrf.densecrf as dcrf
    from ovseg_fast.compat.pydensecrf.utils import unary_from_softmax, unary_from_labels

Covered: ``DenseCRF2D(w, h, n_labels)``, ``setUnaryEnergy``, ``addPairwiseGaussian``,
``addPairwiseBilateral`` (Potts ``compat`` numbers, ``DIAG_KERNEL``, ``NORMALIZE_SYMMETRIC``: what
pydensecrf's examples and PnP-OVSS use), ``inference(n)``, ``utils.unary_from_softmax`` and
``utils.unary_from_labels``. Everything else raises a clear error instead of computing something else.
"""

from ovseg_fast.compat.pydensecrf import densecrf, utils

__all__ = ["densecrf", "utils"]
