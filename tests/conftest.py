from __future__ import annotations

import torch
from torch import nn

import duccio_fx
from duccio_fx import ChannelGroup


def groups_of(model: nn.Module, *inputs: torch.Tensor, **kw) -> list[ChannelGroup]:
    model.eval()
    return duccio_fx.channel_groups(duccio_fx.analyze(model, inputs, **kw))


def group_with(groups: list[ChannelGroup], producer: str) -> ChannelGroup:
    """The (first) group that `producer` produces channels for."""
    found = [g for g in groups if producer in g.producers]
    assert found, f"no group produced by {producer}: {[g.producers for g in groups]}"
    return found[0]


def pytest_addoption(parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden IR files in tests/golden/ from the current output "
                          "(tests/test_golden_ir.py; DUCCIO_UPDATE_GOLDEN=1 does the same)")
