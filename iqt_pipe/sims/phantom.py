"""Synthetic brain DWI with exact ground-truth tensors: the subjects of ``iqt-phantom``.

Why. Every stage of iqt-pipe (fit, degradation, super-resolution, tractography, reports)
needs test data whose true tensors are known. Real scans have no ground truth, and toy
phantoms (a cube with a stripe) exercise neither a brain-shaped mask nor bending and
crossing fibres. This module makes small, deterministic, brain-shaped subjects.

How.

* **Anatomy.** nilearn's bundled MNI152 brain mask and GM/WM probability maps (read from
  the package's own data, no download) are smoothed to the target voxel size and sampled
  on the phantom grid: each voxel gets CSF/GM/WM volume fractions (CSF = brain − GM − WM).
* **Fibres.** A handful of parametric tubes in MNI millimetres (a callosal left–right
  arc, two corticospinal tracts, two superior longitudinal and two cingulum bundles) give
  white matter a principal direction that follows the tube's tangent; where tubes overlap
  the tensors average, which makes planar tensors at crossings. White matter outside the
  tubes is moderately anisotropic along a smooth radial field.
* **One Gaussian per voxel.** Each voxel's tensor is the volume-fraction-weighted mean of
  its compartments' tensors, and the noise-free signal is exactly ``S0·exp(−b gᵀDg)``
  (:mod:`iqt_pipe.dmri.signal`, as the Rician noise), so a DTI fit of noise-free data
  recovers the ground truth to rounding error.
* **Subjects** differ by a small rigid motion of the head (anatomy, tubes and lesion move
  together; the voxel grid stays) and by their noise, both drawn from ``(seed, subject)``.
* **Frames.** Everything is built in world (RAS+ mm) coordinates; the gradient
  directions are fixed in world and written to ``.bvec`` in the FSL frame of the image
  (see :mod:`iqt_pipe.dmri.dti`), so the default positive-determinant affine exercises FSL's
  x flip. Ground-truth tensor files are in the world frame (``Reference: "xyz"``).

Public API: :func:`make_phantom` (arrays in memory);
:func:`iqt_pipe.sims.dataset.write_bids_dataset` writes subjects as a BIDS raw dataset with the
truth in ``derivatives/phantom-truth``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from iqt_pipe.dmri.degrade import voxel_centres
from iqt_pipe.dmri.dti import (
    IDENTITY6,
    from_matrix,
    fsl_flip,
    rotate_tensors,
    scalar_maps,
    tensors_world_to_voxel,
    voxel_to_world_rotation,
)
from iqt_pipe.dmri.gradients import GradientTable
from iqt_pipe.dmri.signal import add_rician_noise, synthesize_signal
from iqt_pipe.io import InputError

# --------------------------------------------------------------------------- parameters

B_VALUE = 1000.0  # s/mm²

#: Relative b = 0 signal per compartment (T2-weighted: CSF brightest, oedema bright).
S0 = {"csf": 2400.0, "gm": 1200.0, "wm": 1000.0, "lesion": 1600.0}
#: Compartment volume fractions stored in :attr:`Phantom.fractions`, in this order.
FRACTION_NAMES = ("csf", "gm", "wm", "lesion")
#: Tissue labels of the ``desc-tissue_dseg`` map.
TISSUE_LABELS = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}

D_CSF = 3.0e-3  # isotropic free water, mm²/s
# Tensors built as a·I + b·v vᵀ with v a unit (tubes) or sub-unit (smooth field) vector:
# fibre tubes: λ∥ 1.5e-3, λ⊥ 0.3e-3 → MD 0.7e-3, FA 0.77.
WM_TUBE = (0.3e-3, 1.2e-3)
# WM between tubes, |v| ≈ 0.9: MD ≈ 0.68e-3, FA ≈ 0.42.
WM_BACKGROUND = (0.5e-3, 0.65e-3)
# Grey matter, weakly radial: MD ≈ 0.8e-3, FA ≈ 0.1.
GM_TENSOR = (0.75e-3, 0.15e-3)
# Tumour-like lesion: λ 2.2/1.9/1.9e-3 → MD 2.0e-3, FA ≈ 0.09.
LESION_TENSOR = (1.9e-3, 0.3e-3)

#: Centre of the radial direction field (MNI mm) and its core radius (mm).
FIELD_CENTRE = np.array([0.0, -18.0, 10.0])
FIELD_CORE = 25.0

#: Field of view in world mm (covers the MNI brain, ±72 × −107..73 × −72..82, plus motion).
FOV_CENTRE = np.array([0.0, -17.0, 5.0])
FOV_SIZE = np.array([160.0, 196.0, 170.0])
#: Largest subject rotation (degrees, per axis) and shift (mm, per axis).
MAX_ROTATION_DEG = 4.0
MAX_SHIFT_MM = 3.0

#: Tumour-like lesion: centre (MNI mm, right frontal white matter), radius and edge (mm).
LESION_CENTRE = np.array([28.0, 12.0, 20.0])
LESION_RADIUS = 10.0
LESION_EDGE = 3.0
TUBE_EDGE = 2.0  # half-width of the tubes' soft edge (mm)

#: Below this brain fraction a voxel is background: no signal, zero tensor.
MIN_BRAIN_FRACTION = 1e-3


@dataclass(frozen=True)
class Preset:
    """Grid and gradient scheme of one phantom size."""

    name: str
    voxel_size: float  # mm, isotropic
    n_b0: int
    n_directions: int  # at b = 1000 s/mm²
    description: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape along world x, y, z (RAS order)."""
        return tuple(int(math.ceil(s / self.voxel_size)) for s in FOV_SIZE)


PRESETS = {
    p.name: p
    for p in (
        Preset("tiny", 6.5, 3, 30, "unit tests: ~0.15 s per subject once the templates are loaded"),
        Preset("small", 4.0, 4, 32, "integration tests and quick training runs"),
        Preset("demo", 2.5, 6, 48, "a small whole brain for demos"),
    )
}


@dataclass(frozen=True)
class Bundle:
    """A tube of coherent fibres around a smooth centreline (MNI mm, natural cubic spline
    through ``points``); the fibre direction is the centreline's tangent."""

    name: str
    points: tuple[tuple[float, float, float], ...]
    radius: float = 7.0

    def centreline(self, step: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """Points every ``step`` mm along the centreline and their unit tangents."""
        from scipy.interpolate import CubicSpline

        pts = np.asarray(self.points, dtype=float)
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        spline = CubicSpline(arc, pts, axis=0, bc_type="natural")
        s = np.linspace(0.0, arc[-1], int(np.ceil(arc[-1] / step)) + 1)
        tangents = spline(s, 1)
        return spline(s), tangents / np.linalg.norm(tangents, axis=1, keepdims=True)


def _mirror(points):
    return tuple((-x, y, z) for x, y, z in points)


_CST = ((-28, -22, 62), (-24, -16, 32), (-19, -12, 8), (-12, -18, -15), (-8, -26, -40))
_SLF = ((-34, 28, 24), (-36, 0, 32), (-36, -30, 32), (-38, -52, 24))
_CING = ((-8, 30, 14), (-8, 8, 30), (-8, -20, 36), (-8, -42, 30), (-9, -55, 16))

#: The fibre bundles: the callosal arc crosses both corticospinal tracts and both superior
#: longitudinal bundles, which cross the corticospinal tracts in the centrum semiovale.
BUNDLES = (
    Bundle("cc", ((-50, -12, 36), (-28, -12, 29), (0, -12, 24), (28, -12, 29), (50, -12, 36))),
    Bundle("cst_l", _CST),
    Bundle("cst_r", _mirror(_CST)),
    Bundle("slf_l", _SLF, radius=6.0),
    Bundle("slf_r", _mirror(_SLF), radius=6.0),
    Bundle("cing_l", _CING, radius=4.5),
    Bundle("cing_r", _mirror(_CING), radius=4.5),
)


# --------------------------------------------------------------------------- result


@dataclass
class Phantom:
    """One synthetic subject. Arrays are on the grid of :attr:`affine` (world = RAS+ mm)."""

    dwi: np.ndarray  # (X, Y, Z, N) float32, Rician-noisy signal (noise-free when snr is None)
    affine: np.ndarray  # (4, 4)
    gtab: GradientTable  # b-values and FSL-frame bvecs, as written to .bval/.bvec
    tensors_world: np.ndarray  # (X, Y, Z, 6) float32, BEP016 order, mm²/s, world frame
    s0: np.ndarray  # (X, Y, Z) float32, noise-free b = 0 signal
    fa: np.ndarray  # (X, Y, Z) float32, ground-truth FA
    md: np.ndarray  # (X, Y, Z) float32, ground-truth MD (mm²/s)
    fractions: np.ndarray  # (X, Y, Z, 4) float32, volume fractions of FRACTION_NAMES
    tissue: np.ndarray  # (X, Y, Z) uint8, TISSUE_LABELS (tubes count as WM; no lesion label)
    mask: np.ndarray  # (X, Y, Z) bool, brain fraction ≥ 0.5
    bundles: np.ndarray  # (X, Y, Z, len(BUNDLES)) float32, tube profile weights in [0, 1]
    lesion: np.ndarray | None  # (X, Y, Z) bool lesion mask, None without a lesion
    sigma: float  # Rician noise level (0 when noise-free)
    preset: str
    seed: int
    subject: int
    snr: float | None
    rotation: np.ndarray  # (3, 3) subject head rotation (world → MNI frame)
    shift: np.ndarray  # (3,) subject head shift, mm

    bundle_names: ClassVar[tuple[str, ...]] = tuple(b.name for b in BUNDLES)

    @property
    def voxel_size(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def tensors_voxel(self) -> np.ndarray:
        """Ground truth in the voxel frame (what :func:`iqt_pipe.dmri.fit.fit_dti` returns)."""
        return tensors_world_to_voxel(self.tensors_world, self.affine)


# --------------------------------------------------------------------------- geometry


def make_affine(voxel_size: float, shape_ras, orientation: str = "RAS") -> tuple[np.ndarray, tuple]:
    """Affine and shape of a grid covering :data:`FOV_SIZE` around :data:`FOV_CENTRE`.

    ``orientation`` gives the world direction each voxel axis points to (nibabel axis
    codes, e.g. ``"RAS"``, ``"LAS"``, ``"PIR"``); every orientation samples the same
    world points, so phantoms that differ only by it have identical world-frame truth.
    """
    from nibabel.orientations import axcodes2ornt

    try:
        ornt = axcodes2ornt(tuple(orientation.upper()))
        valid = len(orientation) == 3 and len(set(ornt[:, 0].tolist())) == 3
    except Exception:  # nibabel raises ValueError or TypeError for odd codes
        valid = False
    if not valid:
        raise InputError(
            f"orientation {orientation!r} is not three axis codes naming three different axes, such as RAS or LPS"
        )
    shape_ras = np.asarray(shape_ras)
    lo = FOV_CENTRE - voxel_size * (shape_ras - 1) / 2.0  # world centre of the first voxel
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    shape = []
    for axis, (world_axis, sign) in enumerate(ornt.astype(int)):
        affine[world_axis, axis] = sign * voxel_size
        n = shape_ras[world_axis]
        affine[world_axis, 3] = lo[world_axis] + (0 if sign > 0 else voxel_size * (n - 1))
        shape.append(int(n))
    return affine, tuple(shape)


def random_head_pose(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A small rigid motion: rotation (world → MNI frame) and shift in mm."""
    from scipy.spatial.transform import Rotation

    angles = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, size=3)
    shift = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, size=3)
    return Rotation.from_euler("xyz", angles, degrees=True).as_matrix(), shift


def world_to_template(points: np.ndarray, rotation: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Subject world coordinates → MNI mm (rotation about the field-of-view centre)."""
    return (points - FOV_CENTRE) @ rotation.T + FOV_CENTRE + shift


# --------------------------------------------------------------------------- anatomy


@functools.lru_cache(maxsize=2)
def _smoothed_templates(voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """nilearn's MNI152 brain mask, GM and WM maps (1 mm) blurred to a voxel's footprint.

    Returns ``(maps, affine)`` with ``maps`` of shape ``(3, X, Y, Z)`` (mask, gm, wm). The
    Gaussian has a full width at half maximum of one target voxel, so sampling it at a
    voxel centre approximates that voxel's partial-volume average.
    """
    from nilearn import datasets
    from scipy.ndimage import gaussian_filter

    images = (
        datasets.load_mni152_brain_mask(),
        datasets.load_mni152_gm_template(),
        datasets.load_mni152_wm_template(),
    )
    affine = images[0].affine
    sigma = voxel_size / (2.0 * math.sqrt(2.0 * math.log(2.0))) / abs(affine[0, 0])
    maps = np.stack([gaussian_filter(img.get_fdata(dtype=np.float32), sigma, mode="constant") for img in images])
    maps.setflags(write=False)
    return maps, affine


def tissue_fractions(template_points: np.ndarray, voxel_size: float) -> np.ndarray:
    """CSF, GM, WM volume fractions at MNI points, shape ``points.shape[:-1] + (3,)``.

    The brain fraction is the larger of the mask and GM + WM; CSF fills the rest of it.
    """
    from scipy.ndimage import map_coordinates

    maps, affine = _smoothed_templates(float(voxel_size))
    inv = np.linalg.inv(affine)
    idx = (template_points @ inv[:3, :3].T + inv[:3, 3]).reshape(-1, 3).T
    mask, gm, wm = (np.clip(map_coordinates(m, idx, order=1, mode="constant", cval=0.0), 0, 1) for m in maps)
    tissue = gm + wm
    over = tissue > 1.0
    gm[over] /= tissue[over]
    wm[over] /= tissue[over]
    brain = np.maximum(mask, gm + wm)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return np.stack([csf, gm, wm], axis=-1).reshape(template_points.shape[:-1] + (3,))


def soft_step(distance: np.ndarray, radius: float, edge: float) -> np.ndarray:
    """1 inside ``radius − edge``, 0 beyond ``radius + edge``, a raised cosine between."""
    t = np.clip((distance - (radius - edge)) / (2.0 * edge), 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def bundle_field(bundle: Bundle, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tube weight in [0, 1] and fibre direction (unit, MNI frame) at MNI points ``(P, 3)``."""
    from scipy.spatial import cKDTree

    samples, tangents = bundle.centreline()
    reach = bundle.radius + TUBE_EDGE
    dist, idx = cKDTree(samples).query(points, distance_upper_bound=reach)
    near = np.isfinite(dist)
    weight = np.zeros(len(points))
    weight[near] = soft_step(dist[near], bundle.radius, TUBE_EDGE)
    direction = np.zeros((len(points), 3))
    direction[near] = tangents[idx[near]]
    return weight, direction


def radial_field(points: np.ndarray) -> np.ndarray:
    """Smooth direction field pointing away from the deep brain, length < 1 (0 at its centre)."""
    d = points - FIELD_CENTRE
    return d / np.sqrt(np.sum(d**2, axis=-1, keepdims=True) + FIELD_CORE**2)


# --------------------------------------------------------------------------- tensors


def axial_tensors(iso_and_axial: tuple[float, float], v: np.ndarray) -> np.ndarray:
    """Tensors ``a·I + b·v vᵀ`` (BEP016, ``(P, 6)``) for vectors ``v`` of shape ``(P, 3)``."""
    a, b = iso_and_axial
    return a * IDENTITY6 + b * from_matrix(v[:, :, None] * v[:, None, :])


def white_matter_tensors(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WM tensors at MNI points: the tubes' tensors where they are, the smooth background
    field between them. Overlapping tubes share the voxel (weights renormalised to 1).

    Returns tensors ``(P, 6)`` (MNI frame) and the raw tube weights ``(P, n_bundles)``.
    """
    fields = [bundle_field(b, points) for b in BUNDLES]
    weights = np.stack([w for w, _ in fields], axis=-1)
    scale = 1.0 / np.maximum(weights.sum(axis=-1), 1.0)
    tensors = (1.0 - weights.sum(axis=-1) * scale)[:, None] * axial_tensors(WM_BACKGROUND, radial_field(points))
    for w, direction in fields:
        tensors += (w * scale)[:, None] * axial_tensors(WM_TUBE, direction)
    return tensors, weights


def lesion_weight(points: np.ndarray) -> np.ndarray:
    """Soft-edged sphere of the tumour-like lesion at MNI points."""
    dist = np.linalg.norm(points - LESION_CENTRE, axis=-1)
    return soft_step(dist, LESION_RADIUS, LESION_EDGE)


def mix_compartments(fractions: np.ndarray, points: np.ndarray, wm: np.ndarray):
    """Per voxel: the volume-fraction-weighted mean tensor (MNI frame) and S0.

    ``fractions`` is ``(P, 4)`` in :data:`FRACTION_NAMES` order, ``wm`` the WM tensors.
    """
    radial = radial_field(points)
    unit = radial / np.maximum(np.linalg.norm(radial, axis=-1, keepdims=True), 1e-9)
    compartments = (
        D_CSF * np.broadcast_to(IDENTITY6, wm.shape),
        axial_tensors(GM_TENSOR, radial),
        wm,
        axial_tensors(LESION_TENSOR, unit),
    )
    brain = fractions.sum(axis=-1)
    tensors = sum(f[:, None] * d for f, d in zip(fractions.T, compartments))
    tensors /= np.maximum(brain, MIN_BRAIN_FRACTION)[:, None]
    s0 = fractions @ np.array([S0[name] for name in FRACTION_NAMES])
    return tensors, s0


# --------------------------------------------------------------------------- gradients


@functools.lru_cache(maxsize=8)
def world_directions(n: int) -> np.ndarray:
    """``n`` well-spread unit directions on a hemisphere (world frame), deterministic:
    a Fibonacci lattice relaxed by dipy's electrostatic repulsion."""
    from dipy.core.sphere import HemiSphere, disperse_charges

    i = np.arange(n) + 0.5
    z = 1.0 - i / n
    r = np.sqrt(1.0 - z**2)
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    start = HemiSphere(xyz=np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1))
    relaxed, _ = disperse_charges(start, 500)
    dirs = relaxed.vertices / np.linalg.norm(relaxed.vertices, axis=1, keepdims=True)
    dirs.setflags(write=False)
    return dirs


def gradient_scheme(preset: Preset) -> tuple[np.ndarray, np.ndarray]:
    """b-values and world-frame directions with the b = 0 volumes spread through the run."""
    n = preset.n_b0 + preset.n_directions
    b0_at = np.round(np.linspace(0, n, preset.n_b0, endpoint=False)).astype(int)
    bvals = np.full(n, B_VALUE)
    bvals[b0_at] = 0.0
    dirs = np.zeros((n, 3))
    dirs[bvals > 0] = world_directions(preset.n_directions)
    return bvals, dirs


def world_to_fsl(directions: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World-frame gradient directions → the FSL (``.bvec``) frame of this image."""
    voxel = directions @ voxel_to_world_rotation(affine)  # rows: Rᵀ·g
    return voxel @ fsl_flip(affine)  # FSL = flip·voxel (flip is symmetric)


# --------------------------------------------------------------------------- phantom


def check_snr(snr) -> float | None:
    """``None`` for noise-free (``None`` or ``inf``), else the SNR as a positive float."""
    if snr is None:
        return None
    try:
        value = float(snr)
    except (TypeError, ValueError):
        value = float("nan")
    if math.isnan(value) or value <= 0:
        raise InputError(f"snr must be a positive number, inf or None (noise-free), got {snr!r}")
    return None if math.isinf(value) else value


def get_preset(preset: str | Preset) -> Preset:
    """A :class:`Preset` by name (``tiny``, ``small``, ``demo``)."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def check_seed(value, what: str) -> int:
    """``value`` as an int when it is a non-negative integer; :class:`InputError` naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


@dataclass
class _Brain:
    """The noise-free model of one head on the phantom grid, tensors in the MNI frame."""

    fractions: np.ndarray  # (X, Y, Z, 4) float32, FRACTION_NAMES
    tissue: np.ndarray  # (X, Y, Z) uint8 labels
    tensors: np.ndarray  # (X, Y, Z, 6) float64, MNI frame
    s0: np.ndarray  # (X, Y, Z) float32
    bundles: np.ndarray  # (X, Y, Z, n_bundles) float32
    lesion: np.ndarray  # (X, Y, Z) float32 lesion weight (zeros without a lesion)
    inside: np.ndarray  # (X, Y, Z) bool, voxels with any brain


def build_brain(template: np.ndarray, voxel_size: float, lesion: bool) -> _Brain:
    """Tissue fractions, labels, tensors and S0 at the MNI coordinates of every voxel.

    Tubes are white matter: inside a tube the grey-matter fraction becomes white matter
    (the template's GM extends into the brainstem and deep nuclei the tubes cross), which
    keeps FA high along the bundles. The lesion then replaces a share of every tissue.
    """
    shape = template.shape[:-1]
    tissue_f = tissue_fractions(template, voxel_size)
    brain = tissue_f.sum(axis=-1)
    inside = brain > MIN_BRAIN_FRACTION
    points = template[inside]
    wm, weights = white_matter_tensors(points)

    f = tissue_f[inside].astype(float)
    to_wm = f[:, 1] * weights.max(axis=-1)
    f[:, 1] -= to_wm
    f[:, 2] += to_wm
    labels = np.zeros(shape, dtype=np.uint8)
    labels[inside] = np.where(brain[inside] >= 0.5, 1 + np.argmax(f, axis=-1), 0)

    w_lesion = lesion_weight(points) if lesion else np.zeros(len(points))
    f = np.concatenate([f * (1.0 - w_lesion)[:, None], (w_lesion * brain[inside])[:, None]], axis=1)
    tensors_in, s0_in = mix_compartments(f, points, wm)
    return _Brain(
        fractions=_scatter(f, inside, np.float32),
        tissue=labels,
        tensors=_scatter(tensors_in, inside, np.float64),
        s0=_scatter(s0_in, inside, np.float32),
        bundles=_scatter(weights, inside, np.float32),
        lesion=_scatter(w_lesion, inside, np.float32),
        inside=inside,
    )


def _scatter(values: np.ndarray, inside: np.ndarray, dtype) -> np.ndarray:
    """Put per-voxel ``values`` of the ``inside`` voxels on the full grid (zeros elsewhere)."""
    out = np.zeros(inside.shape + values.shape[1:], dtype=dtype)
    out[inside] = values
    return out


def make_phantom(
    preset: str | Preset = "tiny",
    seed: int = 0,
    snr: float | None = 30.0,
    lesion: bool = False,
    subject: int = 1,
    orientation: str = "RAS",
) -> Phantom:
    """Generate one synthetic subject in memory.

    ``seed`` and ``subject`` together fix the head pose and the noise (same values →
    identical arrays). ``snr`` is the mean white-matter b = 0 signal over the Rician
    noise level; ``None`` or ``inf`` gives noise-free data. ``orientation`` sets the voxel
    axes (default RAS+, positive determinant, so FSL's x flip applies to the bvecs).
    """
    spec = get_preset(preset)
    snr = check_snr(snr)
    seed, subject = check_seed(seed, "seed"), check_seed(subject, "subject")
    rng = np.random.default_rng([seed, subject])
    rotation, shift = random_head_pose(rng)
    affine, shape = make_affine(spec.voxel_size, spec.shape, orientation)
    template = world_to_template(voxel_centres(shape, affine), rotation, shift)
    brain = build_brain(template, spec.voxel_size, lesion)

    # MNI-frame vectors are world vectors rotated by `rotation`, so D_world = Rᵀ D R.
    tensors = rotate_tensors(brain.tensors, rotation.T).astype(np.float32)
    bvals, dirs = gradient_scheme(spec)
    signal = np.zeros(shape + (len(bvals),), dtype=np.float64)
    inside = brain.inside
    signal[inside] = synthesize_signal(brain.s0[inside].astype(float), tensors[inside].astype(float), bvals, dirs)
    sigma = 0.0 if snr is None else float(brain.s0[brain.tissue == 3].mean()) / snr
    if snr is not None:
        signal = add_rician_noise(signal, sigma, rng)
    maps = scalar_maps(tensors)
    mask = brain.tissue > 0
    return Phantom(
        dwi=signal.astype(np.float32),
        affine=affine,
        gtab=GradientTable(bvals, world_to_fsl(dirs, affine)),
        tensors_world=tensors,
        s0=brain.s0,
        fa=np.where(inside, maps["fa"], 0).astype(np.float32),
        md=np.where(inside, maps["md"], 0).astype(np.float32),
        fractions=brain.fractions,
        tissue=brain.tissue,
        mask=mask,
        bundles=brain.bundles,
        lesion=(brain.lesion >= 0.5) & mask if lesion else None,
        sigma=sigma,
        preset=spec.name,
        seed=seed,
        subject=subject,
        snr=snr,
        rotation=rotation,
        shift=shift,
    )
