"""``iqt-degrade``: make an LR/HR DTI pair from an HR DWI series by the IQT protocol.

Writes the block-averaged LR series (with its gradient files), the world-frame DTI of
both resolutions, FA/MD maps and brain masks. Training and evaluation start from these.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nb
import numpy as np

from iqt_pipe import __version__
from iqt_pipe.cli._common import Parser, run_guarded
from iqt_pipe.dmri.degrade import make_pair
from iqt_pipe.dmri.dti import scalar_maps
from iqt_pipe.dmri.dwi import load_dwi
from iqt_pipe.dmri.gradients import write_gradients
from iqt_pipe.io import InputError, save_nifti, save_tensors, staged_outputs


def _build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="iqt-degrade",
        description="Block-average an HR DWI series over r×r×r voxels and fit DTI at both resolutions.",
    )
    p.add_argument("dwi", type=Path, help="HR DWI series (*_dwi.nii.gz); .bval/.bvec beside it")
    p.add_argument("-o", "--output-dir", type=Path, required=True, help="folder for the outputs")
    p.add_argument("--bval", type=Path, help="b-value file (default: beside the image)")
    p.add_argument("--bvec", type=Path, help="b-vector file (default: beside the image)")
    p.add_argument("-r", "--upsample", type=int, default=2, help="block size r (default: 2)")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"iqt-pipe {__version__}")
    return p


def _entities_stem(dwi_path: Path) -> str:
    name = dwi_path.name.removesuffix(".gz").removesuffix(".nii")
    return name.removesuffix("_dwi")


def degrade(args: argparse.Namespace) -> int:
    if args.upsample < 2:
        raise InputError(f"--upsample {args.upsample}: the block size must be an integer ≥ 2")
    series = load_dwi(args.dwi, args.bval, args.bvec)
    if min(series.data.shape[:3]) < 2 * args.upsample:
        raise InputError(f"{args.dwi}: matrix {series.data.shape[:3]} is too small for {args.upsample}³ blocks")
    pair = make_pair(series.data, series.affine, series.gtab, args.upsample, str(args.dwi))
    # Written to a staging folder first: a failure leaves nothing in the output folder.
    stem = _entities_stem(args.dwi)
    meta = {"SourceFile": str(args.dwi), "UpsampleFactor": args.upsample, "Software": f"iqt-pipe {__version__}"}
    lines = []
    with staged_outputs(args.output_dir) as out:
        save_nifti(pair.lr_dwi, pair.lr_affine, out / f"{stem}_res-lo_dwi.nii.gz")
        write_gradients(series.gtab, out / f"{stem}_res-lo_dwi.bval", out / f"{stem}_res-lo_dwi.bvec")
        for res, fit, affine, mask in (
            ("lo", pair.lr, pair.lr_affine, pair.lr_mask),
            ("hi", pair.hr, pair.hr_affine, pair.hr_mask),
        ):
            prefix = out / f"{stem}_res-{res}"
            save_tensors(fit.tensors, affine, f"{prefix}_model-tensor_param-tensor_dwimap.nii.gz", meta)
            maps = scalar_maps(fit.tensors)
            for param in ("fa", "md"):
                save_nifti(maps[param], affine, f"{prefix}_model-tensor_param-{param}_dwimap.nii.gz")
            save_nifti(mask.astype(np.uint8), affine, f"{prefix}_desc-brain_mask.nii.gz", dtype=np.uint8)
            zooms = nb.affines.voxel_sizes(affine)
            lines.append(
                f"  res-{res}: {'×'.join(map(str, fit.tensors.shape[:3]))} at "
                f"{'×'.join(f'{z:.2f}' for z in zooms)} mm, brain median FA {np.median(maps['fa'][mask]):.3f}, "
                f"MD {np.median(maps['md'][mask]) * 1e3:.3f}e-3 mm²/s"
            )
    out = args.output_dir
    print(f"iqt-degrade: {args.dwi.name} → {out} (r = {args.upsample})")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return run_guarded("iqt-degrade", lambda: degrade(args), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
