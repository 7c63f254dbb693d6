"""Nipype workflow factories of iqt-pipe (``init_*_wf``), installed as :mod:`iqt_pipe.workflows`.

The BIDS App's graph (preprocessing, DTI, super-resolution, outputs) is assembled here from
:mod:`iqt_pipe.interfaces`.
"""
