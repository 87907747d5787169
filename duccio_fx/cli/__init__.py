"""The `duccio-fx` command line: commands (`app`) and the views that render their results."""

from duccio_fx.cli.app import app, main

__all__ = ["app", "main"]
