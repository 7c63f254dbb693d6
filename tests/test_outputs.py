"""Derivatives of one run: BEP016 names, .nii.gz files and JSON sidecars (init_outputs_wf)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec
from nipype.pipeline import engine as pe

from iqt_pipe.workflows.outputs import NATIVE_DERIVATIVES, SR_DERIVATIVES, init_outputs_wf

NATIVE_SHAPE, HR_SHAPE = (8, 9, 7), (16, 18, 14)
SOFTWARE = {"iqt-pipe", "torch", "nipype", "dipy"}

NATIVE_NAMES = [
    "desc-brain_mask",
    "model-tensor_param-tensor_dwimap",
    "model-tensor_param-fa_dwimap",
    "model-tensor_param-md_dwimap",
]
SR_NAMES = [
    "res-hi_desc-brain_mask",
    "res-hi_model-tensor_param-tensor_dwimap",
    "res-hi_model-tensor_param-fa_dwimap",
    "res-hi_model-tensor_param-fa_desc-sd_dwimap",
    "res-hi_model-tensor_param-md_dwimap",
    "res-hi_model-tensor_param-md_desc-sd_dwimap",
    "res-hi_model-tensor_param-tensor_desc-intrinsicsd_dwimap",
    "res-hi_model-tensor_param-tensor_desc-parametersd_dwimap",
    "res-hi_model-tensor_param-tensor_desc-totalsd_dwimap",
]


def expected_tree(folder: str, prefix: str, names: list[str]) -> list[str]:
    return sorted(f"{folder}/{prefix}_{name}{ext}" for name in names for ext in (".json", ".nii.gz"))


def sr_metadata(variant: str) -> dict:
    """What SuperResolve's ``metadata`` output holds (iqt_pipe.sr.superres.prediction_metadata)."""
    return {
        "Model": {"Variant": variant, "UpsampleFactor": 2, "Target": "hr", "WeightsSHA256": "ab" * 32,
                  "Version": "0.1.0"},
        "MonteCarloSamples": 8, "ScalarSamples": 32, "Seed": 7, "Device": "cpu",
    }  # fmt:skip


def write_inputs(folder: Path, intrinsic: bool = True) -> dict[str, str]:
    """Synthetic native (2.5 mm) and super-resolved (1.25 mm) images, named unlike BIDS."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    grids = {"native": (NATIVE_SHAPE, np.diag([2.5, 2.5, 2.5, 1.0])),
             "hr": (HR_SHAPE, np.diag([1.25, 1.25, 1.25, 1.0]))}  # fmt:skip
    paths = {}
    for field in [*NATIVE_DERIVATIVES, *SR_DERIVATIVES]:
        if field == "sr_sd_intrinsic_file" and not intrinsic:
            continue
        shape, affine = grids["hr" if field.startswith("sr_") else "native"]
        if field.endswith("mask_file"):
            data = np.ones(shape, np.uint8)
        elif field.endswith("tensor_file"):
            data = rng.random((*shape, 6), dtype=np.float32) * 1e-3
        else:
            data = rng.random(shape, dtype=np.float32)
        paths[field] = str(folder / f"{field}.nii.gz")
        nb.Nifti1Image(data, affine).to_filename(paths[field])
    return paths


class _SRStandInInputSpec(BaseInterfaceInputSpec):
    sd_parameter_file = File(exists=True)
    sd_total_file = File(exists=True)


class _SRStandInOutputSpec(TraitedSpec):
    sd_intrinsic_file = File()
    sd_parameter_file = File()
    sd_total_file = File()


class SRStandIn(SimpleInterface):
    """Emits the uncertainty maps of a model without a noise network, as SuperResolve
    does: ``sd_intrinsic_file`` stays undefined."""

    input_spec = _SRStandInInputSpec
    output_spec = _SRStandInOutputSpec

    def _run_interface(self, runtime):
        self._results["sd_parameter_file"] = self.inputs.sd_parameter_file
        self._results["sd_total_file"] = self.inputs.sd_total_file
        return runtime


def run_outputs_wf(tmp_path: Path, source: str, inputs: dict, variant: str, undefined_intrinsic: bool = False) -> Path:
    out = tmp_path / "derivatives"
    wf = init_outputs_wf(output_dir=str(out))
    node = wf.get_node("inputnode")
    node.inputs.source_file = source
    node.inputs.sr_metadata = sr_metadata(variant)
    node.inputs.upsample = 2
    for field, path in inputs.items():
        setattr(node.inputs, field, path)
    if undefined_intrinsic:  # the sd maps come from a node, as from init_sr_wf
        parent = pe.Workflow(name="parent", base_dir=str(tmp_path / "work"))
        sr = pe.Node(SRStandIn(sd_parameter_file=inputs["sr_sd_parameter_file"],
                               sd_total_file=inputs["sr_sd_total_file"]), name="sr")  # fmt:skip
        parent.connect([(sr, wf, [("sd_intrinsic_file", "inputnode.sr_sd_intrinsic_file"),
                                  ("sd_parameter_file", "inputnode.sr_sd_parameter_file"),
                                  ("sd_total_file", "inputnode.sr_sd_total_file")])])  # fmt:skip
        parent.run(plugin="Linear")
    else:
        wf.base_dir = str(tmp_path / "work")
        wf.run(plugin="Linear")
    return out


def written(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def check_sidecars(out: Path, files: list[str], raw_uri: str, variant: str) -> None:
    by_name = {Path(f).name: f for f in files}
    for rel in files:
        if rel.endswith(".json"):
            continue
        path = out / rel
        assert path.read_bytes()[:2] == b"\x1f\x8b", f"{rel} is not gzipped"
        img = nb.load(path)
        super_resolved = "_res-hi_" in rel
        assert img.shape[:3] == (HR_SHAPE if super_resolved else NATIVE_SHAPE)
        if "param-tensor_dwimap" in rel:
            assert img.shape[3] == 6
        if rel.endswith("_mask.nii.gz"):
            assert img.get_data_dtype() == np.uint8

        meta = json.loads((out / rel.replace(".nii.gz", ".json")).read_text())
        assert set(meta["SoftwareVersions"]) == SOFTWARE
        assert meta["Description"]
        if rel.endswith("_mask.nii.gz"):
            assert meta["Type"] == "Brain"
        else:
            assert meta["Units"] == ("arbitrary" if "param-fa" in rel else "mm^2/s")
        if "param-tensor_dwimap" in rel:
            assert meta["OrientationEncoding"]["Reference"] == "xyz"
            assert meta["TensorComponents"] == ["D11", "D12", "D13", "D22", "D23", "D33"]
        if super_resolved:
            assert meta["Resolution"].startswith("Super-resolved 2× per axis")
            assert "1.25 × 1.25 × 1.25 mm" in meta["Resolution"]
            assert meta["Model"]["WeightsSHA256"] == "ab" * 32
            assert meta["Model"]["Variant"] == variant
            assert meta["Model"]["UpsampleFactor"] == 2
            assert (meta["MonteCarloSamples"], meta["Seed"], meta["Device"]) == (8, 7, "cpu")
            prefix = Path(rel).name.split("_res-hi_")[0]
            folder = Path(rel).parent.as_posix()
            assert meta["Sources"] == [
                f"bids::{by_name[f'{prefix}_model-tensor_param-tensor_dwimap.nii.gz']}",
                f"bids::{by_name[f'{prefix}_desc-brain_mask.nii.gz']}",
            ]
            assert all(src.startswith(f"bids::{folder}/") for src in meta["Sources"])
        else:
            assert meta["Resolution"] == "Native grid of the source DWI series: 2.5 × 2.5 × 2.5 mm voxels."
            assert meta["Sources"] == [raw_uri]
            assert "MonteCarloSamples" not in meta
    sr_tensor = next(f for f in files if f.endswith("_res-hi_model-tensor_param-tensor_dwimap.json"))
    model = json.loads((out / sr_tensor).read_text())["Model"]
    assert "super-resolved" in model["Description"]  # the tensor's description kept beside the provenance


def test_outputs_with_session_acq_dir_run(tmp_path):
    source = tmp_path / "bids" / "sub-01" / "ses-1" / "dwi" / "sub-01_ses-1_acq-A_dir-AP_run-01_dwi.nii.gz"
    out = run_outputs_wf(tmp_path, str(source), write_inputs(tmp_path / "in"), "hetero-var2")
    files = written(out)
    assert files == expected_tree("sub-01/ses-1/dwi", "sub-01_ses-1_acq-A_dir-AP_run-01", NATIVE_NAMES + SR_NAMES)
    check_sidecars(out, files, "bids:raw:sub-01/ses-1/dwi/sub-01_ses-1_acq-A_dir-AP_run-01_dwi.nii.gz", "hetero-var2")


def test_outputs_without_intrinsic_sd(tmp_path):
    """A model without a noise network: no intrinsicsd file, and the workflow does not fail."""
    source = tmp_path / "bids" / "sub-02" / "dwi" / "sub-02_dwi.nii.gz"
    inputs = write_inputs(tmp_path / "in", intrinsic=False)
    out = run_outputs_wf(tmp_path, str(source), inputs, "espcn-var2", undefined_intrinsic=True)
    files = written(out)
    names = [n for n in NATIVE_NAMES + SR_NAMES if "intrinsicsd" not in n]
    assert files == expected_tree("sub-02/dwi", "sub-02", names)
    check_sidecars(out, files, "bids:raw:sub-02/dwi/sub-02_dwi.nii.gz", "espcn-var2")


def test_sink_gzips_by_default():
    from iqt_pipe.interfaces.bids import DerivativesDataSink

    assert DerivativesDataSink(model="tensor", suffix="dwimap").inputs.compress == [True]
    assert DerivativesDataSink(compress=False, suffix="mask").inputs.compress == [False]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_sink_copies_what_save_nifti_wrote(tmp_path, threads, monkeypatch):
    """Files written by ``save_nifti`` (on one thread or several) already carry the header the
    sink checks (qform/sform code 1, mm) and a reproducible gzip header: it copies them byte
    for byte instead of decompressing them and compressing them again at level 9. Run outside a
    workflow, it leaves nothing in its working folder (its staging folder once did)."""
    from iqt_pipe.interfaces.bids import DerivativesDataSink
    from iqt_pipe.io import save_nifti

    source = tmp_path / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    source.parent.mkdir(parents=True)
    save_nifti(np.zeros((2, 2, 2, 3), np.float32), np.eye(4), source)
    written = save_nifti(
        np.random.default_rng(0).random((5, 6, 7, 6)), np.diag([2, 2, 2, 1]), tmp_path / "t.nii.gz", threads=threads
    )
    sink = DerivativesDataSink(
        base_directory=str(tmp_path / "out"),
        source_file=str(source),
        in_file=str(written),
        model="tensor",
        param="tensor",
        suffix="dwimap",
    )
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    result = sink.run()
    assert result.outputs.fixed_hdr == [False]
    assert Path(result.outputs.out_file).read_bytes() == written.read_bytes()
    assert not any((tmp_path / "cwd").iterdir())


def test_threaded_gzip_is_one_valid_stream_of_the_same_bytes(tmp_path):
    """Chunks deflated on several threads join into one gzip member that gzip, nibabel and
    MRtrix3-style readers decompress to exactly what nibabel itself writes."""
    import gzip

    from iqt_pipe.io import save_nifti, write_gzip

    data = np.random.default_rng(1).random(30000).tobytes() + bytes(70001)
    for chunk in (1000, 2**16, 2**30):  # many chunks, a few, one
        write_gzip(data, tmp_path / "x.gz", threads=2, chunk=chunk)
        assert gzip.decompress((tmp_path / "x.gz").read_bytes()) == data
    write_gzip(b"", tmp_path / "empty.gz", threads=2)
    assert gzip.decompress((tmp_path / "empty.gz").read_bytes()) == b""
    volume = np.random.default_rng(2).random((9, 8, 7, 6)).astype(np.float32)
    one = save_nifti(volume, np.diag([2, 2, 2, 1]), tmp_path / "one.nii.gz")
    two = save_nifti(volume, np.diag([2, 2, 2, 1]), tmp_path / "two.nii.gz", threads=2)
    assert gzip.decompress(one.read_bytes()) == gzip.decompress(two.read_bytes())
    np.testing.assert_array_equal(np.asanyarray(nb.load(two).dataobj), volume)


def test_sidecar_takes_the_factor_from_the_provenance(tmp_path):
    """Without the ``upsample`` input, a super-resolved map still says by how much."""
    from iqt_pipe.interfaces.bids import SidecarMetadata

    image = tmp_path / "hr.nii.gz"
    nb.Nifti1Image(np.zeros(HR_SHAPE, np.float32), np.diag([1.25, 1.25, 1.25, 1.0])).to_filename(image)
    node = SidecarMetadata(in_file=str(image), super_resolved=True, provenance=sr_metadata("hetero"),
                           fields={"Model": {"Description": "kept"}})  # fmt:skip
    meta = node.run(cwd=str(tmp_path)).outputs.meta_dict
    assert meta["Resolution"].startswith("Super-resolved 2× per axis")
    assert meta["Model"]["Description"] == "kept" and meta["Model"]["Variant"] == "hetero"
    assert "Sources" not in meta


@pytest.mark.parametrize(
    "dtype, slope, inter",
    [
        (np.int16, 704.1720581054688, 0.0),  # sub-achieva01's (Philips): scaled here in float32
        (np.uint16, 3.3e-3, 0.0),
        (np.uint8, 2.5e6, 0.0),
        (np.int16, 1.5, 10.0),  # an intercept: nibabel's own scaling
        (np.int32, 704.17, 0.0),  # beyond float32's exact integers: nibabel's
        (np.int16, 1.0, 0.0),  # unscaled
    ],
)
def test_load_nifti_scales_as_nibabel_does(tmp_path, dtype, slope, inter):
    """``load_nifti``'s float32 data equal nibabel's ``get_fdata(dtype=float32)`` to the bit,
    whichever way the scale factors are applied."""
    from iqt_pipe.io import load_nifti

    info = np.iinfo(dtype)
    raw = np.random.default_rng(3).integers(info.min, info.max, (9, 8, 7, 5), endpoint=True).astype(dtype)
    img = nb.Nifti1Image(raw, np.diag([2.0, 2.0, 2.5, 1.0]))
    img.header.set_slope_inter(slope, inter)
    nb.save(img, tmp_path / "s.nii.gz")
    data = load_nifti(tmp_path / "s.nii.gz")[0]
    expected = nb.load(tmp_path / "s.nii.gz").get_fdata(dtype=np.float32)
    assert data.dtype == np.float32 and data.shape == raw.shape
    np.testing.assert_array_equal(data, expected)
    if slope != 1.0:  # the factors were applied, once
        np.testing.assert_allclose(data, raw.astype(np.float64) * np.float32(slope) + inter, rtol=1e-6)
