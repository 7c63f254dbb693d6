"""Per-subject channel standardisation shared by training and prediction.

Each subject's six tensor components are standardised with the in-mask mean and sd of its
*LR* tensors — the only input prediction has. Targets use the same statistics, so the network
output is de-standardised with them too.

Two targets exist (recorded in the model card as ``target``): ``"hr"`` — the network predicts
the standardised HR tensors (the paper); ``"residual-cubic"`` — it predicts the HR tensors minus
the cubic B-spline upsampling of the LR input, divided by the same sd.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iqt_pipe.io import InputError

SD_FLOOR = 1e-12


@dataclass(frozen=True)
class ChannelStats:
    mean: np.ndarray  # (6,)
    sd: np.ndarray  # (6,)

    def standardise(self, d6: np.ndarray) -> np.ndarray:
        """(..., 6) tensors → standardised float32 values."""
        return ((d6 - self.mean) / self.sd).astype(np.float32)

    def destandardise(self, z: np.ndarray) -> np.ndarray:
        """Standardised (..., 6) values → tensors (mm²/s)."""
        return (z * self.sd + self.mean).astype(np.float32)


def channel_stats(tensors: np.ndarray, mask: np.ndarray) -> ChannelStats:
    """In-mask mean and sd of each of the six components of an LR tensor field."""
    values = np.asarray(tensors, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    if values.shape[0] < 2:
        raise InputError("the brain mask holds fewer than two voxels; cannot standardise (check the mask)")
    return ChannelStats(values.mean(axis=0), np.maximum(values.std(axis=0), SD_FLOOR))


TARGETS = ("hr", "residual-cubic")


def encode_target(hr: np.ndarray, stats: ChannelStats, baseline: np.ndarray | None = None) -> np.ndarray:
    """HR tensors → the network's training target (``baseline`` given for residual targets)."""
    if baseline is None:
        return stats.standardise(hr)
    return ((hr - baseline) / stats.sd).astype(np.float32)


def decode_output(z: np.ndarray, stats: ChannelStats, baseline: np.ndarray | None = None) -> np.ndarray:
    """Network output → HR tensors (mm²/s); inverse of :func:`encode_target`."""
    if baseline is None:
        return stats.destandardise(z)
    return (z * stats.sd + baseline).astype(np.float32)
