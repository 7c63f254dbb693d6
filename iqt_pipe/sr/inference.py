"""Whole-volume Monte-Carlo super-resolution with uncertainty.

The 3D-ESPCN is fully convolutional: an LR tile of (t + 2m)³ voxels (m = 2 lost to the valid
convolutions on each side) gives the HR voxels of its t³ central LR positions. The LR volume
is padded by m with background (zero tensors) and split into equal tiles; only tiles whose LR
positions touch the region to predict run. The layers run one at a time over the volume: each
hidden layer's features are computed once, in t³ blocks where a later layer needs them, into
a volume that the next layer reads its blocks' windows from, so no tile recomputes its
neighbours' margins (on a brain-shaped region the 7³-receptive-field network does 0.6× the
convolutions of independent tiles); large volumes run in slabs that fit the memory budget.
No per-patch Python loop, and every HR voxel of the region is predicted. The app and
``iqt-eval`` predict the brain mask dilated by the receptive field (:func:`predict_brain`), so
the brain's rim is predicted too.

Monte-Carlo. Each of the T samples draws one set of weights from the variational posterior,
w = η·(1 + √α·ε), and runs it over the whole volume (every tile uses the same draw), so the
result does not depend on the tiling. (Training uses the local reparameterisation trick, which
samples activations instead: the same marginal per activation with less gradient variance, but
not one network per sample.) Predictive mean = mean of the sampled means; intrinsic variance =
mean of the predicted variances 1/precision; parameter variance = variance of the sampled
means; total = their sum. FA's sd comes from tensor samples drawn from the predictive
distribution (per MC sample, antithetic pairs from Gaussians with the predicted variances);
MD is linear in the tensor, so its mean and sd are exact: the mean and variance over the MC
samples of MD(μ), plus the mean of the predicted (D11 + D22 + D33 variances) / 9.

The FA map is FA of the predictive mean tensor, not the mean of the samples' FA. The samples
carry the intrinsic variance (the HR acquisition's noise among it), and FA is biased upwards
by noise where a tensor is nearly isotropic: their mean FA reproduces that bias. Held out
from training, it scored 0.76–1.11 × cubic spline's FA error against 0.75–0.93 for FA of the
mean (13 runs of ds-realdwi; worse than cubic spline on both Toshiba runs, whose intervals are
wide). FA of the mean tensor is also the FA any tool computes from the written tensor.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from iqt_pipe.dmri.dti import DIAGONAL
from iqt_pipe.io import InputError
from iqt_pipe.models.espcn import IQTNet
from iqt_pipe.sr.normalise import TARGETS, ChannelStats, channel_stats, decode_output, network_input
from iqt_pipe.sr.options import (
    DEFAULT_MC_SAMPLES,
    PRECISIONS,
    SYMMETRIES,
)

#: bytes per float32
_F32 = 4


@dataclass
class Prediction:
    """HR outputs, all in the voxel frame of the HR grid; variances per component (mm²/s)²."""

    mean: np.ndarray  # (X, Y, Z, 6)
    var_intrinsic: np.ndarray | None  # hetero variants only
    var_parameter: np.ndarray | None  # variational variants only
    fa_mean: np.ndarray  # FA of the mean tensor (the module docstring says why)
    fa_sd: np.ndarray
    md_mean: np.ndarray
    md_sd: np.ndarray
    mask: np.ndarray  # (X, Y, Z) bool: the brain, the LR brain mask expanded to HR blocks
    affine: np.ndarray
    info: dict = field(default_factory=dict)
    #: (X, Y, Z) bool: the voxels the network predicted, the brain and around it (variances and
    #: sd are zero outside; the mean, see :func:`predict_volume`'s ``outside``); None: the brain.
    region: np.ndarray | None = None

    @property
    def predicted(self) -> np.ndarray:
        """The HR voxels that hold a prediction."""
        return self.mask if self.region is None else self.region

    @property
    def var_total(self) -> np.ndarray:
        total = np.zeros_like(self.mean)
        for part in (self.var_intrinsic, self.var_parameter):
            if part is not None:
                total = total + part
        return total

    @property
    def sd_frobenius(self) -> np.ndarray:
        """Frobenius sd of the total predictive uncertainty (see :func:`frobenius_sd`)."""
        return frobenius_sd(self.var_total)


def frobenius_sd(var: np.ndarray) -> np.ndarray:
    """sqrt(E‖D − D̂‖²_F) from per-component variances (..., 6) in BEP016 order: one
    rotation-invariant uncertainty number per voxel (mm²/s); off-diagonals count twice."""
    return np.sqrt(var[..., 0] + var[..., 3] + var[..., 5] + 2 * (var[..., 1] + var[..., 2] + var[..., 4]))


def bfloat16_is_native() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles): there bfloat16
    convolutions run ~5× faster than float32 ones; elsewhere they are emulated and slower."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private helpers of PyTorch: absent means no
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bfloat16 on CPUs with native bfloat16 (AMX), else float32 (GPUs included)."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: choose {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if device.type == "cpu" and bfloat16_is_native() else "float32"
    return precision


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when visible, else CPU; ``cuda`` without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"--device {device}: choose auto, cpu or cuda")
    return torch.device(device)


def expand_mask(lr_mask: np.ndarray, r: int) -> np.ndarray:
    """Each LR voxel's r×r×r HR block."""
    m = np.asarray(lr_mask, dtype=bool)
    return m.repeat(r, 0).repeat(r, 1).repeat(r, 2)


def prediction_region(brain: np.ndarray, margin: int) -> np.ndarray:
    """LR voxels to super-resolve: the brain mask dilated by the network's receptive-field
    radius ``margin`` (a cube), so the brain's rim — where a mask of the HR scan reaches past
    the LR one, and where tractography ends — is predicted from the same context as its inside."""
    from scipy import ndimage

    brain = np.asarray(brain, dtype=bool)
    if margin < 1:
        return brain
    return ndimage.binary_dilation(brain, structure=np.ones((3, 3, 3), bool), iterations=int(margin))


def correlate_diagonal(noise, shared, loading) -> None:
    """Give independent standard normal tensor noise (components on the last axis) correlated
    diagonal components, in place: ε_a ← λ_a·c + √(1 − λ_a²)·ε_a for a in D11, D22, D33, with
    the standard normal ``shared`` factor c (``noise``'s shape less the last axis) and
    ``loading`` λ (a number, or one per diagonal component on a last axis); each ε_a stays
    standard normal and two of them correlate by λ_a·λ_b. NumPy arrays or torch tensors (a
    view of any layout: each component is updated where it lies)."""
    for i, a in enumerate(DIAGONAL):
        lam = loading if np.ndim(loading) == 0 else loading[..., i]
        eps = noise[..., a]  # a view
        eps *= (1 - lam * lam) ** 0.5
        eps += lam * shared


def md_variance(var: torch.Tensor, rho: float) -> torch.Tensor:
    """The variance of MD = tr(D)/3 for tensor errors with per-component variances ``var``
    (components on the last axis) whose diagonal components correlate by ``rho``:
    (Σ_a v_a + 2ρ Σ_{a<b} √(v_a v_b)) / 9."""
    v11, v22, v33 = (var[..., a] for a in DIAGONAL)
    out = v11 + v22 + v33
    if rho:
        out = out + 2 * rho * ((v11 * v22) ** 0.5 + (v11 * v33) ** 0.5 + (v22 * v33) ** 0.5)
    return out / 9


#: ‖D‖²_F (mm²/s)² at or below which a tensor is no tissue's (‖D‖_F ≤ 1e-6 mm²/s, a hundredth of
#: the lowest mean diffusivity of tissue, ~1e-4 mm²/s): the background, where the cubic
#: upsampling of the fit's zeros leaves the spline's tails and rounding noise. Its FA is 0,
#: as DIPY's of a zero tensor.
_NEGLIGIBLE_NORM2 = 1e-12


def _fa_md(d: torch.Tensor, axis: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """FA and MD of BEP016 tensors (components on ``axis``) without an eigendecomposition:
    FA² = 3/2·‖D − MD·I‖²_F / ‖D‖²_F = 3/2 − (tr D)² / (2‖D‖²_F) (clipped to [0, 1]; 0 for a
    negligible tensor)."""
    d11, d12, d13, d22, d23, d33 = d.unbind(axis)
    trace = d11 + d22 + d33
    norm2 = d11 * d11 + d22 * d22 + d33 * d33 + 2 * (d12 * d12 + d13 * d13 + d23 * d23)
    md = trace / 3
    return _fa_squared(trace, norm2).sqrt_(), md


def _fa_squared(trace: torch.Tensor, norm2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """FA² = 3/2 − (tr D)² / (2‖D‖²_F), clipped to [0, 1], 0 for a negligible tensor, from
    the trace and squared Frobenius norm (both overwritten: they are the caller's temporaries)."""
    negligible = norm2 <= _NEGLIGIBLE_NORM2
    out = torch.div(trace.mul_(trace), norm2.clamp_min_(_NEGLIGIBLE_NORM2), out=out)
    return out.mul_(-0.5).add_(1.5).clamp_(0, 1).masked_fill_(negligible, 0)


def _antithetic_fa(mu: torch.Tensor, eps: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """FA (2S, K) of the tensor samples μ + ε and μ − ε, for ``mu`` (K, 6) and ``eps``
    (S, K, 6), as :func:`_fa_md` gives it (FA² with ``squared``), without forming the samples:
    tr(μ ± ε) = tr μ ± tr ε and ‖μ ± ε‖²_F = ‖μ‖²_F + ‖ε‖²_F ± 2⟨μ, ε⟩_F. Component by component,
    so ``eps`` may be a view whose components are each contiguous (the fastest layout)."""
    m, e = mu.unbind(-1), eps.unbind(-1)
    tr_mu, tr_eps = m[0] + m[3] + m[5], e[0] + e[3] + e[5]
    norm2_mu = sum(w * mj * mj for w, mj in zip(_FROBENIUS, m))
    norm2 = e[0] * e[0]
    cross = e[0] * (2 * m[0])
    for w, mj, ej in list(zip(_FROBENIUS, m, e))[1:]:
        norm2.addcmul_(ej, ej, value=w)
        cross.addcmul_(ej, 2 * w * mj)
    norm2 += norm2_mu
    out = torch.empty((2,) + norm2.shape, dtype=norm2.dtype, device=norm2.device)
    _fa_squared(tr_mu + tr_eps, norm2 + cross, out[0])
    _fa_squared(tr_mu - tr_eps, norm2.sub_(cross), out[1])
    return (out if squared else out.sqrt_()).flatten(0, 1)


#: The weights of the six BEP016 components in a Frobenius norm.
_FROBENIUS = (1.0, 2.0, 2.0, 1.0, 2.0, 1.0)


def _spatial(w: torch.Tensor, perm, mirror: int, inverse: bool = False) -> torch.Tensor:
    """Symmetry (axis permutation ``perm``, then mirror mask ``mirror``) on the last three
    dimensions of ``w``, or its inverse."""
    lead = tuple(range(w.dim() - 3))
    flips = [w.dim() - 3 + a for a in range(3) if mirror >> a & 1]
    if inverse:
        w = torch.flip(w, flips) if flips else w
        return w.permute(*lead, *(len(lead) + int(a) for a in np.argsort(perm)))
    w = w.permute(*lead, *(len(lead) + a for a in perm))
    return torch.flip(w, flips) if flips else w


@torch.no_grad()
def symmetric_network(net: IQTNet, code: int) -> IQTNet:
    """A copy of ``net`` that computes g⁻¹(f(g(z))) for the symmetry g of ``code`` (see
    :func:`iqt_pipe.sr.patches.transform_field`: voxels moved, tensor components permuted and
    mirrored alike): the prediction the network would make for the mirrored or transposed
    scan, moved back. The symmetry is folded into the weights — kernels moved, input channels
    and the shuffled output channels gathered and signed — so it costs nothing at prediction
    time. Use it with ``sample=False`` (mean or one drawn set of weights)."""
    from iqt_pipe.models.shuffle import periodic_shuffle, periodic_unshuffle
    from iqt_pipe.sr.patches import AXIS_PERMUTATIONS, N_MIRRORS, mirror_signs, permutation_channels

    out = copy.deepcopy(net)
    if not code:
        return out
    perm, mirror = AXIS_PERMUTATIONS[code // N_MIRRORS], code % N_MIRRORS
    source = permutation_channels(perm)  # g(z)_c = sign_c · z_source[c]
    sign = torch.as_tensor(mirror_signs(mirror))
    r = net.r
    # The shuffled output channel each output channel takes after g⁻¹: sub-voxel offsets moved
    # back by the inverse symmetry; component c' of g⁻¹(u) is sign[inverse[c']] · u[inverse[c']].
    probe = torch.arange(6 * r**3, dtype=torch.float64).view(1, -1, 1, 1, 1)
    moved = periodic_unshuffle(_spatial(periodic_shuffle(probe, r), perm, mirror, inverse=True), r).view(6, r**3)
    inverse = np.argsort(source)
    rows = moved[inverse].reshape(-1).long()
    row_sign = sign[inverse].repeat_interleave(r**3)
    in_sign = sign.view(1, 6, 1, 1, 1)
    for n, last, signed, key, w in _conv_parameters(out):
        moved_w = _spatial(w, perm, mirror, inverse=True) if w.dim() == 5 else w
        if n == 0 and w.dim() == 5 and w.shape[1] > 1:  # z_d enters where g puts it, signed (S0 only moves)
            folded = moved_w.clone()
            folded[:, source] = moved_w[:, :6] * (in_sign.to(w) if key == "weight" else 1)
            moved_w = folded
        if n == last:
            moved_w = moved_w[rows]
            if signed and key != "rho":
                moved_w = moved_w * row_sign.to(w).view((-1,) + (1,) * (w.dim() - 1))
        w.copy_(moved_w.clone())
    return out


def _conv_parameters(net: IQTNet) -> list[tuple[int, int, bool, str, torch.Tensor]]:
    """(layer, last layer, signed, name, tensor) of every convolution parameter of ``net``: the
    weights, biases and, per weight (Var.I) or per filter (Var.II), the dropout rates. The mean
    network's outputs are signed tensor components; the precision network's carry no sign."""
    return [
        (n, len(sub.convs) - 1, signed, key, getattr(conv, key))
        for sub, signed in ((net.mean_net, True), (net.prec_net, False))
        if sub is not None
        for n, conv in enumerate(sub.convs)
        for key in ("weight", "rho", "bias")
        if getattr(conv, key, None) is not None
    ]


def _bytes_per_tile(model: IQTNet, t: int, scalar_samples: int) -> int:
    """Rough peak bytes of one tile in one forward call of the last layer: its input window and
    output, both networks' outputs at its HR voxels, and the tensor samples behind FA/MD."""
    window = (t + model.kernels[-1] - 1) ** 3 * model.widths[-1]
    n_hr = (t * model.r) ** 3
    return (window + t**3 * 6 * model.r**3) * _F32 + n_hr * 6 * _F32 * (6 + 2 * scalar_samples)


def tile_size_for_budget(
    model: IQTNet, mem_mb: float, scalar_samples: int = 1, device_type: str = "cpu", precision: str = "bfloat16"
) -> int:
    """LR tile edge t: on CPU 6 in float32 (no tile recomputes another's margin, so small tiles
    and blocks hug the brain: on an HCP-sized box 4–8 ran within the timing noise of each
    other, 12 ~20 % slower) and 16 in bfloat16 (measured fastest with AMX, whose convolutions
    lose more on small tiles); 16 on GPUs, which take many tiles per call
    (:func:`_positions_per_call`; not measured: no GPU at hand); smaller when a tile would not
    fit ``mem_mb``."""
    t = 6 if device_type == "cpu" and precision == "float32" else 16
    while t > 4 and _bytes_per_tile(model, t, scalar_samples) > mem_mb * 2**20:
        t -= 2
    return t


class _Tiler:
    """Equal LR tiles over a padded volume; maps tile outputs back to the HR grid."""

    def __init__(self, shape: tuple[int, int, int], t: int, m: int, r: int):
        self.shape, self.t, self.m, self.r = shape, t, m, r
        self.n_tiles = tuple(math.ceil(s / t) for s in shape)
        self.padded_shape = tuple(n * t + 2 * m for n in self.n_tiles)

    def pad(self, x: np.ndarray, value: np.ndarray) -> np.ndarray:
        """(X, Y, Z, C) → padded (X', Y', Z', C), ``value`` (C,) outside the volume."""
        out = np.empty(self.padded_shape + x.shape[3:], dtype=np.float32)
        out[...] = value
        m = self.m
        out[m : m + self.shape[0], m : m + self.shape[1], m : m + self.shape[2]] = x
        return out

    def tiles_touching(self, lr_mask: np.ndarray) -> list[tuple[int, int, int]]:
        t = self.t
        padded = np.zeros(tuple(n * t for n in self.n_tiles), dtype=bool)
        padded[: self.shape[0], : self.shape[1], : self.shape[2]] = lr_mask
        nx, ny, nz = self.n_tiles
        hit = padded.reshape(nx, t, ny, t, nz, t).any(axis=(1, 3, 5))
        return [tuple(int(v) for v in idx) for idx in np.argwhere(hit)]

    def input_slices(self, tile):
        t, m = self.t, self.m
        return tuple(slice(i * t, i * t + t + 2 * m) for i in tile)

    def hr_slices(self, tile):
        t, r = self.t, self.r
        return tuple(slice(i * t * r, min((i + 1) * t, s) * r) for i, s in zip(tile, self.shape))


def _hr_baseline(lr_tensors, stats: ChannelStats, r: int, target: str) -> np.ndarray:
    """What de-standardised outputs are added to: the channel means (target "hr", shape (6,))
    or the cubic B-spline upsampling of the input ("residual-cubic", the HR grid)."""
    from iqt_pipe.sr.baselines import interpolate_tensors

    if target not in TARGETS:
        raise ValueError(f"unknown model target {target!r}; expected one of {TARGETS}")
    if target == "residual-cubic":
        return interpolate_tensors(lr_tensors, r, "cubic")
    return stats.mean.astype(np.float32)


@contextmanager
def _torch_threads(threads: int | None):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _target_of(model: IQTNet, target: str | None) -> str:
    """The model's own target (set from its card by ``load_model``) unless one is given that
    agrees with it."""
    own = getattr(model, "target", None)
    if target is not None and own is not None and target != own:
        raise ValueError(f"target {target!r} disagrees with the model's own target {own!r}")
    return target or own or "hr"


@dataclass
class _Passes:
    """The T forward passes, T = max(weight draws, symmetries): pass k runs weight draw k (the
    mean weights when ``draws`` is 1) under symmetry code ``symmetries[k mod n]``, in ``dtype``
    on ``device``. Behind FA, ``per_sample`` tensor samples per voxel and pass (antithetic pairs,
    drawn when ``draw_scalars``), else 1: FA of the pass's mean."""

    count: int
    draws: int
    symmetries: tuple[int, ...]
    draw_scalars: bool
    per_sample: int
    device: torch.device
    dtype: torch.dtype
    #: The model's correlation of the diagonal components' intrinsic errors.
    diagonal_correlation: float = 0.0

    @property
    def precision(self) -> str:
        """The arithmetic's name: ``float32`` or ``bfloat16``."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def itemsize(self) -> int:
        """Bytes per number in the arithmetic."""
        return torch.tensor([], dtype=self.dtype).element_size()

    @property
    def channels_last(self) -> bool:
        """On CPU the network and its inputs use the channels-last memory layout."""
        return self.device.type == "cpu"


def _plan_passes(
    model: IQTNet,
    mc_samples: int,
    symmetries: Sequence[int],
    scalar_samples: int,
    device: torch.device,
    dtype: torch.dtype,
) -> _Passes:
    """The passes :func:`predict_volume` runs for these settings (see its docstring)."""
    draws = max(1, mc_samples) if model.stochastic else 1
    symmetries = tuple(int(c) for c in symmetries) or (0,)
    T = max(draws, len(symmetries))
    # Tensor samples per MC sample behind FA: only the hetero Gaussian is sampled, and its MD
    # moments are exact (MD is linear in the components).
    draw_scalars = model.hetero and scalar_samples > 0
    per_sample = 2 * math.ceil(scalar_samples / (2 * T)) if draw_scalars else 1  # antithetic pairs
    return _Passes(T, draws, symmetries, draw_scalars, per_sample, device, dtype, model.diagonal_correlation)


def _pass_network(net: IQTNet, k: int, passes: _Passes, seed: int) -> IQTNet:
    """The network of pass k: one posterior draw of the weights from ``seed`` (when the passes
    draw weights), with its symmetry folded in, in the passes' arithmetic and memory layout;
    ``net`` itself, converted in place, when it is neither drawn nor moved."""
    draw = net.sample_weights(torch.Generator(device=passes.device).manual_seed(seed)) if passes.draws > 1 else net
    code = passes.symmetries[k % len(passes.symmetries)]
    if code:
        draw = symmetric_network(draw, code)
    draw = draw.to(passes.dtype)
    return draw.to(memory_format=torch.channels_last_3d) if passes.channels_last else draw


class _Batch:
    """One forward call's tiles and everything the passes reuse for them: where the last
    layer reads its input, slab ``slab``'s last hidden features (flat indices ``win`` of the
    tiles' windows, :class:`_Slab`); the K voxels of the
    tiles' HR blocks that are in the region, as their LR positions and sub-positions in the
    network's output before the periodic shuffle (``lr_pos``, ``sub``, on the device) and as
    flat indices of the HR grid (``voxels``); the baseline the de-standardised outputs are
    added to over them ((K, 6), or (6,) when constant); and the running statistics over the
    passes at those voxels (Welford for the mean and its variance, a sum for the intrinsic
    variance, float32; float64 sums of FA/MD and their squares), components on the last axis."""

    def __init__(self, slab: int, win: torch.Tensor, lr_pos: torch.Tensor, sub: torch.Tensor, voxels, base):
        self.slab, self.win = slab, win
        self.lr_pos, self.sub, self.voxels, self.base = lr_pos, sub, voxels, base
        self.stats: dict[str, torch.Tensor] = {}

    def region(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, 6·r³, t, t, t), the output before the periodic shuffle → (K, 6): the components
        of the region's K voxels in one gather (on CPU from a view of the channels-last output:
        the shuffle is never materialised)."""
        per_position = raw.permute(0, 2, 3, 4, 1).reshape(-1, 6, raw.shape[1] // 6)  # (B·t³, 6, r³)
        return per_position[self.lr_pos, :, self.sub]

    def add(self, k: int, mu: torch.Tensor, var_i: torch.Tensor | None, fa, md, md_var) -> None:
        """Pass ``k`` over the region's K voxels: ``mu``/``var_i`` (K, 6), ``fa`` the sums of FA
        and FA² (K,) over the pass's tensor samples, ``md`` (K,) the MD of ``mu`` and ``md_var``
        its predicted variance (MD is linear: its moments need no samples). The first pass's
        values start the sums (Welford's first step, exactly)."""
        st = self.stats
        md = md.double()
        moments = {
            "fa": fa[0].double(),
            "fa2": fa[1].double(),
            "md": md,
            "md2": md * md if md_var is None else md * md + md_var.double(),
        }
        if k == 0:
            st["mean"], st["m2"] = mu, torch.zeros_like(mu)
            if var_i is not None:
                st["var_int"] = var_i
            st.update(moments)
            return
        delta = mu - st["mean"]
        st["mean"].add_(delta, alpha=1 / (k + 1))
        st["m2"].addcmul_(delta, mu.sub_(st["mean"]))  # ``mu`` is the caller's temporary
        if var_i is not None:
            st["var_int"] += var_i
        for key, value in moments.items():
            st[key] += value

    def finish(self, passes: int, samples: int) -> dict[str, np.ndarray]:
        """The statistics over ``passes`` MC samples (``samples`` FA samples) at the region's K
        voxels, float32 NumPy: ``mean``, ``var_int`` and ``m2`` (K, 6), ``fa``, ``md`` and their
        sd (K,)."""
        st = self.stats
        out = {key: st[key] / passes if passes > 1 else st[key] for key in ("var_int", "m2") if key in st}
        out["mean"] = st["mean"]
        for key, count in (("fa", samples), ("md", passes)):
            first, second = st[key] / count, st[key + "2"] / count
            out[key], out[key + "_sd"] = first, (second - first * first).clamp_min(0).sqrt()
        out["fa"] = _fa_md(st["mean"])[0]  # the estimate: FA of the mean tensor (module docstring)
        return {key: value.float().cpu().numpy() for key, value in out.items()}


def _positions_per_call(device: torch.device) -> int:
    """Output positions per forward call of a layer: on CPU 16 tiles of 12³ (larger calls ran no
    faster), on a GPU 32 times as many (a GPU needs large calls to fill; within the budget)."""
    return 16 * 12**3 * (32 if device.type == "cuda" else 1)


@dataclass
class _Slab:
    """A slab of the tile grid along its first axis and how the network runs over it, layer by
    layer, in a local frame: index u is the padded volume's ``origin`` + u, over ``shape`` (the
    slab's tiles with the receptive-field margin, and t more voxels at the far end of each axis,
    so that every block's window lies inside). ``z`` is the input there, (*shape, C) in the
    passes' arithmetic on their device. Hidden layer i computes its features in t³ blocks
    where a later layer needs them (the region dilated by the rest of the receptive field):
    ``hidden[i]`` holds per forward call the flat indices of the blocks' input windows and of
    their outputs, and the window edge. Elsewhere a feature volume holds what it held; no
    needed output reads it."""

    origin: tuple[int, int, int]
    shape: tuple[int, int, int]
    z: torch.Tensor
    hidden: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]
    tiles: list[tuple[int, int, int]]
    #: Per hidden layer, how many blocks it computes.
    blocks: list[int]


def _flat(corners: np.ndarray, edge: int, shape) -> np.ndarray:
    """Flat indices (row-major ``shape``) of the ``edge``³ cubes at ``corners`` (N, 3), cube by cube."""
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    r = np.arange(edge, dtype=np.int64)
    offsets = (r[:, None, None] * strides[0] + r[None, :, None] * strides[1] + r[None, None, :]).ravel()
    return ((corners.astype(np.int64) @ strides)[:, None] + offsets[None, :]).ravel()


def _calls(n: int, per_call: int) -> list[slice]:
    return [slice(a, min(a + per_call, n)) for a in range(0, n, per_call)]


@dataclass
class _TilePlan:
    """Which LR tiles run (``tiles``, those whose LR positions touch the region to predict),
    split into :class:`_Slab` s, up to ``per_call`` tiles per forward call of the last layer."""

    tiler: _Tiler
    tiles: list[tuple[int, int, int]]
    slabs: list[_Slab]
    per_call: int
    #: Blocks computed per hidden layer, over all slabs.
    blocks: list[int]
    #: Feature volumes' elements per hidden layer (the largest slab's).
    workspace: list[int]
    #: The last layer's kernel edge.
    last_kernel: int

    def features(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Zeroed flat buffers for the hidden layers' feature volumes, reused by every slab,
        network and pass."""
        return [torch.zeros(n, dtype=dtype, device=device) for n in self.workspace]

    def batches(self, passes: _Passes, baseline: np.ndarray, hr_region: np.ndarray) -> list[_Batch]:
        """The :class:`_Batch` of every forward call of the last layer, slab by slab, on the
        passes' device; ``baseline`` is (6,) or the HR grid's (X, Y, Z, 6), ``hr_region`` the HR
        voxels predicted."""
        out = []
        t, r, m = self.tiler.t, self.tiler.r, self.tiler.m
        n = t * r
        # Per HR offset h of a tile's block: its LR position h // r in the tile and sub-position
        # h mod r, numbered as the periodic shuffle's channels (i + r·j + r²·k), and its offset
        # in the HR grid from the block's corner; a row (tile j, offset h) adds tile j's own.
        hx, hy, hz = np.unravel_index(np.arange(n**3), (n, n, n))
        lr_of = np.ravel_multi_index((hx // r, hy // r, hz // r), (t, t, t))
        sub_of = hx % r + r * (hy % r) + r * r * (hz % r)
        _, Y, Z = hr_region.shape
        offset_of = (hx * Y + hy) * Z + hz
        edge, q = t + self.last_kernel - 1, self.last_kernel // 2
        for s, slab in enumerate(self.slabs):
            for call in _calls(len(slab.tiles), self.per_call):
                chunk = slab.tiles[call]
                corners = np.array(chunk) * t + m - q - np.array(slab.origin)  # of the windows
                win = _flat(corners, edge, slab.shape)
                j, h = np.divmod(np.flatnonzero(self._blocks(chunk, hr_region)), n**3)
                hr_corners = np.array([((a * Y + b) * Z + c) * n for a, b, c in chunk], dtype=np.int64)
                voxels = hr_corners[j] + offset_of[h]
                base = baseline if baseline.ndim == 1 else baseline.reshape(-1, 6)[voxels]
                out.append(
                    _Batch(
                        s,
                        torch.from_numpy(win).to(passes.device),
                        torch.from_numpy(j * t**3 + lr_of[h]).to(passes.device),
                        torch.from_numpy(sub_of[h]).to(passes.device),
                        voxels,
                        torch.from_numpy(base).to(passes.device),
                    )
                )
        return out

    def _blocks(self, chunk, volume: np.ndarray) -> np.ndarray:
        """``volume`` (HR grid, any trailing axes) cut into the tiles' HR blocks, zero beyond it."""
        n = self.tiler.t * self.tiler.r
        out = np.zeros((len(chunk), n, n, n) + volume.shape[3:], dtype=volume.dtype)
        for j, tl in enumerate(chunk):
            hs = self.tiler.hr_slices(tl)
            out[(j,) + tuple(slice(0, s.stop - s.start) for s in hs)] = volume[hs]
        return out


def _plan_tiles(
    net: IQTNet,
    inputs: tuple[np.ndarray, np.ndarray],
    region: np.ndarray,
    tile: int | None,
    mem_mb: float,
    passes: _Passes,
) -> _TilePlan:
    """Equal tiles of edge ``tile`` (default :func:`tile_size_for_budget`) over the LR volume
    of network ``inputs`` (:func:`~iqt_pipe.sr.normalise.network_input`: the volume and its
    background); those touching ``region`` run, in slabs whose feature volumes take at most a
    quarter of ``mem_mb`` (a slab's edge recomputes the receptive field's margin: thinner slabs
    cost little), and as many tiles per forward call as half of it allows."""
    t = tile or tile_size_for_budget(net, mem_mb, passes.per_sample, passes.device.type, passes.precision)
    budget = mem_mb * 2**20 / 2
    positions = _positions_per_call(passes.device)
    per_call = max(1, min(positions // t**3, int(budget // _bytes_per_tile(net, t, passes.per_sample))))
    tiler = _Tiler(region.shape, t, net.margin, net.r)
    tiles = tiler.tiles_touching(region)
    m = net.margin
    z = tiler.pad(*inputs)
    padded_region = np.zeros(tuple(n * t for n in tiler.n_tiles), bool)
    padded_region[tuple(slice(0, s) for s in region.shape)] = region
    lo, hi = (np.array(tiles).min(0), np.array(tiles).max(0) + 1) if tiles else (np.zeros(3, int),) * 2
    across = [int(hi[a] - lo[a]) * t + 2 * m for a in (1, 2)]
    per_x = (across[0] + t) * (across[1] + t) * sum(net.widths) * passes.itemsize
    along = max(1, int((budget / 2 / per_x - 2 * m - t) // t))  # tiles per slab along the first axis
    slabs = []
    for a in range(int(lo[0]), int(hi[0]), along):
        b = min(a + along, int(hi[0]))
        if slab_tiles := [tl for tl in tiles if a <= tl[0] < b]:
            origin = (a * t, int(lo[1]) * t, int(lo[2]) * t)
            extent = ((b - a) * t + 2 * m, *across)
            slabs.append(_slab(net, z, padded_region, origin, extent, slab_tiles, t, budget, passes))
    blocks = [sum(slab.blocks[i] for slab in slabs) for i in range(len(net.widths))]
    workspace = [max((math.prod(slab.shape) * w for slab in slabs), default=0) for w in net.widths]
    return _TilePlan(tiler, tiles, slabs, per_call, blocks, workspace, net.kernels[-1])


def _slab(net: IQTNet, z, padded_region, origin, extent, tiles, t: int, budget: float, passes: _Passes) -> _Slab:
    """The :class:`_Slab` of ``tiles`` over the ``extent`` of the padded input ``z`` (and of the
    region, padded to whole tiles) from ``origin``, with forward calls of at most ``budget``
    bytes."""
    from scipy import ndimage

    m, half = net.margin, [(k - 1) // 2 for k in net.kernels]
    device = passes.device
    shape = tuple(e + t for e in extent)
    local = np.zeros(shape + z.shape[3:], np.float32)
    local[: extent[0], : extent[1], : extent[2]] = z[tuple(slice(o, o + e) for o, e in zip(origin, extent))]
    # The outputs the tiles need, at their local indices.
    needed = np.zeros(shape, bool)
    needed[m : extent[0] - m, m : extent[1] - m, m : extent[2] - m] = padded_region[
        tuple(slice(o, o + e - 2 * m) for o, e in zip(origin, extent))
    ]
    hidden, counts = [], []
    for i, width in enumerate(net.widths):
        start = sum(half[: i + 1])  # the first index layer i is valid at
        rest = m - start  # the receptive field the layers after it add
        need = ndimage.maximum_filter(needed, size=2 * rest + 1, mode="constant") if rest else needed
        nb = [math.ceil((e - 2 * start) / t) for e in extent]
        grid = need[tuple(slice(start, start + n * t) for n in nb)].reshape(nb[0], t, nb[1], t, nb[2], t)
        corners = np.argwhere(grid.any(axis=(1, 3, 5))) * t + start
        edge = t + 2 * half[i]
        call_bytes = (edge**3 * net.mean_net.convs[i].in_channels + t**3 * width) * passes.itemsize
        per_call = max(1, min(_positions_per_call(device) // t**3, int(budget // call_bytes)))
        calls = [
            (_index(corners[c] - half[i], edge, shape, device), _index(corners[c], t, shape, device))
            for c in _calls(len(corners), per_call)
        ]
        hidden.append((edge, calls))
        counts.append(len(corners))
    return _Slab(origin, shape, torch.from_numpy(local).to(device, passes.dtype), hidden, tiles, counts)


def _index(corners: np.ndarray, edge: int, shape, device) -> torch.Tensor:
    return torch.from_numpy(_flat(corners, edge, shape)).to(device)


def _windows(volume: torch.Tensor, index: torch.Tensor, edge: int, passes: _Passes) -> torch.Tensor:
    """The ``edge``³ windows at flat ``index`` of a (X, Y, Z, C) volume as a batch (B, C, edge,
    edge, edge): channels-last on CPU, as gathered."""
    c = volume.shape[-1]
    x = volume.view(-1, c).index_select(0, index).view(-1, edge, edge, edge, c).permute(0, 4, 1, 2, 3)
    return x if passes.channels_last else x.contiguous()


def _run_network(sub, plan: _TilePlan, batches: list[_Batch], passes: _Passes, buffers) -> list[torch.Tensor]:
    """One ESPCN's raw outputs at the region's voxels of every batch ((K, 6·…) per batch, in
    the passes' arithmetic), its layers run one by one over each slab."""
    out: list[torch.Tensor | None] = [None] * len(batches)
    last, widths = len(sub.convs) - 1, [conv.out_channels for conv in sub.convs[:-1]]
    for s, slab in enumerate(plan.slabs):
        volumes = [slab.z] + [buf[: math.prod(slab.shape) * w].view(*slab.shape, w) for buf, w in zip(buffers, widths)]
        for i, (edge, calls) in enumerate(slab.hidden):
            target = volumes[i + 1].view(-1, volumes[i + 1].shape[-1])
            for win, at in calls:
                y = sub.layer(i, _windows(volumes[i], win, edge, passes))
                target.index_copy_(0, at, y.permute(0, 2, 3, 4, 1).reshape(-1, y.shape[1]))
        edge = plan.tiler.t + plan.last_kernel - 1
        for j, b in enumerate(batches):
            if b.slab == s:
                out[j] = b.region(sub.layer(last, _windows(volumes[-1], b.win, edge, passes)))
    return out


def _run_pass(
    draw: IQTNet,
    k: int,
    plan: _TilePlan,
    batches: list[_Batch],
    passes: _Passes,
    sd: torch.Tensor,
    seed: int,
    buffers: list[torch.Tensor],
) -> None:
    """MC sample k: the network ``draw`` over every batch; at the region's voxels its outputs
    (times the channel sd ``sd``, plus the baseline) and their intrinsic variances, and the FA
    and MD of tensor samples (streams from ``seed``, k and the batch) when the passes draw
    them (else of the pass's mean), into the batches' statistics. ``buffers``: the plan's
    :meth:`_TilePlan.features`."""
    means = _run_network(draw.mean_net, plan, batches, passes, buffers)
    precs = None if draw.prec_net is None else _run_network(draw.prec_net, plan, batches, passes, buffers)
    for j, b in enumerate(batches):
        mu = means[j].float() * sd + b.base  # (K, 6), float32
        var_i = sd**2 / draw.precision(precs[j].float()) if precs is not None else None
        if passes.draw_scalars:
            # MD is linear: its mean and variance are exact.
            rho = passes.diagonal_correlation
            fa = _sampled_fa(mu, var_i, rho, passes.per_sample // 2, (seed, k, j))
            md, md_var = (mu[:, 0] + mu[:, 3] + mu[:, 5]) / 3, md_variance(var_i, rho)
        else:
            fa, md = _fa_md(mu)
            fa, md_var = (fa, fa * fa), None
        b.add(k, mu, var_i, fa, md, md_var)


#: Tensor samples (voxels × pairs) per chunk of the FA samples. Each chunk's samples come from
#: its own stream and are reduced while they are in cache, the chunks shared among PyTorch's
#: CPU threads: on 2 cores 4× faster than one draw of every voxel's samples (single-threaded
#: in PyTorch).
_FA_CHUNK = 2**17


def _sampled_fa(
    mu: torch.Tensor, var: torch.Tensor, rho: float, half: int, stream: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ FA and Σ FA² (K,) over 2·``half`` tensor samples per voxel from N(``mu``, ``var``)
    (K, 6), antithetic pairs μ ± ε (half the random numbers, and each voxel's samples have
    exactly its predicted mean), the diagonal components' noise correlated by ``rho``. Chunk c
    of :data:`_FA_CHUNK` samples draws from the generator seeded by (``stream``, c): the same
    numbers whatever the thread count. On a GPU, one chunk."""
    n = mu.shape[0] if mu.device.type == "cuda" else max(1, _FA_CHUNK // half)
    chunks = [(c, slice(a, a + n)) for c, a in enumerate(range(0, mu.shape[0], n))]

    def chunk(item):
        c, sl = item
        seed = int(np.random.SeedSequence(list(stream) + [c]).generate_state(1)[0])
        gen = torch.Generator(device=mu.device).manual_seed(seed)
        n_c = min(sl.stop, mu.shape[0]) - sl.start
        # Components first, each contiguous: ``eps`` (S, n, 6) and ``m`` (n, 6) are views.
        z = torch.randn((6, half, n_c), generator=gen, device=mu.device)
        eps = z.movedim(0, -1)
        if rho:
            correlate_diagonal(eps, torch.randn((half, n_c), generator=gen, device=mu.device), math.sqrt(rho))
        z *= var[sl].t().sqrt()[:, None]
        m = mu[sl].t().contiguous().t()
        fa2 = _antithetic_fa(m, eps, squared=True)
        return fa2.sqrt().sum(0), fa2.sum(0)

    workers = torch.get_num_threads() if len(chunks) > 1 else 1
    if workers > 1:
        with _torch_threads(1), ThreadPoolExecutor(workers) as pool:  # one thread per chunk
            sums = list(pool.map(chunk, chunks))
    else:
        sums = [chunk(item) for item in chunks]
    return torch.cat([s for s, _ in sums]), torch.cat([s2 for _, s2 in sums])


def _volumes(
    batches: list[_Batch], passes: _Passes, tiler: _Tiler, start: dict[str, np.ndarray], hetero: bool, s: float
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, int]]:
    """The statistics on the whole HR grid, float32: in the region what the batches
    accumulated, calibrated by the variance scale ``s`` and guarded (:func:`guard_outputs`),
    elsewhere ``start``'s ``mean``, ``fa`` and ``md`` (the cubic upsampling, or zero) and zero.
    By name ``mean``, ``fa``, ``md``, ``var_int`` (hetero variants) and ``m2`` (the parameter
    variance, with more than one pass), then FA sd, MD sd and the guards' counts."""
    keys = ["mean", "fa", "md", "fa_sd", "md_sd"] + ["var_int"] * hetero + ["m2"] * (passes.count > 1)
    hr_shape = tuple(n * tiler.r for n in tiler.shape)
    arrays = {
        key: np.ascontiguousarray(start[key])
        if key in start
        else np.zeros(hr_shape + ((6,) if key in ("var_int", "m2") else ()), np.float32)
        for key in keys
    }
    counts: dict[str, int] = {}
    for b in batches:
        stats = b.finish(passes.count, passes.count * passes.per_sample)
        scale_variances(stats, s)
        for name, n in guard_outputs(stats).items():
            counts[name] = counts.get(name, 0) + n
        at = torch.from_numpy(b.voxels)
        for key in keys:  # into a view of the volume, on PyTorch's threads
            volume = arrays[key].reshape((-1, 6) if stats[key].ndim == 2 else -1)
            torch.from_numpy(volume).index_copy_(0, at, torch.from_numpy(stats[key]))
        b.stats.clear()
    # Beyond the region, the values of the input's upsampling: non-finite only where it is.
    outside = _replace_non_finite(arrays["mean"], 0, tensor=True)
    arrays["mean"].reshape(-1, 6)[outside] = 0
    counts["NonFiniteTensors"] = counts.get("NonFiniteTensors", 0) + int(outside.sum())
    scalars = _replace_non_finite(arrays["fa"], 0) | _replace_non_finite(arrays["md"], 0)
    counts["NonFiniteScalars"] = counts.get("NonFiniteScalars", 0) + int((scalars & ~outside).sum())
    fa_sd, md_sd = arrays.pop("fa_sd"), arrays.pop("md_sd")  # zero without samples or passes to spread
    return arrays, fa_sd, md_sd, counts


def _outside_values(lr_tensors: np.ndarray, baseline: np.ndarray, target: str, r: int, outside: str, region):
    """What the mean tensor, FA and MD are outside the predicted HR ``region``: those of the
    cubic B-spline upsampling of the input (``outside="cubic"``; already the baseline of a
    residual-cubic model), or zero (FA and MD are zero in the region, which is predicted)."""
    from iqt_pipe.sr.baselines import interpolate_tensors

    if outside == "zero":
        fa, md = np.zeros(region.shape, np.float32), np.zeros(region.shape, np.float32)
        return {"mean": np.zeros(region.shape + (6,), np.float32), "fa": fa, "md": md}
    cubic = baseline if target == "residual-cubic" else interpolate_tensors(lr_tensors, r, "cubic")
    # Of every voxel, on PyTorch's threads (faster than gathering those beyond the region,
    # whose values the prediction then overwrites).
    fa, md = _fa_md(torch.from_numpy(cubic))
    return {"mean": cubic, "fa": fa.numpy(), "md": md.numpy()}


def scale_variances(stats: dict[str, np.ndarray], s: float) -> None:
    """A variance scale (the model card's calibration, a run's self-calibration), in place:
    every variance in ``stats`` (``var_int``, ``m2``) times ``s``, the FA and MD sd (``fa_sd``,
    ``md_sd``) times √s (to first order)."""
    if s == 1.0:
        return
    for key in ("var_int", "m2"):
        if key in stats:
            stats[key] *= s
    for key in ("fa_sd", "md_sd"):
        stats[key] *= np.float32(math.sqrt(s))


def _checked_masks(
    lr_tensors: np.ndarray, lr_mask: np.ndarray, region: np.ndarray | None, outside: str
) -> tuple[np.ndarray, np.ndarray]:
    """The brain and the region to predict (default the brain) as boolean arrays, once they
    are known to match the tensors."""
    lr_mask = np.asarray(lr_mask, dtype=bool)
    if lr_tensors.shape[:3] != lr_mask.shape or lr_tensors.shape[-1] != 6:
        raise ValueError(f"tensors {lr_tensors.shape} and mask {lr_mask.shape} do not match")
    if outside not in ("zero", "cubic"):
        raise ValueError(f"outside must be zero or cubic, got {outside!r}")
    region = lr_mask if region is None else np.asarray(region, dtype=bool)
    if region.shape != lr_mask.shape:
        raise ValueError(f"prediction region {region.shape} and mask {lr_mask.shape} do not match")
    return lr_mask, region


@torch.no_grad()
def predict_volume(
    model: IQTNet,
    lr_tensors: np.ndarray,
    lr_mask: np.ndarray,
    lr_affine: np.ndarray,
    *,
    stats: ChannelStats | None = None,
    mc_samples: int = DEFAULT_MC_SAMPLES,
    scalar_samples: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    mem_mb: float = 1024,
    tile: int | None = None,
    target: str | None = None,
    threads: int | None = None,
    region: np.ndarray | None = None,
    outside: str = "zero",
    symmetries: Sequence[int] = SYMMETRIES["none"],
    precision: str = "float32",
    s0: np.ndarray | None = None,
) -> Prediction:
    """Super-resolve a voxel-frame LR tensor field; see the module docstring.

    ``lr_mask`` is the brain: the channel statistics (unless ``stats`` is given) and the
    prediction's ``mask``; ``region`` (LR, default the brain) the voxels predicted, e.g.
    :func:`prediction_region` (:func:`predict_brain` does both, as the app and ``iqt-eval`` do).
    Outside the region the mean tensor and FA/MD are zero (``outside="zero"``) or those of the
    cubic B-spline upsampling of the input (``"cubic"``: no voxel the input covers is left
    empty); variances and sd are zero there (nothing was predicted).

    ``mc_samples`` applies to variational variants (deterministic ones use one pass);
    ``mc_samples=1`` is a deterministic pass with the mean weights (no parameter variance).
    ``symmetries`` (codes, e.g. ``SYMMETRIES["mirrors"]``) is a test-time symmetry ensemble:
    pass k runs :func:`symmetric_network` of its weights with code ``symmetries[k mod n]``,
    over max(T, n) passes, so with T ≥ n it costs nothing more; the spread of the passes
    (weight draws and symmetries together) is the parameter variance.
    ``precision``: the network's arithmetic, ``float32``, ``bfloat16`` (the convolutions in
    bfloat16, everything after them in float32; several times faster on CPUs with AMX) or
    ``auto`` (:func:`resolve_precision`).
    ``scalar_samples`` is the number of tensor samples per voxel behind FA/MD mean and sd
    (hetero variants; otherwise, or with 0, FA/MD of the MC samples' means are used — FA/MD of
    the predictive mean for a deterministic pass); ``target`` defaults to the
    model's own (from its card); ``threads`` sets PyTorch's CPU threads for this call.
    The model's ``variance_scale`` (its card's calibration) multiplies every predictive
    variance, and the FA/MD sd by its square root.
    ``s0`` is the LR fit's S0 (X, Y, Z), which a model with the S0 input needs (its
    ``inputs``; ignored by others).
    The caller's model is not modified.
    """
    from iqt_pipe.dmri.degrade import upsample_affine

    device = resolve_device(device) if isinstance(device, str) else device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[resolve_precision(precision, device)]
    lr_mask, region = _checked_masks(lr_tensors, lr_mask, region, outside)
    target = _target_of(model, target)
    r = model.r
    stats = stats or channel_stats(lr_tensors, lr_mask)
    passes = _plan_passes(model, mc_samples, symmetries, scalar_samples, device, dtype)
    hr_region = expand_mask(region, r)  # the voxels predicted
    net = copy.deepcopy(model).to(device).eval()
    plan = _plan_tiles(net, _inputs_of(model, lr_tensors, stats, lr_mask, s0), region, tile, mem_mb, passes)
    baseline = _hr_baseline(lr_tensors, stats, r, target)
    # Independent streams: weights from (seed, sample), FA noise from (seed, "scalars").
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(passes.count + 1)]
    sd = torch.as_tensor(stats.sd, dtype=torch.float32, device=device)
    batches = plan.batches(passes, baseline, hr_region)
    buffers = plan.features(device, dtype)
    with _torch_threads(threads):
        for k in range(passes.count):
            _run_pass(_pass_network(net, k, passes, seeds[k]), k, plan, batches, passes, sd, seeds[-1], buffers)
        start = _outside_values(lr_tensors, baseline, target, r, outside, hr_region)
        s = float(getattr(model, "variance_scale", 1.0))
        arrays, fa_sd, md_sd, guards = _volumes(batches, passes, plan.tiler, start, net.hetero, s)
    return Prediction(
        mean=arrays["mean"],
        var_intrinsic=arrays.get("var_int"),
        var_parameter=arrays.get("m2"),
        fa_mean=arrays["fa"],
        fa_sd=fa_sd,
        md_mean=arrays["md"],
        md_sd=md_sd,
        mask=expand_mask(lr_mask, r),
        region=hr_region,
        affine=upsample_affine(lr_affine, r),
        info={
            **_settings_info(passes, plan),
            "target": target,
            "variance_scale": s,
            "diagonal_correlation": passes.diagonal_correlation,
            "seed": seed,
            "guards": guards,
        },  # fmt: skip
    )


def _inputs_of(
    model: IQTNet, lr_tensors: np.ndarray, stats: ChannelStats, brain: np.ndarray, s0: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~iqt_pipe.sr.normalise.network_input` for ``model``'s inputs: with the S0 when it
    takes it (a clear error when it is missing)."""
    if "s0" not in getattr(model, "inputs", ("tensor",)):
        return network_input(lr_tensors, stats)
    if s0 is None:
        raise InputError(
            "this model takes the LR fit's S0 as an input (its card's inputs: tensor s0); pass the S0 image"
        )
    return network_input(lr_tensors, stats, s0, brain)


def _settings_info(passes: _Passes, plan: _TilePlan) -> dict[str, Any]:
    """What a prediction ran with: arithmetic, passes, samples, tiles, device (its ``info``)."""
    return {
        "precision": passes.precision,
        "mc_samples": passes.count if passes.draws > 1 else 1,
        "symmetries": len(passes.symmetries),
        "passes": passes.count,
        "scalar_samples": passes.count * passes.per_sample,
        "tile": plan.tiler.t,
        "tiles": len(plan.tiles),
        "tiles_total": int(np.prod(plan.tiler.n_tiles)),
        "hidden_blocks": plan.blocks,
        "slabs": len(plan.slabs),
        "device": str(passes.device),
    }


def predict_brain(
    model: IQTNet, lr_tensors: np.ndarray, brain: np.ndarray, lr_affine: np.ndarray, **kwargs
) -> Prediction:
    """Super-resolve the whole brain as the app does (and ``iqt-eval``, which scores it):
    :func:`predict_volume` over :func:`prediction_region` of the LR brain mask, with the
    channel statistics from the brain itself; farther out (a mask of a finer scan may hold
    islands there) the mean tensor is the cubic B-spline upsampling, never zero."""
    return predict_volume(
        model, lr_tensors, brain, lr_affine, region=prediction_region(brain, model.margin), outside="cubic", **kwargs
    )


def predict_ensemble(
    models: Sequence[IQTNet], inputs, lr_affine: np.ndarray, *, seed: int = 0, scalar_samples: int = 32, **kwargs
) -> Prediction:
    """What the app writes, and ``iqt-eval`` scores, for one model or several: each model's
    :func:`predict_brain`, combined by :func:`combine_ensemble` when there are several.
    ``inputs`` is the LR ``(tensors, brain)`` or ``(tensors, brain, s0)`` (the fit's S0, for
    models with the S0 input) of every model, or a list of one per model (models trained on
    differently prepared series, in ``iqt-eval``)."""
    if not models:
        raise ValueError("predict_ensemble needs at least one model")
    each = list(inputs) if isinstance(inputs, list) else [inputs] * len(models)
    if len(each) != len(models):
        raise ValueError(f"{len(models)} models but {len(each)} inputs")
    preds = [
        predict_brain(model, *model_inputs[:2], lr_affine, seed=seed, scalar_samples=scalar_samples,
                      s0=model_inputs[2] if len(model_inputs) > 2 else None, **kwargs)
        for model, model_inputs in zip(models, each)
    ]  # fmt: skip
    return preds[0] if len(preds) == 1 else combine_ensemble(preds, scalar_samples=scalar_samples, seed=seed)


#: Bounds on a predicted variance, (mm²/s)²: an infinite precision (variance 0) becomes an sd
#: of 1e-8 mm²/s, far below any real uncertainty; a zero precision (infinite variance) an sd
#: of 0.01 mm²/s, three times the diffusivity of free water, i.e. "nothing is known".
VAR_FLOOR, VAR_CAP = 1e-16, 1e-4


def guard_outputs(stats: dict[str, np.ndarray]) -> dict[str, int]:
    """Make the predicted statistics finite, in place, and count the voxels that needed it (for
    the sidecars). ``stats`` holds the predicted voxels' ``mean`` (..., 6) and, where present,
    ``var_int`` and ``m2`` (..., 6), ``fa``, ``md``, ``fa_sd`` and ``md_sd`` (...).

    A non-finite mean tensor (a numerical failure of the network) becomes zero with every
    variance at ``VAR_CAP`` and FA/MD sd at their "nothing is known" values (FA sd 0.5, MD sd
    √VAR_CAP), so no failed voxel reads as certain; an intrinsic variance of 0 (infinite
    precision) is raised to ``VAR_FLOOR``, an infinite one (zero precision) lowered to
    ``VAR_CAP``; other non-finite FA/MD moments become 0 (means) or the same caps (sd).
    Non-positive-definite mean tensors are counted, not changed: the mean is the estimate
    (as DIPY and MRtrix3 write theirs); FA is clipped to [0, 1] and tractography projects
    onto positive semi-definite tensors. Each check is one pass over an array when, as
    usual, nothing needs it.
    """
    from iqt_pipe.dmri.dti import not_positive_definite

    mean = stats["mean"].reshape(-1, 6)
    bad = _replace_non_finite(mean, 0, tensor=True)
    mean[bad] = 0
    n_bad = int(bad.sum())
    counts = {"NonFiniteTensors": n_bad}
    if "var_int" in stats:
        var = stats["var_int"].reshape(-1, 6)
        if _surely_finite(var) and (var.size == 0 or var.min() > 0):
            counts["InfinitePrecision"] = counts["ZeroPrecision"] = 0
        else:
            zero = (var <= 0) & np.isfinite(var)
            infinite = ~np.isfinite(var)
            counts["InfinitePrecision"] = int(np.any(zero, axis=-1).sum())
            counts["ZeroPrecision"] = int(np.any(infinite, axis=-1).sum())
            var[zero] = VAR_FLOOR
            var[infinite] = VAR_CAP
    bad_scalars = np.zeros(mean.shape[0], bool)
    for key, value in (("var_int", VAR_CAP), ("m2", VAR_CAP), ("fa", 0), ("md", 0)):
        if key in stats:
            a = stats[key].reshape(-1, 6) if key in ("var_int", "m2") else stats[key].reshape(-1)
            if n_bad:
                a[bad] = value
            flags = _replace_non_finite(a, value, tensor=a.ndim == 2)
            if key in ("fa", "md"):
                bad_scalars |= flags
    for key, unknown in (("fa_sd", 0.5), ("md_sd", math.sqrt(VAR_CAP))):
        if key in stats:
            sd = stats[key].reshape(-1)
            bad_scalars |= _replace_non_finite(sd, unknown)
            if n_bad:
                sd[bad] = unknown
    counts["NonFiniteScalars"] = int((bad_scalars & ~bad).sum())
    counts["NonPositiveDefinite"] = int(not_positive_definite(torch.from_numpy(mean[~bad] if n_bad else mean)).sum())
    return counts


def _surely_finite(a: np.ndarray) -> bool:
    """Whether every element of the float array ``a`` is finite, from its float64 sum: a
    non-finite element makes the sum non-finite, and float32 values cannot overflow it (an
    overflow of float64 values only answers False, sending the caller to the exact check)."""
    return bool(np.isfinite(a.sum(dtype=np.float64)))


def _replace_non_finite(a: np.ndarray, value: float, tensor: bool = False) -> np.ndarray:
    """Set the non-finite elements of ``a`` to ``value`` in place; returns, per voxel (flat;
    a voxel is the last axis's components when ``tensor``), whether it held one (a
    whole-array check first: usually there is none)."""
    voxels = a.shape[:-1] if tensor else a.shape
    if _surely_finite(a):
        return np.zeros(voxels, bool).reshape(-1)
    bad = ~np.isfinite(a)
    a[bad] = value
    return (np.any(bad, axis=-1) if tensor else bad).reshape(-1)


@torch.no_grad()
def predict_patchwise(
    model: IQTNet,
    lr_tensors: np.ndarray,
    lr_mask: np.ndarray,
    *,
    stats: ChannelStats | None = None,
    patch: int = 11,
    batch: int = 64,
    device: str | torch.device = "cpu",
    target: str | None = None,
    s0: np.ndarray | None = None,
) -> np.ndarray:
    """The original implementation's deterministic prediction: overlapping LR patches of
    ``patch``³ voxels (stride patch − 2m), run in batches and stitched. Reference for tests
    and benchmarks; :func:`predict_volume` must give the same mean."""
    lr_mask = np.asarray(lr_mask, dtype=bool)
    target = _target_of(model, target)
    r, m = model.r, model.margin
    stride = patch - 2 * m
    stats = stats or channel_stats(lr_tensors, lr_mask)
    tiler = _Tiler(lr_mask.shape, stride, m, r)
    z = tiler.pad(*_inputs_of(model, lr_tensors, stats, lr_mask, s0))
    out = np.zeros(tuple(s * r for s in lr_mask.shape) + (6,), np.float32)
    model = copy.deepcopy(model).to(device).eval()
    corners = [tl for tl in np.ndindex(*tiler.n_tiles)]
    for start in range(0, len(corners), batch):
        chunk = corners[start : start + batch]
        x = torch.from_numpy(np.stack([z[tiler.input_slices(tl)] for tl in chunk])).permute(0, 4, 1, 2, 3)
        mean, _ = model(x.to(device), sample=False)
        mean = mean.permute(0, 2, 3, 4, 1).cpu().numpy()
        for j, tl in enumerate(chunk):
            hs = tiler.hr_slices(tl)
            out[hs] = mean[j][tuple(slice(0, s.stop - s.start) for s in hs)]
    baseline = None
    if target == "residual-cubic":
        from iqt_pipe.sr.baselines import interpolate_tensors

        baseline = interpolate_tensors(lr_tensors, r, "cubic")
    out = decode_output(out, stats, baseline)
    out[~expand_mask(lr_mask, r)] = 0
    return out


def _intrinsic_diagonal_correlation(predictions: list[Prediction], idx: np.ndarray) -> np.ndarray:
    """(M, K, 3): at the flat voxels ``idx``, the correlation of each member's total errors of
    D11, D22 and D33 per unit of their product's sd: its diagonal correlation times the
    intrinsic share of each component's variance (the parameter part is independent)."""
    out = np.zeros((len(predictions), idx.size, len(DIAGONAL)))
    for m, p in enumerate(predictions):
        rho = p.info.get("diagonal_correlation", 0.0)
        if rho and p.var_intrinsic is not None:
            intrinsic = p.var_intrinsic.reshape(-1, 6)[idx][:, list(DIAGONAL)].astype(np.float64)
            total = p.var_total.reshape(-1, 6)[idx][:, list(DIAGONAL)].astype(np.float64)
            out[m] = rho * np.divide(intrinsic, total, out=np.zeros_like(total), where=total > 0)
    return out


def combine_ensemble(predictions: list[Prediction], scalar_samples: int = 32, seed: int = 0) -> Prediction:
    """Average several models' predictions, each weighted per voxel by the inverse of its
    predicted total variance (``sd_frobenius²``; equal weights at voxels where any member
    predicts none). The combination is the weighted mixture: intrinsic variance is the
    weighted mean of the members', parameter variance adds their disagreement
    Σ w (var_par + (μ − μ̄)²) / Σ w. FA and MD are those of the combined mean tensor, their sd
    from samples of the mixture."""
    if not predictions:
        raise ValueError("an ensemble needs at least one prediction")
    first = predictions[0]
    for p in predictions[1:]:
        if p.mean.shape != first.mean.shape or not np.allclose(p.affine, first.affine):
            raise ValueError("ensemble members must predict on the same HR grid")
    v = np.stack([p.sd_frobenius.astype(np.float64) ** 2 for p in predictions])  # (M, X, Y, Z)
    w = np.where(np.all(v > 0, axis=0), 1.0 / np.maximum(v, 1e-300), 1.0)
    w = w / w.sum(0)
    mus = np.stack([p.mean.astype(np.float64) for p in predictions])
    mean = np.einsum("m...,m...c->...c", w, mus)
    var_i = None
    if any(p.var_intrinsic is not None for p in predictions):
        var_i = sum(
            wm[..., None] * (p.var_intrinsic if p.var_intrinsic is not None else 0) for wm, p in zip(w, predictions)
        )
    var_p = sum(
        wm[..., None] * ((p.var_parameter if p.var_parameter is not None else 0) + (p.mean - mean) ** 2)
        for wm, p in zip(w, predictions)
    )
    member_var = np.stack([p.var_total.astype(np.float64) for p in predictions])
    # Mixture samples: per voxel and sample, pick a member by weight, then draw its Gaussian
    # (whose intrinsic part correlates the diagonal components by the member's correlation).
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(first.predicted)
    cum = np.cumsum(w.reshape(len(predictions), -1)[:, idx], axis=0)
    pick = (rng.random((scalar_samples, idx.size))[None] > cum[:, None]).sum(0)  # (S, K)
    pick = np.minimum(pick, len(predictions) - 1)
    mu_k = mus.reshape(len(predictions), -1, 6)[:, idx]  # (M, K, 6)
    sd_k = np.sqrt(member_var.reshape(len(predictions), -1, 6)[:, idx])
    cols = np.arange(idx.size)
    noise = rng.standard_normal((scalar_samples, idx.size, 6))
    rho_k = _intrinsic_diagonal_correlation(predictions, idx)  # (M, K, 3)
    if rho_k.any():
        correlate_diagonal(noise, rng.standard_normal((scalar_samples, idx.size)), np.sqrt(rho_k[pick, cols]))
    draws = mu_k[pick, cols] + noise * sd_k[pick, cols]
    fa, md = (a.numpy() for a in _fa_md(torch.from_numpy(draws)))
    fa_mean, md_mean = (a.numpy() for a in _fa_md(torch.from_numpy(mean.reshape(-1, 6)[idx])))
    scal = {}
    for name, val in (("fa_mean", fa_mean), ("fa_sd", fa.std(0)), ("md_mean", md_mean), ("md_sd", md.std(0))):
        arr = getattr(first, name).astype(np.float32, copy=True)  # outside the predicted voxels: as predicted there
        arr.reshape(-1)[idx] = val
        scal[name] = arr
    return Prediction(
        mean=mean.astype(np.float32),
        var_intrinsic=None if var_i is None else var_i.astype(np.float32),
        var_parameter=var_p.astype(np.float32),
        mask=first.mask,
        region=first.region,
        affine=first.affine,
        info={
            **first.info,
            "ensemble": [p.info for p in predictions],
            "scalar_samples": scalar_samples,
            "seed": seed,
            "variance_scale": [p.info.get("variance_scale", 1.0) for p in predictions],
            "diagonal_correlation": [p.info.get("diagonal_correlation", 0.0) for p in predictions],
            "guards": {
                k: sum(p.info.get("guards", {}).get(k, 0) for p in predictions) for k in first.info.get("guards", {})
            },
        },
        **scal,
    )
