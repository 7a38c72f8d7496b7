"""paramscope's exceptions and the exit codes the CLI maps them to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_CHECKPOINT = 3


class ParamscopeError(Exception):
    """Base of every error paramscope reports; carries a hint and an exit code."""

    exit_code = EXIT_CHECKPOINT

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class CheckpointNotFound(ParamscopeError):
    """The path does not exist."""


class NotACheckpoint(ParamscopeError):
    """The path exists but holds no Orbax checkpoint paramscope can read."""


class StepNotFound(ParamscopeError):
    """No (finished) step matches."""


class ItemNotFound(ParamscopeError):
    """The step has no such item, or the subtree selects nothing."""


class CorruptCheckpoint(ParamscopeError):
    """Metadata or data could not be decoded."""


class CheckpointChanged(ParamscopeError):
    """The step was deleted or rewritten while it was read: its numbers cannot be trusted."""


class StorageError(ParamscopeError):
    """The store refused or failed a request: access denied, unreachable, failing after retries."""


class UsageError(ParamscopeError):
    """A bad option value: regex, mesh, option combination."""

    exit_code = EXIT_USAGE


class BadMesh(UsageError):
    """The requested mesh cannot be built from the local devices."""


EXIT_INTERNAL = 4


def error_line(message: str, hint: str | None = None) -> str:
    """The one line every error is reported as, on stderr.

    >>> error_line("no step 7 in ckpt", "finished steps: 100, 200")
    'paramscope: error: no step 7 in ckpt (hint: finished steps: 100, 200)'
    """
    return f"paramscope: error: {message}" + (f" (hint: {hint})" if hint else "")
