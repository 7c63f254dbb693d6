"""Diffusion MRI at native resolution: tensors and frames, gradient tables, DWI series, the DTI
forward model and Rician noise, the DTI fit and brain mask, the IQT degradation, preprocessing,
what the network sees of a series and the checks of every run before any work starts."""
