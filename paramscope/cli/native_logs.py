"""The log lines of the C++ libraries kept off the terminal.

TensorStore writes absl log lines straight to file descriptor 2, whatever Python says, and has
no switch to silence them: ``E1202 17:33:58.548170 27168 google_auth_provider.cc:188] Could not
find the credentials file...`` without Google credentials, ``I1202 ... Using
GOOGLE_AUTH_TOKEN_FOR_TESTING`` against an emulator. The command line points descriptor 2 at a
pipe and passes on everything written there except such lines, while its own messages go to the
terminal directly (so ``isatty`` and progress bars see it). With ``PARAMSCOPE_DEBUG`` set
nothing is filtered.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading

# absl's prefix: severity (Info, Warning, Error; Fatal is passed on), MMDD, time, thread, file:line]
_LOG_LINE = re.compile(rb"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^\s\]]+:\d+\] ")

_state: dict = {}


def filter_stderr() -> None:
    """From now on, absl log lines written to descriptor 2 are dropped; ``sys.stderr`` writes
    to the terminal (or file) descriptor 2 was."""
    if _state or os.environ.get("PARAMSCOPE_DEBUG", "") not in ("", "0"):
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
    except (OSError, ValueError, AttributeError):
        return
    errors = getattr(sys.stderr, "errors", None) or "backslashreplace"
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    sys.stderr = io.TextIOWrapper(
        io.FileIO(real, "w", closefd=False), encoding=encoding, errors=errors, write_through=True
    )
    thread = threading.Thread(target=_pass_on, args=(read, real), name="paramscope-stderr", daemon=True)
    thread.start()
    _state.update(real=real, thread=thread)


def _pass_on(read: int, real: int) -> None:
    pending = b""
    while True:
        try:
            chunk = os.read(read, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not _LOG_LINE.match(line))
        if kept:
            _write(real, kept)
    if pending and not _LOG_LINE.match(pending):
        _write(real, pending)
    os.close(read)


def _write(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass


def terminal_fd() -> int:
    """The descriptor of the real stderr (2 when nothing is filtered)."""
    return _state.get("real", 2)


def restore() -> None:
    """Points descriptor 2 back at the real stderr and waits a moment for the lines in the pipe."""
    if not _state:
        return
    try:
        sys.stderr.flush()
        os.dup2(_state["real"], 2)  # the pipe's last writer closes: the thread reads to its end
    except (OSError, ValueError):
        return
    _state["thread"].join(timeout=2)
