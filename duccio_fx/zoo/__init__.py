"""Reference model zoo: MLPerf Tiny seeds, the DUCCIO paper's networks and graph-shape stress models.

Every model is plain PyTorch and traceable by ``torch.fx.symbolic_trace``. ``build(name)`` returns a
model with deterministic weights (seeded inside a forked RNG, so the caller's RNG state is untouched)
and a ``torch.randn`` example input of shape ``(batch, *input_shape)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .densenet import densenet
from .dscnn import dscnn
from .efficientnet import efficientnet_b0
from .fc_autoencoder import fc_autoencoder
from .mobilenet_v1 import mobilenet_v1
from .mobilenet_v2 import mobilenet_v2
from .mobilenet_v3 import mobilenet_v3_small
from .resnet import resnet18, resnet18_tinyimagenet, resnet50
from .resnet8 import resnet8
from .resnext import resnext
from .shufflenet import shufflenet_like
from .small_cnn import lenet5, two_head_cnn
from .tcn import tcn

__all__ = [
    "ZooEntry", "names", "entry", "build",
    "densenet", "dscnn", "efficientnet_b0", "fc_autoencoder", "lenet5", "mobilenet_v1", "mobilenet_v2",
    "mobilenet_v3_small", "resnet18", "resnet18_tinyimagenet", "resnet50", "resnet8", "resnext",
    "shufflenet_like", "tcn", "two_head_cnn",
]

_SEED = 0


@dataclass(frozen=True)
class ZooEntry:
    """A named reference model: default builder, per-sample input shape and a one-line description."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            return fn()

    return make


_ENTRIES: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("resnet8", _seeded(resnet8), (3, 32, 32), "MLPerf Tiny CIFAR-10 ResNet-8 (12.5 M MACs)"),
        ZooEntry("dscnn", _seeded(dscnn), (1, 49, 10), "MLPerf Tiny keyword-spotting DS-CNN (2.66 M MACs)"),
        ZooEntry("mobilenet_v1", _seeded(mobilenet_v1), (3, 96, 96),
                 "MLPerf Tiny VWW MobileNetV1 alpha=0.25, 2 classes (7.49 M MACs)"),
        ZooEntry("fc_autoencoder", _seeded(fc_autoencoder), (640,), "MLPerf Tiny anomaly-detection FC autoencoder"),
        ZooEntry("resnet18_tinyimagenet", _seeded(resnet18_tinyimagenet), (3, 64, 64),
                 "DUCCIO Tiny ImageNet ResNet-18 (3x3/1 stem, no max-pool, 200 classes)"),
        ZooEntry("resnet18", _seeded(resnet18), (3, 224, 224), "ImageNet ResNet-18, torchvision layout"),
        ZooEntry("resnet50", _seeded(resnet50), (3, 224, 224), "ImageNet ResNet-50 v1.5, torchvision layout"),
        ZooEntry("mobilenet_v2", _seeded(mobilenet_v2), (3, 224, 224), "ImageNet MobileNetV2, torchvision layout"),
        ZooEntry("mobilenet_v3_small", _seeded(mobilenet_v3_small), (3, 224, 224),
                 "MobileNetV3-Small: squeeze-excite with Hardsigmoid, Hardswish"),
        ZooEntry("densenet", _seeded(densenet), (3, 32, 32), "DenseNet-BC k=12, 3x4 layers, nested torch.cat"),
        ZooEntry("resnext", _seeded(resnext), (3, 64, 64), "ResNeXt 32x4d, grouped 3x3 convs, 3 stages"),
        ZooEntry("efficientnet_b0", _seeded(efficientnet_b0), (3, 224, 224), "EfficientNet-B0: MBConv, SiLU, SE"),
        ZooEntry("tcn", _seeded(tcn), (4, 128), "1-D TCN: causal dilated Conv1d residual blocks, mean-over-time head"),
        ZooEntry("shufflenet_like", _seeded(shufflenet_like), (3, 32, 32),
                 "ShuffleNet-V2-like: chunk/cat on channels, view-transpose-view channel shuffle"),
        ZooEntry("lenet5", _seeded(lenet5), (1, 28, 28), "LeNet-5 with BN and a flatten-into-Linear head"),
        ZooEntry("two_head_cnn", _seeded(two_head_cnn), (3, 32, 32), "small CNN returning (logits, features)"),
    )
}


def names() -> list[str]:
    """Names of all zoo models, in registration order."""
    return list(_ENTRIES)


def entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known models: {', '.join(_ENTRIES)}") from None


def build(name: str, batch: int = 1) -> tuple[nn.Module, torch.Tensor]:
    """Build model ``name`` (default config) and a ``torch.randn`` input of shape ``(batch, *input_shape)``."""
    if batch < 1:
        raise ValueError(f"build({name!r}): batch must be >= 1, got {batch}")
    e = entry(name)
    gen = torch.Generator().manual_seed(_SEED)
    return e.build(), torch.randn((batch, *e.input_shape), generator=gen)
