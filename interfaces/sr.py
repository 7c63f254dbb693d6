"""Bayesian super-resolution with uncertainty as a Nipype interface."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
    traits,
)
from nipype.utils.filemanip import fname_presuffix

from iqt_pipe.sr.options import DEFAULT_PRECISION, DEFAULT_SYMMETRIES, PRECISIONS, SYMMETRIES


class _SuperResolveInputSpec(BaseInterfaceInputSpec):
    tensor_file = File(exists=True, mandatory=True, desc="LR tensors, BEP016 order, world frame")
    mask_file = File(exists=True, mandatory=True, desc="LR brain mask on the same grid")
    s0_file = File(
        exists=True,
        desc="the fit's S0 on the same grid: the input of models with the S0 channel (their card's inputs)",
    )
    model = InputMultiObject(
        Str,
        mandatory=True,
        desc="model folder, model.json or model.safetensors; several: their inverse-variance ensemble",
    )
    mc_samples = traits.Int(8, usedefault=True, desc="Monte-Carlo weight samples (variational variants)")
    symmetries = traits.Enum(
        DEFAULT_SYMMETRIES,
        *SYMMETRIES,
        usedefault=True,
        desc="test-time symmetry ensemble: none, mirrors (8) or cube (48)",
    )
    precision = traits.Enum(
        DEFAULT_PRECISION,
        *PRECISIONS,
        usedefault=True,
        desc="the network's arithmetic: auto (bfloat16 on CPUs with AMX), float32 or bfloat16",
    )
    scalar_samples = traits.Int(32, usedefault=True, desc="tensor samples per voxel behind FA/MD sd")
    seed = traits.Int(0, usedefault=True, desc="random seed")
    use_gpu = traits.Bool(
        False, usedefault=True, desc="run on CUDA (Nipype's MultiProc then gives the node a GPU slot)"
    )
    bval_file = File(
        exists=True,
        desc="the native series' b-values: the run is checked against the model's "
        "training domain (voxel size, b-value, directions, and the scanner vendor of the "
        "JSON sidecar beside it), recorded as ModelDomain",
    )
    bvec_file = File(exists=True, desc="the native series' b-vectors (with bval_file)")
    dwi_file = File(
        exists=True,
        desc="the series tensor_file was fitted from (with bval_file and bvec_file): the run's self-calibration "
        "degrades it once more (iqt_pipe.sr.selfcal)",
    )
    self_calibration = traits.Bool(
        True,
        usedefault=True,
        desc="scale the predictive variances to the model's errors on dwi_file degraded once more (needs dwi_file)",
    )
    denoise = traits.Enum(
        "none",
        "dipy",
        "mrtrix",
        "auto",
        desc="the denoising the native series had; "
        "recorded, with whether it matches the model's training, as Preprocessing",
    )
    degibbs = traits.Bool(desc="whether Gibbs ringing was removed from the native series (with denoise)")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="CPU threads (PyTorch, output compression)")
    mem_mb = traits.Float(1024, usedefault=True, nohash=True, desc="memory budget for the tiles (MB)")


class _SuperResolveOutputSpec(TraitedSpec):
    tensor_file = File(exists=True, desc="HR mean tensor, BEP016 order, world frame (mm²/s)")
    fa_file = File(exists=True, desc="FA of the predictive mean tensor")
    fa_sd_file = File(exists=True, desc="FA sd over predictive samples")
    md_file = File(exists=True, desc="MD mean over predictive samples (mm²/s)")
    md_sd_file = File(exists=True, desc="MD sd over predictive samples (mm²/s)")
    sd_intrinsic_file = File(desc="Frobenius sd of the intrinsic uncertainty (hetero variants)")
    sd_parameter_file = File(desc="Frobenius sd of the parameter uncertainty (variational variants)")
    sd_total_file = File(desc="Frobenius sd of the total uncertainty (when the model has any)")
    mask_file = File(exists=True, desc="HR brain mask")
    metadata = traits.Dict(
        desc="provenance for the outputs' sidecars: model file sha256, variant, r, samples, seed, device"
    )


class SuperResolve(SimpleInterface):
    """Super-resolve a tensor image with a Bayesian 3D-ESPCN (:mod:`iqt_pipe.sr.superres`).

    Sets ``use_gpu`` to run on CUDA, so Nipype's MultiProc schedules the node in a GPU slot."""

    input_spec = _SuperResolveInputSpec
    output_spec = _SuperResolveOutputSpec

    def _run_interface(self, runtime):
        from nipype.interfaces.base import isdefined

        from iqt_pipe.dmri.gradients import read_gradients
        from iqt_pipe.dmri.prepare import Preprocessing, series_domain, series_manufacturer
        from iqt_pipe.io import InputError, load_scalar_image
        from iqt_pipe.models import load_model
        from iqt_pipe.sr.superres import load_tensor_image, prediction_metadata, super_resolve_tensors, write_prediction

        device = "cuda" if self.inputs.use_gpu else "cpu"
        models, cards = zip(*(load_model(path, device=device) for path in self.inputs.model))
        tensors, mask, affine = load_tensor_image(self.inputs.tensor_file, self.inputs.mask_file)
        s0 = None
        if any("s0" in model.inputs for model in models):
            if not isdefined(self.inputs.s0_file):
                raise InputError(f"{self.inputs.model[0]}: the model takes the fit's S0 as an input; connect s0_file")
            s0 = load_scalar_image(self.inputs.s0_file, affine, tensors.shape[:3])
        series = None
        if self.inputs.self_calibration and isdefined(self.inputs.dwi_file):
            series = self._series(tensors.shape[:3])
        pred = super_resolve_tensors(
            tensors,
            mask,
            affine,
            models,
            s0=s0,
            series=series,
            symmetries=SYMMETRIES[self.inputs.symmetries],
            precision=self.inputs.precision,
            mc_samples=self.inputs.mc_samples,
            scalar_samples=self.inputs.scalar_samples,
            seed=self.inputs.seed,
            device=device,
            mem_mb=self.inputs.mem_mb,
            threads=self.inputs.num_threads,
        )
        prefix = fname_presuffix(self.inputs.tensor_file, suffix="_sr", newpath=runtime.cwd, use_ext=False)
        prefix = prefix.removesuffix(".nii")
        # Sidecars are the data sink's job (Nipype removes files that are not outputs).
        preprocessing = domain = None
        if isdefined(self.inputs.denoise):
            preprocessing = Preprocessing(self.inputs.denoise, bool(self.inputs.degibbs))
        if isdefined(self.inputs.bval_file) and isdefined(self.inputs.bvec_file):
            domain = series_domain(
                affine,
                read_gradients(self.inputs.bval_file, self.inputs.bvec_file),
                self.inputs.bval_file,
                series_manufacturer(self.inputs.bval_file),
            )
        metadata = prediction_metadata(cards, pred, preprocessing, domain)
        paths = write_prediction(pred, prefix, metadata, sidecars=False, threads=self.inputs.num_threads)
        self._results["metadata"] = metadata
        names = {
            "tensor": "tensor_file",
            "fa": "fa_file",
            "fasd": "fa_sd_file",
            "md": "md_file",
            "mdsd": "md_sd_file",
            "sdint": "sd_intrinsic_file",
            "sdpar": "sd_parameter_file",
            "sdtot": "sd_total_file",
            "mask": "mask_file",
        }
        for key, path in paths.items():
            self._results[names[key]] = str(path)
        return runtime

    def _series(self, shape):
        """The DWI series and gradients for the self-calibration, on the tensors' grid."""
        from nipype.interfaces.base import isdefined

        from iqt_pipe.dmri.dwi import load_dwi
        from iqt_pipe.io import InputError

        if not (isdefined(self.inputs.bval_file) and isdefined(self.inputs.bvec_file)):
            raise InputError(f"{self.inputs.dwi_file}: the self-calibration needs bval_file and bvec_file too")
        series = load_dwi(self.inputs.dwi_file, self.inputs.bval_file, self.inputs.bvec_file)
        if series.data.shape[:3] != tuple(shape):
            raise InputError(
                f"{self.inputs.dwi_file}: grid {series.data.shape[:3]} differs from the tensors' {tuple(shape)}; "
                "connect the series the tensors were fitted from"
            )
        return series.data, series.gtab
