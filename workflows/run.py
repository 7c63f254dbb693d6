"""One DWI run, from its series to its derivatives, as a single workflow that other pipelines can
embed (as fMRIPrep's ``init_bold_wf``); the BIDS App instantiates it once per run.

:func:`init_dwi_run_wf` reads no run configuration: everything is an argument or an input. In a
pipeline of one's own (the derivatives are named after ``source_file``, a file of a BIDS dataset)::

    from nipype.pipeline import engine as pe
    from iqt_pipe.workflows import init_dwi_run_wf

    run_wf = init_dwi_run_wf(model="models/mine", output_dir="/data/derivatives/iqt-pipe", upsample=2)
    raw = "/data/bids/sub-01/dwi/sub-01_dwi"
    run_wf.inputs.inputnode.dwi_file = run_wf.inputs.inputnode.source_file = f"{raw}.nii.gz"
    run_wf.inputs.inputnode.bval_file, run_wf.inputs.inputnode.bvec_file = f"{raw}.bval", f"{raw}.bvec"
    pipeline = pe.Workflow(name="my_pipeline", base_dir="/scratch/work")
    pipeline.connect([(run_wf, my_stats_node, [("outputnode.sr_fa_file", "in_file")])])
    pipeline.run(plugin="MultiProc")
"""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from iqt_pipe.config import (
    DEFAULT_MC_SAMPLES,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
    DEFAULT_SEED_DENSITY,
    DEFAULT_SYMMETRIES,
)
from iqt_pipe.dmri.prepare import Preprocessing
from iqt_pipe.interfaces.preproc import NoiseCorrelation
from iqt_pipe.models.files import read_card
from iqt_pipe.workflows.dwi import init_dti_wf, init_dwi_preproc_wf
from iqt_pipe.workflows.outputs import (
    NATIVE_DERIVATIVES,
    SR_DERIVATIVES,
    init_outputs_wf,
    init_tractography_outputs_wf,
)
from iqt_pipe.workflows.sr import init_sr_wf
from iqt_pipe.workflows.tractography import TRACTOGRAM_FIELDS, init_tractography_wf, tractogram_keys

RUN_INPUTS = ["dwi_file", "bval_file", "bvec_file", "mask_file", "source_file"]
#: Outputs of the run workflow, per tractogram (``<key>_<field>``): the files as written.
WRITTEN_TRACTOGRAM_FIELDS = ("tck", "tdi")


def init_dwi_run_wf(
    *,
    model: str | Sequence[str],
    output_dir: str,
    denoise: str | None = None,
    degibbs: bool | None = None,
    gibbs_tool: str | None = None,
    mc_samples: int = DEFAULT_MC_SAMPLES,
    symmetries: str = DEFAULT_SYMMETRIES,
    precision: str = DEFAULT_PRECISION,
    self_calibration: bool = True,
    seed: int = DEFAULT_SEED,
    use_gpu: bool = False,
    omp_nthreads: int = 1,
    mem_mb: float = 1024,
    mem_gb: float | None = None,
    preprocessing: Preprocessing | None = None,
    upsample: int | None = None,
    tractography: Sequence[str] = (),
    seed_density: float = DEFAULT_SEED_DENSITY,
    max_uncertainty: float | None = None,
    uncertainty_action: str = "stop",
    name: str = "dwi_run_wf",
) -> Workflow:
    """One DWI run: preprocessing → DTI fit → super-resolution → derivatives, and tractography of the native and
    super-resolved tensors when asked (the BIDS App's chain, with the acquired series' noise-correlation check).

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from iqt_pipe.workflows.run import init_dwi_run_wf
            wf = init_dwi_run_wf(model="model.json", output_dir="derivatives/iqt-pipe", denoise="dipy",
                                 degibbs=False, tractography=("dipy",))

    Parameters
    ----------
    model, output_dir
        Model folder, ``model.json`` or ``model.safetensors``, or several (an ensemble); root of the derivative dataset.
    denoise, degibbs, gibbs_tool
        Preprocessing (:func:`~iqt_pipe.workflows.dwi.init_dwi_preproc_wf`); ``None`` (default, as in the BIDS App):
        as the model's training series had it, its card's ``training.preprocessing`` (an ensemble's first model's).
    mc_samples, symmetries, precision, self_calibration, seed, use_gpu, omp_nthreads, mem_mb, mem_gb, preprocessing
        Super-resolution (:func:`~iqt_pipe.workflows.sr.init_sr_wf`); ``seed`` and ``omp_nthreads`` also seed and
        thread the tracking.
    upsample
        Super-resolution factor r per axis, for the sidecars' Resolution; default: the model's.
    tractography, seed_density, max_uncertainty, uncertainty_action
        Tracking software, ``"dipy"`` and/or ``"mrtrix"`` (empty: no tractography), and the tracking settings
        (:func:`~iqt_pipe.workflows.tractography.init_tractography_wf`).

    Inputs
    ------
    dwi_file, bval_file, bvec_file, mask_file
        The run's DWI series (raw, or preprocessed elsewhere), its FSL gradient files and, optionally, a brain mask
        on its grid (median_otsu's when left undefined).
    source_file
        The BIDS file whose entities name the derivatives (the BIDS App: ``dwi_file``).

    Outputs
    -------
    tensor_file, fa_file, md_file, mask_file
        Native-resolution derivatives, as written (the tensor's sidecar records the noise-correlation check).
    sr_tensor_file, sr_fa_file, sr_fa_sd_file, sr_md_file, sr_md_sd_file, sr_sd_intrinsic_file, sr_sd_parameter_file,
    sr_sd_total_file, sr_mask_file
        Super-resolved derivatives, as written (undefined for maps the model lacks).
    <key>_tck, <key>_tdi, summary_file
        With ``tractography``: per key of :func:`~iqt_pipe.workflows.tractography.tractogram_keys`, the tractogram
        and its track-density image; the run's tractography summary.
    """
    software = tuple(tractography)
    keys = tractogram_keys(software) if software else []
    workflow = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=RUN_INPUTS), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=_run_outputs(keys)), name="outputnode")
    network = dict(
        mc_samples=mc_samples,
        symmetries=symmetries,
        precision=precision,
        self_calibration=self_calibration,
        seed=seed,
        use_gpu=use_gpu,
    )
    resources = dict(omp_nthreads=omp_nthreads, mem_mb=mem_mb, mem_gb=mem_gb)
    tracking = dict(seed_density=seed_density, max_uncertainty=max_uncertainty, uncertainty_action=uncertainty_action)
    steps = dict(
        preproc_wf=_init_preproc_wf(model, denoise, degibbs, gibbs_tool, omp_nthreads),
        dti_wf=init_dti_wf(omp_nthreads=omp_nthreads),
        sr_wf=init_sr_wf(model=model, preprocessing=preprocessing, **network, **resources),
        outputs_wf=_with_upsample(init_outputs_wf(output_dir=output_dir), upsample),
    )
    _connect_run(workflow, inputnode, outputnode, omp_nthreads=omp_nthreads, **steps)
    if keys:
        tract_wf = init_tractography_wf(software=software, random_seed=seed, omp_nthreads=omp_nthreads, **tracking)
        tract_outputs_wf = _with_upsample(init_tractography_outputs_wf(output_dir=output_dir, keys=keys), upsample)
        _connect_tractography(workflow, inputnode, outputnode, tract_wf, tract_outputs_wf, keys, **steps)
    return workflow


def _init_preproc_wf(
    model, denoise: str | None, degibbs: bool | None, gibbs_tool: str | None, omp_nthreads: int
) -> Workflow:
    """The run's preprocessing; ``denoise``/``degibbs`` left as ``None`` follow the (first) model's card, what its
    training series had (``training.preprocessing``)."""
    if denoise is None or degibbs is None:
        trained = Preprocessing.of_model(read_card(model if isinstance(model, str) else model[0]))
        denoise = trained.denoise if denoise is None else denoise
        degibbs = trained.degibbs if degibbs is None else degibbs
    return init_dwi_preproc_wf(denoise=denoise, degibbs=degibbs, gibbs_tool=gibbs_tool, omp_nthreads=omp_nthreads)


def _with_upsample(workflow: Workflow, upsample: int | None) -> Workflow:
    """An outputs workflow with the super-resolution factor of its sidecars' Resolution set (``None``: left
    undefined, the model's)."""
    if upsample is not None:
        workflow.inputs.inputnode.upsample = upsample
    return workflow


def _run_outputs(keys: list[str]) -> list[str]:
    """Outputnode fields: the native and super-resolved derivatives, then those of the tractography."""
    return [*NATIVE_DERIVATIVES, *SR_DERIVATIVES, *_written_tractography(keys)]


def _written_tractography(keys: list[str]) -> list[str]:
    """Outputnode fields of the tractography derivatives (none without tractograms)."""
    return [f"{k}_{f}" for k in keys for f in WRITTEN_TRACTOGRAM_FIELDS] + (["summary_file"] if keys else [])


def _connect_run(workflow, inputnode, outputnode, *, omp_nthreads, preproc_wf, dti_wf, sr_wf, outputs_wf) -> None:
    """Chain the run's steps, with the noise-correlation check of the acquired series."""
    # The noise as acquired, correlated between neighbours where the scanner interpolated:
    # recorded in the native tensor's sidecar, warned about at the end of the run.
    noise_corr = pe.Node(NoiseCorrelation(nprocs=omp_nthreads), name="noise_corr", n_procs=omp_nthreads)
    workflow.connect([
        (inputnode, preproc_wf, [("dwi_file", "inputnode.dwi_file"), ("bval_file", "inputnode.bval_file"),
                                 ("bvec_file", "inputnode.bvec_file")]),
        (preproc_wf, dti_wf, [("outputnode.dwi_file", "inputnode.dwi_file"),
                              ("outputnode.bval_file", "inputnode.bval_file"),
                              ("outputnode.bvec_file", "inputnode.bvec_file")]),
        (inputnode, dti_wf, [("mask_file", "inputnode.mask_file")]),
        (preproc_wf, sr_wf, [("outputnode.dwi_file", "inputnode.dwi_file")]),
        (dti_wf, sr_wf, [("outputnode.tensor_file", "inputnode.tensor_file"),
                         ("outputnode.mask_file", "inputnode.mask_file"),
                         ("outputnode.s0_file", "inputnode.s0_file")]),
        (inputnode, sr_wf, [("bval_file", "inputnode.bval_file"), ("bvec_file", "inputnode.bvec_file")]),
        (inputnode, outputs_wf, [("source_file", "inputnode.source_file")]),
        (dti_wf, outputs_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in NATIVE_DERIVATIVES]),
        # sr_wf's outputs, sr_-prefixed on outputs_wf (tensor_file → sr_tensor_file, metadata → sr_metadata)
        (sr_wf, outputs_wf, [(f"outputnode.{f.removeprefix('sr_')}", f"inputnode.{f}")
                             for f in [*SR_DERIVATIVES, "sr_metadata"]]),
        (inputnode, noise_corr, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
        (dti_wf, noise_corr, [("outputnode.mask_file", "mask_file"), ("outputnode.metadata", "metadata")]),
        (noise_corr, outputs_wf, [("metadata", "inputnode.metadata")]),
        (outputs_wf, outputnode, [(f"outputnode.{f}", f) for f in [*NATIVE_DERIVATIVES, *SR_DERIVATIVES]]),
    ])  # fmt:skip


def _connect_tractography(
    workflow, inputnode, outputnode, tract_wf, tract_outputs_wf, keys, *, preproc_wf, dti_wf, sr_wf, outputs_wf
) -> None:
    """Track the run's native and super-resolved tensors and write the tractograms."""
    fields = ["summary_file"] + [f"{k}_{f}" for k in keys for f in TRACTOGRAM_FIELDS]
    workflow.connect([
        # the series as given: the run's noise level (MRtrix3's Tensor_Prob)
        (inputnode, tract_wf, [("dwi_file", "inputnode.dwi_file")]),
        (preproc_wf, tract_wf, [("outputnode.bval_file", "inputnode.bval_file"),
                                ("outputnode.bvec_file", "inputnode.bvec_file")]),
        (dti_wf, tract_wf, [("outputnode.tensor_file", "inputnode.tensor_file"),
                            ("outputnode.mask_file", "inputnode.mask_file"),
                            ("outputnode.s0_file", "inputnode.s0_file")]),
        (sr_wf, tract_wf, [("outputnode.tensor_file", "inputnode.sr_tensor_file"),
                           ("outputnode.mask_file", "inputnode.sr_mask_file"),
                           ("outputnode.sd_total_file", "inputnode.sr_sd_total_file")]),
        (inputnode, tract_outputs_wf, [("source_file", "inputnode.source_file")]),
        (tract_wf, tract_outputs_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in fields]),
        (outputs_wf, tract_outputs_wf, [("outputnode.tensor_file", "inputnode.tensor_file"),
                                        ("outputnode.sr_tensor_file", "inputnode.sr_tensor_file"),
                                        ("outputnode.sr_sd_total_file", "inputnode.sr_sd_total_file")]),
        (tract_outputs_wf, outputnode, [(f"outputnode.{f}", f) for f in _written_tractography(keys)]),
    ])  # fmt:skip
