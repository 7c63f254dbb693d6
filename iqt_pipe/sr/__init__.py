"""Super-resolution: the interpolation baselines, channel normalisation, the patch library,
training (with its checkpoints and data-parallel helpers), whole-volume inference with
uncertainty and super-resolution of a tensor image. The networks and model files are in :mod:`iqt_pipe.models`."""
