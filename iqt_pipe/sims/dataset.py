"""The BIDS raw dataset of ``iqt-phantom``: synthetic subjects (:func:`iqt_pipe.sims.phantom.make_phantom`)
written as DWI series with their gradients and sidecars, and the exact ground truth in
``derivatives/phantom-truth`` (world-frame tensors in BEP016 order, FA, MD, brain mask, tissue
labels, lesion mask).

Writing is all or nothing: the dataset is built in a hidden sibling folder and moved into place
at the end. A folder is only ever replaced when it holds a dataset this module wrote
(:func:`is_phantom_dataset`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

from iqt_pipe import __version__
from iqt_pipe.dmri.gradients import write_gradients
from iqt_pipe.io import TENSOR_ORIENTATION, InputError, save_json, save_nifti, save_text
from iqt_pipe.sims.phantom import (
    B_VALUE,
    Phantom,
    Preset,
    check_seed,
    check_snr,
    get_preset,
    make_affine,
    make_phantom,
)

#: Name written to ``GeneratedBy``; a folder whose description carries it may be replaced.
GENERATOR = "iqt-phantom"
#: Folder of the ground truth inside the raw dataset.
TRUTH_DIR = Path("derivatives") / "phantom-truth"
BIDS_VERSION = "1.9.0"
REPETITION_TIME = 3.5  # s, header pixdim[4] and sidecar
ECHO_TIME = 0.08  # s


def is_phantom_dataset(path: Path) -> bool:
    """True when ``path`` holds a dataset written by :func:`write_bids_dataset`."""
    try:
        desc = json.loads((Path(path) / "dataset_description.json").read_text())
        return any(g.get("Name") == GENERATOR for g in desc.get("GeneratedBy", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _check_dataset_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_phantom_dataset(out_dir):
        raise InputError(
            f"{out_dir}: folder is not empty and was not written by {GENERATOR}; choose an empty or new output folder"
        )


def _nifti_header(shape, voxel_size: float):
    """Header with spatial units (and, for a 4-D series, the repetition time)."""
    import nibabel as nb

    hdr = nb.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_zooms(((voxel_size,) * 3 + (REPETITION_TIME,))[: len(shape)])
    hdr.set_xyzt_units("mm", "sec")
    return hdr


def _generated_by() -> list[dict]:
    return [
        {
            "Name": GENERATOR,
            "Version": __version__,
            "Description": "Synthetic brain DWI with exact ground-truth tensors (iqt_pipe.sims.phantom)",
        }
    ]


def _write_top_level(root: Path, spec: Preset, seed: int, snr, rows: list[dict]) -> None:
    """dataset_description.json, participants.tsv/.json and README of the raw dataset."""
    save_json(
        {
            "Name": f"iqt-phantom synthetic DWI (preset {spec.name}, seed {seed})",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["iqt-pipe developers"],
            "GeneratedBy": _generated_by(),
        },
        root / "dataset_description.json",
    )
    columns = list(rows[0])
    lines = ["\t".join(columns)] + ["\t".join(str(r[c]) for c in columns) for r in rows]
    save_text("\n".join(lines) + "\n", root / "participants.tsv")
    save_json(
        {
            "phantom_seed": {"Description": "seed given to iqt-phantom; subjects differ by index"},
            "head_rotation_deg": {"Description": "rotation of the head from the template pose", "Units": "degree"},
            "head_shift_mm": {"Description": "shift of the head from the template pose", "Units": "mm"},
        },
        root / "participants.json",
    )
    save_text(_readme(spec, seed, snr), root / "README")


def _participant_row(label: str, p: Phantom) -> dict:
    angle = math.degrees(math.acos(np.clip((np.trace(p.rotation) - 1) / 2, -1, 1)))
    return {
        "participant_id": f"sub-{label}",
        "phantom_seed": p.seed,
        "head_rotation_deg": f"{angle:.2f}",
        "head_shift_mm": f"{np.linalg.norm(p.shift):.2f}",
    }


def _readme(spec: Preset, seed: int, snr) -> str:
    snr = "noise-free" if snr is None else f"Rician noise at SNR {snr:g} (mean WM b=0 / sigma)"
    shape = "x".join(str(n) for n in spec.shape)
    return (
        f"# iqt-phantom synthetic diffusion MRI\n\n"
        f"Written by {GENERATOR} {__version__} (preset {spec.name}, seed {seed}).\n\n"
        f"- Grid {shape} (RAS extent) at {spec.voxel_size:g} mm isotropic; {spec.n_b0} b=0 "
        f"volumes interleaved with {spec.n_directions} directions at b={B_VALUE:g} s/mm^2; "
        f"{snr}.\n"
        "- Anatomy from nilearn's MNI152 brain mask and GM/WM maps; fibre bundles are "
        "parametric tubes (callosal arc, corticospinal, superior longitudinal, cingulum).\n"
        "- One Gaussian tensor per voxel: the noise-free signal is exactly "
        "S0*exp(-b g'Dg).\n"
        "- Subjects differ by a small rigid head motion and by their noise.\n\n"
        f"Ground truth lives in {TRUTH_DIR.as_posix()}/: world-frame tensors (BEP016 order "
        "D11 D12 D13 D22 D23 D33, mm^2/s, Reference xyz), FA, MD, brain mask, tissue labels "
        "(0 background, 1 CSF, 2 GM, 3 WM) and, when present, the lesion mask.\n"
    )


def _write_subject(root: Path, label: str, p: Phantom, spec: Preset) -> None:
    """The raw DWI series of one subject with its .bval/.bvec and JSON sidecar."""
    stem = root / f"sub-{label}" / "dwi" / f"sub-{label}_dwi"
    header = _nifti_header(p.dwi.shape, spec.voxel_size)
    save_nifti(p.dwi, p.affine, f"{stem}.nii.gz", header=header)
    write_gradients(p.gtab, f"{stem}.bval", f"{stem}.bvec")
    save_json(
        {
            "Manufacturer": "iqt-phantom (synthetic)",
            "MagneticFieldStrength": 3,
            "RepetitionTime": REPETITION_TIME,
            "EchoTime": ECHO_TIME,
            "PhaseEncodingDirection": "j-",
            "TotalReadoutTime": 0.05,
        },
        f"{stem}.json",
    )


def _truth_sidecar(label: str, p: Phantom, description: str, **extra) -> dict:
    source = f"bids:raw:sub-{label}/dwi/sub-{label}_dwi.nii.gz"
    return {
        "Description": description,
        "Sources": [source],
        "SpatialReference": source,
        **extra,
        "PhantomParameters": {
            "Preset": p.preset,
            "Seed": p.seed,
            "Subject": p.subject,
            "SNR": p.snr,
            "NoiseSigma": p.sigma,
            "Lesion": p.lesion is not None,
            "HeadRotation": p.rotation.round(8).tolist(),
            "HeadShiftMM": p.shift.round(6).tolist(),
        },
    }


#: Sidecar fields of the ground-truth tensor file (BEP016 draft).
TENSOR_SIDECAR = {
    "Model": {"Description": "single diffusion tensor (ground truth of the phantom)"},
    "OrientationEncoding": dict(TENSOR_ORIENTATION),
    "TensorComponents": ["D11", "D12", "D13", "D22", "D23", "D33"],
    "Units": "mm^2/s",
}


def _write_truth(truth: Path, label: str, p: Phantom) -> None:
    """The ground-truth maps of one subject (world-frame tensors, FA, MD, masks, labels)."""
    base = truth / f"sub-{label}" / "dwi" / f"sub-{label}"
    vox = float(p.voxel_size[0])
    maps = [
        (
            "model-tensor_param-tensor_dwimap",
            p.tensors_world,
            np.float32,
            dict(Description="ground-truth diffusion tensor, world frame", **TENSOR_SIDECAR),
        ),
        (
            "model-tensor_param-fa_dwimap",
            p.fa,
            np.float32,
            dict(Description="ground-truth fractional anisotropy", Units="arbitrary"),
        ),
        (
            "model-tensor_param-md_dwimap",
            p.md,
            np.float32,
            dict(Description="ground-truth mean diffusivity", Units="mm^2/s"),
        ),
        ("desc-brain_mask", p.mask, np.uint8, dict(Description="brain fraction >= 0.5", Type="Brain")),
        (
            "desc-tissue_dseg",
            p.tissue,
            np.uint8,
            dict(Description="largest tissue fraction where brain fraction >= 0.5"),
        ),
    ]
    if p.lesion is not None:
        maps.append(
            (
                "desc-lesion_mask",
                p.lesion,
                np.uint8,
                dict(Description="tumour-like lesion (fraction >= 0.5)", Type="Lesion"),
            )
        )
    for suffix, data, dtype, meta in maps:
        save_nifti(data, p.affine, f"{base}_{suffix}.nii.gz", dtype=dtype, header=_nifti_header(data.shape, vox))
        description = meta.pop("Description")
        save_json(_truth_sidecar(label, p, description, **meta), f"{base}_{suffix}.json")


def _write_truth_top_level(truth: Path) -> None:
    """Description, README, label table and .bidsignore of the ground-truth derivative."""
    save_json(
        {
            "Name": "iqt-phantom ground truth",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": _generated_by(),
            "DatasetLinks": {"raw": "../../"},
        },
        truth / "dataset_description.json",
    )
    save_text(
        "# iqt-phantom ground truth\n\nExact tensors (world frame, BEP016 order, mm^2/s), FA, "
        "MD, brain mask, tissue labels and lesion mask of the synthetic subjects in ../../.\n"
        "The BEP016 `_dwimap` files are not in BIDS 1.9 yet; .bidsignore lists them.\n",
        truth / "README",
    )
    save_text(
        "index\tname\tabbreviation\n0\tbackground\tBG\n1\tcerebrospinal fluid\tCSF\n"
        "2\tgrey matter\tGM\n3\twhite matter\tWM\n",
        truth / "desc-tissue_dseg.tsv",
    )
    save_json({"Description": "labels of the sub-*_desc-tissue_dseg maps"}, truth / "desc-tissue_dseg.json")
    save_text("*_dwimap.*\n", truth / ".bidsignore")


def write_bids_dataset(
    out_dir: str | os.PathLike,
    n_subjects: int = 1,
    preset: str | Preset = "tiny",
    seed: int = 0,
    snr: float | None = 30.0,
    lesion: bool = False,
    orientation: str = "RAS",
) -> Path:
    """Write a BIDS raw dataset of ``n_subjects`` phantoms, the truth in
    ``derivatives/phantom-truth``; returns the dataset root.

    The dataset is built in a hidden sibling folder and moved into place at the end, so a
    failure leaves nothing half-written. ``out_dir`` must be new, empty, or a dataset
    written by this function before (which is then replaced as a whole); anything else
    raises :class:`~iqt_pipe.io.InputError`.
    """
    out = Path(out_dir).absolute()
    spec = get_preset(preset)
    check_snr(snr)
    check_seed(seed, "seed")
    if check_seed(n_subjects, "the number of subjects") < 1:
        raise InputError("the number of subjects must be at least 1")
    make_affine(spec.voxel_size, spec.shape, orientation)  # checks the codes
    _check_dataset_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(out, "tmp")
    try:
        width = max(2, len(str(n_subjects)))
        truth = staging / TRUTH_DIR
        _write_truth_top_level(truth)
        rows = []
        for i in range(1, n_subjects + 1):
            label = f"{i:0{width}d}"
            p = make_phantom(spec, seed, snr, lesion, subject=i, orientation=orientation)
            _write_subject(staging, label, p, spec)
            _write_truth(truth, label, p)
            rows.append(_participant_row(label, p))
        _write_top_level(staging, spec, seed, check_snr(snr), rows)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` onto ``target`` (absent, empty, or an earlier phantom)."""
    _check_dataset_dir(target)  # again: something may have appeared meanwhile
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.{secrets.token_hex(6)}.old"
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _hidden_sibling(path: Path, kind: str) -> Path:
    """A new empty folder beside ``path`` (same file system, so renames are atomic)."""
    folder = path.parent / f".{path.name}.{secrets.token_hex(6)}.{kind}"
    folder.mkdir()
    return folder
