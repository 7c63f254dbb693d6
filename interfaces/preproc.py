"""DIPY denoising and Gibbs-ringing removal as Nipype interfaces (the fallbacks of
MRtrix3's ``dwidenoise`` and ``mrdegibbs``, which Nipype wraps itself)."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)
from nipype.utils.filemanip import fname_presuffix


def _load_series(path: str):
    from iqt_pipe.io import InputError, load_nifti

    data, affine, header = load_nifti(path)
    if data.ndim != 4:
        raise InputError(f"{path}: a DWI series must be 4-D (x, y, z, volumes), this image is {data.ndim}-D")
    return data, affine, header


def _out_path(in_file: str, suffix: str, cwd: str) -> str:
    return fname_presuffix(in_file, suffix=f"{suffix}.nii.gz", newpath=cwd, use_ext=False)


class _DenoiseMPPCAInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="DWI series (4-D NIfTI), before any interpolation")
    mask_file = File(exists=True, desc="denoise only these voxels (all voxels when not given)")
    patch_radius = traits.Int(2, usedefault=True, desc="patch radius in voxels (2: 5×5×5 patches)")
    nprocs = traits.Int(1, usedefault=True, desc="worker processes (identical result with any number)")


class _DenoiseMPPCAOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="denoised DWI series")
    noise_file = File(exists=True, desc="estimated noise standard deviation (3-D)")


class DenoiseMPPCA(SimpleInterface):
    """Marchenko–Pastur PCA denoising, DIPY's ``mppca`` computed for many patches at once
    (:func:`iqt_pipe.dmri.preproc.denoise_mppca`)."""

    input_spec = _DenoiseMPPCAInputSpec
    output_spec = _DenoiseMPPCAOutputSpec

    def _run_interface(self, runtime):
        from iqt_pipe.dmri.preproc import denoise_mppca
        from iqt_pipe.io import load_mask, save_nifti

        data, affine, header = _load_series(self.inputs.in_file)
        mask = load_mask(self.inputs.mask_file, data.shape) if self.inputs.mask_file else None
        denoised, sigma = denoise_mppca(
            data, mask=mask, patch_radius=self.inputs.patch_radius, processes=self.inputs.nprocs
        )
        out = _out_path(self.inputs.in_file, "_denoised", runtime.cwd)
        noise = _out_path(self.inputs.in_file, "_noise", runtime.cwd)
        self._results["out_file"] = str(save_nifti(denoised, affine, out, header=header))
        self._results["noise_file"] = str(save_nifti(sigma, affine, noise, header=header))
        return runtime


class _RemoveGibbsInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="DWI series (4-D NIfTI), before any interpolation")
    slice_axis = traits.Enum(2, 0, 1, usedefault=True, desc="voxel axis across the acquired slices")
    nprocs = traits.Int(1, usedefault=True, desc="worker processes (identical result with any number)")


class _RemoveGibbsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="series with Gibbs ringing removed")


class RemoveGibbs(SimpleInterface):
    """Gibbs-ringing removal by local sub-voxel shifts with DIPY
    (:func:`iqt_pipe.dmri.preproc.remove_gibbs`)."""

    input_spec = _RemoveGibbsInputSpec
    output_spec = _RemoveGibbsOutputSpec

    def _run_interface(self, runtime):
        from iqt_pipe.dmri.preproc import remove_gibbs
        from iqt_pipe.io import save_nifti

        data, affine, header = _load_series(self.inputs.in_file)
        out = _out_path(self.inputs.in_file, "_unringed", runtime.cwd)
        unringed = remove_gibbs(data, slice_axis=self.inputs.slice_axis, processes=self.inputs.nprocs)
        self._results["out_file"] = str(save_nifti(unringed, affine, out, header=header))
        return runtime


class _NoiseCorrelationInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="DWI series as reconstructed by the scanner")
    bval_file = File(exists=True, mandatory=True, desc="its b-values (FSL)")
    bvec_file = File(exists=True, mandatory=True, desc="its b-vectors (FSL)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the series' grid")
    metadata = traits.Dict(
        traits.Str,
        traits.Any,
        usedefault=True,
        desc="sidecar fields to extend (e.g. FitDTI's); returned with the correlation added",
    )
    nprocs = traits.Int(1, usedefault=True, desc="worker processes (identical result with any number)")


class _NoiseCorrelationOutputSpec(TraitedSpec):
    correlation = traits.List(traits.Float, desc="neighbour correlation of the noise along voxel axes i, j, k")
    metadata = traits.Dict(desc="the input metadata plus NoiseNeighbourCorrelation")


class NoiseCorrelation(SimpleInterface):
    """How much a series' noise correlates between neighbouring voxels
    (:func:`iqt_pipe.dmri.preproc.noise_neighbour_correlation` on the volumes of the DTI fit), as a
    sidecar field. Above :data:`iqt_pipe.qc.CORRELATED_NOISE` the scanner interpolated the
    series, which leaves super-resolution little to recover; the participant level warns."""

    input_spec = _NoiseCorrelationInputSpec
    output_spec = _NoiseCorrelationOutputSpec

    def _run_interface(self, runtime):
        from iqt_pipe.dmri.dwi import load_dwi
        from iqt_pipe.dmri.gradients import select_dti_volumes
        from iqt_pipe.dmri.preproc import NOISE_SLICES, noise_neighbour_correlation
        from iqt_pipe.io import load_mask
        from iqt_pipe.qc import CORRELATED_NOISE, NOISE_CORRELATION_FIELD

        series = load_dwi(self.inputs.dwi_file, self.inputs.bval_file, self.inputs.bvec_file)
        mask = load_mask(self.inputs.mask_file, series.data.shape)
        keep = select_dti_volumes(series.gtab, self.inputs.bval_file)
        correlation = noise_neighbour_correlation(series.data[..., keep], mask, processes=self.inputs.nprocs)
        self._results["correlation"] = correlation
        self._results["metadata"] = {
            **self.inputs.metadata,
            NOISE_CORRELATION_FIELD: {
                "Values": [None if c != c else round(c, 4) for c in correlation],
                "Description": "Pearson correlation of the noise between face-neighbouring brain voxels along voxel "
                "axes i, j, k: the residual of MP-PCA (DIPY) on the b=0 and DTI-shell volumes of the "
                f"series as reconstructed, central {NOISE_SLICES} slices of the brain. Independent noise gives about "
                f"0; above {CORRELATED_NOISE} the scanner interpolated the series, and super-resolution "
                "has little to recover.",
            },
        }
        return runtime
