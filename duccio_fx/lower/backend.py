"""Lowering backends: an exported (plain, shrunk) model → the files a deployment toolchain reads.

A backend returns its files as bytes with the checks it ran, and writes nothing itself: the caller writes
every file atomically only once every backend has succeeded, so a failed check never leaves half an
output. A new backend is one module plus one registration:

    @duccio_fx.register_backend("mine")
    def lower_mine(model, example_inputs, target, context) -> Lowered: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from duccio_fx.common.errors import DuccioError
from duccio_fx.ir.pass_manager import PassContext
from duccio_fx.targets import Target


@dataclass(frozen=True)
class Lowered:
    """What a backend produced: files by name (relative to the run directory) and the checks it ran."""

    files: dict[str, bytes]
    checks: dict[str, float] = field(default_factory=dict)


class Backend(Protocol):
    def __call__(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], target: Target | None,
                 context: PassContext) -> Lowered: ...


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    """Decorator: make `backend(model, example_inputs, target, context) -> Lowered` the backend `name`."""
    def add(backend: Backend) -> Backend:
        _BACKENDS[name] = backend
        return backend
    return add


def backends() -> list[str]:
    """The names of the registered backends."""
    return sorted(_BACKENDS)


def lower(name: str, model: nn.Module, example_inputs: Sequence[torch.Tensor], target: Target | None = None,
          context: PassContext | None = None) -> Lowered:
    """Run backend `name` on an exported model (batch-1 example inputs are taken from `example_inputs`)."""
    if name not in _BACKENDS:
        raise DuccioError(f"unknown backend {name!r}", where="--backend", fix=f"use one of: {', '.join(backends())}")
    try:
        return _BACKENDS[name](model, tuple(x[:1] for x in example_inputs), target, context or PassContext())
    except DuccioError as err:
        raise err.locate(f"backend '{name}'")
    except Exception as err:  # e.g. an op the exporter does not support: say which backend, keep the cause
        raise DuccioError(f"backend '{name}' failed: {type(err).__name__}: {err}", where=f"backend '{name}'",
                          fix="the search result is fine; report this model with the backend, or choose another "
                              "--backend") from err
