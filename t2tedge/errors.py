"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class T2tedgeError(Exception):
    """Base class for every user-facing error of t2tedge."""


class UnknownModelError(T2tedgeError):
    """A model name that is not in the registry."""


class CheckpointError(T2tedgeError):
    """A checkpoint that is missing, corrupt, unsafe or for another architecture."""


class DatasetError(T2tedgeError):
    """A dataset that is missing, empty or unreadable."""


class RecipeError(T2tedgeError):
    """A recipe with unknown keys, wrong types or impossible values."""


class TargetUnavailableError(T2tedgeError):
    """A target whose toolchain cannot run on this host."""


class ArtifactError(T2tedgeError):
    """An artifact directory that is missing, incomplete or locked."""
