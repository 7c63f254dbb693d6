"""Interpolation baselines on the tensor components: nearest, trilinear, cubic B-spline.

HR voxel h of an r-times finer grid (see :func:`iqt_pipe.degrade.upsample_affine`) sits at LR
voxel coordinate (h − (r − 1)/2) / r.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ORDERS = {"nearest": 0, "trilinear": 1, "cubic": 3}


def interpolate_tensors(lr: np.ndarray, r: int, method: str = "cubic") -> np.ndarray:
    """Upsample an ``(X, Y, Z, C)`` field to ``(rX, rY, rZ, C)`` by ``method``.

    Edges are extended with the nearest value, so every HR voxel gets a finite value.
    """
    if method not in ORDERS:
        raise ValueError(f"unknown interpolation {method!r}; choose from {', '.join(ORDERS)}")
    order = ORDERS[method]
    axes = [(np.arange(s * r) - (r - 1) / 2.0) / r for s in lr.shape[:3]]
    if order == 0:
        idx = [np.clip(np.floor(a + 0.5).astype(int), 0, s - 1) for a, s in zip(axes, lr.shape[:3])]
        return np.ascontiguousarray(lr[np.ix_(*idx)]).astype(np.float32)
    coords = np.meshgrid(*axes, indexing="ij")
    out = np.empty(tuple(s * r for s in lr.shape[:3]) + lr.shape[3:], np.float32)
    for c in range(lr.shape[3]):
        out[..., c] = ndimage.map_coordinates(
            lr[..., c].astype(np.float64), coords, order=order, mode="nearest", prefilter=order > 1
        )
    return out
