"""Training (iqt_pipe.bids, iqt_pipe.sr.patches, iqt_pipe.sr.training, iqt-train): BIDS queries,
patch library geometry, cache and augmentation, learning on a tiny phantom, exact resume,
determinism, two-process torchrun, CLI errors.

Torch runs single-threaded here: on a busy 2-core machine two OpenMP threads were ~10×
slower than one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch

from iqt_pipe.bids import find_dwi_runs, find_dwi_runs_multi
from iqt_pipe.cli import train as cli
from iqt_pipe.dmri.dti import from_matrix, to_matrix
from iqt_pipe.io import InputError
from iqt_pipe.models import load_model
from iqt_pipe.models.files import sha256
from iqt_pipe.sr import patches as P
from iqt_pipe.sr.patches import (
    AXIS_PERMUTATIONS,
    N_SYMMETRIES,
    PatchLibrary,
    RunPatches,
    build_library,
    transform_field,
    transform_patch,
    transform_volume,
)
from iqt_pipe.sr.training import (
    check_training_dir,
    diagonal_correlation,
    fine_tuning_warning,
    learnt_nothing_warning,
    split_indices,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bids_ds(tmp_path_factory) -> Path:
    from iqt_pipe.sims.dataset import write_bids_dataset

    return write_bids_dataset(tmp_path_factory.mktemp("train") / "ds", n_subjects=2, preset="tiny", seed=11)


@pytest.fixture(scope="session")
def runs(bids_ds):
    return find_dwi_runs(bids_ds)


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("patch-cache")


def _lib(runs, cache, n=24, target="residual-cubic", r=2, seed=0) -> PatchLibrary:
    return build_library(runs, r=r, patches_per_subject=n, seed=seed, target=target, cache_dir=cache, quiet=True)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- bids


def test_bids_labels_with_or_without_prefix(bids_ds):
    all_runs = find_dwi_runs(bids_ds)
    assert [r.subject for r in all_runs] == ["01", "02"]
    assert all(r.bval.exists() and r.bvec.exists() and r.dwi.name.endswith("_dwi.nii.gz") for r in all_runs)
    for label in ("02", "sub-02", ["sub-02"]):
        (run,) = find_dwi_runs(bids_ds, participant_labels=label)
        assert run.subject == "02" and run.name == "sub-02" and run.entities["datatype"] == "dwi"
    assert len(find_dwi_runs_multi([bids_ds, bids_ds], ["01"])) == 2


def test_bids_errors_are_one_line(bids_ds, tmp_path):
    with pytest.raises(InputError, match=r"sub-07 not found; available: sub-01, sub-02") as exc:
        find_dwi_runs(bids_ds, participant_labels=["01", "sub-07"])
    assert "\n" not in str(exc.value)
    with pytest.raises(InputError, match="ses-1 not found; available: none"):
        find_dwi_runs(bids_ds, session_labels="ses-1")
    with pytest.raises(InputError, match="not a BIDS dataset .no dataset_description.json"):
        find_dwi_runs(tmp_path)
    with pytest.raises(InputError, match="not found"):
        find_dwi_runs(tmp_path / "missing")
    (tmp_path / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    with pytest.raises(InputError, match="no DWI series"):
        find_dwi_runs(tmp_path)


# --------------------------------------------------------------------------- patch library


@pytest.mark.parametrize("r", [2, 3])
def test_patch_shapes_and_centres_in_mask(runs, cache, r):
    lib = _lib(runs, cache, n=20, r=r)
    x, y = lib.get(range(len(lib)))
    assert x.shape == (len(lib), 6, 11, 11, 11) and x.dtype == np.float32
    assert y.shape == (len(lib), 6, 7 * r, 7 * r, 7 * r) == (len(lib),) + lib.target_shape
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(y))
    assert lib.summary()["target_size"] == 7 * r and lib.brain(range(3)).shape == (3, 7 * r, 7 * r, 7 * r)
    # Every centre is a brain voxel of the LR mask, with its 7³ block inside the volume.
    from iqt_pipe.dmri.degrade import make_pair
    from iqt_pipe.dmri.dwi import load_dwi

    s = load_dwi(runs[0].dwi)
    pair = make_pair(s.data, s.affine, s.gtab, r)
    rp = lib.runs[0]
    centres = rp.centres + rp.origin
    assert np.all(pair.lr_mask[tuple(centres.T)])
    assert np.all(centres >= 3) and np.all(centres <= np.array(pair.lr_mask.shape) - 4)
    assert len(np.unique(centres, axis=0)) == len(centres)  # drawn without replacement


@pytest.mark.parametrize("r, m", [(2, 2), (3, 2), (2, 3)])
def test_target_block_aligned_with_input(r, m):
    """A field linear in the HR index: block averaging gives the LR voxel the value at its
    block centre, so LR position p of a patch must equal the mean of its r³ HR block (for the
    paper's margin 2 and the 3-3-3 network's margin 3)."""
    shape = np.array([13, 12, 14])
    hr_idx = np.stack(np.meshgrid(*(np.arange(s * r) for s in shape), indexing="ij"), -1).astype(np.float64)
    slopes = np.array([[1, 2, 3], [0, -1, 1], [2, 0, -1], [1, 1, 1], [3, -2, 0], [0.5, 0, 2]]) * 1e-5
    hr = (1e-3 + hr_idx @ slopes.T).astype(np.float32)
    lr = hr.reshape(shape[0], r, shape[1], r, shape[2], r, 6).mean(axis=(1, 3, 5))
    lr_mask = np.ones(shape, bool)
    hr_mask = np.ones(tuple(shape * r), bool)
    rp = RunPatches.from_arrays(lr, hr, lr_mask, hr_mask, r, n_patches=10, seed=1, target="hr", **P.patch_geometry(m))
    c0 = m + 3  # the input's centre voxel
    assert rp.input(0).shape == (6,) + (7 + 2 * m,) * 3 and rp.target(0).shape == (6,) + (7 * r,) * 3
    for j in range(len(rp)):
        x = rp.stats.destandardise(rp.input(j).transpose(1, 2, 3, 0))
        y = rp.stats.destandardise(rp.target(j).transpose(1, 2, 3, 0))
        # the patch centre ...
        np.testing.assert_allclose(
            x[c0, c0, c0], y[3 * r : 4 * r, 3 * r : 4 * r, 3 * r : 4 * r].mean(axis=(0, 1, 2)), rtol=1e-5
        )
        # ... and every LR position of the core against its HR block
        blocks = y.reshape(7, r, 7, r, 7, r, 6).mean(axis=(1, 3, 5))
        np.testing.assert_allclose(x[m : m + 7, m : m + 7, m : m + 7], blocks, rtol=1e-5)
        # and the input really is the LR field around the full-volume centre
        c = rp.centres[j] + rp.origin
        np.testing.assert_allclose(x[c0, c0, c0], lr[tuple(c)], rtol=1e-5)


def test_grid_shifts_sample_the_same_anatomy_on_every_block_grid(runs, tmp_path):
    """Each alignment's LR series is the block mean of the HR series shifted by its offset, at
    the world position of its blocks' centres; its HR target is the same fit, cut to its blocks;
    the patches of a run are shared among the r³ alignments."""
    from iqt_pipe.dmri.degrade import block_average, grid_offsets, make_pair, make_pairs, shift_grid
    from iqt_pipe.dmri.dwi import load_dwi

    assert grid_offsets(2)[0] == (0, 0, 0) and len(set(grid_offsets(2))) == 8 and len(grid_offsets(3)) == 27
    s = load_dwi(runs[0].dwi)
    one = make_pair(s.data, s.affine, s.gtab, 2)
    pairs = make_pairs(s.data, s.affine, s.gtab, 2, [(0, 0, 0), (1, 0, 1)])
    # The IQT protocol's own grid gives make_pair's tensors.
    np.testing.assert_array_equal(pairs[0].lr.tensors, one.lr.tensors)
    np.testing.assert_allclose(pairs[0].hr.tensors, one.hr.tensors, rtol=1e-5, atol=1e-12)  # (batched rounding)
    assert pairs[0].hr_mask.shape == one.hr_mask.shape and np.mean(pairs[0].hr_mask != one.hr_mask) < 0.01
    shifted = pairs[1]
    np.testing.assert_allclose(shifted.lr_dwi, block_average(s.data[1:, :, 1:], 2), rtol=1e-6)
    # ... and make_pair's pair of the shifted series.
    alone = make_pair(*shift_grid(s.data, s.affine, (1, 0, 1)), s.gtab, 2)
    np.testing.assert_array_equal(shifted.lr.tensors, alone.lr.tensors)
    np.testing.assert_allclose(shifted.hr.tensors, alone.hr.tensors, rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(shifted.hr_affine, alone.hr_affine)
    # LR voxel 0 sits at the centre of HR voxels 1-2, 0-1, 1-2 of the original grid.
    centre = nb.affines.apply_affine(s.affine, [1.5, 0.5, 1.5])
    np.testing.assert_allclose(nb.affines.apply_affine(shifted.lr_affine, [0, 0, 0]), centre, atol=1e-9)
    np.testing.assert_allclose(
        nb.affines.apply_affine(shifted.hr_affine, [0, 0, 0]), nb.affines.apply_affine(s.affine, [1, 0, 1])
    )

    plain = build_library(runs[:1], patches_per_subject=40, cache_dir=tmp_path, quiet=True)
    lib = build_library(runs[:1], patches_per_subject=40, cache_dir=tmp_path, grid_shifts=True, quiet=True)
    assert [rp.name for rp in lib.runs] == [f"{plain.runs[0].name}_grid-{i}{j}{k}" for i, j, k in grid_offsets(2)]
    assert [len(rp) for rp in lib.runs] == [5] * 8 and lib.meta["grid_shifts"] and not plain.meta["grid_shifts"]
    assert lib.meta["key"] != plain.meta["key"] and len(list(tmp_path.glob("patches-*.npz"))) == 2
    again = build_library(runs[:1], patches_per_subject=40, cache_dir=tmp_path, grid_shifts=True, quiet=True)
    assert again.from_cache and [rp.name for rp in again.runs] == [rp.name for rp in lib.runs]
    # Each alignment's patches are its own: other inputs for the same HR voxels.
    assert not np.array_equal(lib.runs[0].inputs[:5, :5, :5], lib.runs[7].inputs[:5, :5, :5])
    # The command line's options reach the library.
    args = cli._build_parser().parse_args([str(runs[0].dwi.parent), "-o", str(tmp_path / "o"), "--grid-shifts"])
    assert (
        cli.library_options(args)["grid_shifts"]
        and not cli.library_options(
            cli._build_parser().parse_args([str(runs[0].dwi.parent), "-o", str(tmp_path / "o")])
        )["grid_shifts"]
    )
    args = cli._build_parser().parse_args([str(runs[0].dwi.parent), "-o", "o", "--register-volumes"])
    assert (
        cli.library_options(args)["register_volumes"]
        and not cli.library_options(cli._build_parser().parse_args([str(runs[0].dwi.parent), "-o", "o"]))[
            "register_volumes"
        ]
    )
    # Registered series: their own library (key), recorded as such.
    registered = build_library(runs[:1], patches_per_subject=40, cache_dir=tmp_path, register_volumes=True, quiet=True)
    assert registered.meta["register_volumes"] and not plain.meta["register_volumes"]
    assert registered.meta["key"] != plain.meta["key"]
    assert not np.array_equal(registered.runs[0].targets, plain.runs[0].targets)


def test_symmetries_are_the_tensor_transforms():
    """transform_field's 48 codes are D'(x') = M D(x) Mᵀ with M = F·P (P: axis swap, F: mirror)
    at x' = M x, checked voxel by voxel against the matrices."""
    rng = np.random.default_rng(1)
    shape = (3, 4, 5)
    field = rng.normal(size=shape + (6,))
    for code in range(N_SYMMETRIES):
        perm, mirror = AXIS_PERMUTATIONS[code // 8], code % 8
        p = np.eye(3)[list(perm)]  # row a picks old axis perm[a]
        f = np.diag([-1.0 if mirror >> a & 1 else 1.0 for a in range(3)])
        m = f @ p
        out = transform_field(field, code)
        new_shape = tuple(shape[a] for a in perm)
        assert out.shape == new_shape + (6,)
        for old in np.ndindex(shape):
            new = [old[perm[a]] for a in range(3)]
            new = tuple(new_shape[a] - 1 - new[a] if mirror >> a & 1 else new[a] for a in range(3))
            np.testing.assert_allclose(out[new], from_matrix(m @ to_matrix(field[old]) @ m.T), atol=1e-12)


def _spatial(volume: np.ndarray, code: int) -> np.ndarray:
    """The voxel move of symmetry ``code`` alone (masks, index grids)."""
    perm, mirror = AXIS_PERMUTATIONS[code // 8], code % 8
    volume = np.transpose(volume, (*perm, *range(3, volume.ndim)))
    return np.flip(volume, tuple(a for a in range(3) if mirror >> a & 1))


@pytest.mark.parametrize("target", ["hr", "residual-cubic"])
def test_augmentation_is_tensor_consistent(target):
    """Each of the 48 symmetries (mirrors, axis swaps) of a standardised patch pair == the
    patches made from the transformed volume (with its own per-subject statistics) at the
    transformed centres."""
    rng = np.random.default_rng(3)
    r, shape = 2, (12, 13, 11)
    lr = rng.normal(1e-3, 3e-4, shape + (6,)).astype(np.float32)
    hr = rng.normal(1e-3, 3e-4, tuple(s * r for s in shape) + (6,)).astype(np.float32)
    lr_mask = rng.random(shape) > 0.3
    hr_mask = rng.random(hr.shape[:3]) > 0.3
    a = RunPatches.from_arrays(lr, hr, lr_mask, hr_mask, r, n_patches=12, seed=0, target=target)
    centres = a.centres + a.origin
    index = _spatial(np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1), 0)
    for code in range(1, N_SYMMETRIES):
        moved = _spatial(index, code)  # moved[new position] = old position
        lookup = {
            tuple(old): new for new, old in zip(np.argwhere(np.ones(moved.shape[:3], bool)), moved.reshape(-1, 3))
        }
        b = RunPatches.from_arrays(
            transform_field(lr, code),
            transform_field(hr, code),
            _spatial(lr_mask, code),
            _spatial(hr_mask, code),
            r,
            centres=np.array([lookup[tuple(c)] for c in centres]),
            target=target,
        )
        for j in range(len(a)):
            np.testing.assert_allclose(transform_patch(a.input(j), code), b.input(j), atol=2e-5)
            np.testing.assert_allclose(transform_patch(a.target(j), code), b.target(j), atol=2e-5)
            np.testing.assert_array_equal(_spatial(a.brain(j), code), b.brain(j))
    # inside a library: the same pair, transformed on request
    lib = PatchLibrary([a], target)
    x0, y0 = lib.pair(0)
    for code in (3, 29):
        x, y = lib.pair(0, code)
        np.testing.assert_array_equal(x, transform_patch(x0, code))
        np.testing.assert_array_equal(y, transform_patch(y0, code))
    with pytest.raises(ValueError, match="symmetry codes"):
        lib.pair(0, N_SYMMETRIES)


def test_cache_is_reused_and_keyed(runs, tmp_path, monkeypatch):
    first = _lib(runs, tmp_path, n=16, target="hr", seed=5)
    assert not first.from_cache and len(list(tmp_path.glob("patches-*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("make_pair called although the cache is valid")

    monkeypatch.setattr(P, "make_pair", boom)
    again = _lib(runs, tmp_path, n=16, target="hr", seed=5)
    assert again.from_cache
    for ra, rb in zip(first.runs, again.runs):
        for name in RunPatches._ARRAYS:
            np.testing.assert_array_equal(getattr(ra, name), getattr(rb, name), err_msg=name)
    np.testing.assert_array_equal(first.get(range(5), [1, 2, 3, 4, 5])[1], again.get(range(5), [1, 2, 3, 4, 5])[1])
    # any change of what the library depends on is a different key → recomputed
    for kwargs in ({"seed": 6}, {"target": "residual-cubic"}, {"n": 17}, {"r": 3}):
        with pytest.raises(AssertionError, match="make_pair called"):
            _lib(runs, tmp_path, **{"n": 16, "target": "hr", "seed": 5, **kwargs})
    with monkeypatch.context() as m:  # patches of the same files made differently (the fit changed)
        m.setattr(P, "LIBRARY_VERSION", P.LIBRARY_VERSION + 1)
        with pytest.raises(AssertionError, match="make_pair called"):
            _lib(runs, tmp_path, n=16, target="hr", seed=5)
    # The key follows the files' content, not where they lie or when they were written.
    key = P.library_key(runs, 2, 16, 5, "hr")
    copies = []
    for k, run in enumerate(runs):
        folder = tmp_path / "copy" / str(k)
        folder.mkdir(parents=True)
        copies.append(tuple(shutil.copy(f, folder / Path(f).name) for f in (run.dwi, run.bval, run.bvec)))
    assert P.library_key(copies, 2, 16, 5, "hr") == key
    Path(copies[0][1]).write_bytes(Path(copies[0][1]).read_bytes() + b"\n")  # a changed file: a new key
    assert P.library_key(copies, 2, 16, 5, "hr") != key
    # Large files: size, head and tail (a .nii.gz's tail is its gzip CRC-32 of the whole image).
    big = bytearray(np.random.default_rng(0).bytes(10 << 20))
    (tmp_path / "a.bin").write_bytes(big)
    digest = P.content_digest(tmp_path / "a.bin")
    assert P.content_digest(Path(shutil.copy(tmp_path / "a.bin", tmp_path / "b.bin"))) == digest
    for where in (0, len(big) - 1):
        changed = bytearray(big)
        changed[where] ^= 1
        (tmp_path / "c.bin").write_bytes(changed)
        assert P.content_digest(tmp_path / "c.bin") != digest


def test_library_is_deterministic(runs, tmp_path):
    a = build_library(runs, r=2, patches_per_subject=16, seed=2, target="hr", quiet=True)
    b = build_library(runs, r=2, patches_per_subject=16, seed=2, target="hr", quiet=True)
    c = build_library(runs, r=2, patches_per_subject=16, seed=3, target="hr", quiet=True)
    np.testing.assert_array_equal(a.runs[1].centres, b.runs[1].centres)
    np.testing.assert_array_equal(a.get(range(len(a)))[1], b.get(range(len(b)))[1])
    assert not np.array_equal(a.runs[1].centres + a.runs[1].origin, c.runs[1].centres + c.runs[1].origin)


def test_split_is_seeded_and_disjoint():
    tr, va = split_indices(101, 0.5, 0)
    assert len(va) == 50 and len(tr) == 51 and not set(tr) & set(va)
    assert np.array_equal(split_indices(101, 0.5, 0)[1], va) and not np.array_equal(split_indices(101, 0.5, 1)[1], va)
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        split_indices(10, 1.0, 0)


# --------------------------------------------------------------------------- training


# Measured on this fixture's phantom (tiny, seed 11, 2 subjects, 300 patch pairs each, half for
# validation; espcn, 6 epochs, 1 CPU thread, ~9 s per test); RMSE ×1e-4 mm²/s on the validation
# brain voxels, trilinear 1.69, cubic 1.47:
#   hr (no augmentation):       val loss 1.78 → 1.06 (×0.60); RMSE 1.96 → 1.14 (×0.67 trilinear)
#   residual-cubic + augment:   val loss 1.42 → 1.17 (×0.82); RMSE 1.46 → 1.19 (×0.70 trilinear)
LEARNING = {
    "hr": dict(augment=False, loss_ratio=0.8, rmse_vs_trilinear=0.8),
    "residual-cubic": dict(augment=True, loss_ratio=0.92, rmse_vs_trilinear=0.8),
}


@pytest.mark.parametrize("target", list(LEARNING))
def test_short_training_learns_and_beats_interpolation(runs, cache, tmp_path, target):
    spec = LEARNING[target]
    lib = _lib(runs, cache, n=300, target=target)
    res = train(lib, tmp_path / "out", variant="espcn", epochs=6, seed=0, augment=spec["augment"], quiet=True)
    first, last = res.metrics[0], res.metrics[-1]
    assert last["val_loss"] < spec["loss_ratio"] * first["val_loss"]
    rmse = res.card["validation"]["rmse"]
    assert rmse["cubic"] < rmse["trilinear"]
    assert rmse["model"] < spec["rmse_vs_trilinear"] * rmse["trilinear"]
    assert rmse["model"] < rmse["cubic"]
    # the files: model + card that load_model accepts, metrics log, checkpoint
    model, card = load_model(tmp_path / "out")
    assert card["target"] == target and card["variant"] == "espcn"
    assert card["normalisation"]["method"] == "per-subject"
    assert card["training"]["patches"]["total"] == len(lib) and card["training"]["epochs"] == 6
    assert card["validation"]["best_epoch"] == res.best_epoch
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert {"train_loss", "val_loss", "val_rmse", "seconds"} <= rows[0].keys()
    best = min(rows, key=lambda r: r["val_loss"])
    assert best["val_rmse"] == pytest.approx(rmse["model"])


SMALL = dict(variant="hetero-var2", seed=3, augment=True, quiet=True, batch_size=6)


def test_resume_reaches_the_uninterrupted_weights(runs, cache, tmp_path):
    lib = _lib(runs, cache, n=24)
    full = train(lib, tmp_path / "full", epochs=3, **SMALL)
    train(lib, tmp_path / "part", epochs=2, **SMALL)
    with pytest.raises(InputError, match="add --resume"):
        train(lib, tmp_path / "part", epochs=3, **SMALL)
    with pytest.raises(InputError, match="seed = 3"):
        train(lib, tmp_path / "part", epochs=3, resume=True, **{**SMALL, "seed": 4})
    resumed = train(lib, tmp_path / "part", epochs=3, resume=True, **SMALL)
    assert _same(_weights(tmp_path / "full"), _weights(tmp_path / "part"))
    from safetensors.torch import load_file

    ck = [load_file(str(p / "checkpoint" / "epoch-0003.safetensors")) for p in (tmp_path / "full", tmp_path / "part")]
    assert _same(*ck)  # model, Adam moments, RNG state
    assert ck[0]["rng.cpu"].dtype == torch.uint8
    assert [m["val_loss"] for m in resumed.metrics] == [m["val_loss"] for m in full.metrics]
    state = json.loads((tmp_path / "part" / "checkpoint" / "checkpoint.json").read_text())
    assert state["epoch"] == 3 and state["best_epoch"] == full.best_epoch


def test_init_starts_from_a_models_weights(runs, cache, tmp_path):
    """--init (fine-tuning): the training starts from the model's weights, not the seed's; the
    card and the checkpoint record the model, a resumed run must repeat it, and a model of
    another network is refused in one line."""
    lib = _lib(runs, cache, n=24)
    first = train(lib, tmp_path / "first", epochs=1, **SMALL)
    # A learning rate too small to move a weight: the result is the model it started from.
    still = dict(SMALL, seed=5, lr=1e-30)
    tuned = train(lib, tmp_path / "tuned", epochs=1, init=first.model_path, **still)
    assert _same(_weights(tmp_path / "first"), _weights(tmp_path / "tuned"))
    train(lib, tmp_path / "seed5", epochs=1, **still)
    assert not _same(_weights(tmp_path / "first"), _weights(tmp_path / "seed5"))
    record = tuned.card["training"]["initialised_from"]
    assert record["sha256"] == sha256(first.model_path) and record["epochs"] == 1
    assert record["model"] == "model.safetensors" and record["runs"] == first.card["training"]["runs"]
    assert record["grid_shifts"] is False and "initialised_from" not in record
    # The starting weights scored on this training's validation patches, before epoch 1: here
    # they are the weights it ends with, so the scores agree and the warning says so.
    assert record["validation"]["loss"] == pytest.approx(tuned.card["validation"]["loss"], rel=1e-6)
    assert record["validation"]["rmse"] == pytest.approx(tuned.card["validation"]["rmse"]["model"], rel=1e-6)
    assert "no epoch beat the starting model" in fine_tuning_warning(tuned.card)
    assert fine_tuning_warning(first.card) is None
    better = {"training": {"initialised_from": {"validation": {"loss": -0.5}}}, "validation": {"loss": -0.6}}
    assert fine_tuning_warning(better) is None
    # Fine-tuned twice: the card keeps the whole history, the first model's record nested.
    again = train(lib, tmp_path / "again", epochs=1, init=tuned.model_path, **still)
    history = again.card["training"]["initialised_from"]
    assert history["sha256"] == sha256(tuned.model_path) and history["initialised_from"] == record
    with pytest.raises(InputError, match="init"):
        train(lib, tmp_path / "tuned", epochs=2, resume=True, **still)  # without --init
    resumed = train(lib, tmp_path / "tuned", epochs=2, resume=True, init=first.model_path, **still)
    assert resumed.card["training"]["initialised_from"]["validation"] == record["validation"]  # from the checkpoint
    with pytest.raises(InputError, match=r"first/model.safetensors: the --init model has widths \[50, 100\], this"):
        train(lib, tmp_path / "w", epochs=1, init=first.model_path, **dict(SMALL, widths=(60, 100)))
    with pytest.raises(InputError, match="--init model has variant 'hetero-var2', this training 'espcn'.*--variant"):
        train(lib, tmp_path / "v", epochs=1, init=first.model_path, **dict(SMALL, variant="espcn"))
    with pytest.raises(InputError, match="model card not found"):
        train(lib, tmp_path / "none", epochs=1, init=tmp_path / "nothing.safetensors", **SMALL)


def test_anneal_schedule_resumes_exactly(runs, cache, tmp_path):
    lib = _lib(runs, cache, n=24)
    kw = dict(SMALL, variant="hetero", schedule="anneal", anneal_start=1, anneal_epochs=1)
    full = train(lib, tmp_path / "a", epochs=3, **kw)
    train(lib, tmp_path / "b", epochs=1, **kw)
    train(lib, tmp_path / "b", epochs=3, resume=True, **kw)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert [m["nll_weight"] for m in full.metrics] == [0.0, 1.0, 1.0]
    assert "MSE, then a linear switch" in full.card["training"]["loss"]
    with pytest.raises(InputError, match="anneal"):
        train(lib, tmp_path / "c", epochs=1, **dict(kw, variant="espcn"))


def test_cosine_decay_lowers_the_learning_rate_to_zero_and_resumes_exactly(runs, cache, tmp_path, monkeypatch):
    """--lr-decay cosine: each step's learning rate is lr·(1 + cos(π·position/epochs))/2 (the
    first step at lr, the last near 0); the card records it; a resumed run reaches the
    uninterrupted weights, and one with other --epochs (another decay) is refused."""
    from iqt_pipe.sr import training as tr

    assert tr.decayed_lr(1e-3, "none", 1.5, 2) == 1e-3
    assert tr.decayed_lr(1e-3, "cosine", 0, 2) == 1e-3
    assert tr.decayed_lr(1e-3, "cosine", 1, 2) == pytest.approx(5e-4)
    assert tr.decayed_lr(1e-3, "cosine", 2, 2) == pytest.approx(0, abs=1e-18)
    lib = _lib(runs, cache, n=24)
    kw = dict(SMALL, lr_decay="cosine")
    seen = []
    step = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    full = train(lib, tmp_path / "a", epochs=2, **kw)
    n = len(seen) // 2  # steps per epoch
    assert seen == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * k / (2 * n))) for k in range(2 * n)])
    assert full.card["training"]["lr_decay"] == "cosine" and full.card["training"]["learning_rate"] == 1e-3
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    # Stopped after its first epoch (a job's time limit), then resumed: the same weights.
    first_epoch = tr._epoch

    def stop_after_one(run, progress, epoch):
        if epoch > 0:
            raise KeyboardInterrupt
        return first_epoch(run, progress, epoch)

    monkeypatch.setattr(tr, "_epoch", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        train(lib, tmp_path / "b", epochs=2, **kw)
    monkeypatch.setattr(tr, "_epoch", first_epoch)
    train(lib, tmp_path / "b", epochs=2, resume=True, **kw)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    with pytest.raises(InputError, match="lr_decay_epochs = 2, this run asks for 3"):
        train(lib, tmp_path / "b", epochs=3, resume=True, **kw)
    with pytest.raises(InputError, match="learning-rate decay 'linear'"):
        train(lib, tmp_path / "c", epochs=1, **dict(kw, lr_decay="linear"))


def test_wider_network_and_axis_swaps(runs, cache, tmp_path):
    """--kernels 3 3 3 trains on 13³ inputs (7³ receptive field), its card records the
    architecture and the augmentation, load_model rebuilds it, and a library cut for another
    margin is refused; the axis-swap codes are drawn from all 48 symmetries."""
    from iqt_pipe.sr.training import PatchDataset

    wide = build_library(
        runs,
        r=2,
        patches_per_subject=24,
        seed=0,
        target="residual-cubic",
        cache_dir=cache,
        quiet=True,
        **P.patch_geometry(3),
    )
    assert wide.input_shape == (6, 13, 13, 13) and wide.target_shape == (6, 14, 14, 14)
    kw = dict(SMALL, variant="espcn", kernels=(3, 3, 3), axis_swap=True)
    res = train(wide, tmp_path / "wide", epochs=2, **kw)
    model, card = load_model(tmp_path / "wide")
    assert card["kernels"] == [3, 3, 3] and model.margin == 3 and card["training"]["axis_swap"] is True
    assert np.isfinite(res.card["validation"]["rmse"]["model"])
    with pytest.raises(InputError, match="build it with margin 3"):
        train(_lib(runs, cache), tmp_path / "bad", epochs=1, **kw)
    with pytest.raises(InputError, match="augmentation"):
        train(wide, tmp_path / "bad", epochs=1, **{**kw, "augment": False})
    ds = PatchDataset(wide, np.arange(len(wide)), augment=True, seed=0, axis_swap=True)
    ds.set_epoch(0)
    assert ds.symmetries.max() >= 8
    # Without axis swaps the draws are the mirror codes of earlier versions (same weights).
    ds = PatchDataset(wide, np.arange(len(wide)), augment=True, seed=0)
    ds.set_epoch(0)
    expected = np.random.default_rng([0, 0, 0xF11B]).integers(0, 8, len(wide))
    np.testing.assert_array_equal(ds.symmetries, expected)


def test_brain_masked_loss():
    """The masked data terms are the plain ones over the brain voxels' elements only: what lies
    outside the mask changes nothing, and an all-brain mask gives the unmasked loss."""
    from iqt_pipe.sr.training import data_loss

    g = torch.Generator().manual_seed(0)
    mean, target = torch.randn(2, 6, 4, 4, 4, generator=g), torch.randn(2, 6, 4, 4, 4, generator=g)
    prec = torch.rand(2, 6, 4, 4, 4, generator=g) + 0.5
    brain = (torch.rand(2, 1, 4, 4, 4, generator=g) > 0.4).float()
    inside = brain.expand_as(target).bool()
    for p, w in ((None, 0.0), (prec, 1.0), (prec, 0.3)):
        masked = data_loss(mean, p, target, w, brain)
        sq = (target - mean)[inside] ** 2
        mse = sq.mean()
        expected = mse if p is None else (1 - w) * mse + w * ((p[inside] * sq).mean() - torch.log(p[inside]).mean())
        assert masked.item() == pytest.approx(expected.item(), rel=1e-6)
        noisy = torch.where(inside, target, target + 100.0)
        assert data_loss(mean, p, noisy, w, brain).item() == pytest.approx(masked.item(), rel=1e-6)
        assert data_loss(mean, p, target, w, torch.ones_like(brain)).item() == pytest.approx(
            data_loss(mean, p, target, w).item(), rel=1e-6
        )


def test_brain_masked_training(runs, cache, tmp_path):
    from iqt_pipe.sr.training import target_elements

    lib = _lib(runs, cache, n=24)
    idx = np.arange(len(lib))
    assert target_elements(lib, idx) == len(lib) * 6 * 14**3
    assert target_elements(lib, idx, "brain") == 6 * int(lib.brain(idx).sum()) < target_elements(lib, idx)
    res = train(lib, tmp_path / "m", epochs=1, **SMALL)  # the default
    assert res.card["training"]["loss_mask"] == "brain"
    assert "over the HR brain-mask voxels" in res.card["training"]["loss"]
    with pytest.raises(InputError, match="loss_mask = 'brain', this run asks for 'none'"):
        train(lib, tmp_path / "m", epochs=2, resume=True, loss_mask="none", **SMALL)
    paper = train(lib, tmp_path / "p", epochs=1, loss_mask="none", **SMALL)
    assert paper.card["training"]["loss_mask"] == "none" and "brain" not in paper.card["training"]["loss"]
    with pytest.raises(InputError, match="unknown loss mask"):
        train(lib, tmp_path / "x", epochs=1, loss_mask="head", **SMALL)


def test_resume_accepts_checkpoints_from_before_the_architecture_options(runs, cache, tmp_path):
    lib = _lib(runs, cache, n=24)
    train(lib, tmp_path / "a", epochs=1, **SMALL)
    js = tmp_path / "a" / "checkpoint" / "checkpoint.json"
    state = json.loads(js.read_text())
    for key in ("axis_swap", "loss_mask", "widths", "kernels"):
        del state["settings"][key]
    js.write_text(json.dumps(state))
    with pytest.raises(InputError, match="loss_mask = 'none', this run asks for 'brain'"):
        train(lib, tmp_path / "a", epochs=2, resume=True, **SMALL)  # such checkpoints had no mask
    res = train(lib, tmp_path / "a", epochs=2, resume=True, **{**SMALL, "loss_mask": "none"})
    assert res.epochs == 2
    with pytest.raises(InputError, match="axis_swap"):
        train(lib, tmp_path / "a", epochs=3, resume=True, **{**SMALL, "axis_swap": True})


def test_training_with_the_s0_input(runs, cache, tmp_path):
    """``inputs=("tensor", "s0")`` (``iqt-train --inputs tensor s0``): the library's pairs carry
    the LR fit's S0 as a 7th channel, moved (never signed) by the symmetries like the voxels;
    the model file records the inputs and loads as a 7-channel network; a resume must repeat
    them; inputs without the tensor are refused in one line."""
    lib = _lib(runs, cache, n=24)
    x, y = lib.pair(0, 0, s0=True)
    assert x.shape == (7,) + lib.input_shape[1:] and np.array_equal(x[:6], lib.pair(0)[0])
    assert x[6].min() >= -1 and np.ptp(x[6]) > 0.1  # S0 / brain median − 1: structure, not a constant
    for code in (5, 29):
        moved, _ = lib.pair(0, code, s0=True)
        np.testing.assert_array_equal(moved[:6], transform_patch(x[:6], code))
        np.testing.assert_array_equal(moved[6], transform_volume(x[6], code))
    train(lib, tmp_path / "s", epochs=1, inputs=("tensor", "s0"), **SMALL)
    model, card = load_model(tmp_path / "s")
    assert card["inputs"] == ["tensor", "s0"] and model.inputs == ("tensor", "s0")
    assert model.mean_net.convs[0].weight.shape[1] == model.prec_net.convs[0].weight.shape[1] == 7
    from iqt_pipe.workflows.sr import init_sr_wf  # the methods paragraph says so

    assert "took the fitted non-diffusion-weighted signal (S0" in init_sr_wf(model=tmp_path / "s").__desc__
    with pytest.raises(InputError, match="inputs = \\['tensor', 's0'\\], this run asks for \\['tensor'\\]"):
        train(lib, tmp_path / "s", epochs=2, resume=True, **SMALL)
    with pytest.raises(InputError, match="--inputs s0: give tensor"):
        train(lib, tmp_path / "x", epochs=1, inputs=("s0",), **SMALL)


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.65, -0.3])
def test_diagonal_correlation_of_standardised_errors(rho):
    """The mean correlation of the three pairs, from the sums; a negative one counts as 0."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((200_000, 3)) @ np.linalg.cholesky(rho + (1 - rho) * np.eye(3)).T
    z *= [1.0, 2.0, 0.5]  # the scale of each component does not matter
    sums = [float(np.sum(z[:, a] * z[:, b])) for a, b in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))]
    assert diagonal_correlation(sums) == pytest.approx(max(rho, 0.0), abs=0.01)
    assert diagonal_correlation([0.0] * 6) == 0.0


def test_card_records_the_best_weights_diagonal_correlation(runs, cache, tmp_path):
    """Hetero training writes the validation patches' correlation of the diagonal components'
    standardised errors ((mean − target)·√precision, brain voxels) to the card, as the best
    epoch measured it; a checkpoint from before it was kept gets it from the best weights."""
    lib = _lib(runs, cache, n=24)
    res = train(lib, tmp_path / "a", epochs=2, **SMALL)
    best = next(m for m in res.metrics if m["epoch"] == res.best_epoch)
    rho = res.card["calibration"]["diagonal_correlation"]
    assert rho == best["val_diagonal_correlation"] and 0 <= rho < 1
    # The same from the model file, by hand, over the validation patches.
    model, card = load_model(tmp_path / "a")
    assert model.diagonal_correlation == rho and card["calibration"] == res.card["calibration"]
    _, val_idx = split_indices(len(lib), 0.5, SMALL["seed"])
    x, y = lib.get(val_idx)
    with torch.no_grad():
        mean, prec = model(torch.from_numpy(x), sample=False)
    z = ((mean - torch.from_numpy(y)) * prec.sqrt()).double().numpy()[:, [0, 3, 5]]
    z = np.moveaxis(z, 1, -1)[lib.brain(val_idx)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    r = [np.sum(z[:, a] * z[:, b]) / np.sqrt(np.sum(z[:, a] ** 2) * np.sum(z[:, b] ** 2)) for a, b in pairs]
    assert rho == pytest.approx(min(0.99, max(0.0, np.mean(r))), rel=1e-4, abs=1e-6)
    js = tmp_path / "a" / "checkpoint" / "checkpoint.json"
    state = json.loads(js.read_text())
    del state["best_diagonal_correlation"]
    js.write_text(json.dumps(state))
    again = train(lib, tmp_path / "a", epochs=2, resume=True, **SMALL)
    assert again.card["calibration"]["diagonal_correlation"] == pytest.approx(rho, rel=1e-9)
    plain = train(lib, tmp_path / "b", epochs=1, **{**SMALL, "variant": "espcn"})
    assert "calibration" not in plain.card and "val_diagonal_correlation" not in plain.metrics[0]


def test_same_seed_same_weights(runs, cache, tmp_path):
    lib = _lib(runs, cache, n=24)
    train(lib, tmp_path / "a", epochs=2, **SMALL)
    train(lib, tmp_path / "b", epochs=2, **SMALL)
    train(lib, tmp_path / "c", epochs=2, **{**SMALL, "seed": 4})
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert _same(a, b)
    assert not _same(a, c)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(bids_ds, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "iqt_pipe.cli.train",
            str(bids_ds),
            "-o",
            str(out),
            "--patches-per-subject",
            "24",
            "--epochs",
            "2",
            "--variant",
            "hetero-var2",
            "--device",
            "cpu",
            "--nthreads",
            "1",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best epoch") == 1  # only rank 0 reports
    assert "× 2 process(es)" in proc.stdout
    model, card = load_model(out)
    assert card["training"]["world_size"] == 2 and card["variant"] == "hetero-var2"
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # written once, by rank 0


# --------------------------------------------------------------------------- CLI


def test_cli_help():
    with pytest.raises(SystemExit) as exc:
        cli._build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        cli._build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    from helpers import venv_tool

    tool = venv_tool("iqt-train")
    if tool:
        proc = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "--participant-label" in proc.stdout and "--resume" in proc.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variant", "nope"], "invalid choice: 'nope'"),
        (["--upsample", "1"], "integer ≥ 2"),
        (["--val-fraction", "1.5"], "strictly between 0 and 1"),
        (["--val-fraction", "0"], "strictly between 0 and 1"),
        (["--epochs", "0"], "epochs must be an integer ≥ 1"),
        (["--participant-label", "sub-09"], "sub-09 not found; available: sub-01, sub-02"),
        (["--variant", "espcn", "--schedule", "anneal"], "anneal"),
        (["--kernels", "3", "3"], "one width fewer than kernels"),
        (["--kernels", "3", "2", "3"], "give odd kernel sizes"),
        (["--kernels", "0", "1", "3"], "a kernel size must be an integer ≥ 1"),
        (["--axis-swap", "--no-augment"], "drop --no-augment"),
        (["--init", "bundled"], "--init model has kernels [3, 3, 3], this training [3, 1, 3]; train with --kernels"),
        (["--init", "nothing.safetensors"], "nothing.json: model card not found"),
    ],
)
def test_cli_bad_input_one_line_exit_2(bids_ds, tmp_path, capsys, extra, message):
    code = _main([str(bids_ds), "-o", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def _main(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse errors
        return exc.code


def test_cli_unwritable_output_and_not_bids(bids_ds, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _main([str(bids_ds), "-o", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and err.count("\n") == 1
    assert _main([str(tmp_path), "-o", str(tmp_path / "o2")]) == 2
    assert "not a BIDS dataset" in capsys.readouterr().err


def test_cli_trains_then_refuses_without_resume(bids_ds, tmp_path, capsys):
    out = tmp_path / "cli"
    base = [
        str(bids_ds),
        "-o",
        str(out),
        "--participant-label",
        "01",
        "--patches-per-subject",
        "12",
        "--variant",
        "espcn",
        "--nthreads",
        "1",
        "-q",
    ]
    try:
        assert _main([*base, "--epochs", "1"]) == 0
        text = capsys.readouterr().out
        assert "1 subject(s), 1 DWI run(s) → 12 patch pairs" in text and "variant espcn" in text
        assert "device cpu" in text or "device cuda" in text
        assert _main([*base, "--epochs", "2"]) == 2
        err = capsys.readouterr().err
        assert "already holds a trained model" in err and "--resume" in err and err.count("\n") == 1
        assert _main([*base, "--epochs", "2", "--resume"]) == 0
        text, err = capsys.readouterr()
        assert "reused cache" in text and "resuming" in text and "best epoch" in text
        _, card = load_model(out)
        assert card["training"]["epochs"] == 2 and card["training"]["subjects"] == ["sub-01"]
        assert card["training"]["patches"]["grid_shifts"] is False
        assert card["training"]["patches"]["registered_volumes"] is False
        # A model no better than cubic spline gets the warning (12 patches, 2 epochs: either way).
        rmse = card["validation"]["rmse"]
        assert ("iqt-train: warning: the model's validation RMSE is" in err) == (rmse["model"] / rmse["cubic"] > 0.99)
        # Fine-tuning from that model: its weights, recorded in the new card.
        tuned = tmp_path / "tuned"
        assert _main([*base[:2], str(tuned), *base[3:], "--epochs", "1", "--init", str(out / "model.safetensors")]) == 0
        text, err = capsys.readouterr()
        start = json.loads((tuned / "model.json").read_text())["training"]["initialised_from"]
        assert f"starting from {out / 'model.safetensors'}" in text and start["epochs"] == 2
        assert f"(starting model {start['validation']['loss']:.4g})" in text
        assert ("no epoch beat the starting model" in err) == (fine_tuning_warning(load_model(tuned)[1]) is not None)
    finally:
        torch.set_num_threads(1)
    assert check_training_dir(tmp_path / "fresh").is_dir()


def test_learnt_nothing_warning():
    # The validation RMSEs (mm²/s) of a collapsed 3-3-3 network on ds-realdwi (all ReLUs dead:
    # the residual network outputs zeros, so it is cubic spline), and of a healthy 3-1-3 one.
    collapsed = {
        "validation": {"rmse": {"model": 1.88566e-4, "cubic": 1.88420e-4}},
        "training": {"learning_rate": 1e-3},
    }
    warning = learnt_nothing_warning(collapsed)
    assert warning.startswith("the model's validation RMSE is 1.001 × cubic B-spline's")
    assert "--lr (e.g. 0.00033)" in warning and "\n" not in warning
    healthy = {"validation": {"rmse": {"model": 1.7196e-4, "cubic": 1.8842e-4}}, "training": {"learning_rate": 1e-3}}
    assert learnt_nothing_warning(healthy) is None


@pytest.mark.parametrize("target", ["hr", "residual-cubic"])
def test_patches_match_whole_volume_prediction(runs, cache, target):
    """Training patches and whole-volume prediction share one convention (padding,
    standardisation, residual baseline, HR block placement)."""
    from iqt_pipe.dmri.degrade import make_pair
    from iqt_pipe.dmri.dwi import load_dwi
    from iqt_pipe.models import IQTNet
    from iqt_pipe.sr.baselines import interpolate_tensors
    from iqt_pipe.sr.inference import predict_volume

    lib = _lib(runs, cache, n=24, target=target)
    s = load_dwi(runs[0].dwi)
    pair = make_pair(s.data, s.affine, s.gtab, 2)
    torch.manual_seed(0)
    model = IQTNet("espcn", 2).eval()
    pred = predict_volume(model, pair.lr.tensors, pair.lr_mask, pair.lr_affine, target=target, tile=8)
    rp = lib.runs[0]
    offset = interpolate_tensors(pair.lr.tensors, 2, "cubic") if target == "residual-cubic" else rp.mean
    for j in range(0, len(rp), 5):
        with torch.no_grad():
            z, _ = model(torch.from_numpy(np.ascontiguousarray(rp.input(j)))[None], sample=False)
        corner = (rp.centres[j] + rp.origin - 3) * 2
        sl = tuple(slice(c, c + 14) for c in corner)
        off = offset[sl] if target == "residual-cubic" else offset
        from_patch = z[0].permute(1, 2, 3, 0).numpy() * rp.sd + off
        inside = pred.mask[sl]
        np.testing.assert_allclose(from_patch[inside], pred.mean[sl][inside], atol=1e-7, rtol=1e-4)
        # and the target is the HR fit
        y = rp.target(j).transpose(1, 2, 3, 0) * rp.sd + off
        np.testing.assert_allclose(y, pair.hr.tensors[sl], atol=1e-9, rtol=1e-4)
