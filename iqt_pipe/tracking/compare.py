"""How close tractograms come to a reference: the evaluation mode of tractography.

With an HR reference (e.g. through LR synthesis), native-LR and super-resolved tractograms are
compared with the HR one on the HR grid (:func:`evaluate_tractography`, on files
:func:`evaluate_files`):

* ``tdi_correlation``: Pearson correlation of the track-density images, within a brain mask
  (by default the voxels either tractogram visits, so the background's zeros do not count);
* ``dice`` and ``weighted_dice``: overlap of the voxels the two tractograms visit;
* ``far_fraction``: the fraction of test streamlines whose mean closest-point distance to the
  reference tractogram (over the streamline's points, to the nearest point of any reference
  streamline) exceeds ``far_mm`` — where a streamline lies, not how long it is: a short
  streamline lying on a long reference one is not far;
* per bundle, with bundle masks: the Dice of the voxels visited by the streamlines with most
  of their points in the bundle.

Plain functions, no Nipype; streamlines in world millimetres as :mod:`iqt_pipe.tracking.track`
returns them and :mod:`iqt_pipe.tracking.files` writes them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from iqt_pipe.io import InputError, write_tsv
from iqt_pipe.tracking.files import TSV_FLOAT, load_on_grid, load_streamlines, reference_grid
from iqt_pipe.tracking.track import densify, sample_nearest, track_density, voxel_size

#: Columns of :func:`evaluate_files`' TSV after ``tractogram`` (bundle columns ``dice_<name>``
#: and ``bundle_dice`` follow when bundle masks are given).
COMPARISON_COLUMNS = {
    "n_reference": "streamlines in the HR reference tractogram",
    "n_test": "streamlines in this tractogram",
    "tdi_correlation": "Pearson correlation of the track-density images within the mask",
    "dice": "Dice overlap of the voxels the two tractograms visit",
    "weighted_dice": "density-weighted Dice of the two track-density images, each normalised to unit sum",
    "far_fraction": "fraction of streamlines whose mean closest-point distance to the reference exceeds far_mm",
    "median_closest_mm": "median over streamlines of their mean closest-point distance to the reference (mm)",
    "mean_closest_point_mm": "mean over streamlines of the same (mm)",
    "median_mdf_mm": "median over streamlines of their minimum direct-flip distance to a reference streamline "
    "(mm; penalises length differences too)",
}


def mean_closest_distances(
    streamlines: Sequence[np.ndarray], reference: Sequence[np.ndarray] | np.ndarray, step: float = 0.5
) -> np.ndarray:
    """For each streamline, the mean over its points of the distance (mm) to the closest
    point of ``reference`` (streamlines, densified to ``step`` mm, or an ``(N, 3)`` array)."""
    from scipy.spatial import cKDTree

    if isinstance(reference, np.ndarray) and reference.ndim == 2:
        points = reference
    else:
        if not len(reference):
            return np.full(len(streamlines), np.inf)
        points = np.concatenate([densify(s, step) for s in reference])
    tree = cKDTree(points)
    return np.array([float(tree.query(densify(s, step))[0].mean()) for s in streamlines])


def closest_streamline_distances(
    streamlines: Sequence[np.ndarray], reference: Sequence[np.ndarray], n_points: int = 12
) -> np.ndarray:
    """For each streamline, its minimum direct-flip distance (MDF, mm) to any reference
    streamline: both resampled to ``n_points`` equidistant points, the mean distance between
    corresponding points, in the better of the two orders (Garyfallidis et al. 2012). It
    compares whole streamlines point for point, so it grows with a difference in length."""
    from dipy.tracking.distances import bundles_distances_mdf
    from dipy.tracking.streamline import set_number_of_points

    if not len(streamlines):
        return np.zeros(0)
    if not len(reference):
        return np.full(len(streamlines), np.inf)
    test = set_number_of_points([np.asarray(s, np.float64) for s in streamlines], n_points)
    ref = set_number_of_points([np.asarray(s, np.float64) for s in reference], n_points)
    rows = max(1, 2_000_000 // len(ref))  # about 16 MB of distances at a time
    return np.concatenate(
        [np.asarray(bundles_distances_mdf(test[i : i + rows], ref)).min(axis=1) for i in range(0, len(test), rows)]
    )


def tdi_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two track-density images on one grid (within ``mask``; the
    whole grid without one)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if mask is not None:
        a, b = a[np.asarray(mask, bool)], b[np.asarray(mask, bool)]
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else float("nan")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (NaN when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * np.sum(a & b) / total) if total else float("nan")


def weighted_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Density-weighted Dice of two track-density images: each is normalised to sum to one,
    and the result is the mean of the two shares of density that fall in voxels both visit,
    ``(Σ_{a>0,b>0} a / Σa + Σ_{a>0,b>0} b / Σb) / 2`` — Cousineau et al. (2017)'s weighted Dice
    ``Σ_{A∩B}(a + b) / (Σa + Σb)`` of the normalised images. 1 when both visit the same voxels;
    NaN when either is empty."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.sum() == 0 or b.sum() == 0:
        return float("nan")
    both = (a > 0) & (b > 0)
    return float(0.5 * (a[both].sum() / a.sum() + b[both].sum() / b.sum()))


def compare_tractograms(
    reference: Sequence[np.ndarray],
    test: Sequence[np.ndarray],
    affine: np.ndarray,
    shape: Sequence[int],
    far_mm: float,
    bundles: Mapping[str, np.ndarray] | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """How close ``test`` comes to ``reference`` on a common grid (``affine``, ``shape``); the
    measures of :data:`COMPARISON_COLUMNS`. ``mask`` (boolean, on the grid) limits the
    track-density correlation; without one it runs over the voxels either tractogram visits.
    ``bundles`` (name → boolean mask on the grid) adds, per bundle, ``dice_<name>`` of the voxels
    visited by the streamlines with most of their points in it, and their mean ``bundle_dice``.
    """
    ref_tdi, test_tdi = track_density(reference, affine, shape), track_density(test, affine, shape)
    if mask is None:
        mask = (ref_tdi > 0) | (test_tdi > 0)
    coverage = mean_closest_distances(test, reference)
    mdf = closest_streamline_distances(test, reference)
    nan = float("nan")
    out = {
        "n_reference": len(reference),
        "n_test": len(test),
        "tdi_correlation": tdi_correlation(ref_tdi, test_tdi, mask),
        "dice": dice(ref_tdi > 0, test_tdi > 0),
        "weighted_dice": weighted_dice(ref_tdi, test_tdi),
        "far_fraction": float(np.mean(coverage > far_mm)) if len(test) else nan,
        "median_closest_mm": float(np.median(coverage)) if len(test) else nan,
        "mean_closest_point_mm": float(np.mean(coverage)) if len(test) else nan,
        "median_mdf_mm": float(np.median(mdf)) if len(test) else nan,
    }
    if bundles:
        scores = []
        for name, region in bundles.items():
            inside = np.asarray(region, bool).astype(np.float64)  # once per bundle, not per streamline
            r = _bundle_tdi(reference, inside, affine, shape)
            t = _bundle_tdi(test, inside, affine, shape)
            out[f"dice_{name}"] = dice(r > 0, t > 0)
            scores.append(out[f"dice_{name}"])
        out["bundle_dice"] = float(np.nanmean(scores)) if scores else nan
    return out


def _bundle_tdi(streamlines, inside: np.ndarray, affine, shape, share: float = 0.5) -> np.ndarray:
    """Track density of the streamlines with at least ``share`` of their points in ``inside``
    (a 0/1 float map on the grid)."""
    members = [s for s in streamlines if np.mean(sample_nearest(inside, affine, s, 0.0) > 0) >= share]
    return track_density(members, affine, shape)


def evaluate_tractography(
    hr: Sequence[np.ndarray],
    native: Sequence[np.ndarray],
    sr: Sequence[np.ndarray],
    hr_affine: np.ndarray,
    hr_shape: Sequence[int],
    far_mm: float | None = None,
    bundles: Mapping[str, np.ndarray] | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluation mode: native-LR and super-resolved tractograms against the HR reference on
    the HR grid (see :func:`compare_tractograms`); ``far_mm`` defaults to one HR voxel."""
    far = far_mm if far_mm is not None else voxel_size(hr_affine)
    return {
        name: compare_tractograms(hr, test, hr_affine, hr_shape, far, bundles, mask)
        for name, test in (("native", native), ("sr", sr))
    }


def _grid_mask(value, affine, shape, what: str) -> np.ndarray:
    """A boolean map on the grid from a file or an array."""
    if isinstance(value, (str, os.PathLike)):
        return load_on_grid(value, affine, shape, what) > 0
    value = np.asarray(value)
    if value.shape[:3] != tuple(shape):
        raise InputError(f"the {what} has shape {value.shape[:3]}, the reference grid {tuple(shape)}")
    return value > 0


def evaluate_files(
    hr_file: str | os.PathLike,
    native_file: str | os.PathLike,
    sr_file: str | os.PathLike,
    reference_image: str | os.PathLike,
    far_mm: float | None = None,
    out_tsv: str | os.PathLike | None = None,
    mask: str | os.PathLike | np.ndarray | None = None,
    bundles: Mapping[str, str | os.PathLike | np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Library entry point of the evaluation mode: :func:`evaluate_tractography` on
    ``.tck``/``.trk`` files, on the HR grid of ``reference_image`` (e.g. the HR brain mask or
    tensor image; only its header is read unless it is the mask).

    ``mask`` (file or array on that grid) limits the track-density correlation; by default the
    reference image itself when it is a 3-D 0/1 image (a brain mask), else the voxels either
    tractogram visits. ``bundles`` maps names to bundle masks (files or arrays on the grid).
    With ``out_tsv``, writes one row per tractogram (``native``, ``sr``;
    :data:`COMPARISON_COLUMNS`).
    """
    affine, shape = reference_grid(reference_image)
    if mask is not None:
        mask = _grid_mask(mask, affine, shape, "mask")
    else:
        import nibabel as nb

        img = nb.load(str(reference_image))
        if len(img.shape) == 3:
            data = np.asarray(img.dataobj)
            if np.isin(data, (0, 1)).all() and data.any():
                mask = data > 0
    regions = {name: _grid_mask(v, affine, shape, f"bundle mask {name}") for name, v in (bundles or {}).items()}
    result = evaluate_tractography(
        load_streamlines(hr_file),
        load_streamlines(native_file),
        load_streamlines(sr_file),
        affine,
        shape,
        far_mm,
        regions or None,
        mask,
    )
    if out_tsv is not None:
        columns = ["tractogram", *result["sr"]]
        write_tsv([{"tractogram": k, **v} for k, v in result.items()], columns, out_tsv, TSV_FLOAT)
    return result
