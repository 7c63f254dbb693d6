"""3D-ESPCN and its Bayesian variants (Tanno et al. 2017, 2021).

Three valid convolutions 3³×50 → ReLU → 1³×100 → ReLU → 3³×(6·r³), then a periodic shuffle:
an LR input of n³ voxels gives (n − 4)³ LR positions, i.e. (r·(n − 4))³ HR voxels (receptive
field 5³ LR voxels). ``hetero`` variants add a twin network predicting a per-voxel,
per-component precision softplus(h) + 1e-6; ``-var1``/``-var2`` variants make every
convolution of both networks a variational-dropout convolution (α per weight / per filter).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from iqt_pipe.models.layers import VarConv3d, fused_conv_relu, fused_conv_relu_applies
from iqt_pipe.models.shuffle import periodic_shuffle

#: variant → (heteroscedastic, variational dropout granularity or None)
VARIANTS: dict[str, tuple[bool, str | None]] = {
    "espcn": (False, None),
    "espcn-var1": (False, "weight"),
    "espcn-var2": (False, "filter"),
    "hetero": (True, None),
    "hetero-var1": (True, "weight"),
    "hetero-var2": (True, "filter"),
}
WIDTHS = (50, 100)
KERNELS = (3, 1, 3)
N_COMPONENTS = 6
PRECISION_FLOOR = 1e-6


def architecture_problem(widths, kernels) -> str | None:
    """Why ``widths``/``kernels`` make no ESPCN (one line), or None when they do."""
    if (
        len(widths) != len(kernels) - 1
        or min(widths, default=1) < 1
        or min(kernels) < 1
        or any(k % 2 == 0 for k in kernels)
    ):
        return (
            f"kernels {' '.join(map(str, kernels))} with widths {' '.join(map(str, widths))}: give odd kernel "
            "sizes ≥ 1 and one width fewer than kernels (e.g. --kernels 3 3 3 --widths 50 100)"
        )
    return None


def inputs_problem(inputs) -> str | None:
    """Why ``inputs`` are no network inputs (one line), or None: the tensor components first,
    then optionally the S0 (:data:`iqt_pipe.sr.normalise.INPUTS`)."""
    if tuple(inputs) not in (("tensor",), ("tensor", "s0")):
        return f"inputs {' '.join(map(str, inputs))}: give tensor, or tensor s0 (the components and the fitted S0)"
    return None


def margin(kernels=KERNELS) -> int:
    """LR voxels lost on each side by the valid convolutions (2 for 3-1-3)."""
    return sum(k - 1 for k in kernels) // 2


class ESPCN(nn.Module):
    """One 3D-ESPCN: LR (B, C, X, Y, Z) → HR (B, C, r(X−4), r(Y−4), r(Z−4))."""

    def __init__(
        self,
        r: int,
        channels: int = N_COMPONENTS,
        widths=WIDTHS,
        kernels=KERNELS,
        var: str | None = None,
        in_channels: int | None = None,
    ):
        super().__init__()
        self.r = r
        sizes = (in_channels or channels, *widths, channels * r**3)
        make = (lambda i, o, k: VarConv3d(i, o, k, per=var)) if var else nn.Conv3d
        self.convs = nn.ModuleList(make(sizes[n], sizes[n + 1], kernels[n]) for n in range(len(kernels)))

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """The HR output (the last convolution's (B, C·r³, X, Y, Z) periodically shuffled)."""
        sampled = sample and isinstance(self.convs[0], VarConv3d)  # local reparameterisation
        for n, conv in enumerate(self.convs):
            if not sampled:
                x = self.layer(n, x)
                continue
            x = conv(x, sample)
            if n < len(self.convs) - 1:
                x = F.relu(x, inplace=True)
        return periodic_shuffle(x, self.r)

    def layer(self, n: int, x: torch.Tensor) -> torch.Tensor:
        """Convolution ``n`` with its mean weights, and the ReLU after a hidden one (one oneDNN
        call on CPU where :func:`fused_conv_relu_applies`): prediction runs the layers one by one."""
        conv, hidden = self.convs[n], n < len(self.convs) - 1
        if hidden and fused_conv_relu_applies(x):
            return fused_conv_relu(conv, x)
        x = F.conv3d(x, conv.weight, conv.bias)
        return F.relu(x, inplace=True) if hidden else x

    def kl(self) -> torch.Tensor:
        terms = [c.kl() for c in self.convs if isinstance(c, VarConv3d)]
        return torch.stack(terms).sum() if terms else torch.zeros(())


class IQTNet(nn.Module):
    """The mean network and, for ``hetero`` variants, the precision network."""

    def __init__(self, variant: str = "hetero-var2", r: int = 2, widths=WIDTHS, kernels=KERNELS, inputs=("tensor",)):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if int(r) != r or r < 2:
            raise ValueError(f"the upsampling factor must be an integer ≥ 2, got {r!r}")
        if problem := inputs_problem(inputs):
            raise ValueError(problem)
        hetero, var = VARIANTS[variant]
        self.variant, self.r, self.widths, self.kernels = variant, int(r), tuple(widths), tuple(kernels)
        #: The input channels (see :mod:`iqt_pipe.sr.normalise`): the tensor components, and the S0.
        self.inputs = tuple(inputs)
        self.hetero, self.var = hetero, var
        #: What the network predicts ("hr" or "residual-cubic"); set from the model card.
        self.target: str | None = None
        #: Factor on every predictive variance (calibration on held-out data); from the card.
        self.variance_scale: float = 1.0
        #: Correlation of the intrinsic errors of the three diagonal components (Dxx, Dyy,
        #: Dzz), which the per-component noise model leaves out; from the card (estimated on
        #: the validation patches by training). It widens the MD interval and shapes FA samples.
        self.diagonal_correlation: float = 0.0
        n_in = N_COMPONENTS + len(self.inputs) - 1
        self.mean_net = ESPCN(self.r, widths=widths, kernels=kernels, var=var, in_channels=n_in)
        self.prec_net = ESPCN(self.r, widths=widths, kernels=kernels, var=var, in_channels=n_in) if hetero else None

    @property
    def margin(self) -> int:
        return margin(self.kernels)

    @property
    def stochastic(self) -> bool:
        return self.var is not None

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the HR mean and precision (None for non-hetero variants)."""
        mean = self.mean_net(x, sample)
        if self.prec_net is None:
            return mean, None
        return mean, self.precision(self.prec_net(x, sample))

    @staticmethod
    def precision(h: torch.Tensor) -> torch.Tensor:
        """The precision network's output h → precision softplus(h) + 1e-6."""
        return F.softplus(h) + PRECISION_FLOOR

    @torch.no_grad()
    def sample_weights(self, generator: torch.Generator | None = None) -> IQTNet:
        """A copy whose variational convolutions hold one posterior weight draw each (use it
        with ``sample=False``): one Monte-Carlo network for prediction."""
        net = copy.deepcopy(self)
        for conv in net.modules():
            if isinstance(conv, VarConv3d):
                conv.weight.copy_(conv.sampled_weight(generator))
        return net

    def kl(self) -> torch.Tensor:
        kl = self.mean_net.kl()
        return kl + self.prec_net.kl() if self.prec_net is not None else kl


def masked_mean(values: torch.Tensor, brain: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` (B, C, X, Y, Z) over every element, or with ``brain`` (B, 1, X, Y, Z;
    1 inside, 0 outside) over the elements of the brain voxels only."""
    if brain is None:
        return values.mean()
    return (values * brain).sum() / (brain.sum() * values.shape[1]).clamp_min(1.0)


def gaussian_nll(
    mean: torch.Tensor, precision: torch.Tensor, target: torch.Tensor, brain: torch.Tensor | None = None
) -> torch.Tensor:
    """Heteroscedastic loss: mean(prec·(y − μ)²) − mean(log prec) (means as in :func:`masked_mean`)."""
    return masked_mean(precision * (target - mean) ** 2, brain) - masked_mean(torch.log(precision), brain)
