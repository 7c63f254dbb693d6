"""Per-run quality control of a super-resolved run as a Nipype interface."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


class _RunQCInputSpec(BaseInterfaceInputSpec):
    native_fa_file = File(exists=True, mandatory=True, desc="native-resolution FA")
    native_md_file = File(exists=True, mandatory=True, desc="native-resolution MD (mm²/s)")
    native_mask_file = File(exists=True, mandatory=True, desc="native brain mask")
    sr_fa_file = File(exists=True, mandatory=True, desc="SR FA mean (HR grid)")
    sr_md_file = File(exists=True, mandatory=True, desc="SR MD mean (HR grid, mm²/s)")
    sr_sd_total_file = File(exists=True, mandatory=True, desc="SR Frobenius sd of the total uncertainty (mm²/s)")
    sr_mask_file = File(exists=True, mandatory=True, desc="HR brain mask")
    upsample = traits.Int(2, usedefault=True, desc="upsampling factor r")
    threshold = traits.Float(desc="sd_total threshold (mm²/s); default iqt_pipe.qc.DEFAULT_SD_THRESHOLD = 1.5e-4")
    entities = traits.Dict(
        traits.Str, traits.Any, desc="BIDS entities of the run (pybids names: subject, session, run …)"
    )


class _RunQCOutputSpec(TraitedSpec):
    out_json = File(exists=True, desc="the run's entities and QC metrics (JSON object)")
    metrics = traits.Dict(desc="entities first, then the metrics of iqt_pipe.qc.METRIC_COLUMNS")


class RunQC(SimpleInterface):
    """QC metrics of one super-resolved run (:func:`iqt_pipe.qc.metrics_from_files`): uncertainty
    in white matter, fraction of brain above the sd threshold, SR vs native FA/MD."""

    input_spec = _RunQCInputSpec
    output_spec = _RunQCOutputSpec

    def _run_interface(self, runtime):
        import os

        from iqt_pipe.io import save_json
        from iqt_pipe.qc import metrics_from_files, run_label

        entities = dict(self.inputs.entities or {})
        name = run_label(entities) if entities else None
        metrics = metrics_from_files(
            self.inputs.native_fa_file,
            self.inputs.native_md_file,
            self.inputs.native_mask_file,
            self.inputs.sr_fa_file,
            self.inputs.sr_md_file,
            self.inputs.sr_sd_total_file,
            self.inputs.sr_mask_file,
            self.inputs.upsample,
            self.inputs.threshold if isdefined(self.inputs.threshold) else None,
            name=name,
        )
        row = {**entities, **metrics}
        stem = f"{name}_qc" if name and name != "?" else "qc"
        self._results["out_json"] = str(save_json(row, os.path.join(runtime.cwd, f"{stem}.json")))
        self._results["metrics"] = row
        return runtime
