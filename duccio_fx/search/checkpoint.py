"""Checkpoints: every epoch of every phase ends with an atomic save; a resumed run checks it is the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from duccio_fx.common.atomic import save_atomic
from duccio_fx.common.errors import DuccioError


class Checkpoint:
    """`path` (None: no checkpoints) plus the signature of the run that may resume from it."""

    def __init__(self, path: Path | None, signature: str) -> None:
        self.path = path
        self.signature = signature

    def save(self, state: dict[str, Any]) -> None:
        if self.path is not None:
            save_atomic(dict(state, signature=self.signature), self.path)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none; refuses a checkpoint of another run."""
        if self.path is None or not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False)
        if state.get("signature") != self.signature:
            raise DuccioError("the checkpoint was written by a run with another model, settings or constraints",
                              where=str(self.path),
                              fix="resume with the same options, or start a new run in another --out directory")
        return state
