"""Nipype workflow factories of iqt-pipe (``init_*_wf``), installed as :mod:`iqt_pipe.workflows`.

Factories are keyword-only and return niworkflows ``LiterateWorkflow``s with an ``inputnode``,
an ``outputnode`` and a ``__desc__`` methods paragraph, so other pipelines can embed them.
"""

from iqt_pipe.workflows.dwi import init_dti_wf, init_dwi_preproc_wf
from iqt_pipe.workflows.sr import init_sr_wf

__all__ = ["init_sr_wf", "init_dwi_preproc_wf", "init_dti_wf"]
