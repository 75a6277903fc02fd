"""Errors the user can act on. Each message names the file, row or field and what was expected."""


class AlphaDPOError(Exception):
    """Base class: the CLI prints these as one clear message instead of a traceback."""


class ConfigError(AlphaDPOError, ValueError):
    """An experiment config is invalid (unknown key, bad value, inconsistent settings)."""


class DataError(AlphaDPOError, ValueError):
    """A preference dataset cannot be used (missing file, malformed rows, nothing usable left)."""


class StorageFull(AlphaDPOError, OSError):
    """The disk that holds a run's checkpoints has (or had, mid-save) too little room; the message names
    the path and, before a run, the space free and needed."""
