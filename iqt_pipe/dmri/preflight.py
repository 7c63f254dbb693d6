"""Checks of every selected DWI run before any work starts.

The BIDS App runs :func:`check_run` on each run it is about to process: the image header
(4-D, voxel sizes, affine without shear, a matrix large enough, voxels not too anisotropic),
the gradient table against the image (:func:`iqt_pipe.dmri.gradients.read_gradients`, a usable
DTI shell), the voxel data (readable to the end, finite, no all-zero volume) and the memory
the super-resolution will need, and a brain mask given with a preprocessed series (on the
series' grid, not empty). A problem is an :class:`~iqt_pipe.io.InputError` whose
message is one line naming the file and the fix, so a user learns of it in seconds instead of
from a crash file an hour later. Nothing here writes.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import nibabel as nb
import numpy as np

from iqt_pipe.bids import DWIRun
from iqt_pipe.dmri.gradients import read_gradients, select_dti_volumes
from iqt_pipe.io import NIFTI_READ_ERRORS, InputError, unreadable_nifti

#: Voxels along each axis the brain mask and the network's 5³ receptive field need at least.
MIN_VOXELS_PER_AXIS = 8
#: Largest ratio of the largest to the smallest voxel edge accepted: the network was trained
#: on grids up to 2.5 × 2.5 × 4.2 mm (ratio 1.7); thicker slices need reslicing first.
MAX_ANISOTROPY = 2.0
#: Above this ratio a usable run gets a warning.
WARN_ANISOTROPY = 1.5
#: Largest |cos| between two voxel axes (about 0.6°): beyond it the grid is sheared, and the
#: voxel → world map is no rotation that tensors and gradient directions could follow.
MAX_SHEAR_COS = 1e-2
#: Memory a participant run needs besides the super-resolution's arrays (Python, PyTorch,
#: Nipype, one DWI series), MB.
BASE_MEMORY_MB = 600
#: The network's working memory (tiles in flight): at least this, at most the default, MB.
#: 128 MB always holds one 16³ CPU tile (65 MB with 32 FA/MD samples), so on a CPU the
#: tiling, and with it the FA/MD samples, never depends on --mem-mb.
MIN_TILE_MB, DEFAULT_TILE_MB = 128, 1024


def _header(path: Path):
    try:
        img = nb.load(path)
        img.header.get_data_shape()
    except NIFTI_READ_ERRORS as exc:
        raise unreadable_nifti(path, exc) from None
    return img


def check_geometry(path: Path, img) -> tuple[float, float, float]:
    """The voxel grid's checks; returns the voxel sizes (mm)."""
    shape, affine = tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=float)
    if len(shape) != 4:
        raise InputError(
            f"{path}: a DWI series must be 4-D (x, y, z, volumes), this image is {len(shape)}-D; "
            "give the whole series, not one volume"
        )
    if shape[3] < 2:
        raise InputError(f"{path}: a single volume is not a DWI series; DTI needs b=0 plus ≥ 6 directions")
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: the header has no valid affine (NaN or Inf); fix the qform/sform")
    axes = affine[:3, :3]
    zooms = np.linalg.norm(axes, axis=0)
    if np.any(zooms < 1e-3):
        raise InputError(f"{path}: the affine has a zero voxel size ({_mm(zooms)}); fix the image header (qform/sform)")
    unit = axes / zooms
    cos = np.abs(unit.T @ unit - np.eye(3)).max()
    if cos > MAX_SHEAR_COS:
        raise InputError(
            f"{path}: the voxel axes are sheared ({math.degrees(math.asin(min(cos, 1))):.1f}° from "
            "orthogonal); reslice to an orthogonal grid (e.g. mrgrid regrid) or fix the header"
        )
    hdr_zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if np.any(~np.isfinite(hdr_zooms)) or np.any(hdr_zooms <= 0) or np.any(np.abs(hdr_zooms - zooms) > 0.01 * zooms):
        # nibabel reads a pixdim of 0 as 1: a mismatch with the affine is how it shows.
        raise InputError(
            f"{path}: the header's voxel sizes (pixdim {_mm(hdr_zooms)}) disagree with its affine "
            f"({_mm(zooms)}); fix the header so both give the true voxel size"
        )
    small = [n for n in shape[:3] if n < MIN_VOXELS_PER_AXIS]
    if small:
        raise InputError(
            f"{path}: the matrix {shape[0]}×{shape[1]}×{shape[2]} is too small; super-resolution "
            f"needs at least {MIN_VOXELS_PER_AXIS} voxels along each axis"
        )
    ratio = zooms.max() / zooms.min()
    if ratio > MAX_ANISOTROPY:
        raise InputError(
            f"{path}: voxels of {_mm(zooms)} are too anisotropic (ratio {ratio:.1f} > "
            f"{MAX_ANISOTROPY:g}); reslice to near-isotropic voxels first (e.g. mrgrid regrid -voxel "
            f"{zooms.min():.3g})"
        )
    return tuple(float(z) for z in zooms)


def check_data(path: Path, img) -> None:
    """Read the voxels to the end: truncated files, NaN/Inf, empty volumes."""
    try:  # unscaled: an int16 series stays int16 (zeros and NaN do not depend on the scaling)
        proxy = img.dataobj
        data = np.asanyarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(
            f"{path}: the voxel data cannot be read ({exc.__class__.__name__}: {str(exc)[:80]}); "
            "the file is truncated or corrupt, re-export or re-download it"
        ) from None
    # Volume by volume: the temporaries stay one volume large.
    floating = np.issubdtype(data.dtype, np.floating)
    n_bad, first, empty = 0, None, []
    for k in range(data.shape[-1]):
        volume = data[..., k]
        if floating:
            bad = ~np.isfinite(volume)
            if bad.any():
                n_bad += int(bad.sum())
                first = first or (*np.unravel_index(int(np.flatnonzero(bad)[0]), volume.shape), k)
        if not np.any(volume):
            empty.append(k)
    if n_bad:
        raise InputError(
            f"{path}: {n_bad} voxel values are NaN or Inf (first at {tuple(map(int, first))}); "
            "replace them with 0 (e.g. fslmaths in -nan out) or fix the step that made them"
        )
    if len(empty) == data.shape[-1]:
        raise InputError(f"{path}: every voxel is zero; the image holds no data, re-export it")
    if empty:
        raise InputError(
            f"{path}: volume {empty[0]} is all zero ({len(empty)} such volume(s)); remove them "
            "and their .bval/.bvec entries, or re-export the series"
        )


def check_mask(path: Path, dwi) -> None:
    """A brain mask given with a preprocessed series: readable, on the series' grid, not empty."""
    mask = _header(path)
    shape = tuple(int(n) for n in mask.shape)
    if shape[3:] not in ((), (1,)) or shape[:3] != tuple(dwi.shape[:3]):
        raise InputError(
            f"{path}: this brain mask ({'×'.join(map(str, shape))}) is not on the grid of its DWI series "
            f"({'×'.join(map(str, dwi.shape[:3]))}); give the mask written with the series, or remove it "
            "and iqt-pipe estimates one"
        )
    if not np.allclose(mask.affine, dwi.affine, atol=1e-3):
        raise InputError(
            f"{path}: this brain mask's affine differs from its DWI series'; give the mask written "
            "with the series, or remove it and iqt-pipe estimates one"
        )
    try:
        empty = not np.any(np.asanyarray(mask.dataobj))
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(
            f"{path}: the mask cannot be read ({exc.__class__.__name__}); re-export it, or remove it "
            "and iqt-pipe estimates one"
        ) from None
    if empty:
        raise InputError(
            f"{path}: the brain mask is empty (every voxel 0); give the mask written with the series, "
            "or remove it and iqt-pipe estimates one"
        )


def memory_needed_mb(shape: tuple[int, ...], r: int) -> int:
    """Peak memory (MB) of one participant run's super-resolution: the HR grid's float32
    outputs and running statistics (mean, intrinsic and parameter variance: 18 channels;
    FA/MD sums and squares in float64; the written maps), the native series, and the rest."""
    n_hr = int(np.prod(shape[:3])) * r**3
    per_hr_voxel = 4 * (18 + 18) + 8 * 4 + 4 * 8  # accumulators + arrays, FA/MD moments, maps
    series = int(np.prod(shape)) * 4 * 3  # raw, denoised, Gibbs-corrected copies
    return int(math.ceil((n_hr * per_hr_voxel + series) / 2**20)) + BASE_MEMORY_MB


def tile_budget_mb(shape: tuple[int, ...], r: int, mem_mb: int | None) -> int:
    """Memory for the network's tiles: what ``--mem-mb`` leaves after the run's arrays
    (:func:`memory_needed_mb`), at most ``DEFAULT_TILE_MB``, at least ``MIN_TILE_MB``."""
    if mem_mb is None:
        return DEFAULT_TILE_MB
    return int(max(MIN_TILE_MB, min(DEFAULT_TILE_MB, mem_mb - memory_needed_mb(shape, r))))


def check_memory(path: Path, needed_mb: int, mem_mb: int | None) -> None:
    """Refuse a run that cannot fit ``--mem-mb`` (or, without it, the machine's memory)."""
    needed_mb += MIN_TILE_MB
    if mem_mb is not None:
        if needed_mb > mem_mb:
            raise InputError(
                f"{path}: super-resolving this series needs about {needed_mb} MB but --mem-mb is "
                f"{mem_mb}; raise --mem-mb to at least {needed_mb} (and request that much from the scheduler)"
            )
        return
    total = _machine_memory_mb()
    if total is not None and needed_mb > total:
        raise InputError(
            f"{path}: super-resolving this series needs about {needed_mb} MB but this machine has "
            f"{total} MB; run it on a machine with more memory"
        )


def _machine_memory_mb() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
    except (ValueError, OSError, AttributeError):
        return None


def check_run(run: DWIRun, *, upsample: int, mem_mb: int | None = None) -> list[str]:
    """Every check of one run; raises :class:`InputError` (one line) at the first problem.
    Returns warnings (one line each) about a usable run."""
    path = Path(run.dwi)
    img = _header(path)
    shape = tuple(int(n) for n in img.shape)
    zooms = check_geometry(path, img)
    gtab = read_gradients(run.bval, run.bvec, n_volumes=shape[3])
    select_dti_volumes(gtab, str(run.bval))
    check_data(path, img)
    if run.mask is not None:
        check_mask(Path(run.mask), img)
    check_memory(path, memory_needed_mb(shape, upsample), mem_mb)
    if max(zooms) / min(zooms) > WARN_ANISOTROPY:
        return [f"{path}: anisotropic voxels ({_mm(zooms)}); super-resolution is less accurate along the thick axis"]
    return []


def _mm(zooms) -> str:
    return " × ".join(f"{z:.3g}" for z in zooms) + " mm"
