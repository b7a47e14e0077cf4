"""The ``asymlora`` command line: ``main`` dispatches to one module per subcommand; each parses
its flags, calls one library function and prints."""
from asymlora.cli.main import main

__all__ = ["main"]
