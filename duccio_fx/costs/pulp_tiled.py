"""`gap8-tiled`: the cycles DORY-generated code takes for a layer on a PULP cluster (GAP8, GAP9's cores).

A DORY layer (a conv/linear with its batch norm, activation and requantization) runs as tiles: DORY's
L2->L1 tiler picks the tile, the layer's code moves each tile between L2 and L1 with the cluster DMA and
calls a PULP-NN kernel on it, forking the cluster once per layer. The model follows that structure:

* the tile: whole layer when it fits L1 at once, else the candidate (output channels x output rows x
  output columns; input channels are never tiled) that maximises DORY's own tiler objective
  (Common/Tiler/tiler_conv2d.py of pulp-platform/dory: rows a multiple of 8, even columns, channels a
  multiple of 4, at least 16 pixels, then the most L1 bytes, then the most channels), under its L1 budget
  with the target's double-buffering factor;
* the kernel's cycles for that tile, from the instructions of the PULP-NN inner loops (pulp-platform/pulp-nn,
  8-bit library): convs split output rows over the 8 cores (pointwise: rows x column halves) and compute
  blocks of 4 output channels x 2 pixels, 14 instructions per 4 input elements (4+2 loads, 8 sdotp), a
  leftover output channel 5 per 4, leftover input elements one by one; im2col copies 4 bytes in 2
  instructions; depthwise splits channels over cores, 3 instructions per 4 kernel taps; linear splits output
  neurons, 3 instructions per 4 inputs; every output pays a requantization;
* the DMA of each tile: input, weights (with k, l), output at `dma_bytes_per_cycle` plus a command cost per
  row a core programs; the input goes again for every output-channel tile when the layer is also tiled
  spatially; depthwise inputs are transposed by 1-byte transfers (slower);
* double buffering (target `deployment.double_buffering` = 2): a tile costs max(kernel, its DMA) and only the
  first load is exposed; with 1 (today's DORY GAP8 target, blocking DMA) kernel and DMA add up;
* fixed costs per tile (barriers, kernel call) and per layer (fork, bias load, L1 allocation).

Tile choice is a discrete decision taken on the current kept channels without gradient; the cycles are then
differentiable in the kept channels (floor/ceil with straight-through gradients). It evaluates one layer or
a `TermTable` of all layers with the same tensor code (a fixed number of ops whatever the depth, no host
sync). Constants: `PulpConstants` (instruction counts read off the kernels, or fitted on DORY's published
GAP8 regression cycles by `benchmarks/latency_model.py`, as each says); a target overrides them in
`[latency] constants`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.terms import LayerValues, Number, TermTable, in_bits, out_bits, weight_bits
from duccio_fx.ir.meta import LayerTerm
from duccio_fx.targets import Target


@dataclass(frozen=True)
class PulpConstants:
    """Cycle constants of PULP-NN kernels and DORY layer code. 'code': counted on the kernel's inner loop
    (one instruction a cycle on RI5CY, hardware loops, post-increment loads); 'fitted': fitted on DORY's
    published GAP8 regression cycles (benchmarks/latency_model.py --fit); 'assumed': no source found."""

    cores: float = 8.0                # cluster cores (target compute.cores)
    matmul_per_4k: float = 14.0       # code: 4x2 block, per 4 inputs: 4 lw weights + 2 lw pixels + 8 sdotp
    matmul_per_4k_i4: float = 40.0    # code (C source, pulp-nn-mixed matmul_u8_u8_i4): 4-bit weights unpacked to
    #                                   8 bits (extract + pack per 4) before the sdotp: 36-44, the midpoint
    matmul_per_4k_i2: float = 39.0    # code (matmul_u8_u4_i2): 2-bit weights, 35-43: no faster than 4-bit
    im2col_per_4_subbyte: float = 7.5  # code (pulp_nn_im2col_u4_to_u8): sub-byte inputs unpacked to bytes,
    #                                    1 lw + 8 extract + 4 pack + 2 sw per 8 elements; 1x1 convs too
    matmul_per_k_left: float = 14.0   # code: per leftover input (K % 4) of a 4x2 block: 6 lb + 8 mac
    chan_left_per_4k: float = 5.0     # code: leftover output channel, 1x2 block per 4 inputs: 3 lw + 2 sdotp
    block_overhead: float = 14.0      # code: per 4x2 block: 4 bias loads, 8 stores, loop setup (assumed ~2)
    im2col_per_4: float = 2.0         # code: im2col copies a word with one lw and one sw
    im2col_call: float = 10.0         # assumed: call of the (noinline) im2col copy, once per kernel row
    dw_per_4k: float = 3.0            # code: depthwise, per 4 taps: 2 lw + 1 sdotp; leftover tap lb+lb+mac
    dw_column: float = 2.0            # code: depthwise column buffer, per input row and 4 kernel columns
    linear_per_4k: float = 3.0        # code: pulp_nn_linear, per 4 inputs: 2 lw + 1 sdotp
    requant: float = 18.6             # fitted: per output, requantization (k*acc + l) >> d, clip, store
    requant_64: float = 18.6          # fitted: extra per output with 64-bit k, l (BNRelu_bits 64: 64-bit products)
    output_overhead: float = 4.0      # code: per depthwise/linear output: loop, store
    dma_bytes_per_cycle: float = 8.0  # DORY's GAP8 HW_description.json: "L2 bandwidth": 8
    dma_byte_gather: float = 1.0      # assumed: bytes/cycle of the 1-byte transposing copies of depthwise inputs
    dma_command: float = 10.0         # assumed: programming one DMA transfer (a row of a 3-d tile) and its wait
    tile_overhead: float = 2138.0     # fitted: per tile, barriers, the kernel call, programming its DMA
    layer_overhead: float = 10000.0   # fitted (at its bound, weakly determined): per layer, fork/join, L1 allocation,
    #                                   bias and constant loads, the layer's share of the network loop

    @classmethod
    def of(cls, target: Target) -> PulpConstants:
        """The defaults with the target's cores and its `[latency] constants`."""
        given = dict(target.latency.constants)
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise DuccioError(f"unknown gap8-tiled constant(s) {', '.join(unknown)} in target {target.name!r}",
                              where=f"target {target.name}: [latency] constants",
                              fix=f"use some of: {', '.join(cls.names())}")
        return replace(cls(cores=float(target.compute.cores)), **given)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """floor forward, identity gradient backward."""
    return x + (torch.floor(x) - x).detach()


def ceil_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.ceil(x) - x).detach()


# candidate tiles: output rows split into this many tiles, or any multiple of 8 rows (DORY's objective prefers
# them); columns whole, halved or quartered, each with the most channels that fit; or every channel with the
# most columns that fit
_SPLITS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128)
_ROW_BLOCKS = 32  # and every multiple of 8 rows up to 256


@dataclass
class Tiles:
    """The tile chosen for every layer (float64 columns, no gradient): output channels, rows, columns per
    tile, and whether the layer runs as one tile."""

    cout: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    whole: torch.Tensor


def _kinds(t: TermTable) -> tuple[torch.Tensor, torch.Tensor]:
    return t.flag(["depthwise"]).on, t.flag(["linear"]).on


@dataclass
class TileGrid:
    """The candidate tiles of every layer that depend on its shape only (made once per `TermTable`):
    output rows x columns per tile, the input rows x columns they read, and the parts of DORY's objective
    that do not depend on the channels."""

    rows: torch.Tensor       # [L, R] candidate output rows per tile
    cols: torch.Tensor       # [L, W] candidate output columns per tile
    pixels: torch.Tensor     # [L, 1, R, W] output pixels of a tile
    inputs: torch.Tensor     # [L, 1, R, W] input pixels it reads
    conv_score: torch.Tensor  # [L, 1, R, W]
    dw_score: torch.Tensor   # [L, 1, R, W]
    valid: torch.Tensor      # [L, 1, R, W] tiles DORY's geometry constraints allow

    @classmethod
    def of(cls, t: TermTable) -> TileGrid:
        grid = getattr(t, "_tile_grid", None)
        if grid is None:
            grid = cls._make(t)
            t._tile_grid = grid  # type: ignore[attr-defined]
        return grid

    @classmethod
    def _make(cls, t: TermTable) -> TileGrid:
        dw, lin = _kinds(t)
        (ho, wo), (hi, wi) = t.out_hw, t.input_hw
        (kh, kw), (sh, sw) = t.kernel_hw, t.stride
        splits = torch.tensor(_SPLITS, dtype=torch.float64, device=ho.device)
        eights = 8.0 * torch.arange(1, _ROW_BLOCKS + 1, dtype=torch.float64, device=ho.device)
        rows = torch.cat([torch.ceil(ho[:, None] / splits), torch.minimum(ho[:, None], eights)], 1)
        quarters = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64, device=ho.device)
        cols = torch.minimum(wo[:, None], 2.0 * torch.ceil(wo[:, None] / (2.0 * quarters)))
        cols[:, 0] = wo
        # depthwise layers: whole rows and columns when the input is at most 32x32, else whole columns;
        # linear layers: only output neurons are tiled
        small = ((hi <= 32) & (wi <= 32)).to(torch.float64) * dw
        keep_rows = torch.clamp(small + lin, max=1.0)[:, None]
        keep_cols = torch.clamp(dw + lin, max=1.0)[:, None]
        rows = keep_rows * ho[:, None] + (1 - keep_rows) * rows
        cols = keep_cols * wo[:, None] + (1 - keep_cols) * cols
        R, W = rows[:, None, :, None], cols[:, None, None, :]
        col = lambda x: x[:, None, None, None]  # noqa: E731
        rows_read, cols_read = (R - 1.0) * col(sh) + col(kh), (W - 1.0) * col(sw) + col(kw)
        inputs = torch.minimum(col(hi), rows_read) * torch.minimum(col(wi), cols_read)
        # DORY's geometry: a tile that does not cover the whole output reads fewer rows (columns) than the input
        valid = ((R >= col(ho)) | (rows_read < col(hi))) & ((W >= col(wo)) | (cols_read < col(wi)))
        mod = torch.remainder
        conv_score = (2e6 * mod(R - 1.0, 8.0) + 3e6 * mod(W - 1.0, 2.0) + 1e6 * (R * W >= 16.0)
                      + 2e4 * mod(mod(col(ho) - 1.0, R), 8.0) + 3e4 * mod(mod(col(wo) - 1.0, W), 2.0))
        dw_score = 1e4 * (mod(R, 4.0) == 0) + 1e3 * W + 1e3 * R
        return cls(rows, cols, R * W, inputs, conv_score, dw_score, valid)


def choose_tiles(t: TermTable, cin: torch.Tensor, cout: torch.Tensor, target: Target,
                 wbits: Number = 8.0, ibits: Number = 8.0, obits: Number = 8.0) -> Tiles:
    """DORY's L2->L1 tiler (Common/Tiler/tiler_conv2d.py): the whole layer when it fits L1, else the best
    tile on its objective among a grid of rows x columns per tile, each with the most output channels that
    fit (all layers at once, no gradient). `wbits`, `ibits`, `obits`: the layers' weight, input and output
    precisions (sub-byte tensors are packed)."""
    cin, cout = cin.detach(), cout.detach()
    per_byte = lambda b: b.detach() / 8.0 if isinstance(b, torch.Tensor) else b / 8.0  # noqa: E731
    wbytes, ib, ob = per_byte(wbits), _column(per_byte(ibits), t), _column(per_byte(obits), t)
    grid = TileGrid.of(t)
    dw, lin = _kinds(t)
    (ho, wo), (hi, wi) = t.out_hw, t.input_hw
    (kh, kw), sh = t.kernel_hw, t.stride[0]
    l1 = _l1(target)
    budget = float(l1.usable) if l1 is not None else float("inf")
    db = float(target.deployment.double_buffering)
    spare = float(target.deployment.l1_tile_overhead)
    requant_bytes = 2.0 * target.bits.requant / 8.0 * t.requant.on
    bias_bytes = target.bits.bias / 8.0 * cout * t.bias.on
    cin_g = cin / t.groups
    cores = float(target.compute.cores)
    pointwise = ((kh * kw == 1) & (sh == 1)).to(torch.float64)  # the pointwise kernel reads pixels in place
    im2col = (1.0 - dw) * (1.0 - lin) * (1.0 - pointwise) * 2.0 * cores * kh * kw * cin_g + dw * cores * (kh * hi + kh)
    weights_per_cout = ((1.0 - dw) * cin_g * kh * kw + dw * kh * kw) * wbytes
    whole = (cin * hi * wi * ib + cout * ho * wo * ob + (weights_per_cout + requant_bytes) * cout + bias_bytes
             + im2col) <= budget
    col = lambda x: x[:, None, None, None]  # noqa: E731
    # L1 bytes are linear in a tile's output channels: per rows x columns, the most channels that fit, and
    # the most that are a multiple of 4
    per_channel = db * (col(dw * ib) * grid.inputs + grid.pixels * col(ob) + col(weights_per_cout + requant_bytes))
    fixed = db * col((1.0 - dw) * cin * ib) * grid.inputs + col(im2col + bias_bytes + spare)
    most = torch.clamp(torch.floor((budget - fixed) / per_channel), min=0.0)
    C = torch.minimum(col(cout), torch.cat([most, torch.where(most >= 4.0, 4.0 * torch.floor(most / 4.0), most)], 1))
    C = torch.clamp(C, min=1.0)                                                     # [L, 2, R, W]
    used = C * per_channel + fixed
    mod = torch.remainder
    left = mod(col(cout) - 1.0, C)
    conv_score = grid.conv_score + 1e6 * mod(C - 1.0, 4.0) + 1e5 * C + 1e4 * left + 1e4 * mod(left, 4.0)
    dw_score = grid.dw_score + 1e4 * (C > 7.0) + 2e4 * mod(C - 1.0, 16.0)
    score = col(dw) * dw_score + col(1.0 - dw) * conv_score + used
    # when nothing fits, the tile that needs the least L1 (DORY's tiler would fail; the cost stays finite)
    score = torch.where((used <= budget) & grid.valid, score, -1e12 - used)
    shape = C.shape
    C_all = C.flatten(1)
    R_all = grid.rows[:, None, :, None].expand(shape).flatten(1)
    W_all = grid.cols[:, None, None, :].expand(shape).flatten(1)
    # and every output channel, with as many columns as fit (DORY rewards channels above bytes), for layers
    # whose columns are tiled
    R = grid.rows                                                                    # [L, R]
    rows_in = torch.minimum(hi[:, None], (R - 1.0) * sh[:, None] + kh[:, None])
    c_full = torch.clamp(cout, min=1.0)[:, None]
    ib_, ob_ = ib[:, None], ob[:, None]
    per_col = db * (cin[:, None] * ib_ * rows_in * t.stride[1][:, None] + c_full * ob_ * R)
    fixed_cols = db * (cin[:, None] * ib_ * rows_in * (kw - t.stride[1])[:, None]
                       + c_full * (weights_per_cout + requant_bytes)[:, None]) + (im2col + bias_bytes + spare)[:, None]
    fit = torch.floor((budget - fixed_cols) / per_col)
    partial = torch.floor((wi - 1.0 - kw) / t.stride[1]) + 1.0  # the most columns a partial tile may have
    fit = torch.where(fit >= wo[:, None], wo[:, None], torch.minimum(fit, partial[:, None]))
    W = torch.clamp(torch.minimum(wo[:, None], torch.where(fit >= 2.0, 2.0 * torch.floor(fit / 2.0), fit)), min=1.0)
    row_ok = (R >= ho[:, None]) | ((R - 1.0) * sh[:, None] + kh[:, None] < hi[:, None])
    cols_in = torch.minimum(wi[:, None], (W - 1.0) * t.stride[1][:, None] + kw[:, None])
    used_cols = db * (cin[:, None] * ib_ * rows_in * cols_in + c_full * ob_ * R * W
                      + c_full * (weights_per_cout + requant_bytes)[:, None]) + (im2col + bias_bytes + spare)[:, None]
    ho_, wo_ = ho[:, None], wo[:, None]
    score_cols = (2e6 * mod(R - 1.0, 8.0) + 3e6 * mod(W - 1.0, 2.0) + 1e6 * mod(c_full - 1.0, 4.0)
                  + 1e6 * (R * W >= 16.0) + 1e5 * c_full + 2e4 * mod(mod(ho_ - 1.0, R), 8.0)
                  + 3e4 * mod(mod(wo_ - 1.0, W), 2.0) + 1e4 * (c_full - 1.0) + 1e4 * mod(c_full - 1.0, 4.0)
                  + used_cols)
    tiled_cols = ((dw + lin) == 0)[:, None]
    allowed = (used_cols <= budget) & tiled_cols & row_ok
    score_cols = torch.where(allowed, score_cols, torch.full_like(score_cols, -1e13))
    score = torch.cat([score.flatten(1), score_cols], 1)
    C_all = torch.cat([C_all, c_full.expand_as(R)], 1)
    R_all = torch.cat([R_all, R], 1)
    W_all = torch.cat([W_all, W], 1)
    best = score.argmax(1)
    pick = lambda cand: cand.gather(1, best[:, None]).squeeze(1)  # noqa: E731
    one = whole.to(torch.float64)
    return Tiles(cout=one * torch.clamp(cout, min=1.0) + (1 - one) * pick(C_all),
                 rows=one * ho + (1 - one) * pick(R_all), cols=one * wo + (1 - one) * pick(W_all), whole=one)


def _l1(target: Target) -> Any:
    return next((m for m in target.memory if m.name.upper() == "L1"), target.memory[0] if target.memory else None)


def weight_unpacking(wbits: Number, k: PulpConstants) -> Number:
    """How much slower the matmul inner loop runs with `wbits`-bit weights than with 8-bit ones (1 at 8 bits):
    pulp-nn-mixed unpacks sub-byte weights to bytes before GAP8's 8-bit dot products. Piecewise linear between
    2, 4 and 8 bits (exact there; a precision search's relaxed bits get its slope as gradient)."""
    if isinstance(wbits, torch.Tensor):
        low, high = torch.clamp(wbits, 2.0, 4.0), torch.clamp(wbits, 4.0, 8.0)
    else:
        low, high = min(max(wbits, 2.0), 4.0), min(max(wbits, 4.0), 8.0)
    per_4k = (k.matmul_per_4k_i2 + (k.matmul_per_4k_i4 - k.matmul_per_4k_i2) * (low - 2.0) / 2.0
              + (k.matmul_per_4k - k.matmul_per_4k_i4) * (high - 4.0) / 4.0)
    return per_4k / k.matmul_per_4k


def kernel_cycles(t: TermTable, cin: Number, cout_tile: Number, rows: torch.Tensor, cols: torch.Tensor,
                  k: PulpConstants, requant_bits: int = 32, wbits: Number = 8.0, ibits: Number = 8.0) -> Number:
    """Cycles of one PULP-NN kernel call on a tile of `cout_tile` output channels x `rows` x `cols` pixels
    (every input channel), for every layer kind (columns). Sub-byte weights (`wbits`) slow the conv and
    linear inner loops by `weight_unpacking`; depthwise kernels unpack them once per channel (negligible).
    Sub-byte inputs (`ibits`) are unpacked by the im2col copy, which 1x1 convs then need too (linear in the
    bits between 4 and 8: exact at both)."""
    dw, lin = _kinds(t)
    kh, kw = t.kernel_hw
    cores = k.cores
    unpack = weight_unpacking(wbits, k)
    k = replace(k, requant=k.requant + (k.requant_64 if requant_bits > 32 else 0.0))
    kk = cin / t.groups * kh * kw                                          # inputs per output
    k4 = floor_ste(kk / 4.0)
    k_left = kk - 4.0 * k4
    c4 = floor_ste(cout_tile / 4.0)
    c_left = cout_tile - 4.0 * c4
    packed = torch.clamp((8.0 - _column(ibits, t)) / 4.0, 0.0, 1.0)       # 0 at 8 bits, 1 at 4 and 2
    pointwise = ((kh * kw == 1) & (t.stride[0] == 1)).to(torch.float64) * (1.0 - packed)
    per_4 = k.im2col_per_4 + (k.im2col_per_4_subbyte - k.im2col_per_4) * packed
    rows_ho = torch.ceil(rows / cores) * cols                               # conv_Ho_parallel: rows over cores
    rows_howo = torch.where(torch.remainder(rows, cores) == 0, rows / cores * cols,
                            torch.ceil(rows / (cores / 2.0)) * torch.ceil(cols / 2.0))
    pixels = pointwise * rows_howo + (1.0 - pointwise) * rows_ho            # per core
    pairs = torch.ceil(pixels / 2.0)
    im2col = (1.0 - pointwise) * 2.0 * (per_4 * torch.ceil(kk / 4.0) + k.im2col_call * kh)
    block = unpack * (k.matmul_per_4k * k4 + k.matmul_per_k_left * k_left) + 8.0 * k.requant + k.block_overhead
    left = unpack * k.chan_left_per_4k * (k4 + k_left) + 2.0 * k.requant + k.block_overhead / 4.0
    conv = pairs * (im2col + c4 * block + c_left * left)
    taps = kh * kw
    per_out = k.dw_per_4k * (torch.floor(taps / 4.0) + torch.remainder(taps, 4.0)) + k.requant + k.output_overhead
    rows_in = torch.minimum(t.input_hw[0], (rows - 1.0) * t.stride[0] + kh)
    depthwise = ceil_ste(cout_tile / cores) * (cols * rows_in * torch.ceil(kw / 4.0) * k.dw_column
                                               + rows * cols * per_out)
    neuron = unpack * k.linear_per_4k * ceil_ste(cin / 4.0) + t.requant.on * k.requant + k.output_overhead
    linear = ceil_ste(cout_tile / cores) * neuron * rows
    return dw * depthwise + lin * linear + (1.0 - dw) * (1.0 - lin) * conv


def tiled_cycles_table(v: LayerValues, target: Target) -> torch.Tensor:
    """Cycles of every layer of a `TermTable` (a column)."""
    t: TermTable = v.term  # type: ignore[assignment]
    k = PulpConstants.of(target)
    cin, cout = _column(v.cin, t), _column(v.cout, t)
    wbits = weight_bits(v, target.bits.weights)
    ibits, obits = in_bits(v, target.bits.activations), out_bits(v, target.bits.activations)
    tiles = choose_tiles(t, cin, cout, target, wbits, ibits, obits)
    dw, lin = _kinds(t)
    (ho, wo), (hi, wi) = t.out_hw, t.input_hw
    kh, kw = t.kernel_hw
    n_c = torch.clamp(torch.ceil(cout.detach() / tiles.cout), min=1.0)  # (no channel left: one tile)
    n_r, n_w = torch.ceil(ho / tiles.rows), torch.ceil(wo / tiles.cols)
    spatial = n_r * n_w
    n = n_c * spatial
    cout_tile = cout / n_c                                                  # differentiable in cout
    kernel = kernel_cycles(t, cin, cout_tile, tiles.rows, tiles.cols, k, target.bits.requant, wbits, ibits)
    # bytes moved: the input once per spatial tile, again for every output-channel tile when tiled spatially
    rows_in = torch.minimum(hi, (tiles.rows - 1.0) * t.stride[0] + kh)
    cols_in = torch.minimum(wi, (tiles.cols - 1.0) * t.stride[1] + kw)
    cin_tile = dw * cout_tile + (1.0 - dw) * cin
    in_tile = cin_tile * rows_in * cols_in * (ibits / 8.0)
    in_loads = torch.where(spatial > 1, n, dw * n + (1.0 - dw) * 1.0)
    weights_tile = (((1.0 - dw) * cin / t.groups * kh * kw + dw * kh * kw) * (wbits / 8.0)
                    + t.requant.on * 2.0 * target.bits.requant / 8.0) * cout_tile
    written = (t.requant.on * obits + t.requant.off * target.bits.bias) / 8.0  # a head: int32
    out_tile = cout_tile * tiles.rows * tiles.cols * written
    gather = dw * (1.0 / k.dma_byte_gather - 1.0 / k.dma_bytes_per_cycle)  # depthwise input: 1-byte copies
    in_cycles = in_tile * (1.0 / k.dma_bytes_per_cycle + gather) \
        + k.dma_command * (dw * torch.ceil(cout_tile / k.cores) + (1.0 - dw) * torch.ceil(rows_in / k.cores))
    w_cycles = weights_tile / k.dma_bytes_per_cycle + 3.0 * k.dma_command
    out_cycles = out_tile / k.dma_bytes_per_cycle + k.dma_command * torch.ceil(tiles.rows / k.cores)
    dma_total = in_loads * in_cycles + n_c * w_cycles + n * out_cycles
    if target.deployment.double_buffering >= 2:
        # the first input and weights are loaded before the loop, the last output leaves after it; between,
        # each tile costs the longer of its kernel and the DMA of the next tile and the previous output
        exposed = in_cycles + w_cycles + out_cycles
        per_tile = torch.maximum(kernel, (dma_total - exposed) / torch.clamp(n - 1.0, min=1.0))
        body = exposed + n * per_tile
    else:
        body = n * kernel + dma_total
    fixed = t.flag(["fixed"])  # an opaque op's measured work, at the linear kernel's 8 MACs a cycle
    return fixed.off * (body + n * k.tile_overhead + k.layer_overhead) + fixed.on * (v.macs / 8.0)


def _column(x: Number, t: TermTable) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64).reshape(-1).expand(len(t)) if x.numel() == 1 else x.to(torch.float64)
    return torch.full((len(t),), float(x), dtype=torch.float64, device=t.device)


def tiled_cycles(v: LayerValues, target: Target) -> Number:
    """`gap8-tiled` cycles of one layer (a `LayerTerm`) or of every layer of a `TermTable`."""
    if isinstance(v.term, TermTable):
        return tiled_cycles_table(v, target)
    term: LayerTerm = v.term
    table = TermTable([term], v.cin.device if isinstance(v.cin, torch.Tensor) else None)
    sampled = [None if b is None else _column(b, table) for b in (v.weight_bits, v.in_bits, v.out_bits)]
    one = LayerValues(table, _column(v.cin, table), _column(v.cout, table), v.weights, v.macs, {}, *sampled)
    out = tiled_cycles_table(one, target)[0]
    tensors = any(isinstance(x, torch.Tensor) for x in (v.cin, v.cout))
    return out if tensors else float(out)
