"""Command-line entry points.

Every ``iqt-*`` command turns off Nipype's version check over the network (``NIPYPE_NO_ET``)
before anything imports Nipype (directly or through niworkflows and nireports): a cluster
node without internet would wait for it, and users did not ask for it. An explicit
``NIPYPE_NO_ET`` in the environment is kept.
"""

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")
