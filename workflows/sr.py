"""Super-resolution with uncertainty as a Nipype workflow."""

from __future__ import annotations

import os
from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from iqt_pipe.dmri.prepare import Preprocessing
from iqt_pipe.interfaces.sr import SuperResolve
from iqt_pipe.sr.options import DEFAULT_MC_SAMPLES, DEFAULT_PRECISION, DEFAULT_SYMMETRIES

SR_INPUTS = ["tensor_file", "mask_file", "s0_file", "bval_file", "bvec_file", "dwi_file"]
SR_OUTPUTS = [
    "tensor_file",
    "fa_file",
    "fa_sd_file",
    "md_file",
    "md_sd_file",
    "sd_intrinsic_file",
    "sd_parameter_file",
    "sd_total_file",
    "mask_file",
    "metadata",
]


def init_sr_wf(
    *,
    model: str | Sequence[str],
    mc_samples: int = DEFAULT_MC_SAMPLES,
    symmetries: str = DEFAULT_SYMMETRIES,
    precision: str = DEFAULT_PRECISION,
    self_calibration: bool = True,
    scalar_samples: int = 32,
    seed: int = 0,
    use_gpu: bool = False,
    omp_nthreads: int = 1,
    mem_mb: float = 1024,
    mem_gb: float | None = None,
    preprocessing: Preprocessing | None = None,
    name: str = "sr_wf",
) -> Workflow:
    """Bayesian super-resolution of a tensor image, with its uncertainty maps.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from iqt_pipe.workflows.sr import init_sr_wf
            wf = init_sr_wf(model="model.json")

    Parameters
    ----------
    model
        Model folder, ``model.json`` or ``model.safetensors`` (see :mod:`iqt_pipe.models`), or
        several: their inverse-variance ensemble.
    mc_samples, scalar_samples
        Monte-Carlo weight samples of variational models; tensor samples per voxel behind the FA/MD sd maps.
    symmetries
        Test-time symmetry ensemble: ``none``, ``mirrors`` (8) or ``cube`` (48 symmetries).
    precision
        The network's arithmetic: ``auto`` (bfloat16 on CPUs with AMX), ``float32``, ``bfloat16``.
    self_calibration
        Scale the variances to the model's errors on ``dwi_file`` degraded once more (:mod:`iqt_pipe.sr.selfcal`).
    seed
        Random seed; the same inputs, seed and device give identical outputs.
    use_gpu, omp_nthreads
        Run on CUDA (the node then takes one of MultiProc's GPU slots); CPU threads of the node.
    mem_mb, mem_gb
        Memory for the network's tiles in flight (MB), and the node's whole memory use for Nipype's
        scheduler (GB; default: the tiles plus 1 GB for the arrays of the super-resolved grid).
    preprocessing
        What the native series had before the fit (:class:`iqt_pipe.dmri.prepare.Preprocessing`):
        recorded in the sidecars beside what the model was trained with (``Preprocessing``).

    Inputs
    ------
    tensor_file
        Native-resolution tensors, BEP016 order, world frame (e.g. ``FitDTI``'s), fitted on
        the whole volume as in training.
    mask_file
        Native-resolution brain mask on the same grid.
    s0_file
        The fit's S0 on the same grid (``FitDTI``'s): needed by models with the S0 input
        (their card's ``inputs``), unused by others.
    bval_file, bvec_file, dwi_file
        Optional: the native series' gradient files (the run is then checked against the model's training
        domain, ``ModelDomain`` in the sidecars) and the series ``tensor_file`` was fitted from (self-calibration).

    Outputs
    -------
    tensor_file, fa_file, fa_sd_file, md_file, md_sd_file, sd_intrinsic_file,
    sd_parameter_file, sd_total_file, mask_file
        See :class:`iqt_pipe.interfaces.SuperResolve`.
    metadata
        Provenance for the sidecars (model sha256, variant, r, samples, seed, device).
    """
    models = [str(model)] if isinstance(model, (str, os.PathLike)) else [str(m) for m in model]
    workflow = Workflow(name=name)
    workflow.__desc__ = _methods(mc_samples, symmetries, precision, len(models), _takes_s0(models), self_calibration)
    inputnode = pe.Node(niu.IdentityInterface(fields=SR_INPUTS), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=SR_OUTPUTS), name="outputnode")
    super_resolve = _super_resolve_node(
        models,
        mc_samples=mc_samples,
        symmetries=symmetries,
        precision=precision,
        self_calibration=self_calibration,
        scalar_samples=scalar_samples,
        seed=seed,
        use_gpu=use_gpu,
        omp_nthreads=omp_nthreads,
        mem_mb=mem_mb,
        mem_gb=mem_gb,
        preprocessing=preprocessing,
    )
    workflow.connect([
        (inputnode, super_resolve, [("tensor_file", "tensor_file"), ("mask_file", "mask_file"),
                                    ("s0_file", "s0_file"), ("dwi_file", "dwi_file"),
                                    ("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
        (super_resolve, outputnode, [(out, out) for out in SR_OUTPUTS]),
    ])  # fmt:skip
    return workflow


def _super_resolve_node(
    models: list[str],
    *,
    omp_nthreads: int,
    mem_mb: float,
    mem_gb: float | None,
    preprocessing: Preprocessing | None,
    **options,
) -> pe.Node:
    """The network's node (``options``: :class:`~iqt_pipe.interfaces.sr.SuperResolve`'s): ``omp_nthreads``
    threads, ``mem_mb`` of tiles in flight, the run's ``preprocessing`` recorded when given, and ``mem_gb``
    for Nipype's scheduler (default: the tiles, at least 512 MB, plus 1 GB)."""
    steps = {} if preprocessing is None else {"denoise": preprocessing.denoise, "degibbs": preprocessing.degibbs}
    return pe.Node(
        SuperResolve(model=models, **options, num_threads=omp_nthreads, mem_mb=mem_mb, **steps),
        name="super_resolve",
        n_procs=omp_nthreads,
        mem_gb=mem_gb if mem_gb is not None else max(mem_mb, 512) / 1024 + 1,
    )


def _takes_s0(models: list[str]) -> bool:
    """Whether any of the models takes the fit's S0 as an input (its card's ``inputs``; an
    unreadable card is the super-resolution node's error to report)."""
    from iqt_pipe.models.files import ModelFileError, read_card

    try:
        return any("s0" in read_card(m).get("inputs", ["tensor"]) for m in models)
    except ModelFileError:
        return False


def _methods(
    mc_samples: int, symmetries: str, precision: str, n_models: int, s0: bool = False, self_calibration: bool = False
) -> str:
    """The methods paragraph: the network and its uncertainty, then the options that change it."""
    text = f"""\
Diffusion tensors were super-resolved with Bayesian Image Quality Transfer
[@tanno2017; @tanno2021]: a 3D efficient sub-pixel-shifting convolutional network
(3D-ESPCN) predicted the high-resolution tensors of every brain voxel and of the brain's rim, with a
heteroscedastic noise model for intrinsic uncertainty and variational dropout for
parameter uncertainty where the model has them. The predictive mean and variance were
estimated from {mc_samples} Monte-Carlo weight samples (variational models). FA and MD maps
are those of the predictive mean tensor; FA's standard deviation was estimated from tensor
samples of the predictive distribution, MD's exactly (MD is linear in the tensor).
"""
    if s0:
        text += """\
Besides the tensor components, the network took the fitted non-diffusion-weighted signal (S0,
relative to its median in the brain) as an input.
"""
    if symmetries != "none":
        n = {"mirrors": "8 mirror", "cube": "48"}[symmetries]
        text += f"""\
Each Monte-Carlo pass ran the network on the tensor field transformed by one of the {n}
symmetries of the voxel grid (the tensors transformed alike) and transformed its prediction back,
a test-time symmetry ensemble.
"""
    if precision != "float32":
        where = " on CPUs that multiply bfloat16 natively (AMX), in float32 elsewhere" if precision == "auto" else ""
        text += f"""\
The network's convolutions ran in bfloat16 arithmetic{where}.
"""
    if n_models > 1:
        text += f"""\
The predictions of {n_models} networks were combined with inverse-variance weights
[@tanno2021], their disagreement added to the parameter uncertainty.
"""
    if self_calibration:
        text += """\
The predictive variances were self-calibrated on each run: its series was block-averaged over
blocks of the upsampling factor's size and fitted again, the network super-resolved that
coarser fit with the same settings, and every variance was multiplied by the squared ratio of
the root-mean-square error (against the run's own fit, in the brain) to the root-mean-square
predicted standard deviation.
"""
    return text
