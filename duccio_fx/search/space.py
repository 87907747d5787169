"""The search-space protocol and the registry of search methods.

A search method turns a seed model into a `SearchSpace`: an `nn.Module` that trains like the seed and
also holds architecture parameters. The recipe, the feasibility check, the CLI and the reports talk only to
this protocol, so a new method is one module with a `SearchSpace` subclass plus one registration:

    @duccio_fx.register_search_method("mine")
    def make_mine(model, example_inputs, *, leaf_modules=(), context=None, **options) -> SearchSpace: ...

`duccio_fx.search_methods()` lists the registered names ("mask" and "path" are built in).
"""

from __future__ import annotations

import inspect
from abc import ABCMeta, abstractmethod
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.model import Costs
from duccio_fx.ir.meta import LayerTerm
from duccio_fx.ir.pass_manager import PassContext
from duccio_fx.ir.tracer import LeafSpec
from duccio_fx.search.objective import DuccioObjective
from duccio_fx.targets import Target


class SearchSpace(nn.Module, metaclass=ABCMeta):
    """A model under search: weights W, architecture parameters θ, costs of the sampled architecture."""

    method: str = ""  # the registered name of the method that built it
    # the warmup trains several architectures through shared BatchNorms (a supernet's paths), so their
    # running statistics mix them: re-estimate them for the evaluated architecture before each warmup validation
    recalibrate_in_warmup: bool = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - every method defines it
        raise NotImplementedError

    @abstractmethod
    def arch_parameters(self) -> Iterator[nn.Parameter]:
        """θ: trained in the search phase only, without weight decay."""

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """W: every parameter that is not an architecture parameter."""
        arch = {id(p) for p in self.arch_parameters()}
        return (p for p in self.parameters() if id(p) not in arch)

    @abstractmethod
    def costs(self, target: Target | str | None = None) -> Costs:
        """Costs of the architecture the forward pass uses now, differentiable w.r.t. θ."""

    def penalty(self, objective: DuccioObjective, target: Target | str | None, epoch: float) -> torch.Tensor:
        """The objective's penalty for this training step (add it to the task loss): by default on `costs`; a
        method may give θ another gradient of the same value (the path method's "neighbours" costs)."""
        return objective.penalty(self.costs(target), epoch)

    def cost_values(self, target: Target | str | None = None) -> Costs:
        """Costs (floats, no graph) of the architecture `export()` would return now: for decisions, logs and
        reports. The same as `costs(target)` when the forward pass does not sample."""
        with torch.no_grad():
            return self.costs(target).floats()

    @abstractmethod
    def minimum_costs(self, target: Target | None = None) -> Costs:
        """Costs (floats) of the smallest architecture the space holds: what no bound can go below."""

    @property
    @abstractmethod
    def seed_terms(self) -> Sequence[LayerTerm]:
        """The cost terms of the seed's layers (critical layers are chosen on the seed)."""

    def layer_candidates(self) -> Sequence[LayerTerm]:
        """Every layer the space may use, named as its cost tables name them (critical layers come from these)."""
        return self.seed_terms

    def architecture(self) -> dict[str, Any]:
        """A JSON-ready summary of the current architecture parameters, recorded each search epoch."""
        return {}

    @abstractmethod
    def export(self, context: PassContext | None = None) -> nn.Module:
        """The chosen architecture as a plain model of ordinary torch modules (eval-exact)."""

    def structure(self) -> str:
        """Text that changes whenever the architecture or its forward changes (keys caches and checkpoints)."""
        return repr(self)

    def on_epoch(self, epoch: int) -> None:
        """Called before each search epoch (schedules, e.g. a Gumbel temperature); nothing by default."""

    def on_warmup_epoch(self, epoch: int, epochs: int) -> None:
        """Called before warmup epoch `epoch` of `epochs` (θ frozen; e.g. which paths a supernet trains)."""

    def on_search_start(self) -> None:
        """Called once after the warmup (trained or from the cache), before the search's first epoch; not when a
        search is resumed from its checkpoint (the architecture parameters are in it). Nothing by default."""

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint must hold to resume the search exactly."""
        return self.state_dict()

    def load_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)


class MethodFactory(Protocol):
    def __call__(self, model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[LeafSpec] = (),
                 context: PassContext | None = None, **options: Any) -> SearchSpace: ...


_METHODS: dict[str, MethodFactory] = {}


def register_search_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: make `factory(model, example_inputs, *, leaf_modules, context, **options)` the method `name`."""
    def add(factory: MethodFactory) -> MethodFactory:
        _METHODS[name] = factory
        return factory
    return add


def search_methods() -> list[str]:
    """The names of the registered search methods."""
    return sorted(_METHODS)


def make_searchable(model: nn.Module, example_inputs: Any, method: str = "mask", *,
                      leaf_modules: Sequence[LeafSpec] = (), context: PassContext | None = None,
                      **options: Any) -> SearchSpace:
    """Build the search space of `method` around a copy of `model` (the user's model is left untouched)."""
    if method not in _METHODS:
        raise DuccioError(f"unknown search method {method!r}", where="--method",
                          fix=f"use one of: {', '.join(search_methods())}")
    factory = _METHODS[method]
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        own = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
               and n not in ("leaf_modules", "context")]
        accepted = {n for n, p in params.items()
                    if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
        for name in options:
            if name not in accepted:
                raise DuccioError(f"option {name!r} does not belong to the {method} method",
                                  where=f"make_searchable(..., method={method!r})",
                                  fix=(f"its options are: {', '.join(own)}" if own else "it takes no options")
                                  + "; or choose the method the option belongs to")
    space = factory(model, example_inputs, leaf_modules=leaf_modules, context=context, **options)
    space.method = method
    return space
