"""Nipype interfaces of iqt-pipe: thin ``SimpleInterface`` wrappers around core functions.

Installed as :mod:`iqt_pipe.interfaces`. Names load on first use: the derivatives sinks pull
in niworkflows' BIDS module, whose TemplateFlow indexing costs seconds.
"""

import importlib

_WHERE = {
    "DegradeDWI": "dti",
    "FitDTI": "dti",
    "DenoiseMPPCA": "preproc",
    "RemoveGibbs": "preproc",
    "RunQC": "qc",
    "SuperResolve": "sr",
    "DipyTracking": "tractography",
    "PrepareMRtrixTracking": "tractography",
    "TensorTractography": "tractography",
    "FinishTractogram": "tractography",
    "TrackDensity": "tractography",
    "TractographySummary": "tractography",
    "DerivativesDataSink": "bids",
    "OptionalDerivativesDataSink": "bids",
    "SidecarMetadata": "bids",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
