"""Drop-in replacements for other projects' code, backed by the public ops.

- :mod:`ovseg_fast.compat.swav`: SwAV's ``distributed_sinkhorn`` and PixelCLIP's variant.
- :mod:`ovseg_fast.compat.pydensecrf`: the pydensecrf API (``densecrf.DenseCRF2D``, ``utils``) on
  :func:`ovseg_fast.ops.dense_crf`.

BiFormer models are patched in place by :func:`ovseg_fast.patch.biformer`.
"""
