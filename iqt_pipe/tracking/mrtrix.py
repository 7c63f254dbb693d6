"""Inputs of MRtrix3's tensor tractography (``tckgen -algorithm Tensor_Det/Tensor_Prob``) for a
tensor image (:func:`prepare_mrtrix_inputs`).

``tckgen``'s ``Tensor_Det``/``Tensor_Prob`` fit tensors to a DWI series themselves, so one is
synthesised from the tensors and the fitted S0 (trilinearly resampled to the tensor grid, so it
stays positive), by the forward model of :mod:`iqt_pipe.dmri.signal`. For ``Tensor_Det`` the
series is noise-free, and seven volumes give back every voxel's tensor exactly: one b=0 and six
directions (:func:`exact_scheme`) at the b-value of the subject's DTI shell. ``tckgen`` fits the
signal it interpolates at every step, so a series of the subject's 30-odd volumes took several
times longer for the same directions (measured on sub-achieva01's super-resolved tensors:
17.2 s against 4.7 s; same seeds, track densities r = 0.997). ``Tensor_Prob`` draws its
directions by a wild bootstrap of the fit's residuals, which a noise-free series does not
have: its series has the subject's gradient table (:func:`synthesis_scheme`) and Rician noise
(fixed seed) at the run's noise level, σ measured from the repeated b=0 volumes of the native
DWI (:func:`b0_noise_sigma`), or, without repeats, σ = median S0 / :data:`DEFAULT_SYNTH_SNR`
(30). The sidecars record σ and where it came from.

Frames. Tensor files are in world coordinates, and MRtrix3 reads gradient directions in world
coordinates too (:func:`write_mrtrix_grad`): the series is synthesised with world directions.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np

from iqt_pipe.dmri.signal import add_rician_noise, synthesize_signal
from iqt_pipe.io import InputError, atomic_open, load_nifti, load_tensor_image, save_nifti
from iqt_pipe.tracking.files import resample_to_grid
from iqt_pipe.tracking.track import TrackingParams, bounding_box, seed_count, seed_mask, voxel_size

#: SNR of the synthesised b=0 that sets the noise added for ``Tensor_Prob`` when the run's own
#: noise level cannot be measured (fewer than two b=0 volumes).
DEFAULT_SYNTH_SNR = 30.0


def synthesis_scheme(bvals: np.ndarray, bvecs_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The volumes a synthesised series needs: one b = 0 and the DTI shell of the subject's
    table (IQT protocol, :func:`iqt_pipe.dmri.gradients.select_dti_volumes`); world directions."""
    from iqt_pipe.dmri.gradients import GradientTable, select_dti_volumes

    gtab = GradientTable(np.asarray(bvals, float), np.asarray(bvecs_world, float))
    keep = select_dti_volumes(gtab) & ~gtab.b0_mask
    b = np.r_[0.0, gtab.bvals[keep]]
    g = np.vstack([np.zeros((1, 3)), gtab.bvecs[keep]])
    return b, g


def exact_scheme(bvals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The smallest series that gives back a tensor exactly: one b = 0 and the six axes of an
    icosahedron's vertices (the best-conditioned six directions), at the median b-value of the
    diffusion-weighted volumes of ``bvals`` (a :func:`synthesis_scheme`)."""
    golden = (1 + math.sqrt(5)) / 2
    axes = np.array([[0, 1, golden], [0, -1, golden], [1, golden, 0], [-1, golden, 0], [golden, 0, 1], [golden, 0, -1]])
    b = float(np.median(np.asarray(bvals, float)[np.asarray(bvals) > 0]))
    return np.r_[0.0, np.full(6, b)], np.vstack([np.zeros((1, 3)), axes / np.linalg.norm(axes, axis=1, keepdims=True)])


def synthesize_dwi(
    tensors_world: np.ndarray,
    s0: np.ndarray,
    bvals: np.ndarray,
    bvecs_world: np.ndarray,
    noise: tuple[float, np.random.Generator, int] | None = None,
) -> np.ndarray:
    """Noise-free ``S0·exp(−b gᵀDg)`` for world-frame tensors (projected to positive
    semidefinite) and world directions, float32 ``(X, Y, Z, volumes)``, zero where S0 is not
    positive. ``noise = (σ, rng, k)`` adds Rician noise of sd σ to volumes ``k`` onward
    (``rng``'s draws, voxel by voxel in the order x fastest, then y, then z).

    Stored voxel by voxel (each voxel's volumes contiguous, x fastest among voxels), the
    layout :func:`save_mif` writes and ``tckgen`` reads: every voxel's signal is written at once."""
    from iqt_pipe.dmri.dti import project_psd

    shape = s0.shape
    s0 = np.clip(np.nan_to_num(s0), 0, None).ravel(order="F")
    storage = np.zeros(shape[::-1] + (len(bvals),), dtype=np.float32)  # (Z, Y, X, volumes)
    rows = storage.reshape(-1, len(bvals))  # row x + X·(y + Y·z): the voxels' Fortran-order index
    inside = np.flatnonzero(s0 > 0)
    for start in range(0, len(inside), 200000):  # bounded memory on large grids
        flat = inside[start : start + 200000]
        voxel = np.unravel_index(flat, shape, order="F")
        tensors, _ = project_psd(np.nan_to_num(np.asarray(tensors_world[voxel], dtype=np.float64)), 0.0)
        signal = synthesize_signal(s0[flat].astype(float), tensors, bvals, bvecs_world)
        if noise is not None:
            sigma, rng, first = noise
            signal[:, first:] = add_rician_noise(signal[:, first:].astype(np.float32), sigma, rng)  # float32 draws
        rows[flat] = signal
    return storage.transpose(2, 1, 0, 3)


#: The storage order :func:`save_mif` writes: each voxel's volumes contiguous, then x, y, z.
MIF_LAYOUT = "+1,+2,+3,+0"


def save_mif(series: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """A 4-D series ``(X, Y, Z, volumes)`` on a NIfTI grid as an uncompressed MRtrix3 ``.mif``
    (float32, layout :data:`MIF_LAYOUT`), atomically. ``tckgen``'s tensor algorithms read every
    volume of a voxel at once: they memory-map a series stored this way as it is, where a
    ``.nii.gz`` is decompressed and reordered into memory first (super-resolved sub-achieva01,
    ``Tensor_Prob``, one thread, 20 k seeds: 16.3 s from the ``.nii.gz``, 12.9 s from a ``.nii``,
    11.0 s from this file), and nothing is compressed."""
    affine = np.asarray(affine, dtype=np.float64)
    sizes = nb.affines.voxel_sizes(affine)
    rotation = np.c_[affine[:3, :3] / sizes, affine[:3, 3]]  # MRtrix3's transform: no voxel scaling
    lines = [
        "mrtrix image",
        "dim: " + ",".join(str(int(n)) for n in series.shape),
        "vox: " + ",".join(f"{v:.10g}" for v in sizes) + ",1",
        f"layout: {MIF_LAYOUT}",
        "datatype: Float32LE",
        *("transform: " + ", ".join(f"{v:.17g}" for v in row) for row in rotation),
    ]
    text = "\n".join(lines) + "\nfile: . "
    offset = len(text) + len("\nEND\n") + 5
    offset += -offset % 16  # the data 16-byte aligned; the header's last line padded with spaces
    head = f"{text}{offset}".encode()
    head += b"\nEND\n" + b" " * (offset - len(head) - 5)
    with atomic_open(path, "wb") as fh:
        fh.write(head)
        for z in range(series.shape[2]):  # one slab of voxels at a time, (Y, X, volumes) in C order
            fh.write(np.ascontiguousarray(np.swapaxes(series[:, :, z], 0, 1), dtype="<f4").tobytes())
    return Path(path)


def read_mif(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 4-D float32 ``.mif`` as :func:`save_mif` writes it: ``(X, Y, Z, volumes)`` and the NIfTI
    affine of its grid. Any other layout or data type raises :class:`InputError`."""
    with open(path, "rb") as fh:
        raw = fh.read()
    end = raw.find(b"\nEND\n")
    fields: dict[str, list[str]] = {}
    for line in raw[:end].decode().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), []).append(value.strip())
    if raw[:13] != b"mrtrix image\n" or fields.get("layout") != [MIF_LAYOUT] or fields.get("datatype") != ["Float32LE"]:
        raise InputError(f"{path}: not a float32 .mif of layout {MIF_LAYOUT} as iqt-pipe writes them")
    shape = tuple(int(n) for n in fields["dim"][0].split(","))
    sizes = np.array([float(v) for v in fields["vox"][0].split(",")[:3]])
    rotation = np.array([[float(v) for v in row.split(",")] for row in fields["transform"]])
    affine = np.eye(4)
    affine[:3, :3] = rotation[:, :3] * sizes
    affine[:3, 3] = rotation[:, 3]
    offset = int(fields["file"][0].split()[1])
    data = np.frombuffer(raw, dtype="<f4", count=int(np.prod(shape)), offset=offset)
    return data.reshape(shape[2], shape[1], shape[0], shape[3]).transpose(2, 1, 0, 3).astype(np.float32), affine


def write_mrtrix_grad(bvals: np.ndarray, bvecs_world: np.ndarray, path: str | os.PathLike) -> Path:
    """An MRtrix3 ``-grad`` file: one row ``x y z b`` per volume, directions in world coordinates."""
    rows = [f"{x:.8f} {y:.8f} {z:.8f} {b:g}" for (x, y, z), b in zip(bvecs_world, bvals)]
    with atomic_open(path) as fh:
        fh.write("\n".join(rows) + "\n")
    return Path(path)


def b0_noise_sigma(b0: np.ndarray, mask: np.ndarray) -> float | None:
    """The noise σ of a DWI run from its repeated b=0 volumes ``(X, Y, Z, n)`` inside ``mask``:
    the robust sd (1.4826 × median absolute deviation) of each voxel's deviations from its
    mean b=0, times ``sqrt(n / (n − 1))`` for the mean's share; Gaussian (high-SNR Rician)
    noise. None with fewer than two b=0 volumes or an empty mask."""
    b0 = np.asarray(b0, dtype=np.float64)
    mask = np.asarray(mask, bool)
    n = b0.shape[-1] if b0.ndim == 4 else 1
    if n < 2 or not mask.any():
        return None
    values = b0[mask]
    deviations = values - values.mean(axis=1, keepdims=True)
    sigma = 1.4826 * float(np.median(np.abs(deviations))) * math.sqrt(n / (n - 1))
    return sigma if math.isfinite(sigma) and sigma > 0 else None


def run_noise_sigma(
    dwi_file: str | os.PathLike, bvals: np.ndarray, mask_file: str | os.PathLike | None = None
) -> float | None:
    """:func:`b0_noise_sigma` of a DWI series file (only its b=0 volumes are read) inside a
    brain mask on its grid; None when the series has fewer than two b=0 volumes or the mask's
    grid differs."""
    from iqt_pipe.dmri.gradients import B0_THRESHOLD

    b0_index = np.flatnonzero(np.asarray(bvals, float) <= B0_THRESHOLD)
    if len(b0_index) < 2:
        return None
    img = nb.load(str(dwi_file))
    if len(img.shape) != 4 or img.shape[3] != len(bvals):
        raise InputError(
            f"{dwi_file}: expected a 4-D series of {len(bvals)} volumes (one per b-value), got shape {img.shape}"
        )
    b0 = np.stack([np.asarray(img.dataobj[..., int(i)], dtype=np.float32) for i in b0_index], axis=-1)
    if mask_file is not None:
        mask, mask_affine, _ = load_nifti(mask_file)
        if mask.shape != b0.shape[:3] or not np.allclose(mask_affine, img.affine, atol=1e-3):
            return None
        mask = mask > 0
    else:  # no mask: the voxels brighter than half the 98th percentile of the mean b=0
        mean = b0.mean(axis=-1)
        mask = mean > 0.5 * np.percentile(mean, 98)
    return b0_noise_sigma(b0, mask)


def prepare_mrtrix_inputs(
    tensor_file: str | os.PathLike,
    mask_file: str | os.PathLike,
    s0_file: str | os.PathLike,
    bval_file: str | os.PathLike,
    bvec_file: str | os.PathLike,
    prefix: str | os.PathLike,
    params: TrackingParams | None = None,
    noisy: bool = False,
    noise_dwi_file: str | os.PathLike | None = None,
    noise_mask_file: str | os.PathLike | None = None,
    snr: float = DEFAULT_SYNTH_SNR,
) -> dict[str, Any]:
    """Everything ``tckgen -algorithm Tensor_Det/Tensor_Prob`` needs for a tensor image:
    ``dwi_file``, a noise-free DWI series synthesised from the tensors and S0 (trilinearly
    resampled to the tensor grid when the grids differ) on the :func:`exact_scheme`, with its
    ``grad_file`` (world coordinates); the brain mask, the white-matter seed mask
    (:func:`seed_mask`), and the seed count and step/angle for this voxel size. The images are
    cut to the brain mask's bounding box (one voxel around it).

    With ``noisy`` (for ``Tensor_Prob``, whose wild bootstrap needs residuals) also
    ``noisy_dwi_file`` and ``noisy_grad_file``: a series on the subject's gradient table
    (:func:`synthesis_scheme`) with Rician noise (seeded by ``params.random_seed``) inside the
    mask, σ from the repeated b=0 volumes of ``noise_dwi_file`` (the run's native DWI, same
    gradient table; ``noise_mask_file`` its brain mask) or, failing that, median S0 in the
    mask / ``snr``; ``noise`` describes it for the sidecar.
    """
    from iqt_pipe.dmri.gradients import read_gradients

    tensors, mask, full_affine = load_tensor_image(tensor_file, mask_file)
    s0, s0_affine, _ = load_nifti(s0_file)
    if s0.ndim != 3:
        raise InputError(f"{s0_file}: expected a 3-D S0 image, got shape {s0.shape}")
    gtab = read_gradients(bval_file, bvec_file)
    # Every file is cut to the brain's bounding box (tckgen tracks in world mm: the same
    # streamlines, from a series half the size or less).
    same_grid = s0.shape == mask.shape and np.allclose(s0_affine, full_affine, atol=1e-3)
    box, affine = bounding_box(mask, full_affine)
    tensors, mask = tensors[box], mask[box]
    s0 = s0[box] if same_grid else resample_to_grid(s0, s0_affine, affine, mask.shape)
    bvals, bvecs = synthesis_scheme(gtab.bvals, gtab.bvecs_world(s0_affine))
    params = (params or TrackingParams()).resolved(voxel_size(affine))
    seeds = seed_mask(tensors, mask, params.seed_fa, str(tensor_file))
    prefix = str(prefix)
    if noisy and not (math.isfinite(snr) and snr > 0):
        raise InputError(f"the SNR of the synthesised b=0 must be a positive number, got {snr!r}")
    s0 = np.where(mask, s0, 0)  # the series are zero outside the mask
    exact_bvals, exact_bvecs = exact_scheme(bvals)
    noise = None
    if noisy:
        sigma = run_noise_sigma(noise_dwi_file, gtab.bvals, noise_mask_file) if noise_dwi_file else None
        if sigma is not None:
            how = f"robust sd of the repeated b=0 volumes of {Path(noise_dwi_file).name}"
        else:
            sigma = float(np.median(s0[mask & (s0 > 0)])) / snr if (mask & (s0 > 0)).any() else 0.0
            how = f"median b=0 of the synthesised series / {snr:g} (SNR {snr:g}; the run's noise was not measurable)"
        noise = (sigma, np.random.default_rng(params.random_seed), len(exact_bvals))
    # Both series in one synthesis (projecting the tensors is its costly part)
    both = (np.r_[exact_bvals, bvals], np.vstack([exact_bvecs, bvecs])) if noisy else (exact_bvals, exact_bvecs)
    series = synthesize_dwi(tensors, s0, *both, noise=noise)
    out = {
        "dwi_file": save_mif(series[..., : len(exact_bvals)], affine, prefix + "_dwi.mif"),
        "grad_file": write_mrtrix_grad(exact_bvals, exact_bvecs, prefix + "_grad.b"),
        "mask_file": save_nifti(mask.astype(np.uint8), affine, prefix + "_mask.nii.gz", dtype=np.uint8),
        "seed_mask_file": save_nifti(seeds.astype(np.uint8), affine, prefix + "_seeds.nii.gz", dtype=np.uint8),
        "n_seeds": seed_count(seeds, affine, params.seed_density),
        "step_mm": params.step_mm,
        "max_angle": params.max_angle,
        "voxel_size_mm": voxel_size(affine),
    }
    if noisy:
        out["noisy_dwi_file"] = save_mif(series[..., len(exact_bvals) :], affine, prefix + "_noisy_dwi.mif")
        out["noisy_grad_file"] = write_mrtrix_grad(bvals, bvecs, prefix + "_noisy_grad.b")
        out["noise"] = {"Type": "Rician", "Sigma": sigma, "Estimate": how, "RandomSeed": params.random_seed}
    return out
