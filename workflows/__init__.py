"""Nipype workflow factories of iqt-pipe (``init_*_wf``), installed as :mod:`iqt_pipe.workflows`.

Factories are keyword-only and return niworkflows ``LiterateWorkflow``s with an ``inputnode``,
an ``outputnode`` and a ``__desc__`` methods paragraph, so other pipelines can embed them.
Names load on first use (the output sinks import niworkflows' BIDS module, which is slow).
"""

import importlib

_WHERE = {
    "init_iqt_wf": "base",
    "init_single_subject_wf": "base",
    "init_dwi_run_wf": "run",
    "init_dwi_preproc_wf": "dwi",
    "init_dti_wf": "dwi",
    "init_sr_wf": "sr",
    "init_outputs_wf": "outputs",
    "init_tractography_wf": "tractography",
    "init_tractography_outputs_wf": "outputs",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
