"""Synthetic data anyone can regenerate: the brain phantom with exact ground-truth tensors
(:mod:`~iqt_pipe.sims.phantom`) and its BIDS dataset writer (:mod:`~iqt_pipe.sims.dataset`,
``iqt-phantom``). Test and demonstration data only: no science module imports it (the forward
model and noise they share live in :mod:`iqt_pipe.dmri.signal`)."""
