"""The paramscope command line."""

from paramscope.cli.app import app, main

__all__ = ["app", "main"]
