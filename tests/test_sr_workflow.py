"""Super-resolution in Nipype: the SuperResolve interface and ``init_sr_wf`` embedded in
someone else's workflow (the README's example), against the core functions."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_dataset_and_model

from iqt_pipe.dmri import dti
from iqt_pipe.dmri.degrade import upsample_affine
from iqt_pipe.io import load_nifti
from iqt_pipe.models import load_model
from iqt_pipe.sr.baselines import interpolate_tensors
from iqt_pipe.sr.inference import expand_mask, predict_brain, prediction_region
from iqt_pipe.sr.options import DEFAULT_PRECISION, DEFAULT_SYMMETRIES, SYMMETRIES


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sr")
    root, _ = tiny_dataset_and_model(tmp, seed=6, snr=40)
    return root / "sub-01" / "dwi" / "sub-01_dwi", tmp / "model", tmp


def test_sr_workflow_embedded_in_another_workflow(setup):
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from iqt_pipe.interfaces import FitDTI
    from iqt_pipe.workflows import init_sr_wf

    run, model_dir, tmp = setup
    # Someone else's pipeline: their own inputs and DTI step, then iqt-pipe's super-resolution.
    theirs = pe.Workflow(name="their_pipeline", base_dir=str(tmp / "work"))
    source = pe.Node(niu.IdentityInterface(fields=["dwi", "bval", "bvec"]), name="source")
    source.inputs.dwi, source.inputs.bval, source.inputs.bvec = (f"{run}.nii.gz", f"{run}.bval", f"{run}.bvec")
    fit = pe.Node(FitDTI(), name="fit")
    sr_wf = init_sr_wf(model=str(model_dir), mc_samples=3, scalar_samples=6, seed=2)
    sink = pe.Node(niu.IdentityInterface(fields=["sr_tensor", "sd_total", "fa_sd", "metadata"]), name="sink")
    theirs.connect([
        (source, fit, [("dwi", "dwi_file"), ("bval", "bval_file"), ("bvec", "bvec_file")]),
        (fit, sr_wf, [("tensor_file", "inputnode.tensor_file"), ("mask_file", "inputnode.mask_file")]),
        (sr_wf, sink, [("outputnode.tensor_file", "sr_tensor"), ("outputnode.sd_total_file", "sd_total"),
                       ("outputnode.fa_sd_file", "fa_sd"), ("outputnode.metadata", "metadata")]),
    ])  # fmt:skip
    graph = theirs.run(plugin="Linear")
    sr_node = next(n for n in graph.nodes() if n.name == "super_resolve")
    out = sr_node.result.outputs
    fit_out = next(n for n in graph.nodes() if n.name == "fit").result.outputs

    # The same computation by the core functions, with the app's defaults.
    lr_world, lr_affine, _ = load_nifti(fit_out.tensor_file)
    lr_mask = load_nifti(fit_out.mask_file)[0] > 0
    model, _ = load_model(model_dir)
    pred = predict_brain(
        model,
        dti.tensors_world_to_voxel(lr_world, lr_affine),
        lr_mask,
        lr_affine,
        mc_samples=3,
        scalar_samples=6,
        seed=2,
        precision=DEFAULT_PRECISION,
        symmetries=SYMMETRIES[DEFAULT_SYMMETRIES],
    )
    hr_world, hr_affine, _ = load_nifti(out.tensor_file)
    np.testing.assert_allclose(hr_affine, upsample_affine(lr_affine, 2), atol=1e-5)
    assert hr_world.shape == tuple(2 * s for s in lr_mask.shape) + (6,)
    np.testing.assert_allclose(hr_world, dti.tensors_voxel_to_world(pred.mean, hr_affine), atol=1e-9)
    np.testing.assert_allclose(load_nifti(out.sd_total_file)[0], pred.sd_frobenius, rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(load_nifti(out.mask_file)[0] > 0, pred.mask)
    # The whole brain: the rim around the mask (2 LR voxels, the receptive field) is predicted
    # too, with its uncertainty; farther out the tensors are the cubic B-spline, with no sd.
    region = expand_mask(prediction_region(lr_mask, 2), 2)
    np.testing.assert_array_equal(pred.region, region)
    assert region.sum() > 1.2 * pred.mask.sum()
    sd_total = load_nifti(out.sd_total_file)[0]
    assert np.all(sd_total[region] > 0) and not sd_total[~region].any()
    cubic = interpolate_tensors(dti.tensors_world_to_voxel(lr_world, lr_affine), 2, "cubic")
    np.testing.assert_allclose(pred.mean[~region], cubic[~region], atol=1e-9)

    card = json.loads((model_dir / "model.json").read_text())
    assert out.metadata["Model"]["WeightsSHA256"] == card["weights"]["sha256"]
    # 3 weight samples asked, 8 mirrors by default: 8 passes, each its own weight sample.
    assert out.metadata["MonteCarloSamples"] == 8 and out.metadata["TestTimeSymmetries"] == 8
    assert out.metadata["Seed"] == 2 and out.metadata["Precision"] in ("float32", "bfloat16")
    assert out.metadata["Model"]["Target"] == "residual-cubic"
    assert "tanno2017" in sr_wf.__desc__


def test_write_prediction_sidecars(setup, tmp_path):
    from iqt_pipe.interfaces import FitDTI
    from iqt_pipe.sr.superres import load_tensor_image, prediction_metadata, super_resolve_tensors, write_prediction

    run, model_dir, _ = setup
    (tmp_path / "fit").mkdir()
    fit = FitDTI(dwi_file=f"{run}.nii.gz", bval_file=f"{run}.bval", bvec_file=f"{run}.bvec").run(
        cwd=str(tmp_path / "fit")
    )
    model, card = load_model(model_dir)
    pred = super_resolve_tensors(
        *load_tensor_image(fit.outputs.tensor_file, fit.outputs.mask_file), model, mc_samples=2
    )
    paths = write_prediction(pred, tmp_path / "out" / "sub-01", prediction_metadata(card, pred))
    assert sorted(paths) == sorted(["tensor", "fa", "fasd", "md", "mdsd", "sdint", "sdpar", "sdtot", "mask"])
    for name, path in paths.items():
        side = json.loads(Path(str(path).replace(".nii.gz", ".json")).read_text())
        assert side["Model"]["WeightsSHA256"] == card["weights"]["sha256"] and side["Seed"] == 0, name
    tensor_side = json.loads(Path(str(paths["tensor"]).replace(".nii.gz", ".json")).read_text())
    assert tensor_side["OrientationEncoding"]["Reference"] == "xyz" and tensor_side["Units"] == "mm^2/s"
    assert json.loads(Path(str(paths["sdtot"]).replace(".nii.gz", ".json")).read_text())["Units"] == "mm^2/s"


def test_super_resolve_declares_gpu_and_refuses_mismatched_mask(setup, tmp_path):
    from nipype.pipeline import engine as pe

    from iqt_pipe.interfaces import FitDTI, SuperResolve
    from iqt_pipe.io import InputError, save_nifti

    run, model_dir, _ = setup
    assert pe.Node(SuperResolve(model="m", use_gpu=True), name="gpu").is_gpu_node()
    assert not pe.Node(SuperResolve(model="m"), name="cpu").is_gpu_node()
    (tmp_path / "fit").mkdir()
    fit = FitDTI(dwi_file=f"{run}.nii.gz", bval_file=f"{run}.bval", bvec_file=f"{run}.bvec").run(
        cwd=str(tmp_path / "fit")
    )
    bad = save_nifti(np.ones((3, 3, 3), np.uint8), np.eye(4), tmp_path / "bad_mask.nii.gz", dtype=np.uint8)
    node = SuperResolve(model=str(model_dir), tensor_file=fit.outputs.tensor_file, mask_file=str(bad))
    with pytest.raises(InputError, match="bad_mask.nii.gz: the mask's grid differs"):
        node.run(cwd=str(tmp_path))
