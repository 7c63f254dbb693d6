"""Nipype interfaces of iqt-pipe: thin ``SimpleInterface`` wrappers around core functions.

Installed as :mod:`iqt_pipe.interfaces`.
"""

from iqt_pipe.interfaces.dti import DegradeDWI, FitDTI
from iqt_pipe.interfaces.preproc import DenoiseMPPCA, RemoveGibbs
from iqt_pipe.interfaces.qc import RunQC
from iqt_pipe.interfaces.sr import SuperResolve

__all__ = ["DegradeDWI", "FitDTI", "SuperResolve", "DenoiseMPPCA", "RemoveGibbs", "RunQC"]
