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


class RunLockedError(ReflectEvoError):
    """Another live process is writing this run."""


class OutputWriteError(ReflectEvoError, OSError):
    """An output could not be written (disk full, quota, read-only or unwritable folder); nothing
    half-written was left behind."""


class StageError(ReflectEvoError):
    """A stage cannot start (a stage it depends on has not finished) or did not finish properly."""


class ConfigError(ReflectEvoError):
    """A params file or section that does not fit the schema (the message lists every problem)."""


class ModelLoadError(ReflectEvoError, RuntimeError):
    """A model, tokenizer or adapter could not be loaded as configured; the message says what to change."""


class UnknownModelError(ModelLoadError, LookupError):
    """A ``builtin:`` name that does not exist; the message lists the known ones."""


class BackendUnavailable(ModelLoadError):
    """The requested backend cannot run here (Unsloth not installed, or no CUDA GPU)."""


class GenerationError(ReflectEvoError):
    """Generation cannot start or go on; the message says what to change."""


class SettingsError(GenerationError, ValueError):
    """Impossible generation settings."""


class DuplicateKeyError(GenerationError, ValueError):
    """Two requests share a record key."""


class StoreMismatchError(GenerationError):
    """The store folder holds outputs of a different plan (other params, prompts or seed)."""


class ReplayMissingError(GenerationError, LookupError):
    """A replay engine was asked for a record key it has no stored output for."""


class ReplayRowError(GenerationError, DataError):
    """A replay row that is not a stored output (the message names ``file:line`` or the row number)."""


class TrainingError(ReflectEvoError):
    """Training cannot start as configured (a missing or empty training set, a missing SFT variant)."""


class NoTrainingData(TrainingError):
    """A training set stage 02 left empty, or whose every row is dropped: its variant is skipped, not an error.
    ``reason`` is what happened, without the advice the message adds."""

    def __init__(self, reason: str, advice: str) -> None:
        super().__init__(f"{reason}. {advice}")
        self.reason = reason


class JudgeError(ReflectEvoError):
    """A judge cannot be built or did not answer; the message says what to change."""


class EvaluationError(ReflectEvoError):
    """An evaluation that cannot start: a variant that was not trained, an engine that cannot switch adapters."""


class DistributedError(ReflectEvoError):
    """Generation cannot be split between these processes as configured; the message says what to change."""


class MainProcessStopped(ReflectEvoError):
    """Raised by the other processes when the main one stopped before generating (its error says why)."""


class ServeError(ReflectEvoError):
    """The server cannot start; the message says what to change."""


class EvolveError(ReflectEvoError):
    """A round cannot go on: no validation items, no trained variant to generate with, a missing adapter."""
