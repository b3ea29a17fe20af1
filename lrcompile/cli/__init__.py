"""The command line, a veneer over the library (``lrcompile.cli:main`` is the console script)."""

from lrcompile.cli.commands import main

__all__ = ["main"]
