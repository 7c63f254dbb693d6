"""DTI fitting and LR synthesis as Nipype interfaces."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)
from nipype.utils.filemanip import fname_presuffix


class _FitDTIInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="DWI series (4-D NIfTI)")
    bval_file = File(exists=True, mandatory=True, desc="FSL b-value file")
    bvec_file = File(exists=True, mandatory=True, desc="FSL b-vector file")
    mask_file = File(exists=True, desc="brain mask; median_otsu on the mean b=0 when not given")
    nthreads = traits.Int(1, usedefault=True, nohash=True, desc="threads of the fit (the result does not depend on it)")


class _FitDTIOutputSpec(TraitedSpec):
    tensor_file = File(exists=True, desc="tensors, BEP016 order, world frame (mm²/s)")
    fa_file = File(exists=True, desc="fractional anisotropy")
    md_file = File(exists=True, desc="mean diffusivity (mm²/s)")
    ad_file = File(exists=True, desc="axial diffusivity (mm²/s)")
    rd_file = File(exists=True, desc="radial diffusivity (mm²/s)")
    s0_file = File(exists=True, desc="fitted non-diffusion-weighted signal")
    mask_file = File(exists=True, desc="brain mask (the input's, or median_otsu's)")
    metadata = traits.Dict(desc="for the tensor's sidecar: NumericalGuards (voxels made finite, non-PD count)")


class FitDTI(SimpleInterface):
    """Weighted least-squares DTI on b=0 plus one shell (IQT protocol), written in world
    coordinates with scalar maps.

    Every voxel with enough positive signal (:func:`iqt_pipe.dmri.fit.valid_signal_mask`) is
    fitted, not only the brain: super-resolution sees the brain's surroundings through its
    receptive field, and was trained on whole-volume fits
    (:func:`iqt_pipe.dmri.degrade.make_pair`). The brain mask is an output of its own."""

    input_spec = _FitDTIInputSpec
    output_spec = _FitDTIOutputSpec

    def _run_interface(self, runtime):
        from iqt_pipe.dmri.dti import scalar_maps
        from iqt_pipe.dmri.dwi import load_dwi
        from iqt_pipe.dmri.prepare import fit_series
        from iqt_pipe.io import load_mask, save_nifti, save_tensors

        series = load_dwi(self.inputs.dwi_file, self.inputs.bval_file, self.inputs.bvec_file)
        mask = load_mask(self.inputs.mask_file, series.data.shape) if self.inputs.mask_file else None
        fit, mask = fit_series(
            series.data, series.affine, series.gtab, mask, source=self.inputs.dwi_file, threads=self.inputs.nthreads
        )

        def out(suffix):
            return fname_presuffix(self.inputs.dwi_file, suffix=suffix, newpath=runtime.cwd)

        self._results["tensor_file"] = str(save_tensors(fit.tensors, series.affine, out("_tensor"), sidecar=False))
        for name, volume in scalar_maps(fit.tensors).items():
            self._results[f"{name}_file"] = str(save_nifti(volume, series.affine, out(f"_{name}")))
        self._results["s0_file"] = str(save_nifti(fit.s0, series.affine, out("_s0")))
        self._results["mask_file"] = str(save_nifti(mask.astype(np.uint8), series.affine, out("_mask"), dtype=np.uint8))
        self._results["metadata"] = {"NumericalGuards": fit.guards}
        return runtime


class _DegradeDWIInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="HR DWI series")
    bval_file = File(exists=True, mandatory=True, desc="FSL b-value file")
    bvec_file = File(exists=True, mandatory=True, desc="FSL b-vector file")
    upsample = traits.Int(2, usedefault=True, desc="block size r")


class _DegradeDWIOutputSpec(TraitedSpec):
    dwi_file = File(exists=True, desc="block-averaged LR series")
    bval_file = File(exists=True, desc="its b-values (unchanged)")
    bvec_file = File(exists=True, desc="its b-vectors (unchanged: the LR grid keeps the axes)")


class DegradeDWI(SimpleInterface):
    """Block-average every DWI volume over r×r×r voxels (IQT protocol LR synthesis)."""

    input_spec = _DegradeDWIInputSpec
    output_spec = _DegradeDWIOutputSpec

    def _run_interface(self, runtime):
        from iqt_pipe.dmri.degrade import degrade_dwi
        from iqt_pipe.dmri.dwi import load_dwi
        from iqt_pipe.dmri.gradients import write_gradients
        from iqt_pipe.io import save_nifti

        series = load_dwi(self.inputs.dwi_file, self.inputs.bval_file, self.inputs.bvec_file)
        lr, lr_affine = degrade_dwi(series.data, series.affine, self.inputs.upsample)
        out = fname_presuffix(self.inputs.dwi_file, suffix=f"_lr{self.inputs.upsample}", newpath=runtime.cwd)
        self._results["dwi_file"] = str(save_nifti(lr, lr_affine, out))
        stem = out.removesuffix(".gz").removesuffix(".nii")
        write_gradients(series.gtab, stem + ".bval", stem + ".bvec")
        self._results["bval_file"], self._results["bvec_file"] = stem + ".bval", stem + ".bvec"
        return runtime
