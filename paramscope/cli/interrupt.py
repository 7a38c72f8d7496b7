"""Ctrl-C at any moment: one line on stderr and exit 130.

An interrupt can land anywhere: in Python code (a ``KeyboardInterrupt``), inside a library's
import (which then fails with an ``ImportError``), in Typer's parsing (which turns it into a
silent exit 130). The handler installed here remembers that it came, so whatever it becomes on
its way up, the command line reports the interrupt and nothing else. This module loads only the
standard library: it is installed before jax, TensorStore or Typer are imported.
"""

from __future__ import annotations

import os
import signal
import sys

from paramscope.cli import native_logs

EXIT_INTERRUPTED = 130
LINE = b"paramscope: error: interrupted\n"

_state = {"interrupted": False, "said": False, "stderr": None}


def catch() -> None:
    """Heeds Ctrl-C from now on: the first raises ``KeyboardInterrupt`` (so that ``finally``
    blocks run) and is remembered; a second one leaves at once."""
    if signal.getsignal(signal.SIGINT) is not _on_interrupt:
        signal.signal(signal.SIGINT, _on_interrupt)


def _on_interrupt(signum, frame) -> None:
    if _state["interrupted"]:
        leave(flush=False)
    _state["interrupted"] = True
    _mute_stderr()
    raise KeyboardInterrupt


def _mute_stderr() -> None:
    """From the interrupt on, stderr holds the one line alone: a library whose import is cut
    short prints its own traceback (numpy does) before it fails. With PARAMSCOPE_DEBUG set,
    everything shows."""
    if os.environ.get("PARAMSCOPE_DEBUG", "") not in ("", "0"):
        return
    try:
        sys.stderr.flush()
        terminal = native_logs.terminal_fd()
        _state["stderr"] = os.dup(terminal)
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in {2, terminal}:
            os.dup2(devnull, fd)
        os.close(devnull)
    except (OSError, ValueError):
        pass


def finishing() -> None:
    """The command is done: Ctrl-C while Python waits for threads to end is the one line and
    130 at once, and once it tears itself down (when it would restore the default handler, and
    the signal would kill the process without a word) Ctrl-C is ignored."""
    import atexit

    signal.signal(signal.SIGINT, lambda signum, frame: leave(flush=False))
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)


def interrupted() -> bool:
    """Whether Ctrl-C came (whatever error it may have turned into since)."""
    return _state["interrupted"]


def say() -> None:
    """The one line on stderr, once however many ways the interrupt comes up."""
    _state["interrupted"] = True
    if not _state["said"]:
        _state["said"] = True
        try:
            sys.stderr.flush()
            fd = _state["stderr"]
            os.write(native_logs.terminal_fd() if fd is None else fd, LINE)
        except (OSError, ValueError):
            pass


def leave(flush: bool = True) -> None:
    """Says the line and exits 130 at once: reads still running in worker threads are abandoned
    (a normal exit would wait for them), and no later interrupt prints anything."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if flush:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
    say()
    os._exit(EXIT_INTERRUPTED)
