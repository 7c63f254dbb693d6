"""Tractography on the native and the super-resolved tensors as a Nipype workflow."""

from __future__ import annotations

from dataclasses import replace

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from iqt_pipe.tracking.mrtrix import DEFAULT_SYNTH_SNR
from iqt_pipe.tracking.track import (
    ALGORITHMS,
    DEFAULT_FA_THRESHOLD,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MIN_LENGTH,
    DEFAULT_SEED_DENSITY,
    DEFAULT_SEED_FA,
    SH_ORDER,
    SPHERE,
    TrackingParams,
    check_uncertainty_limit,
)

SOFTWARE = ("dipy", "mrtrix")
SPACES = ("native", "sr")
#: Outputs per tractogram: ``<key>_<field>`` on the outputnode.
TRACTOGRAM_FIELDS = ("tck", "trk", "tsv", "tdi", "metadata")
_INPUTS = [
    "tensor_file",
    "mask_file",
    "s0_file",
    "bval_file",
    "bvec_file",
    "dwi_file",
    "sr_tensor_file",
    "sr_mask_file",
    "sr_sd_total_file",
]
#: The inputnode's tensor and mask fields of each space.
_SPACE_INPUTS = {"native": ("tensor_file", "mask_file"), "sr": ("sr_tensor_file", "sr_mask_file")}


def software_for(tractography: str) -> tuple[str, ...]:
    """``--tractography`` choice → the tracking software to run."""
    return {"none": (), "dipy": ("dipy",), "mrtrix": ("mrtrix",), "both": SOFTWARE}[tractography]


def tractogram_keys(software=SOFTWARE, algorithms=ALGORITHMS, spaces=SPACES) -> list[str]:
    """Names of the tractograms, ``<space>_<software><algorithm>`` (e.g. ``sr_dipydet``)."""
    return [f"{space}_{sw}{alg}" for space in spaces for sw in software for alg in algorithms]


def split_key(key: str) -> tuple[str, str, str]:
    """``sr_dipydet`` → ``("sr", "dipy", "det")``."""
    space, rest = key.split("_", 1)
    sw = next(s for s in SOFTWARE if rest.startswith(s))
    return space, sw, rest[len(sw) :]


def init_tractography_wf(
    *,
    software: tuple[str, ...] = ("dipy",),
    algorithms: tuple[str, ...] = ALGORITHMS,
    spaces: tuple[str, ...] = SPACES,
    seed_density: float = DEFAULT_SEED_DENSITY,
    step_mm: float | None = None,
    max_angle: float | None = None,
    fa_threshold: float = DEFAULT_FA_THRESHOLD,
    seed_fa: float = DEFAULT_SEED_FA,
    min_length: float = DEFAULT_MIN_LENGTH,
    max_length: float = DEFAULT_MAX_LENGTH,
    max_uncertainty: float | None = None,
    uncertainty_action: str = "stop",
    random_seed: int = 0,
    omp_nthreads: int = 1,
    name: str = "tractography_wf",
) -> Workflow:
    """Streamlines on the native and the super-resolved tensors, with DIPY and/or MRtrix3.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from iqt_pipe.workflows.tractography import init_tractography_wf
            wf = init_tractography_wf(software=("dipy", "mrtrix"))

    DIPY tracks the tensors themselves; MRtrix3 (``tckgen -algorithm Tensor_Det/Tensor_Prob``, then ``tckmap``) DWI
    series synthesised from them and the subject's S0: noise-free on b=0 and six directions for ``Tensor_Det``, on the
    subject's gradient table with Rician noise at the run's noise level for ``Tensor_Prob``. Every tractogram then
    gets the uncertainty limit (super-resolved ones only), its ``.tck``/``.trk``/per-streamline TSV and a
    track-density image; the summary TSV has one row per tractogram.

    Parameters
    ----------
    software, algorithms, spaces
        ``"dipy"`` and/or ``"mrtrix"``; ``"det"`` (deterministic) and/or ``"prob"`` (probabilistic);
        ``"native"`` and/or ``"sr"`` (super-resolved): one tractogram per combination (:func:`tractogram_keys`).
    seed_density, seed_fa
        Seeds per mm³ of white matter (FA ≥ ``seed_fa`` in the brain mask), whatever the voxel size.
    step_mm, max_angle
        Step size (mm) and angle limit (degrees per step); default half a voxel and 60° × step / voxel, so each
        grid is tracked at its own resolution.
    fa_threshold, min_length, max_length
        Stopping FA, and the streamline lengths kept (mm).
    max_uncertainty, uncertainty_action
        Threshold on the super-resolution's total Frobenius sd (mm²/s) and what happens to a streamline entering
        a voxel above it: ``"stop"`` or ``"drop"``.
    random_seed
        Seeds of the random seeding and of the probabilistic steps (``MRTRIX_RNG_SEED`` for tckgen).
    omp_nthreads
        Threads of DIPY's tracker and of MRtrix3's commands.

    Inputs
    ------
    tensor_file, mask_file, s0_file, bval_file, bvec_file
        Native tensors (world frame), brain mask and fitted b=0 (``init_dti_wf``'s), and the subject's gradient
        table (for the MRtrix3 synthesis).
    dwi_file
        The run's native DWI series (optional; MRtrix3 ``Tensor_Prob``: its noise level).
    sr_tensor_file, sr_mask_file, sr_sd_total_file
        ``init_sr_wf``'s mean tensor, mask and total uncertainty (may be undefined).

    Outputs
    -------
    <key>_tck, <key>_trk, <key>_tsv, <key>_tdi, <key>_metadata
        Per key of :func:`tractogram_keys`: the tractogram files, its track-density image and the sidecar fields.
    summary_file
        Per-run summary TSV.
    """
    params = TrackingParams(
        seed_density=seed_density,
        step_mm=step_mm,
        max_angle=max_angle,
        fa_threshold=fa_threshold,
        seed_fa=seed_fa,
        min_length=min_length,
        max_length=max_length,
        random_seed=random_seed,
    )
    keys = _checked_keys(software, algorithms, spaces, params, max_uncertainty, uncertainty_action)
    workflow = Workflow(name=name)
    workflow.__desc__ = _methods(software, algorithms, spaces, params, max_uncertainty, uncertainty_action)
    inputnode, outputnode = _io_nodes(keys)
    finish = _add_finishing(workflow, inputnode, outputnode, keys, max_uncertainty, uncertainty_action, min_length)
    if "dipy" in software:
        _add_dipy_branch(workflow, inputnode, outputnode, finish, params, omp_nthreads)
    if "mrtrix" in software:
        _add_mrtrix_branch(workflow, inputnode, outputnode, finish, params, omp_nthreads, noisy="prob" in algorithms)
    return workflow


def _checked_keys(software, algorithms, spaces, params: TrackingParams, max_uncertainty, action) -> list[str]:
    """The tractogram keys, once the settings are valid (``params`` for each algorithm)."""
    for sw in software:
        if sw not in SOFTWARE:
            raise ValueError(f"unknown tractography software {sw!r}; choose from {', '.join(SOFTWARE)}")
    for space in spaces:
        if space not in SPACES:
            raise ValueError(f"unknown space {space!r}; choose from {', '.join(SPACES)}")
    check_uncertainty_limit(max_uncertainty, action)
    for alg in algorithms:
        replace(params, algorithm=alg).check()
    keys = tractogram_keys(software, algorithms, spaces)
    if not keys:
        raise ValueError("nothing to track: give at least one software, algorithm and space")
    return keys


def _io_nodes(keys: list[str]) -> tuple[pe.Node, pe.Node]:
    """The inputnode (:data:`_INPUTS`) and the outputnode (``<key>_<field>`` per tractogram, ``summary_file``)."""
    inputnode = pe.Node(niu.IdentityInterface(fields=_INPUTS), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=[f"{k}_{f}" for k in keys for f in TRACTOGRAM_FIELDS] + ["summary_file"]),
        name="outputnode",
    )
    return inputnode, outputnode


def _seeding(params: TrackingParams) -> dict:
    """The seeding and stepping inputs shared by DIPY's tracker and the MRtrix3 preparation (step and angle
    only when set: otherwise scaled to each grid's voxel size at run time)."""
    return dict(
        seed_density=params.seed_density,
        seed_fa=params.seed_fa,
        random_seed=params.random_seed,
        **({"step_mm": params.step_mm} if params.step_mm is not None else {}),
        **({"max_angle": params.max_angle} if params.max_angle is not None else {}),
    )


def _add_finishing(workflow, inputnode, outputnode, keys, max_uncertainty, action, min_length) -> dict:
    """Per tractogram, the node that applies the uncertainty limit and writes its files (fed by
    its software's branch), and the run's summary of them all, in the order of ``keys``."""
    summaries = pe.Node(niu.Merge(len(keys)), name="summaries", run_without_submitting=True)
    summary = pe.Node(_summary_interface(), name="summary")
    connections = [(summaries, summary, [("out", "summaries")]), (summary, outputnode, [("out_file", "summary_file")])]
    finish = {}
    for i, key in enumerate(keys, start=1):
        space, sw, alg = split_key(key)
        finish[key] = pe.Node(
            _finish_interface(key, space, sw, alg, max_uncertainty, action, min_length), name=f"finish_{key}"
        )
        connections += [
            (inputnode, finish[key], [(_SPACE_INPUTS[space][0], "reference_file")]),
            (finish[key], summaries, [("summary", f"in{i}")]),
            (
                finish[key],
                outputnode,
                [
                    ("tck_file", f"{key}_tck"),
                    ("trk_file", f"{key}_trk"),
                    ("tsv_file", f"{key}_tsv"),
                    ("metadata", f"{key}_metadata"),
                ],
            ),
        ]
        if space == "sr":
            connections.append((inputnode, finish[key], [("sr_sd_total_file", "uncertainty_file")]))
    workflow.connect(connections)
    return finish


def _add_dipy_branch(workflow, inputnode, outputnode, finish: dict, params: TrackingParams, omp_nthreads: int) -> None:
    """DIPY's multi-threaded tracker on the tensors (:class:`~iqt_pipe.interfaces.tractography.DipyTracking`,
    ``omp_nthreads`` threads): deterministic along the principal eigenvector, probabilistic from the
    tensor ODF; then each tractogram's track-density image. ``finish``: every tractogram's node; this branch
    feeds DIPY's."""
    from iqt_pipe.interfaces.tractography import DipyTracking, TrackDensity

    limits = dict(fa_threshold=params.fa_threshold, min_length=params.min_length, max_length=params.max_length)
    connections = []
    for key, node in finish.items():
        space, sw, alg = split_key(key)
        if sw != "dipy":
            continue
        tensor, mask = _SPACE_INPUTS[space]
        track = pe.Node(
            DipyTracking(algorithm=alg, **limits, nthreads=omp_nthreads, **_seeding(params)),
            name=f"track_{key}",
            n_procs=omp_nthreads,
        )
        tdi = pe.Node(TrackDensity(), name=f"tdi_{key}")
        connections += [
            (inputnode, track, [(tensor, "tensor_file"), (mask, "mask_file")]),
            (
                track,
                node,
                [
                    ("tck_file", "in_file"),
                    ("seeds_file", "seeds_file"),
                    ("n_seeds", "n_seeds"),
                    ("step_mm", "step_mm"),
                    ("max_angle", "max_angle"),
                    ("voxel_size_mm", "voxel_size_mm"),
                ],
            ),
            (inputnode, tdi, [(mask, "reference")]),
            (node, tdi, [("tck_file", "in_file")]),
            (tdi, outputnode, [("out_file", f"{key}_tdi")]),
        ]
    workflow.connect(connections)


def _add_mrtrix_branch(
    workflow, inputnode, outputnode, finish: dict, params: TrackingParams, omp_nthreads: int, noisy: bool
) -> None:
    """MRtrix3 on DWI series synthesised from the tensors and the subject's S0 (one preparation per space,
    shared by its algorithms), then ``tckgen -algorithm Tensor_Det/Tensor_Prob`` (Nipype's ``Tractography``) and
    ``tckmap`` (``ComputeTDI``). ``Tensor_Det`` tracks a noise-free series on b=0 and six directions
    (:func:`~iqt_pipe.tracking.mrtrix.exact_scheme`); ``Tensor_Prob`` one on the subject's gradient table with
    Rician noise added (``noisy``) at the run's noise level (measured on ``dwi_file``'s repeated b=0
    volumes, else SNR :data:`~iqt_pipe.tracking.mrtrix.DEFAULT_SYNTH_SNR` of the synthesised b=0),
    so its wild bootstrap has residuals to resample. ``finish``: every tractogram's node; this branch feeds
    MRtrix3's."""
    from nipype.interfaces.mrtrix3 import ComputeTDI

    from iqt_pipe.interfaces.tractography import PrepareMRtrixTracking

    connections, prepared = [], {}
    for key, node in finish.items():
        space, sw, alg = split_key(key)
        if sw != "mrtrix":
            continue
        tensor, mask = _SPACE_INPUTS[space]
        if space not in prepared:
            # One slot: the synthesis runs on one core, so the scheduler can run another node beside it.
            prepared[space] = pe.Node(
                PrepareMRtrixTracking(noisy=noisy, snr=DEFAULT_SYNTH_SNR, **_seeding(params)),
                name=f"mrtrix_inputs_{space}",
            )
            connections.append(
                (
                    inputnode,
                    prepared[space],
                    [
                        (tensor, "tensor_file"),
                        (mask, "mask_file"),
                        ("s0_file", "s0_file"),
                        ("bval_file", "bval_file"),
                        ("bvec_file", "bvec_file"),
                        ("dwi_file", "noise_dwi_file"),
                        ("mask_file", "noise_mask_file"),
                    ],
                )
            )
        prep = prepared[space]
        # Tensor_Prob's bootstrap needs noise, and residuals: the subject's gradient table
        series = "" if alg == "det" else "noisy_"
        track = _tckgen_node(key, alg, params, omp_nthreads)
        tdi = pe.Node(
            ComputeTDI(out_file="tdi.nii.gz", args="-quiet", nthreads=omp_nthreads),
            name=f"tckmap_{key}",
            n_procs=omp_nthreads,
        )
        connections += [
            (
                prep,
                track,
                [
                    (f"{series}dwi_file", "in_file"),
                    (f"{series}grad_file", "grad_file"),
                    ("mask_file", "roi_mask"),
                    ("seed_mask_file", "seed_image"),
                    ("step_mm", "step_size"),
                    ("max_angle", "angle"),
                    ("tckgen_args", "args"),
                ],
            ),
            (track, node, [("out_file", "in_file"), ("out_seeds", "seeds_file")]),
            (
                prep,
                node,
                [
                    ("n_seeds", "n_seeds"),
                    ("step_mm", "step_mm"),
                    ("max_angle", "max_angle"),
                    ("voxel_size_mm", "voxel_size_mm"),
                    *([("noise", "synthesis_noise")] if alg == "prob" else []),
                ],
            ),
            (inputnode, tdi, [(mask, "reference")]),
            (node, tdi, [("tck_file", "in_file")]),
            (tdi, outputnode, [("out_file", f"{key}_tdi")]),
        ]
    workflow.connect(connections)


def _tckgen_node(key: str, alg: str, params: TrackingParams, omp_nthreads: int) -> pe.Node:
    """``tckgen -algorithm Tensor_Det/Tensor_Prob`` for one tractogram, with ``params``' stopping FA, lengths and
    seed (``MRTRIX_RNG_SEED``); the series, masks, step and angle come from its space's preparation."""
    from iqt_pipe.interfaces.tractography import TensorTractography

    return pe.Node(
        TensorTractography(
            algorithm="Tensor_Det" if alg == "det" else "Tensor_Prob",
            cutoff=params.fa_threshold,
            min_length=params.min_length,
            max_length=params.max_length,
            out_file="tracked.tck",
            out_seeds="seeds.txt",
            nthreads=omp_nthreads,
            environ={"MRTRIX_RNG_SEED": str(params.random_seed)},
        ),
        name=f"tckgen_{key}",
        n_procs=omp_nthreads,
    )


def _finish_interface(key, space, sw, alg, max_uncertainty, action, min_length):
    from iqt_pipe.interfaces.tractography import FinishTractogram

    node = FinishTractogram(
        tractogram=key, space=space, software=sw, algorithm=alg, uncertainty_action=action, min_length=min_length
    )
    if max_uncertainty is not None and space == "sr":
        node.inputs.max_uncertainty = max_uncertainty
    return node


def _summary_interface():
    from iqt_pipe.interfaces.tractography import TractographySummary

    return TractographySummary()


def _methods(software, algorithms, spaces, params: TrackingParams, max_unc, action) -> str:
    """The methods paragraph: what was tracked, with which software, seeds, stopping rules and limits."""
    what = {"native": "the native-resolution tensors", "sr": "the super-resolved tensors"}
    text = [f"Whole-brain streamline tractography was run on {' and on '.join(what[s] for s in spaces)}."]
    algs = " and ".join({"det": "deterministic", "prob": "probabilistic"}[a] for a in algorithms)
    if "dipy" in software:
        text.append(
            f"With DIPY [@dipy], {algs} local tracking used the tensors expressed in the voxel frame "
            "of each grid: deterministic tracking followed the principal eigenvector (trilinearly "
            "weighted over the neighbouring voxels), probabilistic tracking drew each step from the "
            "tensors' diffusion orientation distribution function (real spherical harmonics of order "
            f"{SH_ORDER}, evaluated on the directions of DIPY's `{SPHERE}` sphere)."
        )
    if "mrtrix" in software:
        mrtrix_algs = ", ".join("Tensor_Det" if a == "det" else "Tensor_Prob" for a in algorithms)
        text.append(
            "With MRtrix3 [@mrtrix3], diffusion-weighted series were synthesised from each tensor "
            "image and the fitted b=0 signal (interpolated to the tensor grid) and tracked with "
            f"`tckgen` ({mrtrix_algs}); track-density images were computed with `tckmap`."
        )
        if "det" in algorithms:
            text.append(
                "For Tensor_Det the series was noise-free, with one b=0 volume and six directions (an "
                "icosahedron's) at the subject's b-value, which give back the tensors exactly."
            )
        if "prob" in algorithms:
            text.append(
                "For Tensor_Prob, whose wild bootstrap resamples the residuals of the tensor fit, the "
                "series had the subject's gradient table and Rician noise (fixed seed) at the run's "
                "noise level, estimated from the repeated b=0 volumes of the native series (or, without repeats, at "
                f"an SNR of {DEFAULT_SYNTH_SNR:g} for the synthesised b=0)."
            )
    text.append(
        f"Seeds were placed at random in white matter (FA ≥ {params.seed_fa:g} in the brain mask) at "
        f"{params.seed_density:g} seeds per mm³; tracking stopped where FA fell below {params.fa_threshold:g} "
        "or the brain mask ended, with a step of half a voxel and at most 60° × step / voxel between steps unless "
        f"set otherwise, keeping streamlines {params.min_length:g}–{params.max_length:g} mm long. Each streamline's "
        "length and the mean and maximum of the super-resolution's total uncertainty along it were recorded."
    )
    if max_unc is not None:
        verb = "cut where they entered" if action == "stop" else "discarded when they entered"
        text.append(
            f"Streamlines on the super-resolved tensors were {verb} a voxel whose total uncertainty "
            f"exceeded {max_unc:g} mm²/s."
        )
    return "\n".join(text) + "\n"
