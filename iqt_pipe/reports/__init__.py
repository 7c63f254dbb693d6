"""Visual reports: per-participant ``sub-<label>.html`` (nireports) and ``group.html``, built
from an existing output folder. Plain functions; no Nipype.

:mod:`~iqt_pipe.reports.figures` draws (matplotlib on arrays), :mod:`~iqt_pipe.reports.discover`
finds what an output folder holds, :mod:`~iqt_pipe.reports.citations` renders the methods text,
:mod:`~iqt_pipe.reports.build` writes a participant's reportlets and assembles its page,
:mod:`~iqt_pipe.reports.group` the group page; :mod:`~iqt_pipe.reports.markup` holds their HTML helpers.
"""

from iqt_pipe.reports.build import build_subject_report, build_subject_report_with_problems
from iqt_pipe.reports.discover import subjects_with_outputs
from iqt_pipe.reports.group import build_group_report

__all__ = ["build_group_report", "build_subject_report", "build_subject_report_with_problems", "subjects_with_outputs"]
