"""Figures of the visual reports: matplotlib on arrays and affines (no Nipype, no pyplot).

World positions. Mosaics sample every image on planes of the world (scanner RAS) frame:
slice positions are picked in world mm from the native brain mask (:func:`slice_positions`),
and each image is looked up at the plane's points through its own affine, nearest voxel
(:func:`sample_plane`). The native and super-resolved panels of a column therefore show the
same place whatever either grid's orientation, and native voxels keep their true size on
screen. Planes are drawn in the neurological convention: the subject's right on the right
(axial, coronal), anterior on the right (sagittal), superior or anterior up.

Units. Diffusivities and uncertainties are in mm²/s in every file; figures show them scaled
(MD in 10⁻³ mm²/s, standard deviations in 10⁻⁴ mm²/s) and every colour bar and axis says so.

Each figure function returns ``(figure, info)``: a :class:`matplotlib.figure.Figure` and a
dict of the numbers drawn (positions, colour limits, counts), which the report text and the
tests use. :func:`save_figure` writes a figure atomically as SVG (text kept as text) or PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iqt_pipe.dmri.dti import colour_fa, eig
from iqt_pipe.io import atomic_path, load_nifti
from iqt_pipe.qc import DEFAULT_SD_THRESHOLD

#: World axes by name, and the (horizontal, vertical) world axes of a plane normal to each.
AXES = {"x": 0, "y": 1, "z": 2}
IN_PLANE = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}
VIEW_NAMES = {"x": "sagittal", "y": "coronal", "z": "axial"}
#: Display scales: MD in 10⁻³ mm²/s, standard deviations in 10⁻⁴ mm²/s.
MD_SCALE = 1e-3
SD_SCALE = 1e-4
MD_UNITS = "10⁻³ mm²/s"
SD_UNITS = "10⁻⁴ mm²/s"
#: Streamlines drawn per tractogram at most (a random subset; keeps the images light).
MAX_STREAMLINES = 1000
_BACKGROUND = "#111111"


@dataclass(frozen=True)
class Volume:
    """A 3-D image (or 3-D + components on the last axis) and its voxel-to-world affine."""

    data: np.ndarray
    affine: np.ndarray

    @classmethod
    def load(cls, path: str | os.PathLike) -> Volume:
        data, affine, _ = load_nifti(path)
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        return cls(data, affine)

    @classmethod
    def from_image(cls, img) -> Volume:
        """From a nibabel image."""
        return cls(np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine, dtype=np.float64))

    @property
    def voxel_size(self) -> np.ndarray:
        return np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0))


@dataclass(frozen=True)
class Plane:
    """A regular grid of world points on the plane ``axis = position`` (mm)."""

    axis: str
    position: float
    points: np.ndarray  # (rows, cols, 3), rows from bottom (origin="lower") to top
    extent: tuple[float, float, float, float]  # left, right, bottom, top (mm)

    @property
    def label(self) -> str:
        return f"{self.axis} = {self.position:.1f} mm"


# --------------------------------------------------------------------------- sampling


def _world_centres(mask: Volume) -> np.ndarray:
    ijk = np.argwhere(np.asarray(mask.data) > 0)
    if ijk.size == 0:
        raise ValueError("the mask is empty: no slice positions to choose")
    return ijk @ np.asarray(mask.affine)[:3, :3].T + np.asarray(mask.affine)[:3, 3]


def world_bounds(mask: Volume, pad_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (mm) of the mask's voxels, whole voxels included, padded by ``pad_mm``."""
    centres = _world_centres(mask)
    half = 0.5 * np.abs(np.asarray(mask.affine)[:3, :3]).sum(axis=1)
    return centres.min(axis=0) - half - pad_mm, centres.max(axis=0) + half + pad_mm


def slice_positions(
    mask: Volume, n: int = 6, axis: str = "z", coverage: tuple[float, float] = (0.15, 0.85)
) -> np.ndarray:
    """``n`` world positions (mm, rounded to 0.1) along ``axis``, evenly spread over the
    middle ``coverage`` of the span of the mask's voxel centres."""
    coords = _world_centres(mask)[:, AXES[axis]]
    lo, hi = coords.min(), coords.max()
    return np.round(lo + (hi - lo) * np.linspace(coverage[0], coverage[1], n), 1)


def make_plane(axis: str, position: float, lo: np.ndarray, hi: np.ndarray, spacing: float) -> Plane:
    """Grid points every ``spacing`` mm covering the box ``lo``–``hi`` on the plane ``axis = position``."""
    h, v = IN_PLANE[axis]
    n_u = max(1, int(np.ceil((hi[h] - lo[h]) / spacing)))
    n_v = max(1, int(np.ceil((hi[v] - lo[v]) / spacing)))
    u = lo[h] + spacing * (np.arange(n_u) + 0.5)
    w = lo[v] + spacing * (np.arange(n_v) + 0.5)
    points = np.empty((n_v, n_u, 3))
    points[..., h] = u[None, :]
    points[..., v] = w[:, None]
    points[..., AXES[axis]] = position
    extent = (lo[h], lo[h] + n_u * spacing, lo[v], lo[v] + n_v * spacing)
    return Plane(axis, float(position), points, tuple(float(e) for e in extent))


def sample_plane(volume: Volume, plane: Plane, outside: float = np.nan) -> np.ndarray:
    """The volume's value in the voxel nearest to each of the plane's points (through the
    volume's own affine); ``outside`` where a point falls outside the grid. Shape
    ``(rows, cols)`` or ``(rows, cols, components)``."""
    data = np.asarray(volume.data)
    ijk = (plane.points - np.asarray(volume.affine)[:3, 3]) @ np.linalg.inv(np.asarray(volume.affine)[:3, :3]).T
    idx = np.rint(ijk).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.array(data.shape[:3])), axis=-1)
    out = np.full(plane.points.shape[:2] + data.shape[3:], outside, dtype=np.float64)
    out[inside] = data[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
    return out


def colour_fa_plane(tensor: Volume, plane: Plane, mask: Volume | None = None) -> np.ndarray:
    """Direction-encoded colour FA (RGB in [0, 1], world frame: red = left–right, green =
    posterior–anterior, blue = inferior–superior) of world-frame tensors on a plane;
    black outside the image and, when given, outside ``mask``."""
    d6 = sample_plane(tensor, plane, outside=0.0)
    d6 = np.where(np.isfinite(d6), d6, 0.0)
    valid = np.any(d6 != 0, axis=-1)
    if mask is not None:
        valid &= sample_plane(mask, plane, outside=0.0) > 0
    rgb = np.zeros(d6.shape[:2] + (3,))
    if valid.any():
        evals, evecs = eig(d6[valid])
        rgb[valid] = colour_fa(evals, evecs)
    return np.clip(rgb, 0.0, 1.0)


# --------------------------------------------------------------------------- mosaics


@dataclass(frozen=True)
class Row:
    """One row of a mosaic: a scalar image (colour bar), an RGB image, or a scalar overlay
    on an anatomical image.

    ``volume``: the image (world-frame tensors when ``kind == "colourfa"``); ``scale``
    divides values for display and ``units`` names the scaled unit on the colour bar;
    ``vmin``/``vmax`` in displayed units (default: 0 and the 99th percentile in ``mask``);
    ``anatomy``: grey background under an overlay row; ``mask``: where values are drawn.
    """

    key: str
    label: str
    volume: Volume
    kind: str = "scalar"  # "scalar", "colourfa" or "overlay"
    cmap: str = "gray"
    scale: float = 1.0
    units: str = ""
    vmin: float | None = None
    vmax: float | None = None
    anatomy: Volume | None = None
    mask: Volume | None = None


def _limits(row: Row, planes: Sequence[Plane]) -> tuple[float, float]:
    if row.vmin is not None and row.vmax is not None:
        return row.vmin, row.vmax
    data = np.asarray(row.volume.data, dtype=np.float64)
    if row.mask is not None and row.mask.data.shape == data.shape:
        values = data[np.asarray(row.mask.data) > 0]
    else:
        values = np.concatenate([sample_plane(row.volume, p).ravel() for p in planes])
    values = values[np.isfinite(values)] / row.scale
    vmax = float(np.percentile(values, 99)) if values.size else 1.0
    vmin = 0.0 if row.vmin is None else row.vmin
    vmax = vmax if row.vmax is None else row.vmax
    if not vmax > vmin:
        vmax = vmin + 1.0
    return vmin, vmax


def mosaic(
    rows: Sequence[Row],
    positions: Sequence[float],
    axis: str,
    bounds: tuple[np.ndarray, np.ndarray],
    spacing: float,
    title: str | None = None,
    panel_inches: float = 1.7,
):
    """A grid of panels: one row per :class:`Row`, one column per world position (mm).

    Every panel samples its image on the same plane (:func:`make_plane` over ``bounds``
    every ``spacing`` mm), so a column shows one place in every row. Scalar and overlay rows
    get a colour bar labelled with their units. Returns ``(figure, info)``: ``info["positions"]``
    (mm along ``axis``), ``info["rows"]`` per row key its label, colour limits and the sampled
    panels (arrays, displayed units). Each panel's image has the SVG id ``<row key>_<axis>_<position>``.
    """
    from matplotlib.figure import Figure

    planes = [make_plane(axis, p, bounds[0], bounds[1], spacing) for p in positions]
    left, right, bottom, top = planes[0].extent
    aspect = (top - bottom) / max(right - left, 1e-6)
    fig = Figure(
        figsize=(panel_inches * len(planes) + 1.3, panel_inches * aspect * len(rows) + (0.5 if title else 0.25)),
        layout="constrained",
        facecolor="white",
    )
    axes = fig.subplots(len(rows), len(planes), squeeze=False)
    info: dict[str, Any] = {
        "axis": axis,
        "positions": [p.position for p in planes],
        "spacing_mm": spacing,
        "extent": planes[0].extent,
        "rows": {},
    }
    h_name = "xyz"[IN_PLANE[axis][0]]
    for r, row in enumerate(rows):
        panels = []
        limits = None if row.kind == "colourfa" else _limits(row, planes)
        image = None
        for c, plane in enumerate(planes):
            ax = axes[r, c]
            ax.set_facecolor("black")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if row.kind == "colourfa":
                shown = colour_fa_plane(row.volume, plane, row.mask)
                image = ax.imshow(shown, origin="lower", extent=plane.extent, interpolation="nearest")
            else:
                values = sample_plane(row.volume, plane) / row.scale
                if row.mask is not None:
                    values = np.where(sample_plane(row.mask, plane, outside=0.0) > 0, values, np.nan)
                shown = values
                if row.kind == "overlay" and row.anatomy is not None:
                    anat = np.nan_to_num(sample_plane(row.anatomy, plane, outside=0.0))
                    ax.imshow(
                        anat,
                        origin="lower",
                        extent=plane.extent,
                        cmap="gray",
                        vmin=0.0,
                        vmax=max(float(np.percentile(anat, 99)), 1e-6),
                        interpolation="nearest",
                    )
                image = ax.imshow(
                    np.ma.masked_invalid(values),
                    origin="lower",
                    extent=plane.extent,
                    cmap=row.cmap,
                    vmin=limits[0],
                    vmax=limits[1],
                    interpolation="nearest",
                    alpha=0.75 if row.kind == "overlay" else 1.0,
                )
            image.set_gid(f"{row.key}_{axis}_{plane.position:.1f}")
            panels.append(shown)
            if r == 0:
                ax.set_title(plane.label, fontsize=8)
            if c == 0:
                ax.set_ylabel(row.label, fontsize=8)
        if r == 0:  # orientation letters on the first panel
            low, high = ("L", "R") if h_name == "x" else ("P", "A")
            for x, letter, ha in ((0.03, low, "left"), (0.97, high, "right")):
                axes[0, 0].text(
                    x, 0.5, letter, color="white", fontsize=7, ha=ha, va="center", transform=axes[0, 0].transAxes
                )
        if row.kind != "colourfa" and image is not None:
            label = row.units or row.label
            bar = fig.colorbar(image, ax=list(axes[r, :]), fraction=0.05, pad=0.01, aspect=12)
            bar.set_label(label, fontsize=7)
            bar.ax.tick_params(labelsize=7)
        info["rows"][row.key] = {"label": row.label, "limits": limits, "units": row.units, "panels": panels}
    for c in range(len(planes)):
        axes[-1, c].set_xlabel(f"{h_name} →", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig, info


def _sr_spacing(*volumes: Volume) -> float:
    return float(min(v.voxel_size.min() for v in volumes))


def colour_fa_mosaic(
    native_tensor: Volume,
    sr_tensor: Volume,
    native_mask: Volume,
    sr_mask: Volume | None = None,
    n_slices: int = 6,
    axis: str = "z",
):
    """Native vs super-resolved colour FA, two rows at the same world positions (picked from
    the native mask), sampled every SR voxel size so native voxels show their true size."""
    positions = slice_positions(native_mask, n_slices, axis)
    bounds = world_bounds(native_mask, pad_mm=float(native_mask.voxel_size.max()))
    nat = "×".join(f"{v:.3g}" for v in native_tensor.voxel_size)
    sr = "×".join(f"{v:.3g}" for v in sr_tensor.voxel_size)
    rows = [
        Row("native", f"native\n{nat} mm", native_tensor, kind="colourfa", mask=native_mask),
        Row("sr", f"super-resolved\n{sr} mm", sr_tensor, kind="colourfa", mask=sr_mask),
    ]
    return mosaic(
        rows,
        positions,
        axis,
        bounds,
        _sr_spacing(native_tensor, sr_tensor),
        title=f"Colour FA, {VIEW_NAMES[axis]} slices (red: left–right, green: anterior–posterior, "
        f"blue: superior–inferior)",
    )


def scalar_maps_mosaic(
    native_fa: Volume,
    native_md: Volume,
    sr_fa: Volume,
    sr_fa_sd: Volume,
    sr_md: Volume,
    sr_md_sd: Volume,
    native_mask: Volume,
    sr_mask: Volume,
    n_slices: int = 4,
    axis: str = "z",
):
    """Native FA and MD beside the super-resolved FA and MD means and standard deviations."""
    positions = slice_positions(native_mask, n_slices, axis)
    bounds = world_bounds(native_mask, pad_mm=float(native_mask.voxel_size.max()))
    md_max = _limits(Row("md", "", native_md, scale=MD_SCALE, mask=native_mask), [])[1]
    rows = [
        Row(
            "native_fa",
            "native FA",
            native_fa,
            cmap="gray",
            vmin=0.0,
            vmax=1.0,
            units="FA (unitless)",
            mask=native_mask,
        ),
        Row("sr_fa", "SR FA", sr_fa, cmap="gray", vmin=0.0, vmax=1.0, units="FA (unitless)", mask=sr_mask),
        Row("sr_fa_sd", "SR FA sd", sr_fa_sd, cmap="viridis", units="FA sd (unitless)", mask=sr_mask),
        Row(
            "native_md",
            "native MD",
            native_md,
            cmap="gray",
            scale=MD_SCALE,
            vmin=0.0,
            vmax=md_max,
            units=f"MD ({MD_UNITS})",
            mask=native_mask,
        ),
        Row(
            "sr_md",
            "SR MD mean",
            sr_md,
            cmap="gray",
            scale=MD_SCALE,
            vmin=0.0,
            vmax=md_max,
            units=f"MD ({MD_UNITS})",
            mask=sr_mask,
        ),
        Row(
            "sr_md_sd", "SR MD sd", sr_md_sd, cmap="viridis", scale=SD_SCALE, units=f"MD sd ({SD_UNITS})", mask=sr_mask
        ),
    ]
    return mosaic(
        rows,
        positions,
        axis,
        bounds,
        _sr_spacing(native_fa, sr_fa),
        title=f"FA and MD: native fit and super-resolved predictive mean and sd ({VIEW_NAMES[axis]})",
    )


def uncertainty_mosaic(
    anatomy: Volume, maps: dict[str, Volume], native_mask: Volume, sr_mask: Volume, n_slices: int = 6, axis: str = "z"
):
    """Uncertainty maps (Frobenius sd of the predicted tensor, mm²/s; keys among
    ``intrinsic``, ``parameter``, ``total``) overlaid on ``anatomy`` (the SR FA) inside the
    SR brain mask, one row each, at the colour-FA mosaic's positions. All rows share one
    colour scale (0 to the 99th percentile of the largest map in the mask), so the parts
    compare with the total."""
    positions = slice_positions(native_mask, n_slices, axis)
    bounds = world_bounds(native_mask, pad_mm=float(native_mask.voxel_size.max()))
    inside = np.asarray(sr_mask.data) > 0
    vmax = max(float(np.percentile(np.asarray(v.data)[inside], 99)) for v in maps.values()) / SD_SCALE
    vmax = vmax if vmax > 0 else 1.0
    names = {"intrinsic": "intrinsic sd", "parameter": "parameter sd", "total": "total sd"}
    rows = [
        Row(
            key,
            names.get(key, key),
            vol,
            kind="overlay",
            cmap="inferno",
            scale=SD_SCALE,
            vmin=0.0,
            vmax=vmax,
            units=f"{names.get(key, key)} ({SD_UNITS})",
            anatomy=anatomy,
            mask=sr_mask,
        )
        for key, vol in maps.items()
    ]
    return mosaic(
        rows,
        positions,
        axis,
        bounds,
        _sr_spacing(anatomy, *maps.values()),
        title=f"Uncertainty of the super-resolved tensor (Frobenius sd) on the SR FA ({VIEW_NAMES[axis]})",
    )


# --------------------------------------------------------------------------- histogram


def uncertainty_histogram(
    sd_total: np.ndarray, threshold: float = DEFAULT_SD_THRESHOLD, max_uncertainty: float | None = None, bins: int = 60
):
    """Histogram of the total sd (mm²/s, brain voxels) in 10⁻⁴ mm²/s, with the risky-voxel
    ``threshold`` and, when set, the tractography limit ``max_uncertainty`` as lines that
    say how many voxels lie above them."""
    from matplotlib.figure import Figure

    values = np.asarray(sd_total, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite uncertainty values to plot")
    shown = values / SD_SCALE
    top = max(float(np.percentile(shown, 99.9)), threshold / SD_SCALE, (max_uncertainty or 0.0) / SD_SCALE) * 1.08
    fig = Figure(figsize=(8.4, 3.0), layout="constrained", facecolor="white")
    ax = fig.subplots()
    ax.hist(np.clip(shown, 0, top), bins=bins, range=(0, top), color="#4c72b0")
    ax.set_yscale("log")
    ax.set_xlim(0, top)
    ax.set_xlabel(f"total sd of the super-resolved tensor ({SD_UNITS})", fontsize=8)
    ax.set_ylabel("voxels in the SR brain mask", fontsize=8)
    ax.tick_params(labelsize=7)
    info: dict[str, Any] = {
        "n": int(values.size),
        "median": float(np.median(values)),
        "threshold": float(threshold),
        "fraction_above": float(np.mean(values > threshold)),
        "max_uncertainty": max_uncertainty,
        "xlim": (0.0, top),
    }
    ax.axvline(
        threshold / SD_SCALE,
        color="#c44e52",
        ls="--",
        lw=1.2,
        label=f"risky-voxel threshold {sci(threshold)} mm²/s: {100 * info['fraction_above']:.1f} % above",
    )
    if max_uncertainty is not None:
        info["fraction_above_max"] = float(np.mean(values > max_uncertainty))
        ax.axvline(
            max_uncertainty / SD_SCALE,
            color="#dd8452",
            ls=":",
            lw=1.5,
            label=f"--max-uncertainty {sci(max_uncertainty)} mm²/s: {100 * info['fraction_above_max']:.1f} % above",
        )
    ax.axvline(info["median"] / SD_SCALE, color="0.3", lw=0.8, label=f"median {sci(info['median'])} mm²/s")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"Total uncertainty in the brain ({values.size} voxels)", fontsize=9)
    return fig, info


# --------------------------------------------------------------------------- streamlines


@dataclass(frozen=True)
class Tractogram:
    """Streamlines in world mm and, per streamline, the mean total sd along it (mm²/s;
    None for the native tensors, which have no uncertainty)."""

    streamlines: Sequence[np.ndarray]
    uncertainty: np.ndarray | None = None
    label: str = ""


def load_tractogram(path: str | os.PathLike, label: str = "") -> Tractogram:
    """A ``.trk`` (its ``mean_uncertainty`` per streamline) or a ``.tck`` (uncertainty from
    the ``.tsv`` of the same name beside it, when present)."""
    import csv

    import nibabel as nb

    from iqt_pipe.io import MISSING
    from iqt_pipe.tracking.files import load_streamlines

    path = Path(path)
    unc = None
    if path.suffix == ".trk":
        loaded = nb.streamlines.load(str(path)).tractogram
        lines = [np.asarray(s, np.float32) for s in loaded.streamlines]
        if "mean_uncertainty" in loaded.data_per_streamline:
            unc = np.asarray(loaded.data_per_streamline["mean_uncertainty"], np.float64).reshape(-1)
    else:
        lines = load_streamlines(path)
    if unc is None and path.with_suffix(".tsv").exists():
        with open(path.with_suffix(".tsv"), newline="") as fh:  # the one column (csv.DictReader: 3× longer)
            rows = csv.reader(fh, delimiter="\t")
            header = next(rows, [])
            if "mean_uncertainty" in header:
                k = header.index("mean_uncertainty")
                unc = np.array([float(r[k]) if r[k] != MISSING else np.nan for r in rows])
    if unc is not None and (len(unc) != len(lines) or not np.isfinite(unc).any()):
        unc = None
    return Tractogram(lines, unc, label)


def subsample(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a random subset of ``min(n, k)`` of ``n`` items (fixed seed)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def direction_colours(segments: np.ndarray) -> np.ndarray:
    """RGB of each segment's |direction| (world frame: red = left–right, green =
    anterior–posterior, blue = superior–inferior); segments ``(N, 2, 3)``."""
    d = np.abs(segments[:, 1] - segments[:, 0])
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    return np.clip(d / np.where(norm > 0, norm, 1.0), 0, 1)


def _segments(lines: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """World segments ``(N, 2, 3)`` and the streamline each belongs to."""
    segs, owner = [], []
    for i, line in enumerate(lines):
        if len(line) < 2:
            continue
        segs.append(np.stack([line[:-1], line[1:]], axis=1))
        owner.append(np.full(len(line) - 1, i))
    if not segs:
        return np.zeros((0, 2, 3)), np.zeros(0, dtype=int)
    return np.concatenate(segs), np.concatenate(owner)


#: Streamline panels: pixels along the longer side, samples per pixel along each segment, and
#: the opacity one sample adds (``1 − exp(−OPACITY · samples)`` per pixel).
RASTER_PIXELS, RASTER_SAMPLING, RASTER_OPACITY = 480, 2.0, 0.6


def rasterise_segments(
    segments: np.ndarray, values: np.ndarray, lo: Sequence[float], hi: Sequence[float], pixels: int = RASTER_PIXELS
) -> tuple[np.ndarray, np.ndarray]:
    """Draw 2-D segments ``(N, 2, 2)`` into an image over ``[lo, hi]``: each segment is sampled
    :data:`RASTER_SAMPLING` times per pixel; a pixel takes the mean of its samples' ``values``
    (``(N, C)``, one row per segment) and an opacity that grows with their number. Returns the
    mean values ``(rows, columns, C)`` and the opacity ``(rows, columns)``, row 0 at ``lo[1]``
    (all segments at once: a figure of 10⁵ segments takes a fraction of a second, where one
    matplotlib path per segment takes seconds)."""
    from iqt_pipe.tracking.track import segment_steps

    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    size = float(np.max(hi - lo)) / pixels
    shape = tuple(int(np.ceil(v)) for v in (hi - lo)[::-1] / size)  # (rows: vertical, columns)
    values = np.asarray(values, np.float64).reshape(len(segments), -1)
    sums = np.zeros((values.shape[1], shape[0] * shape[1]))
    counts = np.zeros(shape[0] * shape[1])
    if len(segments):
        start, step = segments[:, 0], segments[:, 1] - segments[:, 0]
        n = np.maximum(1, np.ceil(np.linalg.norm(step, axis=1) / size * RASTER_SAMPLING)).astype(np.int64)
        owner, t = segment_steps(n)
        t += 0.5 / n[owner]  # the middle of each step
        points = start[owner] + step[owner] * t[:, None]
        col, row = (np.floor((points - lo) / size).astype(np.int64)).T
        keep = (row >= 0) & (row < shape[0]) & (col >= 0) & (col < shape[1])
        flat, owner = row[keep] * shape[1] + col[keep], owner[keep]
        counts = np.bincount(flat, minlength=counts.size).astype(np.float64)
        sums = np.stack([np.bincount(flat, weights=v[owner], minlength=counts.size) for v in values.T])
    mean = (sums / np.maximum(counts, 1)).T.reshape(shape + (values.shape[1],))
    return mean, (1 - np.exp(-RASTER_OPACITY * counts)).reshape(shape)


def streamlines_figure(
    native: Tractogram | None,
    sr: Tractogram,
    title: str = "",
    max_streamlines: int = MAX_STREAMLINES,
    seed: int = 0,
    views: Sequence[str] = ("z", "x"),
):
    """Streamlines projected on world planes (``z``: axial, seen from above; ``x``: sagittal,
    seen from the left), one row per view: native and super-resolved coloured by direction,
    and super-resolved coloured by its mean uncertainty (10⁻⁴ mm²/s) when it has one. At
    most ``max_streamlines`` random streamlines (fixed seed) of each are drawn; every panel
    of a row shares its limits. Returns ``(figure, info)`` with the counts drawn and total."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    sets = [("native", native), ("sr", sr)]
    drawn: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    info: dict[str, Any] = {"n_total": {}, "n_drawn": {}}
    for key, tract in sets:
        if tract is None:
            continue
        pick = subsample(len(tract.streamlines), max_streamlines, seed)
        segs, owner = _segments([tract.streamlines[i] for i in pick])
        unc = tract.uncertainty[pick][owner] if tract.uncertainty is not None else None
        drawn[key] = (segs, owner, unc)
        info["n_total"][key] = len(tract.streamlines)
        info["n_drawn"][key] = len(pick)
    columns = [("native", "direction"), ("sr", "direction")]
    if drawn["sr"][2] is not None:
        columns.append(("sr", "uncertainty"))
    all_points = np.concatenate([d[0].reshape(-1, 3) for d in drawn.values() if len(d[0])] or [np.zeros((1, 3))])
    lo, hi = all_points.min(axis=0) - 2.0, all_points.max(axis=0) + 2.0
    fig = Figure(figsize=(3.3 * len(columns) + 0.8, 3.2 * len(views) + 0.4), layout="constrained", facecolor="white")
    axes = fig.subplots(len(views), len(columns), squeeze=False)
    finite = drawn["sr"][2][np.isfinite(drawn["sr"][2])] if drawn["sr"][2] is not None else np.zeros(0)
    norm = None
    if finite.size:
        vmin, vmax = np.percentile(finite / SD_SCALE, [2, 98])
        norm = Normalize(vmin=float(vmin), vmax=float(vmax) if vmax > vmin else float(vmin) + 1e-3)
        info["uncertainty_limits"] = (norm.vmin, norm.vmax)
    labels = {"native": native.label if native else "native", "sr": sr.label or "super-resolved"}
    for r, view in enumerate(views):
        h, v = IN_PLANE[view]
        for c, (key, colour) in enumerate(columns):
            ax = axes[r, c]
            ax.set_facecolor(_BACKGROUND)
            ax.set_aspect("equal")
            ax.set_xlim(lo[h], hi[h])
            ax.set_ylim(lo[v], hi[v])
            ax.tick_params(labelsize=6)
            ax.set_xlabel(f"{'xyz'[h]} (mm)", fontsize=7)
            ax.set_ylabel(f"{'xyz'[v]} (mm)", fontsize=7)
            if key not in drawn:
                ax.text(0.5, 0.5, "no tractogram", color="white", ha="center", va="center", transform=ax.transAxes)
                continue
            segs, _, unc = drawn[key]
            extent = (lo[h], hi[h], lo[v], hi[v])
            if colour == "direction":
                rgb, alpha = rasterise_segments(segs[:, :, [h, v]], direction_colours(segs), lo[[h, v]], hi[[h, v]])
                rgba = np.dstack([rgb, alpha])
            else:
                finite = np.isfinite(unc)
                mean, alpha = rasterise_segments(
                    segs[finite][:, :, [h, v]], unc[finite] / SD_SCALE, lo[[h, v]], hi[[h, v]]
                )
                rgba = ScalarMappable(norm, "plasma").to_rgba(mean[..., 0])
                rgba[..., 3] = alpha
            image = ax.imshow(rgba, origin="lower", extent=extent, interpolation="antialiased")
            image.set_gid(f"streamlines_{key}_{colour}_{view}")
            what = "by direction" if colour == "direction" else "by mean uncertainty"
            ax.set_title(
                f"{labels[key]} ({info['n_drawn'][key]} of {info['n_total'][key]}), {what}\n"
                f"{VIEW_NAMES[view]} projection",
                fontsize=7,
            )
            if colour == "uncertainty":
                bar = fig.colorbar(ScalarMappable(norm, "plasma"), ax=ax, fraction=0.05, pad=0.02)
                bar.set_label(f"mean total sd ({SD_UNITS})", fontsize=7)
                bar.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig, info


# --------------------------------------------------------------------------- thumbnail


def thumbnail(sr_tensor: Volume, mask: Volume, axis: str = "z", inches: float = 1.6, dpi: int = 80):
    """A small colour-FA image of the middle slice (no text), for the group report."""
    from matplotlib.figure import Figure

    position = slice_positions(mask, 1, axis, coverage=(0.5, 0.5))[0]
    lo, hi = world_bounds(mask, pad_mm=2.0)
    plane = make_plane(axis, position, lo, hi, _sr_spacing(sr_tensor))
    rgb = colour_fa_plane(sr_tensor, plane)
    fig = Figure(figsize=(inches, inches), dpi=dpi, facecolor="black")
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_axis_off()
    ax.imshow(rgb, origin="lower", extent=plane.extent, interpolation="nearest")
    return fig, {"position": float(position), "axis": axis}


# --------------------------------------------------------------------------- output


def sci(value: float) -> str:
    """``1.5e-4``: a number in scientific notation, short."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a figure atomically as SVG (text as text, no date, fixed ids: the same figure
    gives the same bytes) or PNG, by the file's suffix."""
    import matplotlib

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("svg", "png"):
        raise ValueError(f"{path}: figures are written as .svg or .png")
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    style = {"svg.fonttype": "none", "svg.hashsalt": "iqt-pipe", "image.composite_image": False}  # keep panel ids
    with matplotlib.rc_context(style), atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, metadata=metadata, facecolor=fig.get_facecolor())
    return path
