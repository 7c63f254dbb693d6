"""Interpolation baselines on the tensor components: nearest, trilinear, cubic B-spline.

HR voxel h of an r-times finer grid (see :func:`iqt_pipe.dmri.degrade.upsample_affine`) sits at LR
voxel coordinate (h − (r − 1)/2) / r.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
    # The B-spline interpolant is a tensor product, so on a grid it is a 1-D interpolation along
    # each axis in turn: what map_coordinates(mode="nearest") gives at these coordinates (edges
    # padded by _PAD voxels, then the spline prefilter in float64 on the LR grid, one field per
    # thread: SciPy releases the GIL), the r sub-positions of each axis in float32 on PyTorch's
    # threads (the HR grid is the large part).
    import torch

    fields = np.moveaxis(lr.reshape(lr.shape[:3] + (-1,)), -1, 0)  # one LR field per channel
    trim = _PAD - _TAPS  # the taps reach _TAPS coefficients beyond the volume

    def coefficients(field: np.ndarray) -> np.ndarray:
        c = np.pad(field.astype(np.float64), _PAD, mode="edge")
        for axis in range(3 if order > 1 else 0):
            c = ndimage.spline_filter1d(c, order=order, axis=axis, mode="nearest", output=np.float64)
        return c[trim:-trim, trim:-trim, trim:-trim].astype(np.float32)

    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(fields)))) as pool:
        out = torch.from_numpy(np.stack(list(pool.map(coefficients, fields)), axis=-1))
    for axis in range(3):
        out = _upsample_axis(out, axis, r, order)
    return out.numpy().reshape(out.shape[:3] + lr.shape[3:])


#: Edge padding before the prefilter (scipy's own for mode="nearest"), and how far beyond the
#: volume the interpolation's taps reach (what is kept of it after the prefilter).
_PAD, _TAPS = 12, 2


def _bspline(t: float, order: int) -> float:
    t = abs(t)
    if order == 1:
        return max(1 - t, 0.0)
    return 2 / 3 - t**2 + t**3 / 2 if t < 1 else (2 - t) ** 3 / 6 if t < 2 else 0.0


def _upsample_axis(coeffs, axis: int, r: int, order: int):
    """Interpolate the torch tensor ``coeffs`` along ``axis`` (padded by ``_TAPS``, which it
    drops) at the r sub-positions of each voxel: sub-position q of voxel p sits at
    p + (q − (r − 1)/2)/r, so each q is a fixed (order + 1)-tap weighted sum of shifted slices."""
    import torch

    n = coeffs.shape[axis] - 2 * _TAPS
    phases = []
    for q in range(r):
        x = (q - (r - 1) / 2) / r
        base = int(np.floor(x))
        acc = None
        for k in range(-(order // 2), order // 2 + 2):
            w = _bspline(x - (base + k), order)
            shifted = coeffs.narrow(axis, _TAPS + base + k, n)
            acc = shifted * w if acc is None else acc.add_(shifted, alpha=w)
        phases.append(acc)
    return torch.stack(phases, dim=axis + 1).flatten(axis, axis + 1)
