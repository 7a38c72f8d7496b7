"""The paramscope command line.

``main`` (the console script and ``python -m paramscope``) heeds Ctrl-C and filters the C++
libraries' log lines out of stderr before anything heavy loads; the app and its commands load
after.
"""

from __future__ import annotations

from paramscope.cli import interrupt, native_logs


def main() -> None:
    interrupt.catch()
    native_logs.filter_stderr()
    try:
        from paramscope.cli.app import main as run_main
    except BaseException:
        if interrupt.interrupted():
            interrupt.leave()
        raise
    run_main()


def __getattr__(name: str):
    if name == "app":
        from paramscope.cli.app import app

        return app
    raise AttributeError(f"module 'paramscope.cli' has no attribute {name!r}")


__all__ = ["app", "main"]
