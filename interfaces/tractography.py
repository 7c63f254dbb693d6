"""Tractography as Nipype interfaces: DIPY tracking, the MRtrix3 input synthesis around
Nipype's own ``tckgen`` interface, the uncertainty limit and tractogram files, track density,
and the per-run summary. Each ``SimpleInterface`` calls :mod:`iqt_pipe.tracking.track`,
:mod:`iqt_pipe.tracking.files` or :mod:`iqt_pipe.tracking.mrtrix`."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)
from nipype.interfaces.mrtrix3 import Tractography

from iqt_pipe.tracking.mrtrix import DEFAULT_SYNTH_SNR
from iqt_pipe.tracking.track import (
    ALGORITHMS,
    DEFAULT_FA_THRESHOLD,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MIN_LENGTH,
    DEFAULT_SEED_DENSITY,
    DEFAULT_SEED_FA,
    UNCERTAINTY_ACTIONS,
)


def _optional(value):
    return value if isdefined(value) else None


class _TrackingSettingsSpec(BaseInterfaceInputSpec):
    seed_density = traits.Float(DEFAULT_SEED_DENSITY, usedefault=True, desc="seeds per mm³ of white matter")
    step_mm = traits.Float(desc="step size (mm); default half the voxel size")
    max_angle = traits.Float(desc="largest angle between successive steps (degrees); default 60° × step / voxel")
    seed_fa = traits.Float(DEFAULT_SEED_FA, usedefault=True, desc="white matter to seed in: FA at least this")
    random_seed = traits.Int(0, usedefault=True, desc="random seed of the seeds (and of probabilistic steps)")


def _params(inputs, **extra):
    from iqt_pipe.tracking.track import TrackingParams

    return TrackingParams(
        seed_density=inputs.seed_density,
        step_mm=_optional(inputs.step_mm),
        max_angle=_optional(inputs.max_angle),
        seed_fa=inputs.seed_fa,
        random_seed=inputs.random_seed,
        **extra,
    )


class _DipyTrackingInputSpec(_TrackingSettingsSpec):
    tensor_file = File(exists=True, mandatory=True, desc="tensors, BEP016 order, world frame (mm²/s)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the tensor grid (tracking stops at its edge)")
    algorithm = traits.Enum(
        *ALGORITHMS,
        usedefault=True,
        desc="det: deterministic (principal eigenvector); prob: probabilistic (tensor ODF)",
    )
    fa_threshold = traits.Float(DEFAULT_FA_THRESHOLD, usedefault=True, desc="tracking stops where FA falls below")
    min_length = traits.Float(DEFAULT_MIN_LENGTH, usedefault=True, desc="shortest streamline kept (mm)")
    max_length = traits.Float(DEFAULT_MAX_LENGTH, usedefault=True, desc="longest streamline kept (mm)")
    nthreads = traits.Int(
        1, usedefault=True, desc="threads DIPY tracks the seeds on (0: all cores); the streamlines do not depend on it"
    )


class _TrackingOutputSpec(TraitedSpec):
    tck_file = File(exists=True, desc="streamlines (world mm), before any uncertainty limit")
    seeds_file = File(exists=True, desc="seed of each streamline, MRtrix3's -output_seeds format")
    n_seeds = traits.Int(desc="seeds tracked")
    step_mm = traits.Float(desc="step size used (mm)")
    max_angle = traits.Float(desc="angle limit used (degrees per step)")
    voxel_size_mm = traits.Float(desc="voxel size of the tensor grid (mm)")


class DipyTracking(SimpleInterface):
    """DIPY tracking on a tensor image (:func:`iqt_pipe.tracking.track.track_tensors`):
    deterministic (the principal eigenvector) or probabilistic (drawn from the tensor ODF)
    directions, FA and mask stopping, random white-matter seeds at a given density, seeds
    tracked on ``nthreads`` threads."""

    input_spec = _DipyTrackingInputSpec
    output_spec = _TrackingOutputSpec

    def _run_interface(self, runtime):
        from iqt_pipe.io import load_tensor_image
        from iqt_pipe.tracking.files import save_tck, write_seed_file
        from iqt_pipe.tracking.track import track_tensors

        tensors, mask, affine = load_tensor_image(self.inputs.tensor_file, self.inputs.mask_file)
        params = _params(
            self.inputs,
            algorithm=self.inputs.algorithm,
            fa_threshold=self.inputs.fa_threshold,
            min_length=self.inputs.min_length,
            max_length=self.inputs.max_length,
        )
        tracks = track_tensors(
            tensors, mask, affine, params, source=self.inputs.tensor_file, nthreads=self.inputs.nthreads
        )
        self._results["tck_file"] = str(save_tck(tracks.streamlines, os.path.join(runtime.cwd, "tracked.tck")))
        self._results["seeds_file"] = str(write_seed_file(os.path.join(runtime.cwd, "seeds.txt"), tracks))
        self._results["n_seeds"] = tracks.n_seeds
        self._results["step_mm"] = tracks.info["step_mm"]
        self._results["max_angle"] = tracks.info["max_angle_deg"]
        self._results["voxel_size_mm"] = tracks.info["voxel_size_mm"]
        return runtime


class _PrepareMRtrixInputSpec(_TrackingSettingsSpec):
    tensor_file = File(exists=True, mandatory=True, desc="tensors, BEP016 order, world frame (mm²/s)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the tensor grid")
    s0_file = File(exists=True, mandatory=True, desc="fitted b=0 signal, on any grid of the same subject")
    bval_file = File(exists=True, mandatory=True, desc="the subject's FSL b-values")
    bvec_file = File(exists=True, mandatory=True, desc="the subject's FSL b-vectors (frame of s0_file's image)")
    noisy = traits.Bool(
        False, usedefault=True, desc="also write noisy_dwi_file, the series with Rician noise (for Tensor_Prob)"
    )
    noise_dwi_file = File(
        exists=True, desc="the run's native DWI (same gradient table): its repeated b=0 volumes give the noise level"
    )
    noise_mask_file = File(exists=True, desc="brain mask on noise_dwi_file's grid")
    snr = traits.Float(
        DEFAULT_SYNTH_SNR, usedefault=True, desc="SNR of the synthesised b=0 when noise_dwi_file gives no noise level"
    )


class _PrepareMRtrixOutputSpec(TraitedSpec):
    dwi_file = File(exists=True, desc="noise-free series synthesised from the tensors and S0 (b=0 and 6 directions)")
    grad_file = File(exists=True, desc="its MRtrix3 gradient table (x y z b, world coordinates)")
    noisy_dwi_file = File(desc="a series on the subject's gradient table with Rician noise at the run's level (noisy)")
    noisy_grad_file = File(desc="its MRtrix3 gradient table (when noisy)")
    noise = traits.Dict(desc="the noise added: Type, Sigma, Estimate, RandomSeed (when noisy)")
    mask_file = File(exists=True, desc="brain mask (tckgen -mask)")
    seed_mask_file = File(exists=True, desc="white-matter seed mask (tckgen -seed_image)")
    n_seeds = traits.Int(desc="seeds for the requested density")
    step_mm = traits.Float(desc="step size (mm)")
    max_angle = traits.Float(desc="angle limit (degrees per step)")
    voxel_size_mm = traits.Float(desc="voxel size of the tensor grid (mm)")
    tckgen_args = Str(desc="extra tckgen arguments: -quiet, -seeds N, -select 0")


class PrepareMRtrixTracking(SimpleInterface):
    """Synthesise the DWI series that ``tckgen -algorithm Tensor_Det/Tensor_Prob`` needs from
    a tensor image and the subject's S0 and gradient table
    (:func:`iqt_pipe.tracking.mrtrix.prepare_mrtrix_inputs`), with the masks and settings."""

    input_spec = _PrepareMRtrixInputSpec
    output_spec = _PrepareMRtrixOutputSpec

    def _run_interface(self, runtime):
        from iqt_pipe.tracking.mrtrix import prepare_mrtrix_inputs

        out = prepare_mrtrix_inputs(
            self.inputs.tensor_file,
            self.inputs.mask_file,
            self.inputs.s0_file,
            self.inputs.bval_file,
            self.inputs.bvec_file,
            os.path.join(runtime.cwd, "tensor"),
            _params(self.inputs),
            noisy=self.inputs.noisy,
            noise_dwi_file=_optional(self.inputs.noise_dwi_file),
            noise_mask_file=_optional(self.inputs.noise_mask_file),
            snr=self.inputs.snr,
        )
        for key in ("dwi_file", "grad_file", "mask_file", "seed_mask_file", "noisy_dwi_file", "noisy_grad_file"):
            if key in out:
                self._results[key] = str(out[key])
        if "noise" in out:
            self._results["noise"] = out["noise"]
        for key in ("n_seeds", "step_mm", "max_angle", "voxel_size_mm"):
            self._results[key] = out[key]
        self._results["tckgen_args"] = f"-quiet -seeds {out['n_seeds']} -select 0"
        return runtime


class TensorTractography(Tractography):
    """Nipype's MRtrix3 ``Tractography`` (``tckgen``) that also returns its seeds file."""

    def _list_outputs(self):
        outputs = super()._list_outputs()
        if isdefined(self.inputs.out_seeds):
            outputs["out_seeds"] = os.path.abspath(self.inputs.out_seeds)
        return outputs


class _FinishTractogramInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="streamlines (.tck/.trk, world mm)")
    seeds_file = File(
        exists=True, desc="seed of each streamline (-output_seeds format); else the longest piece is kept"
    )
    reference_file = File(
        exists=True, mandatory=True, desc="image on the tracked grid (the .trk header, the TSV's voxels)"
    )
    uncertainty_file = File(exists=True, desc="uncertainty map on the tracked grid (total Frobenius sd, mm²/s)")
    max_uncertainty = traits.Float(desc="threshold (mm²/s); none when undefined")
    uncertainty_action = traits.Enum(*UNCERTAINTY_ACTIONS, usedefault=True, desc="stop or drop streamlines above it")
    min_length = traits.Float(DEFAULT_MIN_LENGTH, usedefault=True, desc="shortest piece kept after a stop (mm)")
    n_seeds = traits.Int(0, usedefault=True, desc="seeds tracked (for the summary)")
    step_mm = traits.Float(desc="step size used (mm)")
    max_angle = traits.Float(desc="angle limit used (degrees per step)")
    voxel_size_mm = traits.Float(desc="voxel size of the tracked grid (mm)")
    tractogram = Str(mandatory=True, desc="name of this tractogram, e.g. sr_dipydet")
    space = traits.Enum("native", "sr", mandatory=True, desc="native or super-resolved tensors")
    software = traits.Enum("dipy", "mrtrix", mandatory=True, desc="tracking software")
    algorithm = traits.Enum(*ALGORITHMS, mandatory=True, desc="det or prob")
    synthesis_noise = traits.Dict(
        desc="MRtrix3: the noise added to the synthesised series (PrepareMRtrixTracking's noise), for the sidecar"
    )


class _FinishTractogramOutputSpec(TraitedSpec):
    tck_file = File(exists=True, desc="final streamlines, MRtrix3 .tck (world mm)")
    trk_file = File(exists=True, desc="the same as TrackVis .trk with length and uncertainty per streamline")
    tsv_file = File(exists=True, desc="length and uncertainty of every streamline")
    summary = traits.Dict(desc="the tractogram's row of the per-run summary")
    metadata = traits.Dict(desc="sidecar fields: tracking settings and streamline counts")


class FinishTractogram(SimpleInterface):
    """Apply ``--max-uncertainty`` (stop or drop) and write ``.tck``, ``.trk`` and the
    per-streamline TSV (:func:`iqt_pipe.tracking.files.finish_tractogram`; without a limit, the
    input ``.tck`` is the tractogram's, copied)."""

    input_spec = _FinishTractogramInputSpec
    output_spec = _FinishTractogramOutputSpec

    def _run_interface(self, runtime):
        import numpy as np

        from iqt_pipe.tracking.files import (
            finish_tractogram,
            load_on_grid,
            load_streamlines,
            read_seed_file,
            reference_grid,
        )
        from iqt_pipe.tracking.track import Tracks

        streamlines = load_streamlines(self.inputs.in_file)
        seeds = (
            read_seed_file(self.inputs.seeds_file, len(streamlines))
            if isdefined(self.inputs.seeds_file)
            else np.full(len(streamlines), -1)
        )
        info = {
            "step_mm": _optional(self.inputs.step_mm),
            "max_angle_deg": _optional(self.inputs.max_angle),
            "voxel_size_mm": _optional(self.inputs.voxel_size_mm),
        }
        tracks = Tracks(streamlines, seeds, self.inputs.n_seeds, info)
        affine, shape = reference_grid(self.inputs.reference_file)  # the header only
        uncertainty = None
        if isdefined(self.inputs.uncertainty_file):
            uncertainty = load_on_grid(self.inputs.uncertainty_file, affine, shape, "uncertainty map")
        paths, row = finish_tractogram(
            tracks,
            os.path.join(runtime.cwd, self.inputs.tractogram),
            affine,
            shape,
            uncertainty,
            _optional(self.inputs.max_uncertainty),
            self.inputs.uncertainty_action,
            self.inputs.min_length,
            tck_source=self.inputs.in_file,
        )
        row = {
            "tractogram": self.inputs.tractogram,
            "space": self.inputs.space,
            "software": self.inputs.software,
            "algorithm": self.inputs.algorithm,
            **row,
        }
        noise = _optional(self.inputs.synthesis_noise) or None
        self._results.update(
            tck_file=str(paths["tck"]),
            trk_file=str(paths["trk"]),
            tsv_file=str(paths["tsv"]),
            summary=row,
            metadata=tractogram_metadata(row, noise),
        )
        return runtime


def tractogram_metadata(row: dict, synthesis_noise: dict | None = None) -> dict:
    """Sidecar fields of a tractogram from its summary row (and, for MRtrix3, the noise added
    to the synthesised series)."""
    names = {"det": "deterministic (principal eigenvector)", "prob": "probabilistic (tensor ODF)"}
    software = {"dipy": "DIPY generate_tractogram", "mrtrix": "MRtrix3 tckgen"}[row["software"]]
    if row["software"] == "mrtrix":
        prob = (
            "Tensor_Prob (wild bootstrap of the synthesised series with Rician noise added)"
            if synthesis_noise
            else "Tensor_Prob (wild bootstrap of a noise-free synthesised series: effectively deterministic)"
        )
        names = {"det": "Tensor_Det", "prob": prob}
    meta = {
        "TrackingMethod": f"{software}, {names[row['algorithm']]}",
        "TrackingParameters": {
            "StepSize": row.get("step_mm"),
            "MaxAngle": row.get("max_angle_deg"),
            "VoxelSize": row.get("voxel_size_mm"),
            "Seeds": row.get("n_seeds"),
        },
        "StreamlineCounts": {k: row.get(k) for k in ("n_tracked", "n_stopped", "n_dropped", "n_streamlines")},
    }
    if row.get("uncertainty_threshold") is not None:
        meta["UncertaintyLimit"] = {
            "Threshold": row["uncertainty_threshold"],
            "Units": "mm^2/s",
            "Action": row.get("uncertainty_action"),
        }
    if synthesis_noise:
        meta["SynthesisedNoise"] = {**synthesis_noise, "Units": "signal units of the fitted b=0"}
    return meta


class _TrackDensityInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="streamlines (.tck/.trk)")
    reference = File(exists=True, mandatory=True, desc="image whose grid the density map takes")


class _TrackDensityOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="streamlines through each voxel")


class TrackDensity(SimpleInterface):
    """Track-density image without MRtrix3 (:func:`iqt_pipe.tracking.track.track_density`);
    the MRtrix3 branch uses Nipype's ``ComputeTDI`` (``tckmap``) instead."""

    input_spec = _TrackDensityInputSpec
    output_spec = _TrackDensityOutputSpec

    def _run_interface(self, runtime):
        import numpy as np

        from iqt_pipe.io import save_nifti
        from iqt_pipe.tracking.files import load_streamlines, reference_grid
        from iqt_pipe.tracking.track import track_density

        affine, shape = reference_grid(self.inputs.reference)
        tdi = track_density(load_streamlines(self.inputs.in_file), affine, shape)
        out = os.path.join(runtime.cwd, "tdi.nii.gz")
        self._results["out_file"] = str(save_nifti(tdi.astype(np.float32), affine, out))
        return runtime


class _TractographySummaryInputSpec(BaseInterfaceInputSpec):
    summaries = InputMultiObject(traits.Dict, mandatory=True, desc="FinishTractogram's summary rows")


class _TractographySummaryOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="one row per tractogram (iqt_pipe.tracking.files.SUMMARY_COLUMNS)")


class TractographySummary(SimpleInterface):
    """The per-run summary TSV of every tractogram."""

    input_spec = _TractographySummaryInputSpec
    output_spec = _TractographySummaryOutputSpec

    def _run_interface(self, runtime):
        from iqt_pipe.tracking.files import write_summary

        out = os.path.join(runtime.cwd, "tractography_summary.tsv")
        self._results["out_file"] = str(write_summary(list(self.inputs.summaries), out))
        return runtime
