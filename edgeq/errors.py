"""One error hierarchy. Every error carries what failed and a hint that names the fix.

The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits with ``exit_code``; library code raises, it
never calls ``exit()``. Exit status 2 means the user's input was wrong (as click uses for usage errors); 1 means the
tool ran and the result did not meet its bar (accuracy budget, verification).
"""

from __future__ import annotations


class EdgeqError(Exception):
    """Base class. ``hint`` tells the user what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UserInputError(EdgeqError):
    """The input is wrong (path, profile, data, flags): fixable by the user, exit status 2."""

    exit_code = 2


class ModelFolderError(UserInputError):
    """The model folder is missing, has no usable weights, or lacks its config or tokenizer."""


class UnsupportedModelError(UserInputError):
    """The architecture or task is not one edgeq can export with the chosen profile."""


class MissingExtraError(UserInputError):
    """The model needs an optional part of edgeq that is not installed (an extra: ``pip install 'edgeq[NAME]'``)."""


class ProfileError(UserInputError):
    """Unknown profile, or a profile file that does not parse into a valid profile."""


class MatrixFileError(UserInputError):
    """The matrix file (``edgeq matrix``) does not parse into a valid matrix of models and profiles."""


class CalibrationDataError(UserInputError):
    """The calibration file is missing, empty, not text, or overlaps the evaluation split."""


class PackageError(UserInputError):
    """The package folder is missing or not a package, its manifest.json is malformed, or a path in it leaves the
    folder (absolute, '..', a symlink): refused before anything in it is read or run."""


class OutputExistsError(UserInputError):
    """The package folder already exists and --force was not given."""


class DestinationBusyError(UserInputError):
    """Another export holds the lock on the same package folder in OUT."""


class DiskFullError(UserInputError):
    """The disk holding OUT has too little free space for the export, or filled up during it."""


class AccuracyBudgetError(EdgeqError):
    """The quantized model is further from the FP32 model than the profile's budget allows."""


class SizeBudgetError(EdgeqError):
    """The packaged model is larger than the profile allows."""


class VerificationError(EdgeqError):
    """A package failed verification: a hash differs, a file is missing, or outputs moved."""


class DeviceError(EdgeqError):
    """A device's runtime could not be built, or the model failed on it."""


class DeviceUnavailableError(DeviceError):
    """The device's runtime cannot be built on this machine: apt-get missing, not root, or mirrors unreachable."""


class DeviceRunError(DeviceError):
    """The model did not run on the device: the worker crashed, failed, or timed out."""


class PassError(EdgeqError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP stopped the run. A KeyboardInterrupt, not an EdgeqError, so that no ``except
    Exception`` on the way swallows it; the CLI prints ``message`` and exits with 128 + ``signum``."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message)
        self.signum = signum
        self.message = message
