"""DWI preprocessing (denoising, Gibbs-ringing removal) and the native-resolution DTI fit as
Nipype workflows."""

from __future__ import annotations

import shutil

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from iqt_pipe.dmri.prepare import DENOISE
from iqt_pipe.interfaces.dti import FitDTI

DTI_OUTPUTS = ["tensor_file", "fa_file", "md_file", "ad_file", "rd_file", "s0_file", "mask_file"]


def mrtrix_available() -> bool:
    """Whether MRtrix3's ``dwidenoise`` and ``mrdegibbs`` are on PATH."""
    return shutil.which("dwidenoise") is not None and shutil.which("mrdegibbs") is not None


def init_dwi_preproc_wf(
    *,
    denoise: str = "auto",
    degibbs: bool = True,
    slice_axis: int = 2,
    omp_nthreads: int = 1,
    gibbs_tool: str | None = None,
    name: str = "dwi_preproc_wf",
) -> Workflow:
    """Denoise a DWI series, then remove its Gibbs ringing, before any interpolation.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from iqt_pipe.workflows.dwi import init_dwi_preproc_wf
            wf = init_dwi_preproc_wf(denoise="dipy")

    Parameters
    ----------
    denoise
        ``"mrtrix"``: MP-PCA by MRtrix3's ``dwidenoise`` and, with ``degibbs``, ``mrdegibbs``;
        ``"dipy"``: DIPY's ``mppca`` and ``gibbs_removal``; ``"auto"``: MRtrix3 when it is
        on PATH, else DIPY; ``"none"``: no denoising (Gibbs removal, if on, as ``"auto"``).
    degibbs
        Remove Gibbs ringing (local sub-voxel shifts) after denoising.
    slice_axis
        Voxel axis across the acquired slices; ringing is removed in the other two.
    omp_nthreads
        Threads of the MRtrix3 nodes (the DIPY ones run single-threaded).
    gibbs_tool
        ``"dipy"`` or ``"mrtrix"`` for the Gibbs-ringing removal whatever the denoiser (e.g. the
        tool a model's training series were corrected with); default: as ``denoise`` says.

    Inputs
    ------
    dwi_file, bval_file, bvec_file
        DWI series (as reconstructed by the scanner) and its FSL gradient files.

    Outputs
    -------
    dwi_file
        Preprocessed series, on the input's grid and affine.
    bval_file, bvec_file
        The input gradient files (no step changes them).
    noise_file
        Map of the noise standard deviation estimated by MP-PCA (undefined without denoising).
    """
    if denoise not in DENOISE:
        raise ValueError(f"denoise must be one of {', '.join(DENOISE)}, got {denoise!r}")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
    if gibbs_tool not in (None, "dipy", "mrtrix"):
        raise ValueError(f"gibbs_tool must be dipy or mrtrix, got {gibbs_tool!r}")
    use_mrtrix = denoise == "mrtrix" or (denoise in ("auto", "none") and mrtrix_available())
    gibbs_mrtrix = use_mrtrix if gibbs_tool is None else gibbs_tool == "mrtrix"

    workflow = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file"]), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file", "noise_file"]), name="outputnode"
    )
    steps, desc = [], []  # the nodes in order (each in_file → out_file); methods sentences
    if denoise != "none":
        node, noise_field, tool = _denoise_node(use_mrtrix, omp_nthreads)
        steps.append(node)
        desc.append(
            "The DWI series was denoised by Marchenko-Pastur principal component analysis "
            f"(MP-PCA) [@mppca] over 5×5×5-voxel windows with {tool}, which also estimated "
            "a map of the noise standard deviation."
        )
    if degibbs:
        node, tool = _degibbs_node(gibbs_mrtrix, slice_axis, omp_nthreads)
        steps.append(node)
        desc.append(
            f"{'Then, ' if desc else ''}Gibbs-ringing artefacts were removed by local "
            f"sub-voxel shifts [@kellner2016] within the acquired slices with {tool}."
        )
    workflow.__desc__ = " ".join(desc) + "\n" if desc else None

    chain = [(inputnode, "dwi_file"), *((node, "out_file") for node in steps)]
    workflow.connect([
        (inputnode, outputnode, [("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
        *((src, node, [(field, "in_file")]) for (src, field), node in zip(chain, steps)),
        (chain[-1][0], outputnode, [(chain[-1][1], "dwi_file")]),
        *([(steps[0], outputnode, [(noise_field, "noise_file")])] if denoise != "none" else []),
    ])  # fmt:skip
    return workflow


def _denoise_node(mrtrix: bool, omp_nthreads: int):
    """MP-PCA node, the name of its noise-map output, and the tool for the methods text."""
    if mrtrix:
        from nipype.interfaces.mrtrix3 import DWIDenoise

        node = pe.Node(DWIDenoise(out_file="dwi_denoised.nii.gz", noise="dwi_noise.nii.gz",
                                  nthreads=omp_nthreads, args="-quiet"),
                       name="dwidenoise", n_procs=omp_nthreads)  # fmt:skip
        return node, "noise", "MRtrix3's `dwidenoise` [@mrtrix3]"
    from iqt_pipe.interfaces.preproc import DenoiseMPPCA

    node = pe.Node(DenoiseMPPCA(nprocs=omp_nthreads), name="denoise_mppca", n_procs=omp_nthreads)
    return node, "noise_file", "DIPY's `mppca` [@dipy] (its method, computed for many patches at once)"


def _degibbs_node(mrtrix: bool, slice_axis: int, omp_nthreads: int):
    """Gibbs-ringing removal node (in-plane, across ``slice_axis``) and its tool's name."""
    if mrtrix:
        from nipype.interfaces.mrtrix3 import MRDeGibbs

        axes = [axis for axis in range(3) if axis != slice_axis]
        node = pe.Node(MRDeGibbs(out_file="dwi_unringed.nii.gz", axes=axes,
                                 nthreads=omp_nthreads, args="-quiet"),
                       name="mrdegibbs", n_procs=omp_nthreads)  # fmt:skip
        return node, "MRtrix3's `mrdegibbs` [@mrtrix3]"
    from iqt_pipe.interfaces.preproc import RemoveGibbs

    node = pe.Node(RemoveGibbs(slice_axis=slice_axis, nprocs=omp_nthreads), name="remove_gibbs", n_procs=omp_nthreads)
    return node, "DIPY's `gibbs_removal` [@dipy; @netohenriques2018]"


def init_dti_wf(*, omp_nthreads: int = 1, name: str = "dti_wf") -> Workflow:
    """Fit diffusion tensors at native resolution (IQT protocol) and estimate a brain mask.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from iqt_pipe.workflows.dwi import init_dti_wf
            wf = init_dti_wf()

    The fit runs on ``omp_nthreads`` threads (equal parts of the voxels; the same result on any
    number).

    Inputs
    ------
    dwi_file, bval_file, bvec_file
        DWI series and its FSL gradient files (e.g. ``init_dwi_preproc_wf``'s outputs).
    mask_file
        Optional brain mask on the same grid; median_otsu's when left undefined.

    Outputs
    -------
    tensor_file
        Tensors, BEP016 order (D11, D12, D13, D22, D23, D33), world frame, mm²/s; every
        voxel with enough positive signal is fitted, as super-resolution expects.
    fa_file, md_file, ad_file, rd_file, s0_file
        Scalar maps of the tensors and the fitted b = 0 signal.
    mask_file
        Brain mask (the input's, or median_otsu's).
    metadata
        The tensor sidecar's run-time fields (``NumericalGuards``: counts of fitted voxels
        made finite and of non-positive-definite tensors).
    """
    workflow = Workflow(name=name)
    workflow.__desc__ = """\
Diffusion tensors were fitted at the native resolution by weighted linear least squares
with DIPY [@dipy], on the b=0 volumes and one diffusion-weighted shell, following the
Image Quality Transfer protocol [@tanno2017]: the highest shell below b=1500 s/mm² or,
without one, the lowest shell. Every voxel with a positive signal in more than half of
those volumes was fitted, a signal of zero (cerebrospinal fluid at the scanner's floor) taken
as the voxel's smallest positive one, and the tensors were expressed in scanner (world)
coordinates. Unless one was supplied, a brain
mask was estimated with DIPY's `median_otsu` on the mean b=0 image.
"""
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file", "mask_file"]), name="inputnode"
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=[*DTI_OUTPUTS, "metadata"]), name="outputnode")
    fit_dti = pe.Node(FitDTI(nthreads=omp_nthreads), name="fit_dti", n_procs=omp_nthreads)
    workflow.connect([
        (inputnode, fit_dti, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"),
                              ("bvec_file", "bvec_file"), ("mask_file", "mask_file")]),
        (fit_dti, outputnode, [(out, out) for out in [*DTI_OUTPUTS, "metadata"]]),
    ])  # fmt:skip
    return workflow
