"""Gradient tables: every malformed case gets its own clear message."""

import numpy as np
import pytest

from iqt_pipe.dmri.gradients import (
    GradientError,
    GradientTable,
    find_shells,
    read_gradients,
    select_dti_volumes,
    write_gradients,
)

DIRS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.7071068, 0.7071068, 0], [0.7071068, 0, 0.7071068], [0, 0.7071068, 0.7071068]]
)


def write_pair(tmp_path, bval_text, bvec_text):
    bval, bvec = tmp_path / "x_dwi.bval", tmp_path / "x_dwi.bvec"
    if bval_text is not None:
        bval.write_text(bval_text)
    if bvec_text is not None:
        bvec.write_text(bvec_text)
    return bval, bvec


def fsl_text(bvals, bvecs):
    return " ".join(f"{b:g}" for b in bvals), "\n".join(" ".join(f"{v:g}" for v in r) for r in np.asarray(bvecs).T)


GOOD_BVALS = [0, 1000, 1000, 1000, 1000, 1000, 1000]
GOOD_BVECS = np.vstack([[0, 0, 0], DIRS])


def test_reads_a_good_table(tmp_path):
    bval, bvec = write_pair(tmp_path, *fsl_text(GOOD_BVALS, GOOD_BVECS))
    g = read_gradients(bval, bvec, n_volumes=7)
    assert g.bvals.tolist() == GOOD_BVALS
    np.testing.assert_allclose(g.bvecs, GOOD_BVECS, atol=1e-6)
    assert g.b0_mask.tolist() == [True] + [False] * 6
    assert g.shells() == [1000.0]


def test_round_trip_through_write(tmp_path):
    g = GradientTable(np.array(GOOD_BVALS, float), GOOD_BVECS)
    write_gradients(g, tmp_path / "a.bval", tmp_path / "a.bvec")
    g2 = read_gradients(tmp_path / "a.bval", tmp_path / "a.bvec")
    np.testing.assert_allclose(g2.bvecs, g.bvecs, atol=1e-6)
    np.testing.assert_array_equal(g2.bvals, g.bvals)


def test_bval_column_is_accepted(tmp_path):
    bval, bvec = write_pair(tmp_path, "\n".join(map(str, GOOD_BVALS)), fsl_text(GOOD_BVALS, GOOD_BVECS)[1])
    assert len(read_gradients(bval, bvec).bvals) == 7


BAD_CASES = {
    "missing bval": (None, fsl_text(GOOD_BVALS, GOOD_BVECS)[1], 7, r"x_dwi.bval: bval file not found"),
    "missing bvec": (fsl_text(GOOD_BVALS, GOOD_BVECS)[0], None, 7, r"x_dwi.bvec: bvec file not found"),
    "empty bval": ("  \n", fsl_text(GOOD_BVALS, GOOD_BVECS)[1], 7, r"x_dwi.bval: bval file is empty"),
    "non-numeric": (
        "0 1000 abc 1000 1000 1000 1000",
        fsl_text(GOOD_BVALS, GOOD_BVECS)[1],
        7,
        r"non-numeric value 'abc'",
    ),
    "transposed bvec": (
        fsl_text(GOOD_BVALS, GOOD_BVECS)[0],
        "\n".join(" ".join(map(str, r)) for r in GOOD_BVECS),
        7,
        r"x_dwi.bvec: found 7 rows of 3 values: the table is transposed",
    ),
    "two bvec rows": (
        fsl_text(GOOD_BVALS, GOOD_BVECS)[0],
        "0 1 0 0 0 0 0\n0 0 1 0 0 0 0",
        7,
        r"expected 3 rows \(x, y, z\), found 2",
    ),
    "ragged rows": (
        fsl_text(GOOD_BVALS, GOOD_BVECS)[0],
        "0 1 0 0 0 0 0\n0 0 1 0 0 0\n0 0 0 1 0 0 0",
        7,
        r"rows of different lengths",
    ),
    "count mismatch": (
        "0 1000 1000 1000 1000 1000",
        fsl_text(GOOD_BVALS, GOOD_BVECS)[1],
        None,
        r"6 b-values but x_dwi.bvec has 7 directions",
    ),
    "volumes mismatch": (*fsl_text(GOOD_BVALS, GOOD_BVECS), 9, r"7 entries but the DWI series has 9 volumes"),
    "negative b": (
        fsl_text([0, -1000, 1000, 1000, 1000, 1000, 1000], GOOD_BVECS)[0],
        fsl_text(GOOD_BVALS, GOOD_BVECS)[1],
        7,
        r"finite and non-negative",
    ),
    "nan bvec": (
        fsl_text(GOOD_BVALS, GOOD_BVECS)[0],
        fsl_text(GOOD_BVALS, GOOD_BVECS)[1].replace("0.707107", "nan", 1),
        7,
        r"NaN or Inf",
    ),
    "zero vector b>0": (
        fsl_text(GOOD_BVALS, GOOD_BVECS)[0],
        fsl_text(GOOD_BVALS, np.vstack([[0, 0, 0], [0, 0, 0], DIRS[1:]]))[1],
        7,
        r"volume 1 has b=1000 but a zero gradient direction",
    ),
    "not unit": (
        fsl_text(GOOD_BVALS, GOOD_BVECS)[0],
        fsl_text(GOOD_BVALS, np.vstack([[0, 0, 0], [0.5, 0, 0], DIRS[1:]]))[1],
        7,
        r"volume 1 has a gradient direction of length 0.500, not 1",
    ),
    "b0 odd vector": (
        fsl_text(GOOD_BVALS, GOOD_BVECS)[0],
        fsl_text(GOOD_BVALS, np.vstack([[0.3, 0, 0], DIRS]))[1],
        7,
        r"b=0 volume 0 has a direction of length 0.300",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_tables_say_what_is_wrong(tmp_path, case):
    bval_text, bvec_text, n_volumes, message = BAD_CASES[case]
    bval, bvec = write_pair(tmp_path, bval_text, bvec_text)
    with pytest.raises(GradientError, match=message) as err:
        read_gradients(bval, bvec, n_volumes=n_volumes)
    assert "\n" not in str(err.value)
    assert "x_dwi.bv" in str(err.value)  # names the file


def table(bvals, dirs=None):
    bvals = np.asarray(bvals, float)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(len(bvals), 3)) if dirs is None else np.asarray(dirs, float)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    v[bvals <= 50] = 0
    return GradientTable(bvals, v)


def test_shells_cluster_with_tolerance():
    shells, idx = find_shells(np.array([0, 5, 995, 1000, 1010, 2000, 1990, 3005, 900]))
    assert shells == [997.5, 1995.0, 3005.0]  # medians
    assert idx.tolist() == [-1, -1, 0, 0, 0, 1, 1, 2, 0]


def test_dti_shell_choice_follows_protocol():
    # Highest shell below 1500 when there is one...
    g = table([0, 0] + [1000] * 8 + [2000] * 8 + [3000] * 8 + [500] * 8)
    keep = select_dti_volumes(g)
    assert set(g.bvals[keep]) == {0.0, 1000.0}
    # ... else the lowest shell.
    g = table([0] + [2000] * 8 + [3000] * 8)
    assert set(g.bvals[select_dti_volumes(g)]) == {0.0, 2000.0}


@pytest.mark.parametrize(
    "bvals, dirs, message",
    [
        ([0, 0, 0], None, r"only b=0 volumes"),
        ([1000] * 8, None, r"no b=0 volume"),
        (
            [0] + [1000] * 8,
            [[0, 0, 0]] + [[1, 0, 0], [0, 1, 0], [0, 0, 1]] * 2 + [[1, 0, 0], [0, 1, 0]],
            r"fewer than 6 non-collinear directions",
        ),
    ],
)
def test_unusable_tables_for_dti(bvals, dirs, message):
    with pytest.raises(GradientError, match=message):
        select_dti_volumes(table(bvals, dirs), "run-1")


def test_frames_of_bvecs():
    g = GradientTable(np.array([1000.0]), np.array([[1.0, 0, 0]]))
    ras = np.diag([2.0, 2, 2, 1])
    las = np.diag([-2.0, 2, 2, 1])
    # FSL's x flip for a positive determinant: the file's +x is voxel −i, i.e. world −x.
    np.testing.assert_allclose(g.bvecs_world(ras), [[-1, 0, 0]])
    # For LAS images the file frame is the voxel frame; voxel +i points to world −x.
    np.testing.assert_allclose(g.bvecs_world(las), [[-1, 0, 0]])
