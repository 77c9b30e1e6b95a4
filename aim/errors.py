"""Errors that the pipeline raises for bad input.

Every message says what was wrong and what to do; the CLI prints it without a traceback.
"""


class AimError(Exception):
    """Base class: a user-facing problem, not a bug."""


class UnknownModelError(AimError):
    pass


class InvalidGraphError(AimError):
    """The ONNX file is unreadable, or lacks what a pass needs (logits output, class axis)."""


class InvalidInputError(AimError):
    """A runtime input is wrong: utility or focus out of range, wrong shape or dtype."""


class CheckpointError(AimError):
    pass


class VerificationError(AimError):
    """An engine disagreed with the PyTorch reference beyond the stated tolerance."""


class TritonConfigError(AimError):
    """A Triton model configuration that does not match its engine, or is not valid by Triton's schema."""
