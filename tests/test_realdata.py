"""Real multi-vendor scans (../shared/data/ds-realdwi): every run loads, masks and fits,
with physiological values; Philips scale factors are applied exactly once."""

import nibabel as nb
import numpy as np
import pytest
from helpers import REALDWI, real_runs
from scipy.ndimage import binary_erosion

from iqt_pipe.dmri import dti
from iqt_pipe.dmri.dwi import load_dwi
from iqt_pipe.dmri.fit import brain_mask, fit_dti

pytestmark = pytest.mark.realdata
RUNS = real_runs() or [REALDWI / "absent"]


def white_matter(fit, mask, maps):
    core = binary_erosion(mask, iterations=2) & fit.mask
    return core, core & (maps["fa"] > 0.35)


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.name.removesuffix("_dwi.nii.gz"))
def test_every_run_loads_masks_and_fits(realdwi, path):
    series = load_dwi(path)
    assert series.data.dtype == np.float32 and np.all(np.isfinite(series.data))
    mask = brain_mask(series.data, series.gtab, series.zooms)
    assert 0.1 < mask.mean() < 0.5, "brain mask covers an implausible fraction of the field of view"
    fit = fit_dti(series.data, series.affine, series.gtab, mask=mask)
    assert np.all(np.isfinite(fit.tensors))
    maps = dti.scalar_maps(fit.tensors)
    core, wm = white_matter(fit, mask, maps)
    assert wm.sum() > 2000
    # Physiological white matter: MD 0.6–0.8e-3 mm²/s at b=1000, a little lower at b=2000
    # (non-Gaussian diffusion); FA of coherent white matter 0.4–0.6.
    assert 0.5e-3 < np.median(maps["md"][wm]) < 0.9e-3
    assert 0.38 < np.median(maps["fa"][wm]) < 0.6
    # Brain (CSF included) has a higher MD than white matter.
    assert np.median(maps["md"][core]) > np.median(maps["md"][wm])
    # Every brain voxel is fitted, those whose signal reached 0 in some diffusion-weighted
    # volume too (up to 3 % of the brain on these scans): cerebrospinal fluid, with an MD
    # well above white matter's, up to free water's (3e-3 mm²/s at 37 °C; measured 1.49–2.43e-3).
    assert (mask & ~fit.mask).mean() < 1e-3
    dropped = mask & fit.mask & np.any(series.data[..., fit.volumes] <= 0, axis=-1)
    if dropped.sum() > 50:
        assert 1.2e-3 < np.median(maps["md"][dropped]) < 3.5e-3
        assert np.quantile(maps["md"][dropped], 0.99) < 6e-3


def test_scale_factors_applied_exactly_once(realdwi):
    path = realdwi / "sub-achieva01/dwi/sub-achieva01_dwi.nii.gz"
    img = nb.load(path)
    slope, inter = img.dataobj.slope, img.dataobj.inter
    assert slope > 100  # this Philips scan carries a large scl_slope
    raw = np.asanyarray(img.dataobj.get_unscaled()).astype(np.float64)
    series = load_dwi(path)
    np.testing.assert_allclose(series.data, raw * slope + inter, rtol=1e-6)
    # Tensors do not depend on a global intensity scale: fitting the unscaled integers
    # gives the same tensors, and S0 carries the scale.
    mask = brain_mask(series.data, series.gtab, series.zooms)
    scaled = fit_dti(series.data, series.affine, series.gtab, mask=mask)
    unscaled = fit_dti(raw.astype(np.float32), series.affine, series.gtab, mask=mask)
    np.testing.assert_allclose(scaled.tensors, unscaled.tensors, atol=1e-7)
    ratio = np.median(scaled.s0[scaled.mask] / unscaled.s0[scaled.mask])
    assert ratio == pytest.approx(slope, rel=1e-4)
    maps = dti.scalar_maps(scaled.tensors)
    _, wm = white_matter(scaled, mask, maps)
    assert 0.7e-3 < np.median(maps["md"][wm]) < 0.85e-3  # b=1000, measured 0.79e-3


def test_fa_md_equal_dipy_fit(realdwi):
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    series = load_dwi(realdwi / "sub-galan01/dwi/sub-galan01_run-1_dwi.nii.gz")
    mask = brain_mask(series.data, series.gtab, series.zooms)
    fit = fit_dti(series.data, series.affine, series.gtab, mask=mask)
    ours = dti.scalar_maps(dti.tensors_voxel_to_world(fit.tensors, series.affine))
    g = series.gtab.subset(fit.volumes)
    data = series.data[..., fit.volumes]
    positive = fit.mask & np.all(data > 0, axis=-1)  # elsewhere DIPY's floor (1e-4) is not ours
    assert positive.sum() > 0.95 * fit.mask.sum()
    theirs = TensorModel(gradient_table(g.bvals, bvecs=g.bvecs), fit_method="WLS").fit(
        data[positive].astype(np.float64)
    )
    np.testing.assert_allclose(ours["fa"][positive], theirs.fa, atol=1e-5)
    np.testing.assert_allclose(ours["md"][positive], theirs.md, atol=1e-9)
