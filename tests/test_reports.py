"""Visual reports (iqt_pipe.reports): figure functions on synthetic data (world positions,
colour bars and their units, thresholds, streamline colours, deterministic files), the
methods text, and end to end: ``iqt-pipe participant --tractography dipy`` then ``group``
write ``sub-01.html`` and ``group.html``, which open in headless Chromium with every image
loaded, no console error and every local link resolving; ``--reports-only`` rebuilds them
byte for byte, follows changed outputs and refuses an empty folder; a failed run's crash
file shows in its participant's report."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import numpy as np
import pytest

from iqt_pipe.dmri.degrade import upsample_affine
from iqt_pipe.qc import DEFAULT_SD_THRESHOLD
from iqt_pipe.reports import figures as F
from iqt_pipe.reports.citations import cite, methods_html, parse_bibtex
from iqt_pipe.sims.phantom import make_phantom

SVG = "{http://www.w3.org/2000/svg}"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FAST = [
    "--denoise",
    "dipy",
    "--no-degibbs",
    "--mc-samples",
    "2",
    "--nprocs",
    "2",
    "--omp-nthreads",
    "1",
    "--skip-bids-validation",
]
#: Reportlets of a run without / with DIPY tractography.
RUN_FIGURES = [
    "summary.html",
    "qc.html",
    "colourfa.svg",
    "scalars.svg",
    "uncertainty.svg",
    "histogram.svg",
    "thumbnail.png",
]
TRACT_FIGURES = ["tracts.html", "dipydet.png", "dipyprob.png"]
SUBJECT_FIGURES = ["about.html", "methods.html", "errors.html"]


# --------------------------------------------------------------------------- synthetic data


def upsampled(vol: F.Volume, r: int = 2) -> F.Volume:
    """Each voxel as an r×r×r block on the r-fold finer grid: what a perfect SR would give."""
    data = np.asarray(vol.data).repeat(r, 0).repeat(r, 1).repeat(r, 2)
    return F.Volume(data, upsample_affine(vol.affine, r))


@pytest.fixture(scope="module")
def phantoms():
    """The same noise-free phantom on an RAS grid and on a permuted, flipped (PIR) one."""
    out = {}
    for orientation in ("RAS", "PIR"):
        p = make_phantom("tiny", seed=3, snr=None, orientation=orientation)
        out[orientation] = (F.Volume(p.tensors_world, p.affine), F.Volume(p.mask.astype(np.float32), p.affine))
    return out


def svg_texts(path: Path) -> list[str]:
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def svg_ids(path: Path) -> list[str]:
    return [el.get("id") for el in ET.parse(path).getroot().iter() if el.get("id")]


# --------------------------------------------------------------------------- figure functions


def test_planes_sample_each_image_through_its_own_affine(phantoms):
    tensors, mask = phantoms["RAS"]
    positions = F.slice_positions(mask, 5, "z")
    z = (np.argwhere(mask.data > 0) @ mask.affine[:3, :3].T + mask.affine[:3, 3])[:, 2]
    assert len(positions) == 5 and np.all(np.diff(positions) > 0)
    assert z.min() < positions[0] and positions[-1] < z.max()
    np.testing.assert_allclose(positions, np.round(positions, 1))
    lo, hi = F.world_bounds(mask)
    plane = F.make_plane("z", positions[2], lo, hi, 3.25)
    assert np.all(plane.points[..., 2] == positions[2]) and plane.label == f"z = {positions[2]:.1f} mm"
    assert np.all(np.diff(plane.points[0, :, 0]) > 0) and np.all(np.diff(plane.points[:, 0, 1]) > 0)
    # A volume whose value is its voxel's world x: the plane reads back each point's x,
    # to half a voxel, on both grids.
    for key in ("RAS", "PIR"):
        _, m = phantoms[key]
        ijk = np.indices(m.data.shape).reshape(3, -1).T
        world_x = (ijk @ m.affine[:3, :3].T + m.affine[:3, 3])[:, 0].reshape(m.data.shape)
        got = F.sample_plane(F.Volume(world_x, m.affine), plane)
        inside = np.isfinite(got)
        assert inside.mean() > 0.9
        assert np.abs(got[inside] - plane.points[..., 0][inside]).max() <= 6.5 / 2 + 1e-6
    outside = F.make_plane("z", 1e4, lo, hi, 3.25)
    assert np.isnan(F.sample_plane(mask, outside)).all()


def test_colour_fa_mosaic_shows_native_and_sr_at_the_same_world_positions(phantoms, tmp_path):
    tensors, mask = phantoms["RAS"]
    sr, sr_mask = upsampled(tensors), upsampled(mask)
    fig, info = F.colour_fa_mosaic(tensors, sr, mask, sr_mask, n_slices=6)
    path = F.save_figure(fig, tmp_path / "cfa.svg")
    positions = info["positions"]
    assert len(positions) == 6 and positions == list(F.slice_positions(mask, 6, "z"))
    # Each column shows one world position in both rows: the panel ids say so, and a perfect
    # (block-copy) super-resolution gives the native panel's colours pixel for pixel.
    ids = svg_ids(path)
    for pos in positions:
        assert f"native_z_{pos:.1f}" in ids and f"sr_z_{pos:.1f}" in ids
    titles = [t for t in svg_texts(path) if t.startswith("z = ")]
    assert titles == [f"z = {p:.1f} mm" for p in positions]
    nat, sup = info["rows"]["native"]["panels"], info["rows"]["sr"]["panels"]
    for a, b in zip(nat, sup):
        assert a.shape == b.shape and a.shape[-1] == 3
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert max(p.max() for p in nat) > 0.5  # white matter shows, bright
    # The same brain on a permuted and flipped grid (PIR) gives the same panels: the images are
    # looked up through their own affines, at the same world points.
    pir, pir_mask = phantoms["PIR"]
    _, info_pir = F.colour_fa_mosaic(pir, upsampled(pir), mask, upsampled(pir_mask), n_slices=6)
    for a, b in zip(sup, info_pir["rows"]["sr"]["panels"]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Colours are world directions: a tensor along world x is pure red, along z pure blue.
    d = np.zeros((3, 3, 3, 6), np.float32)
    d[..., 0], d[..., 3], d[..., 5] = 1.7e-3, 0.2e-3, 0.2e-3
    one = F.Volume(d, np.diag([2.0, 2.0, 2.0, 1.0]))
    rgb = F.colour_fa_plane(one, F.make_plane("z", 2.0, np.zeros(3) - 1, np.full(3, 5.0), 2.0))
    assert rgb[1, 1, 0] > 0.7 and rgb[1, 1, 1] == pytest.approx(0) and rgb[1, 1, 2] == pytest.approx(0)


def test_uncertainty_and_scalar_mosaics_have_colour_bars_with_units(phantoms, tmp_path):
    tensors, mask = phantoms["RAS"]
    sr_mask = upsampled(mask)
    rng = np.random.default_rng(0)
    shape = sr_mask.data.shape
    maps = {
        "intrinsic": F.Volume(rng.uniform(0.5e-4, 1.5e-4, shape), sr_mask.affine),
        "parameter": F.Volume(rng.uniform(0.1e-4, 0.5e-4, shape), sr_mask.affine),
    }
    maps["total"] = F.Volume(np.hypot(maps["intrinsic"].data, maps["parameter"].data), sr_mask.affine)
    fa = F.Volume(rng.uniform(0, 1, shape), sr_mask.affine)
    fig, info = F.uncertainty_mosaic(fa, maps, mask, sr_mask, n_slices=4)
    path = F.save_figure(fig, tmp_path / "unc.svg")
    texts = svg_texts(path)
    for name in ("intrinsic", "parameter", "total"):
        assert f"{name} sd (10⁻⁴ mm²/s)" in texts
        assert info["rows"][name]["limits"] == info["rows"]["total"]["limits"]  # one scale for all three
    vmax = info["rows"]["total"]["limits"][1]
    total_in_mask = maps["total"].data[sr_mask.data > 0]
    assert vmax == pytest.approx(np.percentile(total_in_mask, 99) / 1e-4)
    assert info["positions"] == list(F.slice_positions(mask, 4, "z"))
    shown = info["rows"]["total"]["panels"][1]
    assert np.nanmax(shown) < 2.0 and np.nanmin(shown) > 0.4  # displayed in units of 1e-4 mm²/s
    assert len([i for i in svg_ids(path) if i.startswith(("intrinsic_z", "parameter_z", "total_z"))]) == 12

    md = F.Volume(np.full(mask.data.shape, 0.8e-3), mask.affine)
    fa_nat = F.Volume(np.full(mask.data.shape, 0.4), mask.affine)
    sd = F.Volume(np.full(shape, 0.05), sr_mask.affine)
    md_sd = F.Volume(np.full(shape, 0.3e-4), sr_mask.affine)
    fig, info = F.scalar_maps_mosaic(fa_nat, md, fa, sd, upsampled(md), md_sd, mask, sr_mask)
    texts = svg_texts(F.save_figure(fig, tmp_path / "scalars.svg"))
    assert "MD (10⁻³ mm²/s)" in texts and "MD sd (10⁻⁴ mm²/s)" in texts and "FA (unitless)" in texts
    assert info["rows"]["native_md"]["limits"] == info["rows"]["sr_md"]["limits"]
    assert np.nanmax(info["rows"]["sr_md"]["panels"][0]) == pytest.approx(0.8)
    assert np.nanmax(info["rows"]["sr_md_sd"]["panels"][0]) == pytest.approx(0.3)


def test_histogram_marks_the_threshold_and_the_tractography_limit(tmp_path):
    values = np.concatenate([np.full(750, 1.0e-4), np.full(200, 1.8e-4), np.full(50, 3.0e-4), [np.nan]])
    fig, info = F.uncertainty_histogram(values, DEFAULT_SD_THRESHOLD, max_uncertainty=2.5e-4)
    texts = svg_texts(F.save_figure(fig, tmp_path / "hist.svg"))
    assert info["n"] == 1000 and info["fraction_above"] == pytest.approx(0.25)
    assert info["fraction_above_max"] == pytest.approx(0.05) and info["threshold"] == 1.5e-4
    assert "risky-voxel threshold 1.5e-4 mm²/s: 25.0 % above" in texts
    assert "--max-uncertainty 2.5e-4 mm²/s: 5.0 % above" in texts
    assert "total sd of the super-resolved tensor (10⁻⁴ mm²/s)" in texts
    assert info["xlim"][1] > 3.0  # every value and line is on the axis
    _, low = F.uncertainty_histogram(np.full(10, 1e-5))
    assert low["xlim"][1] >= 1.5 and low["fraction_above"] == 0 and "fraction_above_max" not in low
    with pytest.raises(ValueError, match="no finite"):
        F.uncertainty_histogram(np.array([np.nan]))


def test_streamlines_figure_colours_by_direction_and_uncertainty(tmp_path):
    from PIL import Image

    from iqt_pipe.tracking.files import save_trk

    x_line = np.stack([np.linspace(-40, 40, 30), np.zeros(30), np.zeros(30)], axis=1)
    z_line = np.stack([np.zeros(30), np.zeros(30), np.linspace(-30, 30, 30)], axis=1)
    segs = np.stack([x_line[:-1], x_line[1:]], axis=1)
    np.testing.assert_allclose(F.direction_colours(segs), np.tile([1.0, 0, 0], (len(segs), 1)))
    np.testing.assert_allclose(F.direction_colours(np.stack([z_line[:-1], z_line[1:]], axis=1))[0], [0, 0, 1])
    lines = [x_line + [0, 2 * i, 0] for i in range(1200)] + [z_line + [i, 0, 0] for i in range(300)]
    unc = np.linspace(1e-4, 3e-4, len(lines))
    save_trk(lines, tmp_path / "sr.trk", np.diag([2.0, 2, 2, 1]), (50, 50, 50), {"mean_uncertainty": unc})
    sr = F.load_tractogram(tmp_path / "sr.trk", "super-resolved")
    assert len(sr.streamlines) == 1500 and np.allclose(sr.uncertainty, unc, rtol=1e-6)
    native = F.Tractogram(lines[:400], None, "native")
    fig, info = F.streamlines_figure(native, sr, "test", max_streamlines=1000)
    path = F.save_figure(fig, tmp_path / "tracts.png")
    assert info["n_total"] == {"native": 400, "sr": 1500} and info["n_drawn"] == {"native": 400, "sr": 1000}
    lo, hi = info["uncertainty_limits"]
    assert 1.0 < lo < hi < 3.0  # 2nd–98th percentile, in 10⁻⁴ mm²/s
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape[0] > 400 and img.shape[1] > 800
    red = (img[..., 0] > 150) & (img[..., 1] < 80) & (img[..., 2] < 80)
    blue = (img[..., 2] > 150) & (img[..., 0] < 80) & (img[..., 1] < 80)
    assert red.sum() > 500 and blue.sum() > 50  # x streamlines red, z streamlines blue
    assert F.subsample(10, 20).tolist() == list(range(10))
    assert np.array_equal(F.subsample(100, 7, seed=1), F.subsample(100, 7, seed=1))


def test_figures_are_written_atomically_and_reproducibly(phantoms, tmp_path):
    tensors, mask = phantoms["RAS"]
    for name in ("a.svg", "b.svg", "t1.png", "t2.png"):
        fig, _ = (
            F.colour_fa_mosaic(tensors, upsampled(tensors), mask, n_slices=3)
            if name.endswith(".svg")
            else F.thumbnail(upsampled(tensors), mask)
        )
        F.save_figure(fig, tmp_path / name)
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()
    assert (tmp_path / "t1.png").read_bytes() == (tmp_path / "t2.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svg", "b.svg", "t1.png", "t2.png"]
    text = (tmp_path / "a.svg").read_text()
    assert "<dc:date>" not in text and "z = " in text  # no time stamp; text kept as text
    with pytest.raises(ValueError, match="svg or .png"):
        F.save_figure(fig, tmp_path / "x.pdf")


def test_the_model_card_counts_dwi_runs_not_block_grid_alignments():
    """The bundled model trained on 22 runs, each at the 8 alignments of the block grid: its
    card's ``training.runs`` names 176 LR series; the report counts the runs and says why."""
    from iqt_pipe.models import read_card
    from iqt_pipe.models.files import bundled_model
    from iqt_pipe.reports.build import _training_data

    training = read_card(bundled_model(2))["training"]
    assert len(training["runs"]) == 8 * len(training["dwi_runs"]) == 176
    assert _training_data(training) == (
        "ds-realdwi: 8 subject(s), 22 run(s) × 8 block-grid alignments, 64032 patch pairs"
    )
    one_grid = dict(training, dwi_runs=None, patches={"total": 12})
    assert _training_data(one_grid).endswith("8 subject(s), 176 run(s), 12 patch pairs")
    registered = dict(one_grid, patches={"total": 12, "registered_volumes": True})
    assert _training_data(registered).endswith("176 run(s) (volumes registered), 12 patch pairs")


def test_methods_text_cites_readably():
    bib = parse_bibtex("""
@article{one, author = {Tanno, Ryutaro and Worrall, Daniel E. and Kaden, Enrico}, title = {Uncertainty {MRI}},
  journal = {NeuroImage}, volume = {225}, pages = {1--9}, year = {2021}, doi = {10.1/x}}
@misc{two, author = "Doe, Jane", title = {Solo}, year = 2019}""")
    assert bib["one"]["pages"] == "1–9" and bib["one"]["title"] == "Uncertainty MRI" and bib["two"]["year"] == "2019"
    assert cite(bib["one"], "one") == "Tanno et al., 2021" and cite(bib["two"], "two", narrative=True) == "Doe (2019)"
    text = methods_html(
        "# Methods\n\nFitted with <DIPY> [@one; @two], as in\n@one and `code`.\n\n"
        "Unknown [@nope].\n\nCitation keys refer to the bib.",
        """@article{one, author = {Tanno, Ryutaro and Worrall, Daniel E. and Kaden, Enrico},
                        title = {T}, journal = {NeuroImage}, year = {2021}, doi = {10.1/x}}
                        @misc{two, author = {Doe, Jane}, title = {Solo}, year = {2019}}""",
        [("logs/CITATION.md", "CITATION.md")],
    )
    assert "(Tanno et al., 2021; Doe, 2019)" in text and "Tanno et al. (2021) and <code>code</code>" in text
    assert "&lt;DIPY&gt;" in text and "(?nope)" in text and "Citation keys" not in text and "# Methods" not in text
    assert (
        text.count("<li>") == 2 and 'href="https://doi.org/10.1/x"' in text and "Tanno R, Worrall DE, Kaden E" in text
    )


def test_group_report_highlights_outliers(browser, tmp_path):
    """Five runs, one far off in white-matter uncertainty: its row and that cell stand out,
    in the HTML and as the browser draws it; runs without a report are not linked."""
    from iqt_pipe.qc import METRIC_COLUMNS, group_table, write_group_qc
    from iqt_pipe.reports import build_group_report

    rows = []
    for i, sd in enumerate([1.0e-4, 1.1e-4, 0.9e-4, 1.05e-4, 6.0e-4], start=1):
        row = {key: 1.0 for key in METRIC_COLUMNS}
        row.update(
            subject=f"{i:02d}",
            sdtot_wm_median=sd,
            sdtot_frac_above=0.1 + 0.01 * i,
            fa_wm_median_ratio=1.0 + 0.01 * i,
            md_wm_median_ratio=1.0 - 0.01 * i,
        )
        rows.append(row)
    write_group_qc(group_table(rows), tmp_path / "group_qc.tsv", tmp_path / "group_qc.txt")
    (tmp_path / "sub-05.html").write_text("<!DOCTYPE html><title>sub-05</title>")
    page = build_group_report(tmp_path).read_text()
    body = page.split("<tbody>")[1]
    trs = re.findall(r'<tr class="([^"]*)">(.*?)</tr>', body)
    assert [cls for cls, _ in trs] == ["", "", "", "", "iqt-outlier"]
    assert trs[4][1].count('class="iqt-flag"') == 1 and 'title="sdtot_wm_median"' in trs[4][1]
    assert '<a href="sub-05.html">sub-05</a>' in trs[4][1] and "yes: sdtot_wm_median" in trs[4][1]
    assert "<a " not in trs[0][1] and "no image" in trs[0][1]  # no report, no derivatives: no link, no image
    assert "<strong>1</strong> outlier run(s)" in page and ">6 <span" in trs[4][1]  # 6e-4 shown as 6 (10⁻⁴ mm²/s)
    driver, serve = browser
    check_page(driver, serve(tmp_path), tmp_path, "group.html", tmp_path / "group.png")
    colours = driver.execute_script("""return Array.from(document.querySelectorAll('tbody tr')).map(
        tr => Array.from(tr.cells).map(td => getComputedStyle(td).backgroundColor))""")
    assert len(set(colours[4])) == 2 and colours[4][0] != colours[0][0]  # the outlier row and its flagged cell
    assert len(set(colours[0])) == 1


# --------------------------------------------------------------------------- end to end
# --------------------------------------------------------------------------- end to end


def iqt_pipe(*args, check_rc=0):
    proc = subprocess.run([sys.executable, "-m", "iqt_pipe.cli.run", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


def digests(out: Path) -> dict[str, str]:
    files = [out / "sub-01.html", out / "group.html", *sorted((out / "sub-01" / "figures").iterdir())]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Two tiny subjects; sub-01 processed with DIPY tractography, then the group level."""
    from helpers import tiny_dataset_and_model

    tmp = tmp_path_factory.mktemp("reports")
    root, _ = tiny_dataset_and_model(tmp, n_subjects=2, seed=1)
    out = tmp / "out"
    part = iqt_pipe(
        root,
        out,
        "participant",
        "--participant-label",
        "01",
        "--model",
        tmp / "model",
        "-w",
        tmp / "work",
        *FAST,
        "--tractography",
        "dipy",
        "--seed-density",
        "0.02",
        "--max-uncertainty",
        "1e-3",
    )
    group = iqt_pipe(root, out, "group", "--skip-bids-validation")
    return root, out, part, group


def test_participant_and_group_write_the_reports(e2e):
    root, out, part, group = e2e
    assert f"visual report {out / 'sub-01.html'}" in part.stdout
    assert f"group report {out / 'group.html'}" in group.stdout
    names = sorted(p.name for p in (out / "sub-01" / "figures").iterdir())
    expected = sorted(f"sub-01_desc-{n.replace('.', '_dwi.')}" for n in RUN_FIGURES + TRACT_FIGURES + SUBJECT_FIGURES)
    assert names == expected
    page = (out / "sub-01.html").read_text()
    for section in ("Summary", "Diffusion", "Methods", "Errors"):
        assert f'<section id="{section.lower()}">' in page
    for fig in (out / "sub-01" / "figures").glob("*"):
        if fig.suffix in (".svg", ".png") and "thumbnail" not in fig.name:
            assert f'src="./sub-01/figures/{fig.name}"' in page, fig.name
    assert "cdn." not in page and "<script" not in page  # self-contained: opens offline
    assert "No errors recorded" in page and "hetero-var2" in page and "super-resolved; 4 tractograms" in page
    assert "b = 1000 s/mm²" in page and "30 (30 distinct directions)" in page
    assert "(Tanno et al., 2017; Tanno et al., 2021)" in page and "doi.org/10.1016/j.neuroimage.2020.117366" in page
    assert "--max-uncertainty 1e-3 mm²/s (stop)" in page
    # The QC numbers of the report are the group table's.
    row = dict(zip(*[line.split("\t") for line in (out / "group_qc.tsv").read_text().splitlines()[:2]]))
    assert f"{F.sci(float(row['sdtot_wm_median']))} mm²/s" in page
    assert f"{100 * float(row['sdtot_frac_above']):.1f} %" in page
    group_page = (out / "group.html").read_text()
    assert (
        '<a href="sub-01.html"><img class="iqt-thumb" src="sub-01/figures/sub-01_desc-thumbnail_dwi.png"' in group_page
    )
    assert "Outliers are not assessed" in group_page
    assert f"{float(row['sdtot_wm_median']) / 1e-4:.3g}" in group_page
    hist = svg_texts(out / "sub-01" / "figures" / "sub-01_desc-histogram_dwi.svg")
    assert any(t.startswith("risky-voxel threshold 1.5e-4 mm²/s") for t in hist)
    assert any(t.startswith("--max-uncertainty 1e-3 mm²/s") for t in hist)
    # Derivatives stay as they were: figures go to figures/, reports to the root.
    assert not list((out / "sub-01" / "dwi").glob("*.svg")) and not list((out / "sub-01" / "dwi").glob("*.html"))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def browser():
    """Headless Debian Chromium through selenium, and a localhost server for a folder."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (test extras)")
    from selenium.webdriver.chrome.service import Service

    for exe in (CHROMIUM, CHROMEDRIVER):
        if not exe.exists():
            pytest.skip(
                f"{exe} not found: install Debian's chromium and chromium-driver (scripts/setup.sh does as root)"
            )
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="iqt-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    servers = []

    def serve(folder: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield driver, serve
    driver.quit()
    for server in servers:
        server.shutdown()
    shutil.rmtree(profile, ignore_errors=True)


def check_page(driver, base: str, folder: Path, page: str, screenshot: Path) -> dict:
    """Open a page and check it as a reviewer's browser shows it; returns what it found."""
    url = urljoin(base, page)
    driver.get_log("browser")  # empties the log: what follows is this page's
    driver.get(url)
    found = driver.execute_script("""
        const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
        return {
          images: Array.from(document.images).map(
            i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]),
          objects: Array.from(document.querySelectorAll('object, embed')).map(
            o => [o.getAttribute('data') || o.getAttribute('src'),
                  box(o), o.contentDocument ? box(o.contentDocument.documentElement) : [0, 0]]),
          svgs: Array.from(document.querySelectorAll('svg')).map(box),
          links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
          ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
          height: document.documentElement.scrollHeight,
        };""")
    for src, complete, width, height in found["images"]:
        assert complete and width > 0 and height > 0, f"{page}: image {src} did not load"
    for src, own, inner in found["objects"]:
        assert min(own) > 0 and min(inner) > 0, f"{page}: object {src} did not load"
    for width, height in found["svgs"]:
        assert width > 0 and height > 0, f"{page}: an inline SVG has no size"
    ids = set(found["ids"])
    for href in found["links"]:
        target = urlparse(urljoin(url, href))
        if target.netloc != urlparse(base).netloc:
            assert target.scheme == "https", f"{page}: link {href} is neither local nor https"
            continue
        path = folder / unquote(target.path).lstrip("/")
        assert path.is_file(), f"{page}: link {href} resolves to nothing"
        if target.fragment and path.name == page:
            assert unquote(target.fragment) in ids, f"{page}: anchor {href} missing"
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"{page}: console errors {errors}"
    driver.set_window_size(1280, min(int(found["height"]) + 50, 12000))
    assert driver.save_screenshot(str(screenshot))
    return found


def assert_screenshot(path: Path, min_height: int) -> None:
    from PIL import Image

    img = Image.open(path)
    assert img.size[0] >= 1000 and img.size[1] >= min_height
    colours = img.convert("RGB").resize((200, 200 * img.size[1] // img.size[0])).getcolors(1 << 20)
    assert len(colours) > 200  # figures drawn, not a blank or error page


def test_reports_open_in_headless_chromium(e2e, browser, tmp_path):
    _, out, _, _ = e2e
    driver, serve = browser
    base = serve(out)
    found = check_page(driver, base, out, "sub-01.html", tmp_path / "sub-01.png")
    srcs = [src for src, *_ in found["images"]]
    assert len(srcs) == 6 and sum(s.endswith(".svg") for s in srcs) == 4  # 4 SVG mosaics/plots + 2 streamline PNGs
    assert {"summary", "diffusion", "methods", "errors"} <= set(found["ids"])
    assert any(h.startswith("sub-01/log/") and h.endswith("iqt-pipe.toml") for h in found["links"])
    assert_screenshot(tmp_path / "sub-01.png", 3000)
    found = check_page(driver, base, out, "group.html", tmp_path / "group.png")
    assert [src for src, *_ in found["images"]] == ["sub-01/figures/sub-01_desc-thumbnail_dwi.png"]
    assert "sub-01.html" in found["links"] and "group_qc.tsv" in found["links"]
    assert_screenshot(tmp_path / "group.png", 300)
    # file:// too (a report opened from a file manager): the images load there as well.
    driver.get((out / "sub-01.html").as_uri())
    loaded = driver.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert loaded


def test_reports_only_rebuilds_identical_reports_and_follows_the_outputs(e2e, tmp_path):
    root, built, _, _ = e2e
    out = tmp_path / "out"
    shutil.copytree(built, out)
    before = digests(out)
    shutil.rmtree(out / "sub-01" / "figures")
    (out / "sub-01.html").unlink()
    (out / "group.html").unlink()
    proc = iqt_pipe(root, out, "participant", "--reports-only")
    assert proc.stdout.strip() == f"iqt-pipe: visual report {out / 'sub-01.html'}"  # no processing
    iqt_pipe(root, out, "group", "--reports-only")
    assert digests(out) == before
    assert not list((out / "sub-01" / "figures").glob(".*"))  # atomic writes leave nothing behind
    # Outputs that change change the report: without the probabilistic tractograms their figure goes.
    for path in (out / "sub-01" / "dwi").glob("*track-dipyprob_tractogram.*"):
        path.unlink()
    iqt_pipe(root, out, "participant", "--reports-only", "--participant-label", "sub-01")
    assert not (out / "sub-01" / "figures" / "sub-01_desc-dipyprob_dwi.png").exists()
    page = (out / "sub-01.html").read_text()
    assert "desc-dipyprob" not in page and "desc-dipydet_dwi.png" in page and "super-resolved; 2 tractograms" in page
    # A model without uncertainty (espcn) has no uncertainty maps: no uncertainty figures, and no QC.
    for path in (out / "sub-01" / "dwi").glob("*sd_dwimap.*"):
        if "desc-intrinsicsd" in path.name or "desc-parametersd" in path.name or "desc-totalsd" in path.name:
            path.unlink()
    iqt_pipe(root, out, "participant", "--reports-only")
    figures = sorted(p.name for p in (out / "sub-01" / "figures").iterdir())
    assert "sub-01_desc-uncertainty_dwi.svg" not in figures and "sub-01_desc-histogram_dwi.svg" not in figures
    assert "sub-01_desc-colourfa_dwi.svg" in figures
    assert "QC metrics not available: no total-uncertainty map" in (out / "sub-01.html").read_text()


def test_every_run_of_a_subject_gets_its_section(e2e, tmp_path):
    """Two runs in a session: nireports' ordering gives each its own section with all of its
    reportlets, named after the run."""
    from iqt_pipe.reports import build_subject_report_with_problems

    _, built, _, _ = e2e
    out = tmp_path / "out"
    shutil.copytree(built, out, ignore=lambda folder, names: [n for n in names if n in ("dwi", "figures")])
    dwi = out / "sub-01" / "ses-1" / "dwi"
    dwi.mkdir(parents=True)
    for run in (1, 2):
        for path in (built / "sub-01" / "dwi").iterdir():
            if "dipyprob" not in path.name:
                shutil.copy(path, dwi / path.name.replace("sub-01_", f"sub-01_ses-1_run-{run}_"))
    report, problems = build_subject_report_with_problems(out, "01")
    assert problems == []
    page = report.read_text()
    nav = re.findall(r'<li><a href="#([^"]+)">([^<]+)</a></li>', page)
    assert [text for _, text in nav] == ["session 1, run 1.", "session 1, run 2."]
    for run in (1, 2):
        for fig in ("colourfa_dwi.svg", "uncertainty_dwi.svg", "histogram_dwi.svg", "dipydet_dwi.png"):
            assert f'src="./sub-01/figures/sub-01_ses-1_run-{run}_desc-{fig}"' in page
    assert page.count("Native vs super-resolved colour FA") == 2 and "desc-dipyprob" not in page


def test_figures_drawn_side_by_side_equal_one_by_one(e2e, tmp_path):
    """A run's figures drawn by forked processes are the same bytes as drawn one by one, and a
    figure that fails in a process is shown as such in its place, the others drawn."""
    from iqt_pipe.reports import build_subject_report_with_problems

    _, built, _, _ = e2e
    figures = {}
    for processes in (1, 3):
        out = tmp_path / str(processes)
        shutil.copytree(built, out)
        report, problems = build_subject_report_with_problems(out, "01", processes=processes)
        assert problems == []
        figures[processes] = digests(out)
    assert figures[1] == figures[3] and len(figures[1]) > 8
    (md,) = (out / "sub-01" / "dwi").glob("sub-01_model-tensor_param-md_dwimap.nii.gz")  # native MD: one figure
    md.write_bytes(b"not a NIfTI file")
    report, problems = build_subject_report_with_problems(out, "01", processes=3)
    assert len(problems) == 1 and problems[0].startswith("sub-01 FA/MD maps: "), problems
    scalars = out / "sub-01" / "figures" / "sub-01_desc-scalars_dwi.html"
    assert "Could not draw the FA/MD maps" in scalars.read_text()
    assert not scalars.with_suffix(".svg").exists()
    colourfa = "sub-01/figures/sub-01_desc-colourfa_dwi.svg"
    assert digests(out)[colourfa] == figures[1][colourfa]


def test_reports_only_refuses_a_folder_without_outputs(e2e, tmp_path):
    root, built, _, _ = e2e
    for level, message in (
        ("participant", "no iqt-pipe participant outputs to build reports from"),
        ("group", "no group_qc.tsv to build group.html from; run the group level first"),
    ):
        proc = iqt_pipe(root, tmp_path / "empty", level, "--reports-only", check_rc=2)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        (tmp_path / "empty").mkdir(exist_ok=True)
        proc = iqt_pipe(root, tmp_path / "empty", level, "--reports-only", check_rc=2)
        assert message in proc.stderr and proc.stderr.count("\n") == 1
    proc = iqt_pipe(root, built, "participant", "--reports-only", "--participant-label", "02", check_rc=2)
    assert "no iqt-pipe outputs of sub-02" in proc.stderr and proc.stderr.count("\n") == 1
    assert not list((tmp_path / "empty").iterdir())


def _crash_in(log_dir: Path, bval: Path) -> Path:
    """A genuine Nipype crash file: a workflow node that reads a broken gradient table."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    def read_table(bval, bvec):
        from iqt_pipe.dmri.gradients import read_gradients

        return read_gradients(bval, bvec)

    wf = pe.Workflow(name="sub_02_wf", base_dir=str(log_dir.parent.parent / "work"))
    node = pe.Node(
        niu.Function(input_names=["bval", "bvec"], output_names=["table"], function=read_table), name="read_gradients"
    )
    node.inputs.bval, node.inputs.bvec = str(bval), str(bval.with_suffix(".bvec"))
    wf.add_nodes([node])
    wf.config["execution"].update({"crashdump_dir": str(log_dir), "crashfile_format": "txt"})
    with pytest.raises(RuntimeError):
        wf.run(plugin="Linear")
    crashes = sorted(log_dir.glob("crash-*.txt"))
    assert len(crashes) == 1
    return crashes[0]


def test_report_of_a_failed_run_shows_its_crash(e2e, browser, tmp_path):
    from iqt_pipe.config import RunConfig

    root, built, _, _ = e2e
    out = tmp_path / "out"
    shutil.copytree(built, out)
    shutil.rmtree(out / "work", ignore_errors=True)
    # sub-02's run failed: its log folder holds the run configuration and the crash file, and
    # it has no derivatives.
    config = RunConfig.from_toml(next((out / "sub-01" / "log").glob("*/iqt-pipe.toml")))
    config = dataclasses.replace(config, output_dir=out, participant_label=("02",), run_uuid="20300101-120000_failed")
    log = config.archive("02")
    bad = tmp_path / "bad" / "sub-02_dwi.bval"
    bad.parent.mkdir()
    bad.write_text("0 1000 x\n")
    bad.with_suffix(".bvec").write_text("0 1 0\n")
    crash = _crash_in(log.parent, bad)
    proc = iqt_pipe(root, out, "participant", "--reports-only", "--participant-label", "02")
    assert f"visual report {out / 'sub-02.html'}" in proc.stdout
    page = (out / "sub-02.html").read_text()
    assert "1 processing step(s) failed" in page and "sub_02_wf.read_gradients" in page
    assert f'href="sub-02/log/20300101-120000_failed/{crash.name}"' in page
    last = next(line for line in reversed(crash.read_text().splitlines()) if line.strip())
    assert "bval" in last and html.escape(last.strip()) in page  # the error itself
    assert "no derivatives: the run failed or was not processed" in page and "sub-02_dwi.nii.gz" in page
    driver, serve = browser
    check_page(driver, serve(out), out, "sub-02.html", tmp_path / "sub-02.png")
    assert_screenshot(tmp_path / "sub-02.png", 500)
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"


@pytest.mark.slow
def test_participant_level_failure_still_writes_both_reports(e2e, browser, tmp_path):
    """A step failing at run time (MRtrix3's dwidenoise, wrapped to fail on sub-02): the
    participant level exits 1 and still writes sub-02.html with the crash, and sub-01.html."""
    from helpers import mrtrix_failing_on

    root = e2e[0]
    env = mrtrix_failing_on(tmp_path, "sub-02")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iqt_pipe.cli.run",
            str(root),
            str(out),
            "participant",
            "--model",
            str(root.parent / "model"),
            "-w",
            str(tmp_path / "work"),
            *[a if a != "dipy" else "mrtrix" for a in FAST],
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (
        f"visual report {out / 'sub-01.html'}" in proc.stdout and f"visual report {out / 'sub-02.html'}" in proc.stdout
    )
    failed = (out / "sub-02.html").read_text()
    assert "simulated scanner-file failure" in failed and "no derivatives: the run failed" in failed
    assert "No errors recorded" in (out / "sub-01.html").read_text()
    driver, serve = browser
    base = serve(out)
    check_page(driver, base, out, "sub-02.html", tmp_path / "sub-02.png")
    check_page(driver, base, out, "sub-01.html", tmp_path / "sub-01.png")


def test_model_card_network_text():
    """The network as the report names it: the card's kernels and widths, the paper's when the
    card has none."""
    from iqt_pipe.reports.build import _network

    assert _network({"kernels": [3, 3, 3], "widths": [64, 128]}) == "3-3-3 × 64-128"
    assert _network({}) == "3-1-3 × 50-100"
