"""The BIDS App's top-level workflows: all participants, then one participant's DWI runs.

Only these two factories read the run configuration (:class:`iqt_pipe.config.RunConfig`);
the science factories they call take explicit arguments.
"""

from __future__ import annotations

import re
from copy import deepcopy

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from iqt_pipe import __version__
from iqt_pipe.bids import DWIRun
from iqt_pipe.config import RunConfig
from iqt_pipe.interfaces.preproc import NoiseCorrelation
from iqt_pipe.workflows.dwi import init_dti_wf, init_dwi_preproc_wf
from iqt_pipe.workflows.outputs import init_outputs_wf
from iqt_pipe.workflows.sr import init_sr_wf


def init_iqt_wf(*, config: RunConfig, runs: list[DWIRun], name: str = "iqt_wf") -> Workflow:
    """One :func:`init_single_subject_wf` per participant with DWI runs.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            # needs a RunConfig and the runs found by iqt_pipe.bids.find_dwi_runs
    """
    workflow = Workflow(name=name)
    workflow.base_dir = str(config.work_dir)
    for subject in sorted({run.subject for run in runs}):
        subject_wf = init_single_subject_wf(
            config=config, subject=subject, runs=[r for r in runs if r.subject == subject]
        )
        # Crash reports as text in the subject's log folder of this run.
        subject_wf.config["execution"].update(
            {"crashdump_dir": str(config.log_dir(subject)), "crashfile_format": "txt"}
        )
        for node in subject_wf._get_all_nodes():
            node.config = deepcopy(subject_wf.config)
        workflow.add_nodes([subject_wf])
    return workflow


def _node_name(run: DWIRun) -> str:
    """``sub-01_ses-1_run-2`` → ``ses_1_run_2`` (Nipype names: letters, digits, _)."""
    tag = run.name.split("_", 1)[1] if "_" in run.name else "dwi"
    return re.sub(r"\W", "_", tag.replace("-", "_"))


def init_single_subject_wf(
    *, config: RunConfig, subject: str, runs: list[DWIRun], name: str | None = None
) -> Workflow:
    """Every DWI run of one participant: preprocessing → DTI → super-resolution → outputs.

    Runs are independent branches: one failing run does not stop the others.
    """
    import nibabel as nb

    from iqt_pipe.sr.inference import resolve_device
    from iqt_pipe.dmri.preflight import memory_needed_mb, tile_budget_mb

    workflow = Workflow(name=name or f"sub_{subject}_wf")
    workflow.__desc__ = f"""
Results included in this manuscript come from processing performed with iqt-pipe
{__version__}, which uses Nipype [@nipype]. {len(runs)} diffusion-weighted series of this
participant were processed independently.
"""
    if any(run.derivative for run in runs):
        from iqt_pipe.bids import pipeline_name

        pipeline = pipeline_name(config.bids_dir)
        masks = "; the brain masks supplied with them were used" if any(run.mask for run in runs) else ""
        workflow.__desc__ += f"""
The series had been preprocessed beforehand by {pipeline} and were read from its
BIDS-derivatives dataset{masks}.
"""
    workflow.__postdesc__ = """
Many internal operations of iqt-pipe use DIPY [@dipy] and PyTorch; the methods of
super-resolution follow @tanno2017 and @tanno2021.
"""
    use_gpu = resolve_device(config.device).type == "cuda"
    for run in runs:
        tag = _node_name(run)
        inputnode = pe.Node(niu.IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file"]), name=f"{tag}_inputs")
        inputnode.inputs.dwi_file, inputnode.inputs.bval_file, inputnode.inputs.bvec_file = (
            str(run.dwi), str(run.bval), str(run.bvec)
        )
        # A model trained on Gibbs-corrected series saw DIPY's correction (iqt-train): the same here,
        # unless MRtrix3 denoises anyway.
        gibbs_tool = "dipy" if config.model_degibbs and config.denoise in ("none", "dipy") else None
        preproc_wf = init_dwi_preproc_wf(denoise=config.denoise, degibbs=config.degibbs, gibbs_tool=gibbs_tool,
                                         omp_nthreads=config.omp_nthreads, name=f"{tag}_preproc_wf")
        dti_wf = init_dti_wf(name=f"{tag}_dti_wf")
        if run.mask is not None:  # given with a preprocessed series: used, not recomputed
            dti_wf.inputs.inputnode.mask_file = str(run.mask)
        shape, r = nb.load(run.dwi).shape, config.model_upsample or 2
        tiles_mb = tile_budget_mb(shape, r, config.mem_mb)
        sr_wf = init_sr_wf(model=[str(m) for m in (config.model, *config.ensemble_models)],
                           mc_samples=config.mc_samples, symmetries=config.symmetries, precision=config.precision,
                           seed=config.seed,
                           use_gpu=use_gpu, omp_nthreads=config.omp_nthreads, mem_mb=tiles_mb,
                           mem_gb=(tiles_mb + memory_needed_mb(shape, r) * (1 + len(config.ensemble_models))) / 1024,
                           preprocessing=config.series_preprocessing(run), name=f"{tag}_sr_wf")
        outputs_wf = init_outputs_wf(output_dir=str(config.output_dir), name=f"{tag}_outputs_wf")
        outputs_wf.inputs.inputnode.source_file = str(run.dwi)
        outputs_wf.inputs.inputnode.upsample = config.model_upsample
        if config.tractography != "none":
            _add_tractography(workflow, config, run, tag, preproc_wf, dti_wf, sr_wf, outputs_wf)
        workflow.connect([
            (inputnode, preproc_wf, [("dwi_file", "inputnode.dwi_file"), ("bval_file", "inputnode.bval_file"),
                                     ("bvec_file", "inputnode.bvec_file")]),
            (preproc_wf, dti_wf, [("outputnode.dwi_file", "inputnode.dwi_file"),
                                  ("outputnode.bval_file", "inputnode.bval_file"),
                                  ("outputnode.bvec_file", "inputnode.bvec_file")]),
            (dti_wf, sr_wf, [("outputnode.tensor_file", "inputnode.tensor_file"),
                             ("outputnode.mask_file", "inputnode.mask_file")]),
            (inputnode, sr_wf, [("bval_file", "inputnode.bval_file"), ("bvec_file", "inputnode.bvec_file")]),
            (dti_wf, outputs_wf, [("outputnode.tensor_file", "inputnode.tensor_file"),
                                  ("outputnode.fa_file", "inputnode.fa_file"),
                                  ("outputnode.md_file", "inputnode.md_file"),
                                  ("outputnode.mask_file", "inputnode.mask_file")]),
            (sr_wf, outputs_wf, [("outputnode.tensor_file", "inputnode.sr_tensor_file"),
                                 ("outputnode.fa_file", "inputnode.sr_fa_file"),
                                 ("outputnode.fa_sd_file", "inputnode.sr_fa_sd_file"),
                                 ("outputnode.md_file", "inputnode.sr_md_file"),
                                 ("outputnode.md_sd_file", "inputnode.sr_md_sd_file"),
                                 ("outputnode.sd_intrinsic_file", "inputnode.sr_sd_intrinsic_file"),
                                 ("outputnode.sd_parameter_file", "inputnode.sr_sd_parameter_file"),
                                 ("outputnode.sd_total_file", "inputnode.sr_sd_total_file"),
                                 ("outputnode.mask_file", "inputnode.sr_mask_file"),
                                 ("outputnode.metadata", "inputnode.sr_metadata")]),
        ])  # fmt:skip
        # The noise as acquired, correlated between neighbours where the scanner interpolated:
        # recorded in the native tensor's sidecar, warned about at the end of the run.
        noise_corr = pe.Node(NoiseCorrelation(), name=f"{tag}_noise_corr")
        workflow.connect([
            (inputnode, noise_corr, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
            (dti_wf, noise_corr, [("outputnode.mask_file", "mask_file"), ("outputnode.metadata", "metadata")]),
            (noise_corr, outputs_wf, [("metadata", "inputnode.metadata")]),
        ])  # fmt:skip
    return workflow


def _add_tractography(workflow, config: RunConfig, run: DWIRun, tag: str, preproc_wf, dti_wf, sr_wf, outputs_wf):
    """Tractography on the native and super-resolved tensors of one run, and its derivatives."""
    from iqt_pipe.workflows.outputs import init_tractography_outputs_wf
    from iqt_pipe.workflows.tractography import TRACTOGRAM_FIELDS, init_tractography_wf, software_for, tractogram_keys

    software = software_for(config.tractography)
    tract_wf = init_tractography_wf(
        software=software, seed_density=config.seed_density, max_uncertainty=config.max_uncertainty,
        uncertainty_action=config.uncertainty_action, random_seed=config.seed,
        omp_nthreads=config.omp_nthreads, name=f"{tag}_tractography_wf",
    )
    keys = tractogram_keys(software)
    tract_outputs_wf = init_tractography_outputs_wf(output_dir=str(config.output_dir), keys=keys,
                                                    name=f"{tag}_tractography_outputs_wf")
    tract_outputs_wf.inputs.inputnode.source_file = str(run.dwi)
    tract_wf.inputs.inputnode.dwi_file = str(run.dwi)  # the raw series: the run's noise level (Tensor_Prob)
    tract_outputs_wf.inputs.inputnode.upsample = config.model_upsample
    fields = ["summary_file"] + [f"{k}_{f}" for k in keys for f in TRACTOGRAM_FIELDS]
    workflow.connect([
        (preproc_wf, tract_wf, [("outputnode.bval_file", "inputnode.bval_file"),
                                ("outputnode.bvec_file", "inputnode.bvec_file")]),
        (dti_wf, tract_wf, [("outputnode.tensor_file", "inputnode.tensor_file"),
                            ("outputnode.mask_file", "inputnode.mask_file"),
                            ("outputnode.s0_file", "inputnode.s0_file")]),
        (sr_wf, tract_wf, [("outputnode.tensor_file", "inputnode.sr_tensor_file"),
                           ("outputnode.mask_file", "inputnode.sr_mask_file"),
                           ("outputnode.sd_total_file", "inputnode.sr_sd_total_file")]),
        (tract_wf, tract_outputs_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in fields]),
        (outputs_wf, tract_outputs_wf, [("outputnode.tensor_file", "inputnode.tensor_file"),
                                        ("outputnode.sr_tensor_file", "inputnode.sr_tensor_file"),
                                        ("outputnode.sr_sd_total_file", "inputnode.sr_sd_total_file")]),
    ])  # fmt:skip
