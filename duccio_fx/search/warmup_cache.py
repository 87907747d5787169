"""The warmup cache: the warmup does not depend on the constraints, so its result is stored and reused.

The key covers what the warmed-up weights depend on: the seed's weights and traced graph, the loss, the
data (in a fixed order, without touching the global RNG), the seed, the warmup settings and the autocast
precision (`--amp`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from duccio_fx.common.atomic import save_atomic
from duccio_fx.search.settings import SearchSettings
from duccio_fx.search.training import split_batch


def default_cache_dir() -> Path:
    return Path(os.environ.get("DUCCIO_FX_CACHE", Path.home() / ".cache" / "duccio-fx"))


def fingerprint(model: nn.Module, loader: Iterable[Any], settings: SearchSettings, example: Sequence[Any],
                graph_code: str = "", loss_name: str = "", amp: str | None = None) -> str:
    """Key of the warmup cache: seed weights, traced graph, loss, data, seed, warmup settings and autocast
    precision (None, the full-precision warmup, keeps the keys of earlier versions)."""
    h = hashlib.sha256()
    h.update(graph_code.encode())
    h.update(loss_name.encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(str(model).encode())
    n = 0
    with torch.random.fork_rng():  # a shuffling loader: same order every time, global RNG untouched
        torch.manual_seed(0)
        for batch in loader:
            x, y = split_batch(batch)
            for t in list(x if isinstance(x, (tuple, list)) else [x]) + [y]:
                h.update(torch.as_tensor(t).detach().cpu().contiguous().numpy().tobytes()[:65536])
            n += 1
    h.update(f"{n}|{settings.warmup_epochs}|{settings.lr}|{settings.weight_decay}|{settings.seed}".encode())
    h.update(str([tuple(e.shape) for e in example]).encode())
    if amp is not None:  # a bf16 warmup trains other weights than a float32 one
        h.update(f"|amp {amp}".encode())
    return h.hexdigest()[:24]


class WarmupCache:
    """One cached warmup: `DIR/warmup/<key>.pt` holding the search space's state, L̂ and the epoch history."""

    def __init__(self, directory: Path, key: str, map_location: torch.device | str | None = None) -> None:
        self.path = Path(directory) / "warmup" / f"{key}.pt"
        self.map_location = map_location  # a warmup stored on a GPU loads on the CPU, and back

    def load(self) -> dict[str, Any] | None:
        return torch.load(self.path, weights_only=False, map_location=self.map_location) if self.path.exists() \
            else None

    def store(self, state: dict[str, Any], loss: float, history: list[dict[str, Any]]) -> None:
        save_atomic({"searchable": state, "loss": loss, "history": history}, self.path)
