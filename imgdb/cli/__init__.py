"""The `imgdb` command line: parses options, calls the library, prints results."""

from .app import app, main

__all__ = ["app", "main"]
