"""Throughput of the foundation steps on one real run: loading, LR synthesis, masking,
DTI fit. Run on demand:  .venv/bin/python benchmarks/fit.py [DWI.nii.gz] [-r 2]
Prints seconds and voxels per second for each step."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from iqt_pipe.dmri.degrade import degrade_dwi
from iqt_pipe.dmri.dwi import load_dwi
from iqt_pipe.dmri.fit import brain_mask, fit_dti

DEFAULT = (
    Path(__file__).resolve().parents[1].parent / "shared/data/ds-realdwi/sub-achieva01/dwi/sub-achieva01_dwi.nii.gz"
)


def timed(label, n_voxels, fn):
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    print(f"{label:<28} {dt:7.2f} s  {n_voxels / dt / 1e3:9.1f} k voxels/s")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dwi", nargs="?", type=Path, default=DEFAULT)
    p.add_argument("-r", type=int, default=2)
    args = p.parse_args()
    t0 = time.perf_counter()
    series = load_dwi(args.dwi)
    print(f"{'load (scale factors applied)':<28} {time.perf_counter() - t0:7.2f} s")
    n = int(np.prod(series.data.shape[:3]))
    print(f"{args.dwi.name}: {series.data.shape}, {n} voxels per volume")
    lr, lr_aff = timed(f"block average r={args.r}", n, lambda: degrade_dwi(series.data, series.affine, args.r))
    mask = timed("median_otsu mask", n, lambda: brain_mask(series.data, series.gtab, series.zooms))
    timed("DTI WLS fit (whole box)", n, lambda: fit_dti(series.data, series.affine, series.gtab))
    timed(
        "DTI WLS fit (brain mask)", int(mask.sum()), lambda: fit_dti(series.data, series.affine, series.gtab, mask=mask)
    )
    timed("DTI WLS fit (LR box)", int(np.prod(lr.shape[:3])), lambda: fit_dti(lr, lr_aff, series.gtab))


if __name__ == "__main__":
    main()
