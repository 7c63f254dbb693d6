"""The prediction settings the command lines offer, defined once: the library
(:mod:`iqt_pipe.sr.inference`), the app's configuration (:mod:`iqt_pipe.config`), its parser and
the Nipype interfaces all take them from here. This module imports nothing, so parsing a command
line needs no torch.
"""

from __future__ import annotations

#: Monte-Carlo samples of a variational model's weights (``--mc-samples``).
DEFAULT_MC_SAMPLES = 8

#: Test-time symmetry ensembles (``--symmetries``): the symmetry codes of
#: :mod:`iqt_pipe.sr.patches` each Monte-Carlo pass uses in turn — none, the 8 mirrors of the
#: axes, or all 48 symmetries of the cube (mirrors and axis permutations).
SYMMETRIES: dict[str, tuple[int, ...]] = {"none": (0,), "mirrors": tuple(range(8)), "cube": tuple(range(48))}
DEFAULT_SYMMETRIES = "mirrors"

#: The network's arithmetic (``--precision``).
PRECISIONS = ("auto", "float32", "bfloat16")
DEFAULT_PRECISION = "auto"
