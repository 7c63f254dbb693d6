"""Evaluation of super-resolution against HR references: the protocol behind ``iqt-eval``, the
metrics, cross-validation and the report."""
