"""A DWI series as iqt-pipe uses it: float32 data, affine, checked gradient table."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from iqt_pipe.dmri.gradients import GradientTable, read_gradients
from iqt_pipe.io import InputError, load_nifti


@dataclass
class DWISeries:
    data: np.ndarray  # (X, Y, Z, N) float32, scale factors applied
    affine: np.ndarray  # (4, 4) voxel → world (mm)
    gtab: GradientTable
    path: Path

    @property
    def zooms(self) -> np.ndarray:
        """Voxel sizes (mm) from the affine's column norms."""
        return nb.affines.voxel_sizes(self.affine)


def gradient_paths(dwi_path: str | os.PathLike) -> tuple[Path, Path]:
    """The BIDS/FSL ``.bval``/``.bvec`` files beside a ``*_dwi.nii[.gz]``."""
    path = Path(dwi_path)
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    return path.with_name(stem + ".bval"), path.with_name(stem + ".bvec")


def load_dwi(
    path: str | os.PathLike,
    bval: str | os.PathLike | None = None,
    bvec: str | os.PathLike | None = None,
) -> DWISeries:
    """Load a DWI series and its gradient table (default: the files beside it), checked."""
    path = Path(path)
    data, affine, _ = load_nifti(path)
    if data.ndim != 4:
        raise InputError(f"{path}: a DWI series must be 4-D (x, y, z, volumes), this image is {data.ndim}-D")
    if data.shape[-1] < 2:
        raise InputError(f"{path}: a single volume is not a DWI series; DTI needs b=0 plus ≥ 6 directions")
    zooms = nb.affines.voxel_sizes(affine)
    if np.any(zooms < 1e-3) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{path}: the affine has a zero voxel size; fix the image header (qform/sform)")
    default_bval, default_bvec = gradient_paths(path)
    gtab = read_gradients(bval or default_bval, bvec or default_bvec, n_volumes=data.shape[-1])
    return DWISeries(data=data, affine=affine, gtab=gtab, path=path)
