"""Errors users see. Each says what went wrong, where, and how to fix it."""

from __future__ import annotations


class DuccioError(Exception):
    """Base class of every error duccio-fx raises on purpose (the CLI turns these into exit code 1)."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None,
                 node: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        self.node = node  # name of the IR node involved, when there is one
        super().__init__(self.render())

    def locate(self, where: str, *, prepend: bool = True) -> DuccioError:
        """Add location detail (e.g. the pass, or the source line) to this error and return it."""
        if where and where not in (self.where or ""):
            parts = [where, self.where] if prepend else [self.where, where]
            self.where = ", ".join(p for p in parts if p)
            self.args = (self.render(),)
        return self

    def render(self) -> str:
        lines = [self.what]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.fix:
            lines.append(f"  how to fix: {self.fix}")
        return "\n".join(lines)


class DuccioTraceError(DuccioError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python, ...)."""


class ShapePropagationError(DuccioError):
    """The traced model failed to run on its example input."""


class PassError(DuccioError):
    """A pass failed or left an invalid graph; names the pass."""


class ModelFileError(DuccioError):
    """A user's model file is missing, broken or does not follow the model.py contract."""
