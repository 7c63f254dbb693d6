"""Bayesian 3D-ESPCN: networks, variational layers, periodic shuffle and model files."""

from iqt_pipe.models.espcn import VARIANTS, IQTNet, gaussian_nll
from iqt_pipe.models.files import ModelFileError, load_model, read_card, save_model
from iqt_pipe.models.shuffle import periodic_shuffle, periodic_unshuffle

__all__ = [
    "VARIANTS",
    "IQTNet",
    "gaussian_nll",
    "ModelFileError",
    "load_model",
    "read_card",
    "save_model",
    "periodic_shuffle",
    "periodic_unshuffle",
]
