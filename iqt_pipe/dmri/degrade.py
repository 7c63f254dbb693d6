"""Low-resolution synthesis by the IQT protocol.

An HR DWI series is block-averaged over r×r×r voxels (every volume, one LR voxel per
block), then DTI is fitted on the LR series. The HR DTI fitted the same way is the
target. DWIs are downsampled first and fitted second — tensors are never downsampled.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import nibabel as nb
import numpy as np

from iqt_pipe.dmri.fit import DTIFit
from iqt_pipe.dmri.gradients import GradientTable


def crop_to_multiple(data: np.ndarray, r: int) -> np.ndarray:
    """Drop the trailing voxels of each spatial axis so its length is a multiple of ``r``.

    Cropping at the far end keeps voxel (0, 0, 0), hence the affine, unchanged.
    """
    x, y, z = (s - s % r for s in data.shape[:3])
    return data[:x, :y, :z]


def block_average(data: np.ndarray, r: int) -> np.ndarray:
    """Mean over r×r×r blocks of the first three axes (after cropping to a multiple of r)."""
    _check_factor(r)
    data = crop_to_multiple(np.asarray(data), r)
    x, y, z = (s // r for s in data.shape[:3])
    if min(x, y, z) < 1:
        raise ValueError(f"volume of shape {data.shape[:3]} is smaller than one {r}³ block")
    blocks = data.reshape((x, r, y, r, z, r) + data.shape[3:])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def downsample_affine(affine: np.ndarray, r: int) -> np.ndarray:
    """Affine of the block-averaged grid: LR voxel i sits at the centre of HR voxels
    r·i … r·i + r − 1, i.e. at HR index r·i + (r − 1)/2."""
    _check_factor(r)
    scale = np.diag([r, r, r, 1.0])
    scale[:3, 3] = (r - 1) / 2.0
    return np.asarray(affine, dtype=np.float64) @ scale


def upsample_affine(affine: np.ndarray, r: int) -> np.ndarray:
    """Inverse of :func:`downsample_affine`: the HR grid whose r³ blocks are the LR voxels."""
    return np.asarray(affine, dtype=np.float64) @ np.linalg.inv(downsample_affine(np.eye(4), r))


def degrade_dwi(dwi: np.ndarray, affine: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-average every DWI volume; returns the LR series and its affine."""
    return block_average(dwi, r), downsample_affine(affine, r)


@dataclass
class TrainingPair:
    """An LR/HR DTI pair made by the IQT protocol, both fitted on the whole volume."""

    r: int
    hr: DTIFit
    lr: DTIFit
    hr_affine: np.ndarray
    lr_affine: np.ndarray
    hr_mask: np.ndarray  # brain mask of the (cropped) HR series
    lr_mask: np.ndarray  # brain mask of the LR series
    lr_dwi: np.ndarray


def make_pair(
    dwi: np.ndarray, affine: np.ndarray, gtab: GradientTable, r: int = 2, source: str = "DWI"
) -> TrainingPair:
    """LR synthesis plus DTI fits of both resolutions, with a brain mask for each.

    Both resolutions go through :func:`iqt_pipe.dmri.prepare.fit_series`, as the app's native
    series does: fits cover every voxel with enough positive signal (masking is for scoring and
    sampling, not for the fit); each mask comes from ``median_otsu`` on its own mean b = 0.
    """
    from iqt_pipe.dmri.prepare import fit_series

    hr_dwi = crop_to_multiple(dwi, r)
    lr_dwi, lr_affine = degrade_dwi(hr_dwi, affine, r)
    hr, hr_mask = fit_series(hr_dwi, affine, gtab, source=source)
    lr, lr_mask = fit_series(lr_dwi, lr_affine, gtab, source=f"{source} (LR)")
    return TrainingPair(
        r=r,
        hr=hr,
        lr=lr,
        hr_affine=np.asarray(affine, dtype=np.float64),
        lr_affine=lr_affine,
        hr_mask=hr_mask,
        lr_mask=lr_mask,
        lr_dwi=lr_dwi,
    )


def grid_offsets(r: int) -> list[tuple[int, int, int]]:
    """The r³ alignments of an r×r×r block grid on an HR grid: the HR index at which the first
    block of each axis starts, ``(0, 0, 0)`` (the IQT protocol's) first."""
    _check_factor(r)
    return list(itertools.product(range(int(r)), repeat=3))


def shift_grid(dwi: np.ndarray, affine: np.ndarray, offset: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``dwi`` without its first ``offset`` voxels along each axis, and the affine of what is left
    (the same world positions: voxel i of the result is voxel i + offset of ``dwi``)."""
    offset = np.asarray(offset, dtype=int)
    shift = np.eye(4)
    shift[:3, 3] = offset
    return dwi[offset[0] :, offset[1] :, offset[2] :], np.asarray(affine, dtype=np.float64) @ shift


def make_pairs(
    dwi: np.ndarray,
    affine: np.ndarray,
    gtab: GradientTable,
    r: int,
    offsets: Sequence[Sequence[int]],
    source: str = "DWI",
) -> list[TrainingPair]:
    """:func:`make_pair`'s pair of the series at each block-grid ``offset`` (:func:`grid_offsets`):
    the same anatomy sampled by LR voxels half a voxel (at r = 2) apart, for training. At
    offset 0 it can differ from :func:`make_pair`'s in a few HR-mask voxels at the grid's far
    edge (the mask of the whole grid, not of the cropped one), so one-grid libraries keep
    :func:`make_pair`.

    A voxel's fit does not depend on its neighbours, so the HR series is fitted once, and its
    brain mask made once, on the whole grid; each pair holds the part its blocks cover (the
    fit's ``guards`` are the whole grid's). Each LR series is fitted on its own.
    """
    from iqt_pipe.dmri.prepare import fit_series

    hr, hr_mask = fit_series(dwi, affine, gtab, source=source)
    pairs = []
    for offset in offsets:
        hr_dwi, hr_affine = shift_grid(dwi, affine, offset)
        hr_dwi = crop_to_multiple(hr_dwi, r)
        part = tuple(slice(o, o + n) for o, n in zip(offset, hr_dwi.shape[:3]))
        lr_dwi, lr_affine = degrade_dwi(hr_dwi, hr_affine, r)
        lr, lr_mask = fit_series(lr_dwi, lr_affine, gtab, source=f"{source} (LR, grid offset {tuple(offset)})")
        pairs.append(
            TrainingPair(
                r=r,
                hr=replace(hr, tensors=hr.tensors[part], s0=hr.s0[part], mask=hr.mask[part]),
                lr=lr,
                hr_affine=hr_affine,
                lr_affine=lr_affine,
                hr_mask=hr_mask[part],
                lr_mask=lr_mask,
                lr_dwi=lr_dwi,
            )
        )
    return pairs


def voxel_centres(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of every voxel centre, shape ``shape + (3,)``."""
    ijk = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=-1)
    return nb.affines.apply_affine(affine, ijk)


def _check_factor(r: int) -> None:
    if int(r) != r or r < 1:
        raise ValueError(f"the upsampling factor must be a positive integer, got {r!r}")
