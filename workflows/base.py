"""The BIDS App's top-level workflows: all participants, then one participant's DWI runs.

Only these two factories read the run configuration (:class:`iqt_pipe.config.RunConfig`);
the science factories they call take explicit arguments.
"""

from __future__ import annotations

import re
from copy import deepcopy

from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from iqt_pipe import __version__
from iqt_pipe.bids import DWIRun
from iqt_pipe.config import RunConfig
from iqt_pipe.workflows.run import init_dwi_run_wf
from iqt_pipe.workflows.tractography import software_for


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


def _run_wf_name(run: DWIRun) -> str:
    """``sub-01`` → ``dwi_wf``, ``sub-01_ses-1_run-2`` → ``dwi_ses_1_run_2_wf`` (Nipype names:
    letters, digits, _; the subject is the enclosing workflow's)."""
    return re.sub(r"\W", "_", "_".join(["dwi", *run.name.split("_")[1:], "wf"]).replace("-", "_"))


def init_single_subject_wf(*, config: RunConfig, subject: str, runs: list[DWIRun], name: str | None = None) -> Workflow:
    """Every DWI run of one participant: one :func:`~iqt_pipe.workflows.run.init_dwi_run_wf` each.

    Runs are independent branches: one failing run does not stop the others.
    """
    import nibabel as nb

    from iqt_pipe.dmri.preflight import memory_needed_mb, tile_budget_mb
    from iqt_pipe.sr.inference import resolve_device

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
    # A model trained on Gibbs-corrected series saw DIPY's correction (iqt-train): the same here,
    # unless MRtrix3 denoises anyway.
    gibbs_tool = "dipy" if config.model_degibbs and config.denoise in ("none", "dipy") else None
    for run in runs:
        shape, r = nb.load(run.dwi).shape, config.model_upsample or 2
        tiles_mb = tile_budget_mb(shape, r, config.mem_mb)
        run_wf = init_dwi_run_wf(
            model=[str(m) for m in (config.model, *config.ensemble_models)],
            output_dir=str(config.output_dir),
            denoise=config.denoise,
            degibbs=config.degibbs,
            gibbs_tool=gibbs_tool,
            mc_samples=config.mc_samples,
            symmetries=config.symmetries,
            precision=config.precision,
            self_calibration=config.self_calibration,
            seed=config.seed,
            use_gpu=use_gpu,
            omp_nthreads=config.omp_nthreads,
            mem_mb=tiles_mb,
            mem_gb=(tiles_mb + memory_needed_mb(shape, r) * (1 + len(config.ensemble_models))) / 1024,
            preprocessing=config.series_preprocessing(run),
            upsample=config.model_upsample,
            tractography=software_for(config.tractography),
            seed_density=config.seed_density,
            max_uncertainty=config.max_uncertainty,
            uncertainty_action=config.uncertainty_action,
            name=_run_wf_name(run),
        )
        # The series names its derivatives; a mask given with a preprocessed series is used, not recomputed.
        inputs = dict(dwi_file=run.dwi, bval_file=run.bval, bvec_file=run.bvec, source_file=run.dwi, mask_file=run.mask)
        for field, path in inputs.items():
            if path is not None:
                setattr(run_wf.inputs.inputnode, field, str(path))
        workflow.add_nodes([run_wf])
    return workflow
