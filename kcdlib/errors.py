"""Errors a user can cause: the command line prints their message as one paragraph and exits non-zero."""


class KcdError(Exception):
    """Base of every error caused by the user's input (names, files, options), not by a bug."""


class UnknownName(KcdError):
    """An architecture, dataset, distiller or method name that is not registered."""


class CheckpointError(KcdError):
    """A checkpoint that is corrupt or belongs to another architecture."""


class DatasetMissing(KcdError):
    """The dataset's files are not where they were looked for."""


class DatasetInvalid(KcdError):
    """A dataset file that exists but is not of the expected format."""


class BadOption(KcdError):
    """An option value that makes no sense (rho outside (0, 1], a schedule that would grow, ...)."""


class StoreError(KcdError):
    """The run store cannot be used: a full disk, a read-only folder, a path that is a file."""


class StaleRun(KcdError):
    """The store holds a finished run with the same options, trained on other data or by other numerics."""


class Diverged(KcdError):
    """A run's loss or weights stopped being finite: nothing is recorded."""
