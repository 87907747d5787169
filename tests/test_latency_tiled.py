"""`gap8-tiled`: the per-kernel formulas on hand-computed layers, DORY's tile choice, double buffering,
gradients, and the target constants."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import duccio_fx
from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.program import CostProgram
from duccio_fx.costs import pulp_tiled
from duccio_fx.costs.pulp_tiled import PulpConstants, choose_tiles, tiled_cycles
from duccio_fx.costs.terms import evaluate
from duccio_fx.ir.meta import layer_terms
from duccio_fx.targets import load_target

K = PulpConstants()
GAP8 = load_target("gap8")


def _with(target=GAP8, **deployment):
    return target.model_copy(update={"deployment": target.deployment.model_copy(update=deployment)})


def _layer(module: nn.Module, shape: tuple[int, ...]):
    """The single layer term of a one-layer model (plus its values with every channel kept)."""
    terms = layer_terms(duccio_fx.analyze(nn.Sequential(module, nn.ReLU()), torch.randn(1, *shape)))
    return evaluate(terms)[0]


def test_a_conv_that_fits_l1_costs_its_kernel_its_dma_and_the_fixed_costs():
    v = _layer(nn.Conv2d(16, 16, 3, padding=1), (16, 8, 8))
    # kernel: 8 rows over 8 cores -> 8 pixels a core, 4 pairs; K = 144 inputs = 36 words
    im2col = 2 * (K.im2col_per_4 * 36 + K.im2col_call * 3)
    block = K.matmul_per_4k * 36 + 8 * K.requant + K.block_overhead
    kernel = 4 * (im2col + 4 * block)
    # DMA (today's GAP8 target: blocking, no double buffering): input 16x8x8, weights + k, l, output 16x8x8
    dma = (1024 / 8 + K.dma_command) + ((144 + 8) * 16 / 8 + 3 * K.dma_command) + (1024 / 8 + K.dma_command)
    assert tiled_cycles(v, GAP8) == pytest.approx(kernel + dma + K.tile_overhead + K.layer_overhead, rel=1e-12)


def test_leftover_output_channels_run_the_one_channel_block():
    four, six = _layer(nn.Conv2d(16, 4, 3, padding=1), (16, 8, 8)), _layer(nn.Conv2d(16, 6, 3, padding=1), (16, 8, 8))
    left = K.chan_left_per_4k * 36 + 2 * K.requant + K.block_overhead / 4
    extra_dma = (2 * (144 + 8) / 8) + (2 * 64 / 8)  # two more channels of weights (+k, l) and of output
    assert tiled_cycles(six, GAP8) - tiled_cycles(four, GAP8) == pytest.approx(4 * 2 * left + extra_dma, rel=1e-12)


def test_leftover_inputs_run_one_by_one():
    # K = 3 * 9 = 27 inputs: 6 words and 3 leftovers, pointwise off (3x3)
    v = _layer(nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8))
    im2col = 2 * (K.im2col_per_4 * math.ceil(27 / 4) + K.im2col_call * 3)
    block = K.matmul_per_4k * 6 + K.matmul_per_k_left * 3 + 8 * K.requant + K.block_overhead
    dma = (3 * 64 / 8 + K.dma_command) + ((27 + 8) * 4 / 8 + 3 * K.dma_command) + (4 * 64 / 8 + K.dma_command)
    expected = 4 * (im2col + block) + dma + K.tile_overhead + K.layer_overhead
    assert tiled_cycles(v, GAP8) == pytest.approx(expected, rel=1e-12)


def test_depthwise_splits_channels_over_cores_and_builds_column_buffers():
    v = _layer(nn.Conv2d(16, 16, 3, padding=1, groups=16), (16, 8, 8))
    per_out = K.dw_per_4k * (2 + 1) + K.requant + K.output_overhead  # 9 taps: 2 words, 1 leftover
    kernel = 2 * (8 * 8 * 1 * K.dw_column + 64 * per_out)  # ceil(16 / 8) channels a core
    dma = (1024 / K.dma_byte_gather + K.dma_command * 2) + ((9 + 8) * 16 / 8 + 3 * K.dma_command) \
        + (1024 / 8 + K.dma_command)
    assert tiled_cycles(v, GAP8) == pytest.approx(kernel + dma + K.tile_overhead + K.layer_overhead, rel=1e-12)


def test_a_head_linear_splits_neurons_and_does_not_requantize():
    terms = layer_terms(duccio_fx.analyze(nn.Linear(64, 10), torch.randn(1, 64)))
    v = evaluate(terms)[0]
    kernel = math.ceil(10 / 8) * (K.linear_per_4k * 16 + K.output_overhead)
    dma = (64 / 8 + K.dma_command) + (640 / 8 + 3 * K.dma_command) + (10 * 4 / 8 + K.dma_command)  # 32-bit out
    assert tiled_cycles(v, GAP8) == pytest.approx(kernel + dma + K.tile_overhead + K.layer_overhead, rel=1e-12)


def test_a_layer_too_big_for_l1_gets_dorys_tile():
    # 64x64x32 -> 64 channels, 3x3: far over 36,700 B; DORY prefers rows a multiple of 8, even columns and
    # channels a multiple of 4, and the tile must fit L1 double-buffered
    v = _layer(nn.Conv2d(32, 64, 3, padding=1), (32, 64, 64))
    program = CostProgram([v.term])
    values = program.values(None, GAP8)
    for db in (1, 2):
        target = _with(double_buffering=db)
        tiles = choose_tiles(values.term, values.cin, values.cout, target)
        cout, rows, cols = float(tiles.cout[0]), float(tiles.rows[0]), float(tiles.cols[0])
        assert tiles.whole[0] == 0 and rows % 8 == 0 and cols % 2 == 0 and cout % 4 == 0
        used = db * (32 * min(64, rows + 2) * min(64, cols + 2) + cout * rows * cols + cout * (288 + 8)) \
            + 2 * 8 * 9 * 32 + 40
        assert used <= 36_700


def test_double_buffering_hides_dma_behind_the_kernels(monkeypatch):
    v = _layer(nn.Conv2d(32, 64, 3, padding=1), (32, 64, 64))
    program = CostProgram([v.term])
    values = program.values(None, GAP8)
    same = choose_tiles(values.term, values.cin, values.cout, _with(double_buffering=2))
    monkeypatch.setattr(pulp_tiled, "choose_tiles", lambda *args: same)  # the same tiles both ways
    single, double = tiled_cycles(v, _with(double_buffering=1)), tiled_cycles(v, _with(double_buffering=2))
    assert double < single


def test_cycles_are_differentiable_in_the_kept_channels():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 10, 1))
    sm = duccio_fx.make_searchable(model, torch.randn(1, 3, 32, 32))
    costs = sm.costs("gap8")
    costs["cycles"].backward()
    grads = [p.grad for p in sm.arch_parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    sm.set_masks({g.id: torch.arange(g.channels) < g.channels // 2 for g in sm.channel_groups})
    assert float(sm.costs("gap8")["cycles"].detach()) < float(costs["cycles"].detach())


def test_target_constants_replace_the_defaults_and_unknown_ones_are_refused():
    v = _layer(nn.Conv2d(16, 16, 3, padding=1), (16, 8, 8))
    slower = GAP8.model_copy(update={"latency": GAP8.latency.model_copy(update={"constants": {"layer_overhead": 0.0}})})
    assert tiled_cycles(v, GAP8) - tiled_cycles(v, slower) == pytest.approx(K.layer_overhead)
    bad = GAP8.model_copy(update={"latency": GAP8.latency.model_copy(update={"constants": {"warp_speed": 1.0}})})
    with pytest.raises(DuccioError, match="warp_speed"):
        tiled_cycles(v, bad)


def test_gap8_and_gap9_use_the_tiled_model():
    assert load_target("gap8").latency.model == load_target("gap9").latency.model == "gap8-tiled"


DORY_CHECK = os.environ.get("DORY_CHECK")


@pytest.mark.skipif(not (DORY_CHECK and os.environ.get("DORY_VENV")),
                    reason="set DORY_CHECK (path of check_dory.py) and DORY_VENV to run the real DORY tiler")
def test_the_tiles_are_the_real_dory_tilers(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tile_agreement import compare

    rows = [r for name in ("resnet8", "dscnn") for r in compare(name, tmp_path, str(DORY_CHECK))]
    assert len(rows) >= 18
    assert all(r["same_tile"] for r in rows), [r for r in rows if not r["same_tile"]]
