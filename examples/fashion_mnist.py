"""MLPerf Tiny's ResNet-8 seed on Fashion-MNIST (70 000 real 28x28 clothing images, 10 classes).

    duccio-fx optimize examples/fashion_mnist.py --target gap8 --max-size 50% --out runs/fmnist
    FMNIST_TRAIN=12000 FMNIST_VAL=2000 duccio-fx sweep examples/fashion_mnist.py --size 25%,50%,75% ...

Data: the original IDX files of Zalando's Fashion-MNIST, as the Debian package `dataset-fashion-mnist`
installs them (`/usr/share/datasets/fashion-mnist/`; another directory through `FMNIST_DIR`). Nothing is
downloaded. Training uses the first `FMNIST_TRAIN` images of the 60 000 training images (default: all),
validation the first `FMNIST_VAL` images of the 10 000 test images (default: all).

The seed is the MNIST example's ResNet-8 (16-32-64 filters, 1x1 strided shortcuts, average pool, FC).
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from mnist import ResNet8  # the sibling example's seed (a model file may import its siblings)

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # of the Fashion-MNIST training images
BATCH = 64
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")


def build_model() -> torch.nn.Module:
    return ResNet8(classes=len(CLASSES))


example_input = torch.zeros(1, 1, 28, 28)


def _directory() -> Path:
    directory = Path(os.environ.get("FMNIST_DIR", DEFAULT_DIR))
    if not (directory / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {directory}. Install it with `apt-get install dataset-fashion-mnist` (as root) "
            f"(Debian/Ubuntu; it puts the four IDX files in {DEFAULT_DIR}), or set FMNIST_DIR to a directory "
            "holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz.")
    return directory


def _idx(path: Path) -> np.ndarray:
    """An IDX file (Fashion-MNIST's format): a big-endian header of dims, then unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@lru_cache(maxsize=2)
def _split(name: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    directory = _directory()
    images = _idx(directory / f"{name}-images-idx3-ubyte.gz")[:limit]
    labels = _idx(directory / f"{name}-labels-idx1-ubyte.gz")[:limit]
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    return x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def train_loader() -> DataLoader:
    x, y = _split("train", int(os.environ.get("FMNIST_TRAIN", 60_000)))
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)


def val_loader() -> DataLoader:
    x, y = _split("t10k", int(os.environ.get("FMNIST_VAL", 10_000)))
    return DataLoader(TensorDataset(x, y), batch_size=256)
