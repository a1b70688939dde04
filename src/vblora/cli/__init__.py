"""The ``vblora`` command line: :mod:`.main` is the entry point, one module per command."""

from .main import main

__all__ = ["main"]
