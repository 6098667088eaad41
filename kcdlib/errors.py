"""Errors a user can cause: the command line prints their message as one paragraph and exits non-zero."""


class KcdError(Exception):
    """Base of every error caused by the user's input (names, files, options), not by a bug."""


class UnknownName(KcdError):
    """An architecture, dataset, distiller or method name that is not registered."""


class CheckpointError(KcdError):
    """A checkpoint that is corrupt or belongs to another architecture."""


class DatasetMissing(KcdError):
    """The dataset's files are not where they were looked for."""


class BadOption(KcdError):
    """An option value that makes no sense (rho outside (0, 1], a schedule that would grow, ...)."""
