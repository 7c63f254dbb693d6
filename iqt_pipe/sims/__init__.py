"""Synthetic data anyone can regenerate: the brain phantom with exact ground-truth tensors and
its BIDS dataset writer (``iqt-phantom``). Test and demonstration data only: no science module
imports it."""
