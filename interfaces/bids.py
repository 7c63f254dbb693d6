"""Writing BIDS derivatives: iqt-pipe's data sinks and the sidecar metadata they write.

Names come from ``iqt_pipe/data/io_spec.json`` (entities and path patterns), merged into
niworkflows' ``DerivativesDataSink``; no file name is assembled by hand. Importing this
module imports niworkflows' BIDS interfaces, which index TemplateFlow (a few seconds).
"""

from __future__ import annotations

import json
from importlib import resources

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
from niworkflows.interfaces.bids import DerivativesDataSink as _BaseDerivativesDataSink
from niworkflows.interfaces.bids import _DerivativesDataSinkInputSpec

IO_SPEC = json.loads((resources.files("iqt_pipe.data") / "io_spec.json").read_text())

#: Software whose versions every sidecar records (distribution names).
SOFTWARE = ("iqt-pipe", "torch", "nipype", "dipy")


def _copy_reproducible_gzip(src, dst) -> bool:
    """niworkflows' ``_copy_any``, except that a gzip file without a file name or time stamp
    in its header (nibabel writes them so) is copied as it is: niworkflows would decompress it
    and compress it again at level 9 to drop those fields, which takes longer than writing it
    and saves <1 % of the size of a float image."""
    import os
    import shutil

    from niworkflows.utils.misc import _copy_any

    if os.fspath(src).endswith(".gz") and os.fspath(dst).endswith(".gz"):
        with open(src, "rb") as fh:
            head = fh.read(10)
        if len(head) == 10 and head[:2] == b"\x1f\x8b" and not head[3] & 0x08 and head[4:8] == bytes(4):
            if os.path.exists(dst):
                os.unlink(dst)
            shutil.copyfile(src, dst)
            return True
    return _copy_any(src, dst)


class DerivativesDataSink(_BaseDerivativesDataSink):
    """niworkflows' ``DerivativesDataSink`` with iqt-pipe's entities and path patterns.

    Writes under ``base_directory`` itself (``out_path_base = ""``) and gzips NIfTI files
    unless ``compress=False`` is given (niworkflows leaves them as they come). The source
    file's ``desc`` is dropped (``dismiss_entities``): a preprocessed input's ``desc-preproc``
    describes the input, not the derivative; its other entities (``space``, ``acq``, ``dir``,
    ``run``…) carry over. Entities are read below the nearest ``sub-`` folder of the source,
    whatever the folders above it are called. ``res`` is
    pybids' name for the ``res-`` entity; with it the sink keeps the ``Resolution`` the
    caller puts in ``meta_dict`` (niworkflows' ``resolution`` would replace it).

    >>> sink = DerivativesDataSink(model="tensor", param="fa", suffix="dwimap")
    >>> sink.inputs.compress
    [True]
    """

    out_path_base = ""
    _config_entities = frozenset(entity["name"] for entity in IO_SPEC["entities"])
    _config_entities_dict = IO_SPEC["entities"]
    _file_patterns = tuple(IO_SPEC["default_path_patterns"])

    def __init__(self, allowed_entities=None, out_path_base=None, **inputs):
        inputs.setdefault("compress", True)
        inputs.setdefault("dismiss_entities", ["desc"])
        super().__init__(allowed_entities=allowed_entities, out_path_base=out_path_base, **inputs)

    def _run_interface(self, runtime):
        """niworkflows writes straight into the output folder (deleting an existing file
        first); here it writes into the node's own folder, and each finished file then
        replaces its destination atomically, so a killed run never leaves a partial one."""
        import shutil
        from pathlib import Path

        import niworkflows.interfaces.bids as niworkflows_bids

        from iqt_pipe.io import move_atomic

        final = Path(self.inputs.base_directory if isdefined(self.inputs.base_directory) else runtime.cwd).absolute()
        stage = Path(runtime.cwd, "staged").absolute()
        shutil.rmtree(stage, ignore_errors=True)
        self.inputs.base_directory = str(stage)
        copy_any = niworkflows_bids._copy_any
        niworkflows_bids._copy_any = _copy_reproducible_gzip
        try:
            runtime = super()._run_interface(runtime)
        finally:
            niworkflows_bids._copy_any = copy_any
            self.inputs.base_directory = str(final)

        def moved(path: str) -> str:
            dest = final / Path(path).relative_to(stage)
            move_atomic(path, dest)
            return str(dest)

        # Data first, sidecar last: a kill in between never pairs a new sidecar with old data.
        files = self._results.get("out_file", [])
        self._results["out_file"] = moved(files) if isinstance(files, str) else [moved(f) for f in files]
        if "out_meta" in self._results:
            self._results["out_meta"] = moved(self._results["out_meta"])
        shutil.rmtree(stage, ignore_errors=True)  # the emptied folders (a sink run outside a workflow: in its cwd)
        return runtime


class _OptionalDerivativesDataSinkInputSpec(_DerivativesDataSinkInputSpec):
    in_file = InputMultiObject(File(exists=True), desc="the file to save; nothing is written when undefined")


class OptionalDerivativesDataSink(DerivativesDataSink):
    """A :class:`DerivativesDataSink` for outputs that only some runs produce (e.g. the
    intrinsic-uncertainty map of a model without a noise network): an undefined
    ``in_file`` writes nothing instead of failing the workflow."""

    input_spec = _OptionalDerivativesDataSinkInputSpec

    def _run_interface(self, runtime):
        if not isdefined(self.inputs.in_file):
            return runtime
        return super()._run_interface(runtime)


class _SidecarMetadataInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, desc="image the sidecar describes (its voxel size goes into Resolution)")
    fields = traits.Dict(Str, traits.Any, usedefault=True, desc="fields known when the workflow is built")
    provenance = traits.Dict(Str, traits.Any, usedefault=True, desc="fields known at run time (SuperResolve's)")
    raw_sources = InputMultiObject(Str, desc="inputs in the raw dataset (Sources as bids:raw:<path>)")
    derived_sources = InputMultiObject(Str, desc="inputs in this derivative dataset (Sources as bids::<path>)")
    super_resolved = traits.Bool(False, usedefault=True, desc="the image is on the super-resolved grid")
    upsample = traits.Int(desc="super-resolution factor r per axis (else the provenance's Model.UpsampleFactor)")


class _SidecarMetadataOutputSpec(TraitedSpec):
    meta_dict = traits.Dict(Str, traits.Any, desc="the sidecar, for DerivativesDataSink's meta_dict")


class SidecarMetadata(SimpleInterface):
    """The JSON sidecar of one derivative: the static ``fields``, the run-time
    ``provenance`` (dictionaries under the same key are merged), ``Sources`` as BIDS URIs,
    ``Resolution`` from the image's voxel size, and ``SoftwareVersions``."""

    input_spec = _SidecarMetadataInputSpec
    output_spec = _SidecarMetadataOutputSpec

    def _run_interface(self, runtime):
        provenance = self.inputs.provenance if isdefined(self.inputs.provenance) else {}
        meta = merge_metadata(self.inputs.fields, provenance)
        sources = [bids_uri(path, "raw") for path in _listify(self.inputs.raw_sources)]
        sources += [bids_uri(path) for path in _listify(self.inputs.derived_sources)]
        if sources:
            meta["Sources"] = sources
        if isdefined(self.inputs.in_file):
            upsample = self.inputs.upsample if isdefined(self.inputs.upsample) else None
            if self.inputs.super_resolved and upsample is None:
                upsample = provenance.get("Model", {}).get("UpsampleFactor")
            meta["Resolution"] = resolution_sentence(self.inputs.in_file, self.inputs.super_resolved, upsample)
        meta["SoftwareVersions"] = software_versions()
        self._results["meta_dict"] = meta
        return runtime


def merge_metadata(fields: dict, provenance: dict) -> dict:
    """``fields`` updated by ``provenance``; where both hold a dictionary under the same
    key, the two are merged (so a tensor's ``Model`` description keeps the network's
    provenance beside it)."""
    merged = dict(fields)
    for key, value in provenance.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def bids_uri(path: str, dataset: str = "") -> str:
    """``bids:<dataset>:<path from the subject folder's parent>`` (BIDS URI; an empty
    dataset name means the dataset the sidecar belongs to)."""
    from niworkflows.utils.bids import relative_to_root

    return f"bids:{dataset}:{relative_to_root(path).as_posix()}"


def resolution_sentence(path: str, super_resolved: bool = False, upsample: int | None = None) -> str:
    """What the ``res`` entity (or its absence) means for this image, with its voxel size."""
    import nibabel as nb

    zooms = nb.load(path).header.get_zooms()[:3]
    size = " × ".join(f"{z:.4g}" for z in zooms) + " mm voxels"
    if not super_resolved:
        return f"Native grid of the source DWI series: {size}."
    factor = f" {upsample}× per axis" if upsample else ""
    return f"Super-resolved{factor} from the native grid by Bayesian Image Quality Transfer: {size}."


def software_versions() -> dict[str, str]:
    """Installed versions of the software behind the derivatives (without importing it)."""
    from importlib import metadata

    from iqt_pipe import __version__

    versions = {}
    for name in SOFTWARE:
        try:
            versions[name] = __version__ if name == "iqt-pipe" else metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _listify(value) -> list:
    if not isdefined(value):
        return []
    return [value] if isinstance(value, str) else list(value)
