"""Errors raised on purpose. Each message says what went wrong and what to change."""


class ReflectEvoError(Exception):
    """Base class for every error this package raises deliberately."""


class DataError(ReflectEvoError, ValueError):
    """A data file or row is malformed. The message starts with ``path:line:`` when a line is to blame."""


class DataFileNotFound(DataError, FileNotFoundError):
    """A data file named by the user does not exist."""


class UnknownTaskError(ReflectEvoError, LookupError):
    """A task name that is not registered. The message lists the known names."""


class CodeExecutionNotAllowed(ReflectEvoError, PermissionError):
    """Model-written code would have to run, but the user has not opted in."""


class SandboxError(ReflectEvoError, RuntimeError):
    """The sandbox itself failed (not the program inside it)."""
