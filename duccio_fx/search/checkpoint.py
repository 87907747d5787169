"""Checkpoints: every epoch of every phase ends with an atomic save; a resumed run checks it is the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from duccio_fx.common.atomic import save_atomic
from duccio_fx.common.errors import DuccioError


class Checkpoint:
    """`path` (None: no checkpoints) plus the signature of the run that may resume from it: a flat mapping of
    what must agree (each setting, the constraints, the target, a hash of the model) so a mismatch can say
    which of them differs."""

    def __init__(self, path: Path | None, signature: dict[str, Any],
                 map_location: torch.device | str | None = None) -> None:
        self.path = path
        self.signature = signature
        self.map_location = map_location  # resume on another device than the one that saved it

    def save(self, state: dict[str, Any]) -> None:
        if self.path is not None:
            save_atomic(dict(state, signature=self.signature), self.path)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none; refuses a checkpoint of another run."""
        if self.path is None or not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False, map_location=self.map_location)
        saved = state.get("signature")
        if saved != self.signature:
            if isinstance(saved, dict):
                keys = [k for k in dict.fromkeys([*saved, *self.signature]) if saved.get(k) != self.signature.get(k)]
                what = "; ".join(f"{k}: {_short(saved.get(k))} in the checkpoint, {_short(self.signature.get(k))} now"
                                 for k in keys)
            else:
                what = "it was written by an older duccio-fx"
            raise DuccioError(f"the checkpoint belongs to another run ({what})", where=str(self.path),
                              fix="resume with the options of the interrupted run, or start a new run in another "
                                  "--out directory")
        return state


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
