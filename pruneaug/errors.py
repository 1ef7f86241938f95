"""User-facing errors: one type per kind of user mistake, raised at the boundary.

The CLI turns any `PruneaugError` into one line on stderr and exit code 2; everything
else is a bug and keeps its traceback. Messages name the file, node or option at fault.
"""


class PruneaugError(Exception):
    """Base of every error a user can cause and fix."""


class ModelError(PruneaugError):
    """The ONNX model (file, graph, node or weight) cannot be used."""


class OptionError(PruneaugError):
    """A command-line option or API argument is malformed or out of range."""


class CalibrationError(PruneaugError):
    """Calibration or evaluation data does not fit the model."""


class OutputError(PruneaugError):
    """The output folder cannot be written as asked."""


class TargetError(PruneaugError):
    """The target name or profile is unknown or unusable."""


class CodegenError(PruneaugError):
    """The model or plan cannot be compiled for the target."""
