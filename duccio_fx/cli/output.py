"""Lines a user (or a script) copies: file paths, commands, JSON. They are printed whole, never wrapped at the
terminal's width (a console writing to a pipe assumes 80 columns, which would split a long path in two)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape


def say(console: Console, text: str) -> None:
    """Print one line of text (rich markup allowed) without wrapping it."""
    console.print(text, highlight=False, soft_wrap=True)


def path_text(path: str | Path) -> str:
    """A path inside a `say` line: brackets in it are not taken for markup."""
    return escape(str(path))
