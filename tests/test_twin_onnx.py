"""The standard-ops twin ONNX against the integer executor: every value of every layer must be equal.

Why: the twin is how an independent runtime (onnxruntime) checks our integer arithmetic, so it is only worth
something if it is exact. It is checked on the upstream Quantlab DroNet (`tests/data/quantlab_dronet/`) and on
random small integer networks built by the generator below (hypothesis draws the structure, a numpy generator
seeded by hypothesis draws the constants, which keeps the examples fast).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duccio_fx.common.errors import DuccioError
from duccio_fx.lower.dory_files import from_hwc, read_golden
from duccio_fx.lower.int_executor import output_shapes, run
from duccio_fx.lower.intnet import (INT8, NETWORK_INPUT, UINT8, Add, Branch, Conv, IntLayer, IntNet, IntType,
                                    Linear, Pool, Requant)
from duccio_fx.lower.quantlab_onnx import read_quantlab
from duccio_fx.lower.twin_onnx import IR_VERSION, run_twin, write_twin

REFERENCE = Path(__file__).parent / "data" / "quantlab_dronet"
TYPES = (UINT8, INT8)


# ----- comparison ----------------------------------------------------------------------------------------

def assert_twin_matches(net: IntNet, x: np.ndarray) -> None:
    """onnxruntime on the twin == the executor, on every value of every layer, for the batch `x`."""
    data = write_twin(net, output_shapes(net))
    ours = [out.numpy() for out in run(net, torch.as_tensor(x))]
    twins = run_twin(data, x)
    assert len(twins) == len(ours) == len(net.layers)
    for i, (twin, expected) in enumerate(zip(twins, ours)):
        assert twin.dtype == np.int64 and twin.shape == expected.shape, (i, twin.shape, expected.shape)
        bad = np.argwhere(twin != expected)
        assert bad.size == 0, (f"layer {i} ({net.layers[i].name}): {len(bad)} of {expected.size} values differ, "
                               f"first at {tuple(bad[0])}: twin {twin[tuple(bad[0])]}, executor "
                               f"{expected[tuple(bad[0])]}")


def sample_inputs(net: IntNet, rng: np.random.Generator, n_random: int = 2) -> np.ndarray:
    """A batch: random values of the input type, then all-highest and all-lowest (the accumulator extremes)."""
    t, shape = net.input_type, net.input_shape
    random = rng.integers(t.lo, t.hi + 1, size=(n_random, *shape))
    return np.concatenate([random, np.full((1, *shape), t.hi), np.full((1, *shape), t.lo)]).astype(np.int64)


# ----- the DroNet reference ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dronet() -> tuple[IntNet, np.ndarray]:
    config = json.loads((REFERENCE / "config.json").read_text())
    net = read_quantlab(REFERENCE / config["onnx_file"], input_bits=config["input_bits"],
                        input_signed=config["input_signed"])
    return net, from_hwc(read_golden(REFERENCE / "input.txt"), net.input_shape)


def test_dronet_twin_equals_the_executor(dronet: tuple[IntNet, np.ndarray]) -> None:
    net, x = dronet
    assert_twin_matches(net, x[None])
    assert_twin_matches(net, sample_inputs(net, np.random.default_rng(0), n_random=3))


def test_dronet_twin_reproduces_the_golden_head(dronet: tuple[IntNet, np.ndarray]) -> None:
    """The reference input without batch dim, against DORY's own last golden file."""
    net, x = dronet
    head = run_twin(write_twin(net, output_shapes(net)), x)[-1]
    assert np.array_equal(head[0], read_golden(REFERENCE / f"out_layer{len(net.layers) - 1}.txt"))


def test_twin_is_a_standard_onnx_with_one_output_per_layer(dronet: tuple[IntNet, np.ndarray]) -> None:
    import onnx

    net, _ = dronet
    model = onnx.load_from_string(write_twin(net, output_shapes(net)))
    assert model.ir_version == IR_VERSION <= 10
    assert [o.name for o in model.graph.output] == [f"layer{i}" for i in range(len(net.layers))]
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    ops = {node.op_type for node in model.graph.node}
    assert "ConvInteger" in ops and not ops & {"Conv", "AveragePool", "GlobalAveragePool"}
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "N"


# ----- generator of random integer networks --------------------------------------------------------------

class NetBuilder:
    """Grows an `IntNet` layer by layer, tracking each output's shape and type, with constants from `rng`."""

    def __init__(self, input_shape: tuple[int, int, int], input_type: IntType, rng: np.random.Generator) -> None:
        self.net = IntNet(input_shape=input_shape, input_type=input_type, layers=[])
        self.shapes: list[tuple[int, ...]] = []
        self.rng = rng

    def shape(self, index: int) -> tuple[int, ...]:
        return tuple(self.net.input_shape) if index == NETWORK_INPUT else self.shapes[index]

    def type(self, index: int) -> IntType:
        return self.net.input_type if index == NETWORK_INPUT else self.net.out_type(index)

    def append(self, layer: IntLayer, shape: tuple[int, ...]) -> int:
        self.net.layers.append(layer)
        self.shapes.append(shape)
        return len(self.net.layers) - 1

    def weights(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.integers(-127, 128, size=shape).astype(np.int64)

    def requant(self, acc_scale: float, out: IntType, shift: int, channels: int | None) -> Requant:
        """Constants that map a typical accumulator (≈ acc_scale) onto `out` with a random spread, so outputs
        both vary and clip; k in [1, 2^20] (sometimes negative), the add around the output range's centre."""
        n = () if channels is None else (channels,)
        base = 2.0 ** shift * (out.hi - out.lo) / max(acc_scale, 1.0)
        mul = np.clip(np.round(base * 2.0 ** self.rng.uniform(-2, 1, n)), 1, 2 ** 20).astype(np.int64)
        mul = mul * np.where(self.rng.random(n) < 0.2, -1, 1)
        centre = (out.lo + out.hi) / 2 + self.rng.uniform(-0.25, 0.25, n) * (out.hi - out.lo)
        add = np.round(2.0 ** shift * centre).astype(np.int64)
        return Requant(np.asarray(mul, dtype=np.int64), np.asarray(add, dtype=np.int64), shift, out)


def _spread(t: IntType) -> float:
    """The typical magnitude of a value of type `t` (the std of a uniform one)."""
    return (t.hi - t.lo) / 3.5


def _out_size(size: int, kernel: int, stride: int, before: int, after: int) -> int:
    return (size + before + after - kernel) // stride + 1


def draw_conv(draw: st.DrawFn, b: NetBuilder, src: int, depthwise: bool, same: bool = False) -> int:
    """A conv (g=1 or depthwise) with kernel 1/3/5, stride 1/2, asymmetric pads, optional bias; `same` keeps the
    shape (stride 1, pads summing to k-1), for a residual branch."""
    cin, h, w = b.shape(src)
    if same:
        k = draw(st.sampled_from([1, 3, 5]))
        stride = (1, 1)
        top, left = draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
        pads = (top, left, k - 1 - top, k - 1 - left)
    else:
        pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
        k = draw(st.sampled_from([k for k in (1, 3, 5) if k <= min(h + pads[0] + pads[2], w + pads[1] + pads[3])]))
        stride = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    cout = cin if depthwise or same else draw(st.integers(1, 6))  # a residual add needs equal shapes
    groups = cin if depthwise else 1
    weight = b.weights((cout, cin // groups, k, k))
    bias = b.rng.integers(-2 ** 15, 2 ** 15, size=cout).astype(np.int64) if draw(st.booleans()) else None
    out = draw(st.sampled_from(TYPES))
    acc_scale = np.sqrt(weight[0].size) * 73 * _spread(b.type(src))
    requant = b.requant(acc_scale, out, draw(st.integers(8, 24)), cout)
    shape = (cout, _out_size(h, k, stride[0], pads[0], pads[2]), _out_size(w, k, stride[1], pads[1], pads[3]))
    layer = Conv(f"conv{len(b.shapes)}", src, weight, stride, pads, groups, requant, bias)  # type: ignore[arg-type]
    return b.append(layer, shape)


def _branch(draw: st.DrawFn, b: NetBuilder, src: int) -> Branch:
    """Moves a branch to the add's scale: `clip((x * mul + add) >> shift, into)`, `into` the 8-bit type of the
    input's signedness (as the kernel's clip8 / clips8)."""
    into = INT8 if b.type(src).signed else UINT8
    shift = draw(st.integers(8, 24))
    scale = (into.hi - into.lo) / max(b.type(src).hi - b.type(src).lo, 1)
    mul = int(np.clip(round(2.0 ** shift * scale * 2.0 ** b.rng.uniform(-1, 1)), 1, 2 ** 20))
    add = round(2.0 ** shift * b.rng.uniform(-0.25, 0.25) * (into.hi - into.lo))
    return Branch(mul, add, shift, into)


def draw_residual(draw: st.DrawFn, b: NetBuilder, src: int) -> int:
    """A shape-keeping conv of `src`, added to `src` (in either input order) with its own branch types."""
    conv = draw_conv(draw, b, src, depthwise=draw(st.booleans()), same=True)
    inputs = (conv, src) if draw(st.booleans()) else (src, conv)
    out = draw(st.sampled_from(TYPES))
    in1, in2 = (_branch(draw, b, i) for i in inputs)
    shift = draw(st.integers(8, 24))
    out_mul = int(np.clip(round(2.0 ** shift * 2.0 ** b.rng.uniform(-1.5, 0.5)), 1, 2 ** 20))
    out_add = round(2.0 ** shift * ((out.lo + out.hi) / 2 + b.rng.uniform(-20, 20)))
    layer = Add(f"add{len(b.shapes)}", inputs, in1, in2, out_mul, out_add, shift, out)
    return b.append(layer, b.shape(src))


def draw_pool(draw: st.DrawFn, b: NetBuilder, src: int, mode: str, global_: bool) -> int:
    """Max or average pooling (average with or without requant), windowed with pads < kernel, or global."""
    c, h, w = b.shape(src)
    if global_:
        kernel, stride, pads, shape = (h, w), (h, w), (0, 0, 0, 0), (c, 1, 1)
    else:
        kernel = (draw(st.integers(1, min(3, h))), draw(st.integers(1, min(3, w))))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        pads = (draw(st.integers(0, kernel[0] - 1)), draw(st.integers(0, kernel[1] - 1)),
                draw(st.integers(0, kernel[0] - 1)), draw(st.integers(0, kernel[1] - 1)))
        shape = (c, _out_size(h, kernel[0], stride[0], pads[0], pads[2]),
                 _out_size(w, kernel[1], stride[1], pads[1], pads[3]))
    requant = None
    if mode == "avg" and draw(st.booleans()):
        window = kernel[0] * kernel[1]
        requant = b.requant(window * _spread(b.type(src)), draw(st.sampled_from(TYPES)), draw(st.integers(8, 24)), None)
    layer = Pool(f"pool{len(b.shapes)}", src, mode, kernel, stride, pads, requant, global_)
    return b.append(layer, shape)


def draw_linear(draw: st.DrawFn, b: NetBuilder, src: int, requantized: bool) -> int:
    """A linear layer on the CHW-flattened input, with or without bias and requant (raw int32 head)."""
    cin = int(np.prod(b.shape(src)))
    cout = draw(st.integers(1, 5))
    weight = b.weights((cout, cin))
    bias = b.rng.integers(-2 ** 15, 2 ** 15, size=cout).astype(np.int64) if draw(st.booleans()) else None
    requant = None
    if requantized:
        requant = b.requant(np.sqrt(cin) * 73 * _spread(b.type(src)), draw(st.sampled_from(TYPES)),
                            draw(st.integers(8, 24)), cout)
    return b.append(Linear(f"fc{len(b.shapes)}", src, weight, requant, bias), (cout,))


BLOCKS = ("conv", "depthwise", "residual", "maxpool", "avgpool")
HEADS = ("none", "global_avg", "global_max", "linear", "linear_raw", "global_avg+linear_raw", "linear+linear_raw")


@st.composite
def int_nets(draw: st.DrawFn, max_blocks: int = 4) -> tuple[IntNet, int]:
    """A random small IntNet (uint8 or int8 input, 1-4 blocks, an optional head) and a seed for its inputs."""
    seed = draw(st.integers(0, 2 ** 32 - 1))
    shape = (draw(st.integers(1, 4)), draw(st.integers(3, 9)), draw(st.integers(3, 9)))
    b = NetBuilder(shape, draw(st.sampled_from(TYPES)), np.random.default_rng(seed))
    x = NETWORK_INPUT
    for kind in draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=max_blocks)):
        if kind in ("conv", "depthwise"):
            x = draw_conv(draw, b, x, depthwise=kind == "depthwise")
        elif kind == "residual":
            x = draw_residual(draw, b, x)
        else:
            x = draw_pool(draw, b, x, kind.removesuffix("pool"), global_=False)
    head = draw(st.sampled_from(HEADS))
    if head.startswith("global"):
        x = draw_pool(draw, b, x, "max" if head == "global_max" else "avg", global_=True)
    if "linear+" in head:
        x = draw_linear(draw, b, x, requantized=True)
    if head.startswith("linear") or head.endswith("linear_raw"):
        draw_linear(draw, b, x, requantized=head == "linear")
    return b.net, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(int_nets())
def test_random_twins_equal_the_executor(case: tuple[IntNet, int]) -> None:
    net, seed = case
    assert_twin_matches(net, sample_inputs(net, np.random.default_rng(seed + 1)))


def test_generator_reaches_every_layer_kind() -> None:
    """The property is only as strong as its generator: check that it builds every kind it claims to."""
    seen: set[str] = set()

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(int_nets())
    def collect(case: tuple[IntNet, int]) -> None:
        net, _ = case
        for layer in net.layers:
            kind = type(layer).__name__
            if isinstance(layer, Conv):
                kind += "/dw" if layer.groups > 1 else "/g1"
            elif isinstance(layer, Pool):
                kind += f"/{layer.mode}/{'global' if layer.global_ else 'window'}/{'rq' if layer.requant else 'raw'}"
            elif isinstance(layer, Linear):
                kind += "/rq" if layer.requant else "/raw"
            elif isinstance(layer, Add):
                seen.update(f"Add/into/{branch.into.name}" for branch in (layer.in1, layer.in2))
                seen.update(f"Add/from/{(net.input_type if j == NETWORK_INPUT else net.out_type(j)).name}"
                            for j in layer.inputs)
            seen.add(kind)
        seen.add(f"input/{net.input_type.name}")

    collect()
    wanted = {"Conv/g1", "Conv/dw", "Add/into/uint8", "Add/into/int8", "Add/from/uint8", "Add/from/int8",
              "Pool/max/window/raw", "Pool/avg/window/rq", "Pool/avg/window/raw", "Pool/avg/global/rq",
              "Pool/avg/global/raw", "Pool/max/global/raw",
              "Linear/rq", "Linear/raw", "input/uint8", "input/int8"}
    assert wanted <= seen, f"never generated: {sorted(wanted - seen)}"


# ----- edge cases ----------------------------------------------------------------------------------------

def _one_conv(weight: np.ndarray, requant: Requant, input_type: IntType,
              pads: tuple[int, int, int, int] = (1, 1, 1, 1), bias: np.ndarray | None = None) -> IntNet:
    cin = weight.shape[1]
    conv = Conv("conv", NETWORK_INPUT, weight, (1, 1), pads, 1, requant, bias)
    return IntNet(input_shape=(cin, 5, 5), input_type=input_type, layers=[conv])


@pytest.mark.parametrize("input_type", TYPES)
def test_accumulator_extremes_are_exact(input_type: IntType) -> None:
    """255·127 pairs are where a u8×s8 kernel saturates (VPMADDUBSW on AVX2): the twin must not use one."""
    rq = Requant(np.ones(4, dtype=np.int64), np.zeros(4, dtype=np.int64), 0, IntType(32, True))
    weight = np.stack([np.full((64, 3, 3), 127), np.full((64, 3, 3), -128), np.full((64, 3, 3), 127) * np.array(
        [1, -1] * 32).reshape(64, 1, 1), np.full((64, 3, 3), -127)]).astype(np.int64)
    net = _one_conv(weight, rq, input_type)
    x = np.stack([np.full((64, 5, 5), input_type.hi), np.full((64, 5, 5), input_type.lo)]).astype(np.int64)
    assert_twin_matches(net, x)


def test_refuses_what_float64_cannot_hold() -> None:
    rq = Requant(np.full(2, 2 ** 40, dtype=np.int64), np.zeros(2, dtype=np.int64), 30, UINT8)
    net = _one_conv(np.full((2, 64, 3, 3), 127, dtype=np.int64), rq, UINT8)
    with pytest.raises(DuccioError, match="2\\^53"):
        write_twin(net, output_shapes(net))


def test_refuses_inputs_outside_the_input_type() -> None:
    rq = Requant(np.ones(1, dtype=np.int64), np.zeros(1, dtype=np.int64), 0, UINT8)
    net = _one_conv(np.ones((1, 1, 3, 3), dtype=np.int64), rq, UINT8)
    data = write_twin(net, output_shapes(net))
    with pytest.raises(DuccioError, match="outside the network's uint8"):
        run_twin(data, np.full((1, 1, 5, 5), -1))
