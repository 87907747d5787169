"""Our Quantlab reader and integer executor against a network that the upstream toolchain integerized.

`tests/data/quantlab_dronet/` holds a Quantlab DroNet with DORY's golden activations (see its PROVENANCE.md).
Every value of all 15 golden files must come out of our executor exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from duccio_fx.lower.dory_files import from_hwc, golden_text, read_golden
from duccio_fx.lower.int_executor import output_shapes, run
from duccio_fx.lower.intnet import Add, Conv, Linear, Pool
from duccio_fx.lower.quantlab_onnx import read_quantlab, write_quantlab

REFERENCE = Path(__file__).parent / "data" / "quantlab_dronet"


@pytest.fixture(scope="module")
def reference():
    config = json.loads((REFERENCE / "config.json").read_text())
    net = read_quantlab(REFERENCE / config["onnx_file"], input_bits=config["input_bits"],
                        input_signed=config["input_signed"])
    x = torch.as_tensor(from_hwc(read_golden(REFERENCE / "input.txt"), net.input_shape))
    return net, run(net, x)


def test_reads_the_fifteen_dory_layers(reference):
    net, _ = reference
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds == ["Conv", "Pool"] + (["Conv"] * 3 + ["Add"]) * 3 + ["Linear"]
    assert isinstance(net.layers[1], Pool) and net.layers[1].mode == "max"
    head = net.layers[-1]
    assert isinstance(head, Linear) and head.requant is None and head.weight.shape == (2, 6272)
    first = net.layers[0]
    assert isinstance(first, Conv) and first.requant.shift == 19 and first.requant.out.hi == 255


@pytest.mark.parametrize("index", range(15))
def test_executor_reproduces_every_golden_file(reference, index):
    net, outputs = reference
    golden = read_golden(REFERENCE / f"out_layer{index}.txt")
    ours = outputs[index][0].numpy()
    ours_flat = (ours.transpose(1, 2, 0) if ours.ndim == 3 else ours).reshape(-1)
    assert ours_flat.size == golden.size
    mismatches = np.flatnonzero(ours_flat != golden)
    assert mismatches.size == 0, (f"layer {index} ({net.layers[index].name}): {mismatches.size} of {golden.size} "
                                  f"values differ, first at {mismatches[0]}: ours {ours_flat[mismatches[0]]}, "
                                  f"golden {golden[mismatches[0]]}")


def test_residual_adds_take_in1_from_the_first_onnx_input(reference):
    net, outputs = reference
    add = net.layers[5]
    assert isinstance(add, Add) and add.inputs == (4, 2)  # ONNX input[0] is the 3x3 branch, not the shortcut
    assert (add.in1.mul, add.in2.mul) == (245015, 265342)


def test_writer_round_trips_the_reference(reference):
    net, outputs = reference
    again = read_quantlab(write_quantlab(net, output_shapes(net)))
    assert [type(a) for a in again.layers] == [type(b) for b in net.layers]
    x = torch.as_tensor(from_hwc(read_golden(REFERENCE / "input.txt"), net.input_shape))
    for ours, theirs in zip(run(again, x), outputs):
        assert torch.equal(ours, theirs)


def test_golden_text_is_what_dory_reads(tmp_path, reference):
    net, outputs = reference
    path = tmp_path / "out_layer5.txt"
    path.write_text(golden_text("layer5", outputs[5][0].numpy()))
    assert np.array_equal(read_golden(path), read_golden(REFERENCE / "out_layer5.txt"))
    assert path.read_text().splitlines()[0] == "# layer5 (shape [25, 25, 32]),"
