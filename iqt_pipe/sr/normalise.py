"""Per-subject channel standardisation shared by training and prediction.

Each subject's six tensor components are standardised with the in-mask mean and sd of its
*LR* tensors — the only input prediction has. Targets use the same statistics, so the network
output is de-standardised with them too.

Two targets exist (recorded in the model card as ``target``): ``"hr"`` — the network predicts
the standardised HR tensors (the paper); ``"residual-cubic"`` — it predicts the HR tensors minus
the cubic B-spline upsampling of the LR input, divided by the same sd.

The network's inputs (the card's ``inputs``): the six standardised components (``"tensor"``)
and optionally the fitted non-diffusion-weighted signal (``"s0"``, T2-weighted structure at a
higher SNR than the components: CSF, the brain's edge), as S0 over its median in the LR brain
minus 1, so that background (S0 = 0) is −1, as are the voxels beyond the volume.
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


#: The network's input channels: the tensor components, and optionally the fitted S0.
INPUTS = ("tensor", "s0")
#: The S0 channel's background value (S0 = 0), and its ceiling (S0 at 6× the brain's median:
#: beyond any tissue or CSF, where a fit of a few bad voxels may put it).
S0_BACKGROUND, S0_CEILING = -1.0, 5.0


def s0_channel(s0: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The fitted S0 as a network input (float32): S0 / median(S0 in the brain ``mask``) − 1,
    clipped to [−1, 5]; non-finite or non-positive S0 is background (−1)."""
    s0 = np.asarray(s0, dtype=np.float64)
    inside = np.asarray(mask, dtype=bool) & np.isfinite(s0) & (s0 > 0)
    if not inside.any():
        raise InputError("the brain mask holds no voxel with a positive fitted S0; cannot scale the S0 input")
    ratio = np.where(np.isfinite(s0) & (s0 > 0), s0, 0.0) / np.median(s0[inside])
    return np.clip(ratio - 1.0, S0_BACKGROUND, S0_CEILING).astype(np.float32)


def network_input(
    tensors: np.ndarray, stats: ChannelStats, s0: np.ndarray | None = None, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The network's input volume (X, Y, Z, C) — the standardised components, then with ``s0``
    its :func:`s0_channel` over the brain ``mask`` — and its background value (C,), that of a
    zero tensor and S0, which pads the volume."""
    z, background = stats.standardise(tensors), stats.standardise(np.zeros(6))
    if s0 is None:
        return z, background
    if mask is None:
        raise ValueError("the S0 input is scaled within the brain mask: pass mask")
    if s0.shape != tensors.shape[:3]:
        raise InputError(f"S0 image {s0.shape} and tensor image {tensors.shape[:3]} are not on the same grid")
    channel = s0_channel(s0, mask)[..., None]
    return np.concatenate([z, channel], axis=-1), np.append(background, np.float32(S0_BACKGROUND))
