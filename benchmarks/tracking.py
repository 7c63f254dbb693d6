"""DIPY tracking vs MRtrix3 ``tckgen`` on the same tensors and the same seeding (run on demand,
not a test):

    .venv/bin/python benchmarks/tracking.py [--subject achieva01] [--bids DIR] [--threads N]

One real run: the DTI fit at its native resolution and the bundled model's super-resolution of it
(2× per axis, the predictive mean, as the app tracks). For each space and algorithm, DIPY
(:func:`iqt_pipe.tracking.track.track_tensors`, loading the tensor image included) and ``tckgen``
(``Tensor_Det``/``Tensor_Prob`` on the synthesised series, as the workflow runs it, Rician noise
for ``Tensor_Prob``) get the default settings, the same white-matter seed mask and seed count
and ``--threads`` threads each. Prints seconds, the DIPY/tckgen ratio (issue 22's goal: ≤ 3 on
the super-resolved tensors), the streamline counts and the two track-density maps' correlation
in the brain. Preparing the inputs (fit, super-resolution, synthesis) is not timed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare(args, tmp: Path) -> dict[str, dict[str, str]]:
    """Native fit and super-resolved tensor files: ``{space: {tensor_file, mask_file}}``, plus
    the S0 and gradient files the MRtrix3 synthesis needs (under ``"native"``)."""
    import numpy as np

    from iqt_pipe.dmri.dti import tensors_voxel_to_world
    from iqt_pipe.interfaces import FitDTI
    from iqt_pipe.io import load_tensor_image, save_nifti
    from iqt_pipe.models import load_model
    from iqt_pipe.sr.superres import super_resolve_tensors

    stem = args.bids / f"sub-{args.subject}/dwi/sub-{args.subject}_dwi"
    (tmp / "fit").mkdir()
    fit = (
        FitDTI(dwi_file=f"{stem}.nii.gz", bval_file=f"{stem}.bval", bvec_file=f"{stem}.bvec")
        .run(cwd=str(tmp / "fit"))
        .outputs
    )
    net, _ = load_model(args.model)
    pred = super_resolve_tensors(*load_tensor_image(fit.tensor_file, fit.mask_file), net, mc_samples=1)
    sr_tensor = save_nifti(
        tensors_voxel_to_world(pred.mean, pred.affine).astype(np.float32), pred.affine, tmp / "sr_tensor.nii.gz"
    )
    sr_mask = save_nifti(pred.mask.astype(np.uint8), pred.affine, tmp / "sr_mask.nii.gz", dtype=np.uint8)
    common = {
        "s0_file": fit.s0_file,
        "bval_file": f"{stem}.bval",
        "bvec_file": f"{stem}.bvec",
        "dwi_file": f"{stem}.nii.gz",
        "native_mask_file": fit.mask_file,
    }
    return {
        "native": {"tensor_file": fit.tensor_file, "mask_file": fit.mask_file, **common},
        "sr": {"tensor_file": str(sr_tensor), "mask_file": str(sr_mask), **common},
    }


def time_dipy(files: dict, algorithm: str, threads: int, density: float):
    from iqt_pipe.io import load_tensor_image
    from iqt_pipe.tracking import track as T

    t0 = time.perf_counter()
    tensors, mask, affine = load_tensor_image(files["tensor_file"], files["mask_file"])
    tracks = T.track_tensors(
        tensors, mask, affine, T.TrackingParams(algorithm=algorithm, seed_density=density), nthreads=threads
    )
    return time.perf_counter() - t0, tracks


def time_tckgen(files: dict, algorithm: str, threads: int, density: float, folder: Path):
    from iqt_pipe.interfaces.tractography import TensorTractography
    from iqt_pipe.tracking import files as F
    from iqt_pipe.tracking import mrtrix as M
    from iqt_pipe.tracking import track as T

    folder.mkdir()
    prep = M.prepare_mrtrix_inputs(
        files["tensor_file"],
        files["mask_file"],
        files["s0_file"],
        files["bval_file"],
        files["bvec_file"],
        folder / "prep",
        T.TrackingParams(seed_density=density),
        noisy=algorithm == "prob",
        noise_dwi_file=files["dwi_file"],
        noise_mask_file=files["native_mask_file"],
    )
    series = "noisy_" if algorithm == "prob" else ""  # Tensor_Prob's series (the workflow's choice)
    node = TensorTractography(
        in_file=str(prep[f"{series}dwi_file"]),
        grad_file=str(prep[f"{series}grad_file"]),
        roi_mask=str(prep["mask_file"]),
        seed_image=str(prep["seed_mask_file"]),
        step_size=prep["step_mm"],
        angle=prep["max_angle"],
        algorithm="Tensor_Det" if algorithm == "det" else "Tensor_Prob",
        cutoff=T.DEFAULT_FA_THRESHOLD,
        min_length=T.DEFAULT_MIN_LENGTH,
        max_length=T.DEFAULT_MAX_LENGTH,
        out_file=str(folder / "tracked.tck"),
        args=f"-quiet -seeds {prep['n_seeds']} -select 0",
        nthreads=threads,
    )
    env = {**os.environ, "MRTRIX_RNG_SEED": "0"}
    t0 = time.perf_counter()
    subprocess.run(node.cmdline, shell=True, check=True, env=env, cwd=folder)
    return time.perf_counter() - t0, F.load_streamlines(folder / "tracked.tck"), prep["n_seeds"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bids", type=Path, default=REPO.parent / "shared/data/ds-realdwi")
    p.add_argument("--subject", default="achieva01")
    p.add_argument("--model", type=Path, default=REPO / "iqt_pipe/data/models/iqt-hetero-var2-r2.safetensors")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for DIPY and tckgen alike")
    p.add_argument("--seed-density", type=float, default=0.1, help="seeds per mm³ of white matter (app default)")
    p.add_argument("--spaces", nargs="+", choices=("native", "sr"), default=["native", "sr"])
    args = p.parse_args()

    import nibabel as nb

    from iqt_pipe.tracking import compare as C
    from iqt_pipe.tracking import track as T

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = prepare(args, tmp)
        print(f"sub-{args.subject}, {args.threads} thread(s), seed density {args.seed_density:g}/mm³")
        print(
            f"{'space':<7} {'alg':<5} {'seeds':>7} {'DIPY s':>8} {'tckgen s':>9} {'ratio':>6} "
            f"{'DIPY n':>7} {'tckgen n':>8} {'TDI r':>6}"
        )
        for space in args.spaces:
            files = inputs[space]
            mask_img = nb.load(files["mask_file"])
            mask = mask_img.get_fdata() > 0
            for algorithm in ("det", "prob"):
                dipy_s, tracks = time_dipy(files, algorithm, args.threads, args.seed_density)
                mrtrix_s, lines, n_seeds = time_tckgen(
                    files, algorithm, args.threads, args.seed_density, tmp / f"{space}_{algorithm}"
                )
                r = C.tdi_correlation(
                    T.track_density(tracks.streamlines, mask_img.affine, mask.shape),
                    T.track_density(lines, mask_img.affine, mask.shape),
                    mask,
                )
                print(
                    f"{space:<7} {algorithm:<5} {tracks.n_seeds:>7} {dipy_s:>8.1f} {mrtrix_s:>9.1f} "
                    f"{dipy_s / mrtrix_s:>6.2f} {len(tracks):>7} {len(lines):>8} {r:>6.3f}",
                    flush=True,
                )
                if tracks.n_seeds != n_seeds:
                    print(f"        (seed counts differ: DIPY {tracks.n_seeds}, tckgen {n_seeds})")


if __name__ == "__main__":
    main()
