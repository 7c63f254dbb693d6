"""iqt-pipe: Bayesian Image Quality Transfer for diffusion MRI.

Core science lives here as plain functions and torch modules; Nipype lives only in
:mod:`iqt_pipe.interfaces` and :mod:`iqt_pipe.workflows`.
"""

__version__ = "0.1.0"
