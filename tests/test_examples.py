"""The example model files: Fashion-MNIST reads the real IDX files from the installed location, and says
how to install them when they are missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from duccio_fx.cli.model_file import load_model_file

ROOT = Path(__file__).resolve().parent.parent
FASHION = ROOT / "examples" / "fashion_mnist.py"
INSTALLED = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()


def test_fashion_mnist_without_its_data_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("FMNIST_DIR", str(tmp_path))
    ns = load_model_file(str(FASHION)).namespace
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        ns["train_loader"]()


@pytest.mark.skipif(not INSTALLED, reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_reads_the_real_images(monkeypatch):
    monkeypatch.setenv("FMNIST_TRAIN", "600")
    monkeypatch.setenv("FMNIST_VAL", "200")
    spec = load_model_file(str(FASHION))
    ns = spec.namespace
    x, y = next(iter(ns["train_loader"]()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) <= 9
    vx, vy = ns["val_loader"]().dataset.tensors
    assert len(vy) == 200 and abs(float(vx.mean())) < 0.3  # normalised with the training mean / std
    assert set(torch.bincount(vy, minlength=10).tolist()) != {0} and spec.model(vx[:2]).shape == (2, 10)
