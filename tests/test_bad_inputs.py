"""Every bad input a user can give ``iqt-pipe participant``: one line on stderr naming the
file (or flag) and the fix, the documented exit code, no traceback, and nothing written into
the output folder.

Each case damages a copy of a tiny synthetic dataset (or a model, or the command line) and
runs the real entry point in this process; a few run the installed console script.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch
from helpers import tiny_dataset_and_model

from iqt_pipe.cli.run import main
from iqt_pipe.models import IQTNet, save_model
from iqt_pipe.sims.dataset import write_bids_dataset

DWI = "sub-01/dwi/sub-01_dwi.nii.gz"
BVAL = "sub-01/dwi/sub-01_dwi.bval"
BVEC = "sub-01/dwi/sub-01_dwi.bvec"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    root, _ = tiny_dataset_and_model(tmp, n_subjects=1, seed=3)
    return root, tmp / "model"


# --------------------------------------------------------------------------- damage helpers


def _edit_image(ds: Path, fn) -> None:
    """Replace the DWI by ``fn(data, affine) -> (data, affine)``."""
    path = ds / DWI
    img = nb.load(path)
    data, affine = fn(np.asarray(img.dataobj).copy(), img.affine.copy())
    new = nb.Nifti1Image(data, affine, img.header.copy())
    new.set_qform(affine, code=1)
    new.set_sform(affine, code=1)
    nb.save(new, path)


def _lines(ds: Path, name: str) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in (ds / name).read_text().splitlines() if line.strip()]


def _write_lines(ds: Path, name: str, rows) -> None:
    (ds / name).write_text("\n".join(" ".join(f"{v:g}" for v in row) for row in rows) + "\n")


def _keep_volumes(ds: Path, keep) -> None:
    keep = np.asarray(keep)
    _edit_image(ds, lambda d, a: (d[..., keep], a))
    _write_lines(ds, BVAL, [np.asarray(_lines(ds, BVAL)[0])[keep]])
    _write_lines(ds, BVEC, np.asarray(_lines(ds, BVEC))[:, keep])


def _set_bvals(ds: Path, fn) -> None:
    _write_lines(ds, BVAL, [fn(np.asarray(_lines(ds, BVAL)[0]))])


def _b0s(ds: Path) -> np.ndarray:
    return np.asarray(_lines(ds, BVAL)[0]) < 50


def _voxel(ds, value):
    def fn(d, a):
        d = d.astype(np.float32)
        d[10, 10, 10, 3] = value
        return d, a

    _edit_image(ds, fn)


def _zero_volume(ds):
    def fn(d, a):
        d = d.copy()
        d[..., 5] = 0
        return d, a

    _edit_image(ds, fn)


def _scale_axis(ds, factor, axis=2):
    def fn(d, a):
        a = a.copy()
        a[:3, axis] *= factor
        return d, a

    _edit_image(ds, fn)


def _shear(ds):
    def fn(d, a):
        a = a.copy()
        a[0, 1] = 0.3 * a[1, 1]
        return d, a

    _edit_image(ds, fn)


def _zero_voxel_size(ds):
    """An sform whose third axis has length 0 (nibabel cannot write that as a qform)."""
    img = nb.load(ds / DWI)
    affine = img.affine.copy()
    affine[:3, 2] = 0
    header = img.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(affine, code=1)
    nb.Nifti1Image(np.asarray(img.dataobj), None, header).to_filename(ds / DWI)


def _zero_pixdim(ds):
    """A valid sform, but a header voxel size (pixdim[3], bytes 88–91) of 0 that FSL-style
    tools would use; patched in the bytes, since nibabel rewrites pixdim from the affine."""
    raw = bytearray(gzip.decompress((ds / DWI).read_bytes()))
    raw[88:92] = np.float32(0).tobytes()
    (ds / DWI).write_bytes(gzip.compress(bytes(raw)))


def _truncate(ds):
    raw = (ds / DWI).read_bytes()
    (ds / DWI).write_bytes(raw[: len(raw) // 2])


def _garbage(ds):
    (ds / DWI).write_bytes(gzip.compress(os.urandom(4000)))


def _multishell_unusable(ds):
    """b=0 plus two shells of 4 directions each: no shell can hold a tensor."""
    b0 = np.flatnonzero(_b0s(ds))[:2]
    dw = np.flatnonzero(~_b0s(ds))[:8]
    _keep_volumes(ds, np.concatenate([b0, dw]))
    _set_bvals(ds, lambda b: np.array([0, 0, 1000, 1000, 1000, 1000, 2500, 2500, 2500, 2500], float))


def _model_bytes(model: Path, fn) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(fn(weights.read_bytes()))


def _model_card(model: Path, **changes) -> None:
    card = json.loads((model / "model.json").read_text())
    card.update(changes)
    (model / "model.json").write_text(json.dumps(card))


def _model_r3_card(model: Path) -> None:
    """A card that claims r = 3 beside r = 2 weights (checksum consistent)."""
    _model_card(model, upsample=3)


def _pickle_model(model: Path) -> None:
    torch.save({"state": 1}, model / "model.safetensors")
    from iqt_pipe.models.files import sha256

    card = json.loads((model / "model.json").read_text())
    card["weights"]["sha256"] = sha256(model / "model.safetensors")
    (model / "model.json").write_text(json.dumps(card))


def _nan_weights(model: Path) -> None:
    torch.manual_seed(0)
    net = IQTNet("hetero-var2", 2)
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    save_model(net, model / "model.safetensors", {"target": "residual-cubic"})


# --------------------------------------------------------------------------- the table

# (id, damage to the dataset copy, damage to the model copy, extra arguments, expected text, exit code)
CASES = [
    ("not-bids", lambda ds: (ds / "dataset_description.json").unlink(), None, [], "not a BIDS dataset", 2),
    ("bids-json-broken", lambda ds: (ds / "dataset_description.json").write_text("{"), None, [], "not valid JSON", 2),
    (
        "no-dwi-for-participant",
        lambda ds: (shutil.rmtree(ds / "sub-01/dwi"), (ds / "sub-01/anat").mkdir()),
        None,
        [],
        "no DWI series",
        2,
    ),
    ("unknown-participant", None, None, ["--participant-label", "07"], "participant label sub-07 not found", 2),
    ("label-path-trick", None, None, ["--participant-label", "../01"], "not a BIDS label", 2),
    ("label-slash", None, None, ["--participant-label", "sub-01/.."], "not a BIDS label", 2),
    ("bval-missing", lambda ds: (ds / BVAL).unlink(), None, [], "no .bval file found", 2),
    ("bval-empty", lambda ds: (ds / BVAL).write_text(""), None, [], "bval file is empty", 2),
    ("bval-wrong-count", lambda ds: _set_bvals(ds, lambda b: b[:-1]), None, [], "b-values but", 2),
    ("bval-not-numeric", lambda ds: (ds / BVAL).write_text("0 1000 abc\n"), None, [], "non-numeric value 'abc'", 2),
    ("bvec-transposed", lambda ds: _write_lines(ds, BVEC, np.asarray(_lines(ds, BVEC)).T), None, [], "transposed", 2),
    (
        "bvec-not-unit",
        lambda ds: _write_lines(ds, BVEC, np.asarray(_lines(ds, BVEC)) * 1.5),
        None,
        [],
        "normalise the vectors",
        2,
    ),
    (
        "bvec-nan",
        lambda ds: _write_lines(
            ds, BVEC, np.where(np.arange(len(_lines(ds, BVEC)[0])) == 3, np.nan, np.asarray(_lines(ds, BVEC)))
        ),
        None,
        [],
        "directions contain NaN or Inf",
        2,
    ),
    ("b0-only", lambda ds: _keep_volumes(ds, np.flatnonzero(_b0s(ds))), None, [], "only b=0 volumes", 2),
    ("no-b0", lambda ds: _keep_volumes(ds, np.flatnonzero(~_b0s(ds))), None, [], "no b=0 volume", 2),
    ("single-volume", lambda ds: _keep_volumes(ds, [0]), None, [], "a single volume is not a DWI series", 2),
    ("three-d", lambda ds: _edit_image(ds, lambda d, a: (d[..., 0], a)), None, [], "must be 4-D", 2),
    ("nan-voxel", lambda ds: _voxel(ds, np.nan), None, [], "NaN or Inf", 2),
    ("inf-voxel", lambda ds: _voxel(ds, np.inf), None, [], "NaN or Inf", 2),
    ("zero-volume", _zero_volume, None, [], "volume 5 is all zero", 2),
    ("all-zero", lambda ds: _edit_image(ds, lambda d, a: (np.zeros_like(d), a)), None, [], "every voxel is zero", 2),
    ("corrupt-gzip", _garbage, None, [], "cannot read as NIfTI", 2),
    ("truncated", _truncate, None, [], "truncated or corrupt", 2),
    ("zero-voxel-size", _zero_voxel_size, None, [], "zero voxel size", 2),
    ("zero-pixdim", _zero_pixdim, None, [], "disagree with its affine", 2),
    ("sheared", _shear, None, [], "sheared", 2),
    ("too-small", lambda ds: _edit_image(ds, lambda d, a: (d[:6], a)), None, [], "too small", 2),
    ("anisotropic", lambda ds: _scale_axis(ds, 2.5), None, [], "too anisotropic", 2),
    ("multishell-unusable", _multishell_unusable, None, [], "fewer than 6 non-collinear directions", 2),
    ("output-inside-input", None, None, ["@out-inside"], "lies inside the BIDS folder", 2),
    ("output-is-input", None, None, ["@out-is-bids"], "output_dir is the BIDS folder itself", 2),
    ("output-unwritable", None, None, ["@out-unwritable"], "cannot write there", 2),
    ("work-inside-input", None, None, ["-w", "@bids/work"], "lies inside the BIDS folder", 2),
    ("model-missing", None, None, ["--model", "@nowhere"], "no such file or folder", 2),
    (
        "model-corrupt",
        None,
        lambda m: _model_bytes(m, lambda b: b[:100] + os.urandom(len(b) - 100)),
        [],
        "checksum differs",
        2,
    ),
    ("model-truncated", None, lambda m: _model_bytes(m, lambda b: b[: len(b) // 3]), [], "checksum differs", 2),
    ("model-wrong-r", None, _model_r3_card, [], "do not match a hetero-var2 r=3 network", 2),
    ("model-unknown-variant", None, lambda m: _model_card(m, variant="hetero-var9"), [], "unknown variant", 2),
    ("model-pickle", None, _pickle_model, [], "pickle", 2),
    ("model-nan-weights", None, _nan_weights, [], "NaN or Inf", 2),
    ("model-card-json", None, lambda m: (m / "model.json").write_text("{"), [], "not valid JSON", 2),
    ("device-cuda", None, None, ["--device", "cuda"], "no CUDA GPU", 2),
    ("mem-too-small", None, None, ["--mem-mb", "100"], "raise --mem-mb to at least", 2),
    ("filter-file-json", None, None, ["--bids-filter-file", "@broken-json"], "not valid JSON", 2),
    ("nprocs-zero", None, None, ["--nprocs", "0"], "integer ≥ 1", 2),
]


def _damaged_copy(case, pristine, tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the dataset and the model with the case's damage done."""
    _, damage_ds, damage_model, *_ = case
    root, model = pristine
    ds, mdl = tmp_path / "ds", tmp_path / "model"
    shutil.copytree(root, ds, ignore=shutil.ignore_patterns("derivatives"))
    shutil.copytree(model, mdl)
    if damage_ds:
        damage_ds(ds)
    if damage_model:
        damage_model(mdl)
    return ds, mdl


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, pristine, tmp_path, capsys):
    name, _, _, extra, expected, code = case
    if name == "device-cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    ds, mdl = _damaged_copy(case, pristine, tmp_path)
    out = tmp_path / "out"
    (tmp_path / "broken.json").write_text("{")
    args = [
        str(ds),
        str(out),
        "participant",
        "--model",
        str(mdl),
        "-w",
        str(tmp_path / "work"),
        "--skip-bids-validation",
        "--nprocs",
        "1",
    ]
    for token in extra:
        if token == "@out-inside":
            out = ds / "sub-01" / "out"
            args[1] = str(out)
        elif token == "@out-is-bids":
            out = ds
            args[1] = str(ds)
        elif token == "@out-unwritable":
            out = Path("/proc/iqt-pipe-out")
            args[1] = str(out)
        else:
            args.append(
                {
                    "@bids/work": str(ds / "work"),
                    "@nowhere": str(tmp_path / "nowhere"),
                    "@broken-json": str(tmp_path / "broken.json"),
                }.get(token, token)
            )
    if "--model" in extra:  # the case's own --model replaces the default one
        i = args.index("--model")
        del args[i : i + 2]
    try:
        rc = main(args)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert "Traceback" not in err
    assert err.count("\n") == 0, f"more than one line:\n{err}"
    assert expected in err, err
    assert err.startswith("iqt-pipe: error: ")
    if out != ds:
        assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", ["nan-voxel", "model-pickle", "bvec-transposed"])
def test_console_script_no_traceback(case, pristine, tmp_path):
    """The same refusals from the installed ``iqt-pipe`` program: exit code, one line."""
    from helpers import venv_tool

    exe = venv_tool("iqt-pipe")
    if exe is None:
        pytest.skip("the iqt-pipe console script is not installed")
    row = next(c for c in CASES if c[0] == case)
    expected, code = row[4], row[5]
    ds, mdl = _damaged_copy(row, pristine, tmp_path)
    proc = subprocess.run(
        [
            exe,
            str(ds),
            str(tmp_path / "out"),
            "participant",
            "--model",
            str(mdl),
            "-w",
            str(tmp_path / "work"),
            "--skip-bids-validation",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NIPYPE_NO_ET": "1"},
    )
    assert proc.returncode == code
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    # With -v the same failure shows where it came from.
    verbose = subprocess.run(
        [
            exe,
            str(ds),
            str(tmp_path / "out"),
            "participant",
            "--model",
            str(mdl),
            "-w",
            str(tmp_path / "work"),
            "--skip-bids-validation",
            "-v",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NIPYPE_NO_ET": "1"},
    )
    assert verbose.returncode == code and expected in verbose.stderr


def test_one_bad_run_among_good_ones_is_named_and_the_others_finish(tmp_path):
    """Two participants, one unusable: its error is one line, the other is processed, exit 2."""
    root = write_bids_dataset(tmp_path / "ds", n_subjects=2, preset="tiny", seed=1, snr=30)
    (root / "sub-02/dwi/sub-02_dwi.bvec").write_text("0 1 0\n0 0 1\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iqt_pipe.cli.run",
            str(root),
            str(tmp_path / "out"),
            "participant",
            "-w",
            str(tmp_path / "work"),
            "--skip-bids-validation",
            "--denoise",
            "dipy",
            "--no-degibbs",
            "--mc-samples",
            "2",
            "--nprocs",
            "2",
            "--omp-nthreads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("iqt-pipe: error:")]
    assert len(errors) == 1 and "sub-02_dwi.bvec" in errors[0]
    assert "1 run(s) refused" in proc.stderr
    assert (tmp_path / "out/sub-01/dwi/sub-01_res-hi_model-tensor_param-tensor_dwimap.nii.gz").exists()
    assert not (tmp_path / "out/sub-02").exists()


def test_memory_estimate_and_tile_budget_honour_mem_mb(pristine, tmp_path):
    """--mem-mb covers the run's arrays plus the network's tiles: a limit just large enough
    passes and leaves MIN_TILE_MB for the tiles, one MB less is refused."""
    from iqt_pipe.bids import find_dwi_runs
    from iqt_pipe.dmri.preflight import DEFAULT_TILE_MB, MIN_TILE_MB, check_run, memory_needed_mb, tile_budget_mb

    root, _ = pristine
    run = find_dwi_runs(root)[0]
    shape = nb.load(run.dwi).shape
    needed = memory_needed_mb(shape, 2)
    assert memory_needed_mb(shape, 3) > needed  # 27 vs 8 HR voxels per native voxel
    check_run(run, upsample=2, mem_mb=needed + MIN_TILE_MB)
    assert tile_budget_mb(shape, 2, needed + MIN_TILE_MB) == MIN_TILE_MB
    assert tile_budget_mb(shape, 2, needed + 300) == 300
    from iqt_pipe.models import IQTNet
    from iqt_pipe.sr.inference import tile_size_for_budget

    for variant in ("hetero", "hetero-var2"):  # the CPU tile never shrinks below --mem-mb's floor
        assert tile_size_for_budget(IQTNet(variant, 2), MIN_TILE_MB, scalar_samples=32) == 16
        assert tile_size_for_budget(IQTNet(variant, 2), MIN_TILE_MB, 32, precision="float32") == 6
    assert tile_budget_mb(shape, 2, None) == tile_budget_mb(shape, 2, 10**6) == DEFAULT_TILE_MB
    from iqt_pipe.io import InputError

    with pytest.raises(InputError, match=f"at least {needed + MIN_TILE_MB}"):
        check_run(run, upsample=2, mem_mb=needed + MIN_TILE_MB - 1)
