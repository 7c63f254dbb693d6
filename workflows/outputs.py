"""Derivatives of one DWI run — native DTI and super-resolved maps — as BIDS files with
JSON sidecars, written by data sinks (names from ``iqt_pipe/data/io_spec.json``)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from iqt_pipe.io import tensor_sidecar
from iqt_pipe.sr.superres import MAP_SIDECARS
from iqt_pipe.tracking.files import STREAMLINE_COLUMNS, SUMMARY_COLUMNS

#: Label of the ``res-`` entity of super-resolved outputs (each sidecar's Resolution says what it means).
SR_RES = "hi"

_TENSOR = {"model": "tensor", "suffix": "dwimap"}
_SR_TENSOR = {"res": SR_RES, **_TENSOR}
_MASK = {"desc": "brain", "suffix": "mask"}
_DIFFUSIVITY = "mm^2/s"

#: Native-grid outputs of ``init_dti_wf``: inputnode field → (entities, sidecar fields).
NATIVE_DERIVATIVES: dict[str, tuple[dict, dict]] = {
    "tensor_file": ({**_TENSOR, "param": "tensor"}, tensor_sidecar({
        "Description": "Diffusion tensor fitted at the native resolution, world (scanner RAS) frame"})),
    "fa_file": ({**_TENSOR, "param": "fa"},
                {"Description": "Fractional anisotropy of the tensor fit", "Units": "arbitrary"}),
    "md_file": ({**_TENSOR, "param": "md"},
                {"Description": "Mean diffusivity of the tensor fit", "Units": _DIFFUSIVITY}),
    "mask_file": (_MASK, {"Description": "Brain mask: the supplied one, or DIPY's median_otsu on the "
                                         "mean b=0 image", "Type": "Brain"}),
}  # fmt:skip

#: Super-resolved outputs of ``init_sr_wf``: inputnode field → (entities, sidecar fields,
#: optional). Optional maps exist only for models with that part of the uncertainty.
SR_DERIVATIVES: dict[str, tuple[dict, dict, bool]] = {
    "sr_tensor_file": ({**_SR_TENSOR, "param": "tensor"}, tensor_sidecar({
        "Description": "Super-resolved diffusion tensor: mean of the predictive distribution, "
                       "world (scanner RAS) frame",
        "Model": {"Description": "Diffusion tensor super-resolved by Bayesian Image Quality Transfer "
                                 "(3D-ESPCN) from the native-resolution tensor fit"}}), False),
    "sr_fa_file": ({**_SR_TENSOR, "param": "fa"}, MAP_SIDECARS["fa"], False),
    "sr_fa_sd_file": ({**_SR_TENSOR, "param": "fa", "desc": "sd"}, MAP_SIDECARS["fasd"], False),
    "sr_md_file": ({**_SR_TENSOR, "param": "md"}, MAP_SIDECARS["md"], False),
    "sr_md_sd_file": ({**_SR_TENSOR, "param": "md", "desc": "sd"}, MAP_SIDECARS["mdsd"], False),
    "sr_sd_intrinsic_file": ({**_SR_TENSOR, "param": "tensor", "desc": "intrinsicsd"}, MAP_SIDECARS["sdint"], True),
    "sr_sd_parameter_file": ({**_SR_TENSOR, "param": "tensor", "desc": "parametersd"}, MAP_SIDECARS["sdpar"], True),
    "sr_sd_total_file": ({**_SR_TENSOR, "param": "tensor", "desc": "totalsd"}, MAP_SIDECARS["sdtot"], True),
    "sr_mask_file": ({"res": SR_RES, **_MASK}, MAP_SIDECARS["mask"], False),
}  # fmt:skip


def init_outputs_wf(*, output_dir: str, name: str = "outputs_wf") -> Workflow:
    """Write the native DTI and super-resolved derivatives of one DWI run, with sidecars.

    Names follow BEP016 (``model-``, ``param-``, ``res-``, ``desc-``; ``_dwimap``,
    ``_mask``) and are derived from ``source_file`` by :class:`~iqt_pipe.interfaces.bids.DerivativesDataSink`.
    Each sidecar holds the map's Description and Units (tensors: BEP016's
    OrientationEncoding and TensorComponents), ``Sources`` as BIDS URIs, ``Resolution``
    with the voxel size and ``SoftwareVersions``; super-resolved maps add the model's
    provenance (``sr_metadata``). Maps a model does not produce (intrinsic, parameter or
    total sd) are skipped.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from iqt_pipe.workflows.outputs import init_outputs_wf
            wf = init_outputs_wf(output_dir="derivatives/iqt-pipe")

    Parameters
    ----------
    output_dir
        Root of the derivative dataset (files go to ``sub-<label>[/ses-<label>]/dwi/``).

    Inputs
    ------
    source_file
        The raw DWI series (its entities name the outputs; ``Sources`` of native maps).
    tensor_file, fa_file, md_file, mask_file
        ``init_dti_wf``'s native-resolution outputs.
    sr_tensor_file, sr_fa_file, sr_fa_sd_file, sr_md_file, sr_md_sd_file, sr_mask_file
        ``init_sr_wf``'s outputs.
    sr_sd_intrinsic_file, sr_sd_parameter_file, sr_sd_total_file
        ``init_sr_wf``'s uncertainty maps; undefined where the model lacks that part.
    metadata
        ``init_dti_wf``'s run-time fields of the native tensor's sidecar.
    sr_metadata
        ``init_sr_wf``'s provenance (model sha256, variant, r, samples, seed, device).
    upsample
        Super-resolution factor r per axis (for the sidecars' Resolution).

    Outputs
    -------
    tensor_file, fa_file, ..., sr_mask_file
        Paths of the written derivatives (undefined for skipped maps).
    """
    workflow = Workflow(name=name)
    fields = [*NATIVE_DERIVATIVES, *SR_DERIVATIVES]
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["source_file", *fields, "metadata", "sr_metadata", "upsample"]), name="inputnode"
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=fields), name="outputnode")
    # Sources of the super-resolved maps: the native tensor and mask as written.
    native_sources = pe.Node(niu.Merge(2), name="native_sources", run_without_submitting=True)

    connections = []
    for field, (entities, sidecar) in NATIVE_DERIVATIVES.items():
        meta, sink = _sink_nodes(field, entities, sidecar, output_dir, optional=False)
        connections += _sink_connections(inputnode, outputnode, field, meta, sink)
        connections.append((inputnode, meta, [("source_file", "raw_sources")]))
        if field == "tensor_file":
            connections.append((inputnode, meta, [("metadata", "provenance")]))
        if field in ("tensor_file", "mask_file"):
            connections.append((sink, native_sources, [("out_file", "in1" if field == "tensor_file" else "in2")]))
    for field, (entities, sidecar, optional) in SR_DERIVATIVES.items():
        meta, sink = _sink_nodes(field, entities, sidecar, output_dir, optional=optional)
        connections += _sink_connections(inputnode, outputnode, field, meta, sink)
        connections += [
            (inputnode, meta, [("sr_metadata", "provenance"), ("upsample", "upsample")]),
            (native_sources, meta, [("out", "derived_sources")]),
        ]
    workflow.connect(connections)
    return workflow


#: Sidecar of a tractogram (shared by its .tck, .trk and per-streamline .tsv): what it is and
#: the TSV's columns (BIDS tabular-file style); the tracking settings and counts come at run time.
TRACTOGRAM_SIDECAR = {
    "Description": "Whole-brain streamlines in world (scanner RAS) millimetres; the .trk header holds the "
    "tracked image's grid and, per streamline, length_mm and (super-resolved tensors) "
    "mean_uncertainty and max_uncertainty, which the .tsv lists too",
    **{column: {"Description": text} for column, text in STREAMLINE_COLUMNS.items()},
}
TDI_SIDECAR = {"Description": "Track-density image: streamlines passing through each voxel", "Units": "streamlines"}
SUMMARY_SIDECAR = {
    "Description": "Tractography of this DWI run: one row per tractogram",
    **{column: {"Description": text} for column, text in SUMMARY_COLUMNS.items()},
}


def init_tractography_outputs_wf(
    *, output_dir: str, keys: list[str], name: str = "tractography_outputs_wf"
) -> Workflow:
    """Write the tractography of one DWI run (``init_tractography_wf``'s outputs) as derivatives.

    Per tractogram ``<space>_<software><algorithm>``:
    ``[_res-hi]_model-tensor_track-<software><algorithm>_tractogram.{tck,trk,tsv,json}`` and
    ``..._tdi.{nii.gz,json}`` (``res-hi`` for the super-resolved tensors); per run:
    ``_model-tensor_desc-summary_tractogram.{tsv,json}``. Names come from ``io_spec.json``.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from iqt_pipe.workflows.outputs import init_tractography_outputs_wf
            wf = init_tractography_outputs_wf(output_dir="derivatives/iqt-pipe", keys=["sr_dipydet"])

    Parameters
    ----------
    output_dir
        Root of the derivative dataset (files go to ``sub-<label>[/ses-<label>]/dwi/``).
    keys
        The tractograms to write (:func:`~iqt_pipe.workflows.tractography.tractogram_keys`).

    Inputs
    ------
    source_file
        The raw DWI series (its entities name the outputs).
    tensor_file, sr_tensor_file, sr_sd_total_file
        The native and super-resolved tensors and the uncertainty map as written (``Sources``).
    <key>_tck, <key>_trk, <key>_tsv, <key>_tdi, <key>_metadata
        ``init_tractography_wf``'s outputs; ``summary_file`` its summary.
    upsample
        Super-resolution factor r per axis (for the track-density sidecars' Resolution).

    Outputs
    -------
    <key>_tck, <key>_tdi, summary_file
        Paths of the written derivatives.
    """
    from iqt_pipe.workflows.tractography import TRACTOGRAM_FIELDS

    workflow = Workflow(name=name)
    fields = [f"{k}_{f}" for k in keys for f in TRACTOGRAM_FIELDS]
    sources = ["source_file", "tensor_file", "sr_tensor_file", "sr_sd_total_file"]
    inputnode = pe.Node(niu.IdentityInterface(fields=[*sources, "upsample", *fields, "summary_file"]), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=[*(f"{k}_{f}" for k in keys for f in ("tck", "tdi")), "summary_file"]),
        name="outputnode",
    )
    sr_sources = pe.Node(niu.Merge(2), name="sr_sources", run_without_submitting=True)
    connections = [(inputnode, sr_sources, [("sr_tensor_file", "in1"), ("sr_sd_total_file", "in2")])]
    for key in keys:
        connections += _tractogram_sinks(inputnode, outputnode, sr_sources, key, output_dir)
    connections += _summary_sink(inputnode, outputnode, output_dir)
    workflow.connect(connections)
    return workflow


def _tractogram_sinks(inputnode, outputnode, sr_sources, key: str, output_dir: str) -> list:
    """The sinks of one tractogram: its .tck with the sidecar (``Sources``: the tensor it was tracked on, and for
    super-resolved ones the uncertainty map), the .trk and .tsv beside it, and its track-density image with its
    own sidecar (``Sources``: the .tck as written)."""
    from iqt_pipe.interfaces.bids import DerivativesDataSink
    from iqt_pipe.workflows.tractography import split_key

    space, sw, alg = split_key(key)
    entities = {"model": "tensor", "track": f"{sw}{alg}", **({"res": SR_RES} if space == "sr" else {})}
    meta, tck_sink = _sink_nodes(
        f"{key}_tck",
        {**entities, "suffix": "tractogram", "compress": False},
        TRACTOGRAM_SIDECAR,
        output_dir,
        optional=False,
    )
    connections = [  # no in_file for the sidecar: a tractogram has no voxel size of its own
        (inputnode, meta, [(f"{key}_metadata", "provenance")]),
        (sr_sources, meta, [("out", "derived_sources")])
        if space == "sr"
        else (inputnode, meta, [("tensor_file", "derived_sources")]),
        (inputnode, tck_sink, [("source_file", "source_file"), (f"{key}_tck", "in_file")]),
        (meta, tck_sink, [("meta_dict", "meta_dict")]),
        (tck_sink, outputnode, [("out_file", f"{key}_tck")]),
    ]
    for ext in ("trk", "tsv"):  # beside the .tck, sharing its sidecar
        other = pe.Node(
            DerivativesDataSink(base_directory=str(output_dir), suffix="tractogram", compress=False, **entities),
            name=f"ds_{key}_{ext}",
            run_without_submitting=True,
        )
        connections.append((inputnode, other, [("source_file", "source_file"), (f"{key}_{ext}", "in_file")]))
    meta, sink = _sink_nodes(f"{key}_tdi", {**entities, "suffix": "tdi"}, TDI_SIDECAR, output_dir, optional=False)
    meta.inputs.super_resolved = space == "sr"
    if sw == "mrtrix":
        # tckmap's header says its 3-D image's time unit is seconds; niworkflows would rewrite the
        # whole image (gunzip, gzip at level 9: 3 s for a super-resolved one, in the scheduler's
        # process) to drop the unit. Its codes and spatial units are already the derivative's.
        sink.inputs.check_hdr = False
    connections += _sink_connections(inputnode, outputnode, f"{key}_tdi", meta, sink)
    connections.append((tck_sink, meta, [("out_file", "derived_sources")]))
    if space == "sr":
        connections.append((inputnode, meta, [("upsample", "upsample")]))
    return connections


def _summary_sink(inputnode, outputnode, output_dir: str) -> list:
    """The sink of the run's tractography summary TSV and its sidecar (``Sources``: the raw series)."""
    meta, sink = _sink_nodes(
        "summary_file",
        {"model": "tensor", "desc": "summary", "suffix": "tractogram", "compress": False},
        SUMMARY_SIDECAR,
        output_dir,
        optional=False,
    )
    return [  # no in_file for the sidecar: a TSV has no voxel size
        (inputnode, meta, [("source_file", "raw_sources")]),
        (inputnode, sink, [("source_file", "source_file"), ("summary_file", "in_file")]),
        (meta, sink, [("meta_dict", "meta_dict")]),
        (sink, outputnode, [("out_file", "summary_file")]),
    ]


def _sink_nodes(field: str, entities: dict, sidecar: dict, output_dir: str, optional: bool):
    """The sidecar node and the data sink of one output."""
    from iqt_pipe.interfaces.bids import DerivativesDataSink, OptionalDerivativesDataSink, SidecarMetadata

    stem = field.removesuffix("_file")
    sink_class = OptionalDerivativesDataSink if optional else DerivativesDataSink
    meta = pe.Node(SidecarMetadata(fields=sidecar, super_resolved=field.startswith("sr_")), name=f"meta_{stem}",
                   run_without_submitting=True)  # fmt:skip
    sink = pe.Node(sink_class(base_directory=str(output_dir), **entities), name=f"ds_{stem}",
                   run_without_submitting=True)  # fmt:skip
    return meta, sink


def _sink_connections(inputnode, outputnode, field: str, meta, sink) -> list:
    return [
        (inputnode, meta, [(field, "in_file")]),
        (inputnode, sink, [("source_file", "source_file"), (field, "in_file")]),
        (meta, sink, [("meta_dict", "meta_dict")]),
        (sink, outputnode, [("out_file", field)]),
    ]
