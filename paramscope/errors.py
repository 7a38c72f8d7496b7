"""paramscope's exceptions and the exit codes the CLI maps them to."""

from __future__ import annotations

import re

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

    def __str__(self) -> str:
        """The message and its hint, as a traceback or a notebook shows the error.

        >>> str(ParamscopeError("ckpt does not exist", hint="check the path"))
        'ckpt does not exist (hint: check the path)'
        """
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class CheckpointNotFound(ParamscopeError):
    """The path does not exist."""


class NotACheckpoint(ParamscopeError):
    """The path exists but holds no checkpoint in a format paramscope reads."""


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
    return message_line("error", message + (f" (hint: {hint})" if hint else ""))


def few(names, shown: int = 5) -> str:
    """The first few of ``names``, comma-separated, then how many more: a hint stays one short
    line when a run has thousands of steps.

    >>> few(range(100, 1100, 100), 3), few(["params"]), few([])
    ('100, 200, 300 and 7 more', 'params', 'none')
    """
    names = [str(n) for n in names]
    more = f" and {len(names) - shown:,} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "none") + more


def message_line(kind: str, message: str) -> str:
    """A line for stderr, ``paramscope: <kind>: <message>``, safe for a terminal and free of secrets.

    Messages quote names from checkpoints and URLs from the environment: their control
    characters are escaped (:func:`printable`) and credentials in URLs hidden (:func:`redacted`).
    """
    return f"paramscope: {kind}: " + printable(redacted(message))


# C0 and C1 controls, DEL, and the bidirectional overrides and isolates (which reorder what is
# shown after them), plus the line and paragraph separators: none of them shows as itself.
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x061C, 0x200E, 0x200F, 0x2028, 0x2029] + [
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]
_ESCAPES = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS}


def printable(text: str, keep: str = "") -> str:
    """``text`` with every control character written as an escape: a name from a checkpoint
    cannot move the cursor, retitle the window or clear the screen. ``keep``: characters left
    as they are (newlines, in a text of several lines).

    >>> printable("x\\x1b]0;title\\x07"), printable("a\\u202eb"), printable("a\\nb", keep="\\n")
    ('x\\\\x1b]0;title\\\\x07', 'a\\\\u202eb', 'a\\nb')
    """
    if text.isascii() and text.isprintable():
        return text
    table = _ESCAPES if not keep else {c: e for c, e in _ESCAPES.items() if chr(c) not in keep}
    return text.translate(table)


_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def redacted(text: str) -> str:
    """``text`` with the user and password of every URL in it replaced by ``***``.

    >>> redacted("cannot reach http://user:SECRET@host:9000/b")
    'cannot reach http://***@host:9000/b'
    """
    return _USERINFO.sub(r"\1***@", text)
