"""Diffusion tensors: the one internal order, frames, eigen-analysis and scalar maps.

Order. Every tensor array in iqt-pipe has its 6 unique components on the last axis in
BEP016 order ``(D11, D12, D13, D22, D23, D33)``, units mm²/s. Converters to and from
dipy's lower-triangular order ``(Dxx, Dxy, Dyy, Dxz, Dyz, Dzz)`` and MRtrix3's
``(Dxx, Dyy, Dzz, Dxy, Dxz, Dyz)`` live here and nowhere else.

Frames. A tensor is expressed in one of three orthonormal frames:

* *voxel*: the axes of the image's index grid (i, j, k). The network works here, because
  its spatial patterns live on that grid.
* *FSL*: the frame of FSL/BIDS ``.bvec`` files — the voxel frame with the first axis
  negated when the affine has a positive determinant (FSL's radiological convention).
  dipy fitted with the file's bvecs returns tensors in this frame.
* *world*: scanner RAS+ coordinates, the frame of MRtrix3 and of every tensor file
  iqt-pipe writes (``OrientationEncoding.Reference: "xyz"``).
"""

from __future__ import annotations

import numpy as np

#: Names of the components in BEP016 order.
COMPONENTS = ("D11", "D12", "D13", "D22", "D23", "D33")
#: Positions of the diagonal components (D11, D22, D33) in BEP016 order.
DIAGONAL = (0, 3, 5)

# (row, col) of each BEP016 component in the 3×3 matrix.
_ROWS = np.array([0, 0, 0, 1, 1, 2])
_COLS = np.array([0, 1, 2, 1, 2, 2])

# Index maps: other_order = bep016[..., _TO_X]; bep016 = other[..., _FROM_X].
_TO_DIPY = np.array([0, 1, 3, 2, 4, 5])  # Dxx, Dxy, Dyy, Dxz, Dyz, Dzz
_TO_MRTRIX = np.array([0, 3, 5, 1, 2, 4])  # Dxx, Dyy, Dzz, Dxy, Dxz, Dyz
_FROM_DIPY = np.argsort(_TO_DIPY)
_FROM_MRTRIX = np.argsort(_TO_MRTRIX)


def _check6(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d)
    if d.shape[-1] != 6:
        raise ValueError(f"expected 6 tensor components on the last axis, got shape {d.shape}")
    return d


def to_dipy_order(d6: np.ndarray) -> np.ndarray:
    """BEP016 → dipy's lower-triangular order (Dxx, Dxy, Dyy, Dxz, Dyz, Dzz)."""
    return _check6(d6)[..., _TO_DIPY]


def from_dipy_order(d6: np.ndarray) -> np.ndarray:
    """dipy's lower-triangular order → BEP016."""
    return _check6(d6)[..., _FROM_DIPY]


def to_mrtrix_order(d6: np.ndarray) -> np.ndarray:
    """BEP016 → MRtrix3's order (Dxx, Dyy, Dzz, Dxy, Dxz, Dyz)."""
    return _check6(d6)[..., _TO_MRTRIX]


def from_mrtrix_order(d6: np.ndarray) -> np.ndarray:
    """MRtrix3's order → BEP016."""
    return _check6(d6)[..., _FROM_MRTRIX]


#: The identity tensor in BEP016 order.
IDENTITY6 = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])


def to_matrix(d6: np.ndarray) -> np.ndarray:
    """``(..., 6)`` BEP016 components → symmetric ``(..., 3, 3)`` matrices."""
    d6 = _check6(d6)
    m = np.empty(d6.shape[:-1] + (3, 3), dtype=d6.dtype)
    m[..., _ROWS, _COLS] = d6
    m[..., _COLS, _ROWS] = d6
    return m


def from_matrix(m: np.ndarray) -> np.ndarray:
    """Symmetric ``(..., 3, 3)`` matrices → ``(..., 6)`` BEP016 components."""
    m = np.asarray(m)
    if m.shape[-2:] != (3, 3):
        raise ValueError(f"expected (..., 3, 3) matrices, got shape {m.shape}")
    return m[..., _ROWS, _COLS]


# --------------------------------------------------------------------------- frames


def voxel_to_world_rotation(affine: np.ndarray) -> np.ndarray:
    """Orthonormal rotation (or rotoreflection) taking voxel-frame vectors to world.

    The columns of ``affine[:3, :3]`` are the world directions of the voxel axes, scaled
    by the voxel sizes; shear, if any, is removed by the polar decomposition.
    """
    a = np.asarray(affine, dtype=float)[:3, :3]
    u, _, vt = np.linalg.svd(a)
    return u @ vt


def fsl_flip(affine: np.ndarray) -> np.ndarray:
    """Diagonal matrix mapping FSL-frame vectors to voxel-frame vectors (its own inverse)."""
    flip = np.eye(3)
    if np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]) > 0:
        flip[0, 0] = -1.0
    return flip


def rotation_operator(rotation: np.ndarray) -> np.ndarray:
    """The ``(6, 6)`` matrix ``M`` with ``from_matrix(R D Rᵀ) = M @ d6`` for BEP016 ``d6``: the
    change of frame is linear in the six components, column ``c`` being the rotated unit
    tensor of component ``c``."""
    r = np.asarray(rotation, dtype=np.float64)
    units = to_matrix(np.eye(6))  # (6, 3, 3): one symmetric unit tensor per component
    return from_matrix(np.einsum("ij,cjk,lk->cil", r, units, r)).T


def rotate_tensors(d6: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Express tensors in a new frame: ``D' = R D Rᵀ`` for every voxel (one ``6 × 6`` product
    per voxel, :func:`rotation_operator`; float32 input stays float32)."""
    d6 = _check6(d6)
    dtype = np.result_type(d6, np.float32)
    flat = np.ascontiguousarray(d6, dtype=dtype).reshape(-1, 6)
    return (flat @ rotation_operator(rotation).T.astype(dtype)).reshape(d6.shape)


def tensors_voxel_to_world(d6: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel-frame tensors of an image with this affine → world (scanner RAS) frame."""
    return rotate_tensors(d6, voxel_to_world_rotation(affine))


def tensors_world_to_voxel(d6: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World-frame tensors → the voxel frame of an image with this affine."""
    return rotate_tensors(d6, voxel_to_world_rotation(affine).T)


# --------------------------------------------------------------------------- eigen and scalars


def eig(d6: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised eigendecomposition, eigenvalues in descending order.

    Returns ``evals`` of shape ``(..., 3)`` and ``evecs`` of shape ``(..., 3, 3)`` whose
    column ``evecs[..., :, k]`` is the unit eigenvector of ``evals[..., k]``.
    """
    w, v = np.linalg.eigh(to_matrix(np.asarray(d6, dtype=np.float64)))
    return w[..., ::-1], v[..., :, ::-1]


def mean_diffusivity(evals: np.ndarray) -> np.ndarray:
    """MD = (λ1 + λ2 + λ3) / 3."""
    return np.mean(evals, axis=-1)


def axial_diffusivity(evals: np.ndarray) -> np.ndarray:
    """AD = λ1 (eigenvalues in descending order)."""
    return evals[..., 0]


def radial_diffusivity(evals: np.ndarray) -> np.ndarray:
    """RD = (λ2 + λ3) / 2 (eigenvalues in descending order)."""
    return 0.5 * (evals[..., 1] + evals[..., 2])


def fractional_anisotropy(evals: np.ndarray) -> np.ndarray:
    """FA = sqrt(3/2) · |λ − MD| / |λ|; 0 where all eigenvalues are 0."""
    evals = np.asarray(evals, dtype=np.float64)
    dev = evals - evals.mean(axis=-1, keepdims=True)
    num = np.sqrt(1.5 * np.sum(dev**2, axis=-1))
    den = np.sqrt(np.sum(evals**2, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        fa = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(fa, 0.0, 1.0)


def colour_fa(evals: np.ndarray, evecs: np.ndarray) -> np.ndarray:
    """Direction-encoded colour FA: ``FA · |e1|`` as RGB in ``[0, 1]``, shape ``(..., 3)``.

    The colours refer to the frame the tensors are in (world: red = left–right).
    """
    return fractional_anisotropy(evals)[..., None] * np.abs(evecs[..., :, 0])


def scalar_maps(d6: np.ndarray) -> dict[str, np.ndarray]:
    """FA, MD, AD, RD (float32) of tensors in any frame."""
    evals, _ = eig(d6)
    return {
        "fa": fractional_anisotropy(evals).astype(np.float32),
        "md": mean_diffusivity(evals).astype(np.float32),
        "ad": axial_diffusivity(evals).astype(np.float32),
        "rd": radial_diffusivity(evals).astype(np.float32),
    }


def not_positive_definite(d6: np.ndarray) -> np.ndarray:
    """Tensors with an eigenvalue ≤ 0, by Sylvester's criterion on the leading principal
    minors (D11, D11·D22 − D12², det D): no 3×3 matrices, a few bytes per tensor. A torch
    tensor gives a torch tensor (on its threads)."""
    d = d6.double() if hasattr(d6, "double") else np.asarray(d6, dtype=np.float64)
    d11, d12, d13, d22, d23, d33 = (d[..., k] for k in range(6))
    minor2 = d11 * d22 - d12**2
    det = d11 * (d22 * d33 - d23**2) - d12 * (d12 * d33 - d23 * d13) + d13 * (d12 * d23 - d22 * d13)
    return ~((d11 > 0) & (minor2 > 0) & (det > 0))


def project_psd(d6: np.ndarray, min_eigenvalue: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Nearest tensors (Frobenius norm) with every eigenvalue ≥ ``min_eigenvalue``.

    Returns the projected tensors and a boolean array marking the voxels that changed. Only
    the tensors :func:`not_positive_definite` finds with an eigenvalue ≤ ``min_eigenvalue`` are
    decomposed (a few percent of a fitted brain: 10× sooner than decomposing them all).
    """
    d6 = np.asarray(d6)
    out = d6.astype(np.result_type(d6, np.float32), copy=True)
    candidates = not_positive_definite(d6.astype(np.float64) - min_eigenvalue * IDENTITY6)
    w, v = np.linalg.eigh(to_matrix(d6[candidates].astype(np.float64)))
    below = np.any(w < min_eigenvalue, axis=-1)
    changed = np.zeros(candidates.shape, dtype=bool)
    changed[candidates] = below
    out[changed] = tensors_from_eig(np.maximum(w[below], min_eigenvalue), v[below])
    return out, changed


def tensors_from_eig(evals: np.ndarray, evecs: np.ndarray) -> np.ndarray:
    """Compose tensors from eigenvalues ``(..., 3)`` and eigenvector columns ``(..., 3, 3)``."""
    return from_matrix(np.einsum("...ij,...j,...kj->...ik", evecs, evals, evecs))
