"""A search step reads no value of the device: no `.item()`, `float()`, `bool()` of a tensor, no copy to the host.

On a GPU, tests/test_cuda.py runs the step under `torch.cuda.set_sync_debug_mode("error")`. Here the
reads are counted: every tensor-to-Python conversion during the steps (after the first, which builds the
cost program) is recorded, except reads of host copies the loss meter made without waiting for the device.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch

from duccio_fx import Constraint, SearchSettings, zoo
from duccio_fx.search.recipe import Recipe

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")


@contextmanager
def counted_reads(log: list[str]) -> Iterator[None]:
    """Record the tensor-to-host conversions made inside the block (their names)."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name: str, fn: Any) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            # torch.optim keeps its step counters on the host by design (not a device read)
            if not getattr(self, "duccio_host_copy", False) and f"torch{os.sep}optim" not in caller:
                log.append(f"{name} in {caller}:{sys._getframe(1).f_lineno}")
            return fn(self, *args, **kwargs)
        return read

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


class Switch:
    """A loader of `batches` copies of one batch that counts reads from the second step to the end of the loop."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batches: int) -> None:
        self.x, self.y, self.batches = x, y, batches
        self.reads: list[str] = []

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield self.x, self.y
        with counted_reads(self.reads):
            for _ in range(self.batches - 1):
                yield self.x, self.y


def _recipe(method: str, device: str, loader: Any, x: torch.Tensor, target: str = "gap8", **options: Any) -> Recipe:
    model, example = zoo.build("resnet8")
    settings = SearchSettings(method=method, bn_recalibration_batches=0, method_options=options)
    recipe = Recipe(model, (example,), loader, [(x, loader.y)], [Constraint.parse("size", "50%")], target,
                    settings, device=device)
    recipe.objective.calibrate(1.0, recipe.space.cost_values(recipe.target))
    return recipe


def _search_epoch(recipe: Recipe) -> float:
    opt = recipe._search_optimizer()
    return recipe._train_epoch(recipe.space, opt, "search", 0)


def test_a_mask_search_step_reads_nothing_from_the_device():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loader = Switch(x, y, 4)
    recipe = _recipe("mask", "cpu", loader, x)
    loss = _search_epoch(recipe)
    assert loader.reads == [], f"host reads in a search step: {loader.reads}"
    assert loss == loss and loss > 0  # the epoch's mean loss is still read, once, after the loop


@pytest.mark.parametrize("estimator", ["all", "sampled"])
def test_a_path_search_step_reads_the_device_once(estimator):
    """Which alternative each point runs is decided on the host: one read per step for all points together."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loader = Switch(x, y, 4)
    recipe = _recipe("path", "cpu", loader, x, estimator=estimator)
    assert {p.estimator for p in recipe.space.points()} == {estimator}
    _search_epoch(recipe)
    assert len(recipe.space.points()) > 3
    assert len(loader.reads) == 3 and all(r.startswith("tolist in") and "choice_point.py" in r
                                          for r in loader.reads), loader.reads


def test_the_loss_meter_sums_on_the_device_and_shows_the_latest_arrived_loss():
    from duccio_fx.search.training import StepLosses

    meter = StepLosses(torch.device("cpu"))
    for value, n in ((2.0, 4), (1.0, 2)):
        meter.add(torch.tensor(value), n)
    assert meter.mean() == (10.0, 6) and meter.latest() == 1.0  # on a CPU the last copy has arrived
