"""Probe networks and DORY-checker helpers shared by `tests/test_dory_agreement.py` and
`benchmarks/dory_agreement.py`: small networks built to sit on either side of DORY's L2/L3 decisions on GAP8
(L2 budget 512 000 - 132 000 B of code reserved space = 380 000 B)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECK_TIMEOUT = 600


class ChainFromL3(nn.Module):
    """conv 3->39 at 96x96: 27.6 kB in + 359 kB out + constants = 388 kB > L2 budget, output L3-tiled;
    then a 1x1/2 conv 39->4 whose whole layer is 368 kB (fits by itself) reading that output from L3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 39, 3, 1, 1)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(39, 4, 1, 2)
        self.relu1 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(self.relu0(self.conv0(x))))
        return self.fc(torch.flatten(self.gap(x), 1))


class DepthwiseGap(nn.Module):
    """A depthwise 3x3 over 64 channels, straight into the global average pool and the head. At 54x54 it is
    373 kB of activations + 576 B of weights: 383 kB with DORY's 16x weight count (> the 380 kB budget),
    375 kB with the weights counted once (fits). At 56x56 (411 kB) its output goes to L3, and the global
    pool cannot read it from there."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(64, 64, 3, 1, 1, groups=64)
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.gap(self.relu(self.dw(x))), 1))


class WidePointwise(nn.Module):
    """A 256->256 1x1 conv (66 kB of weights and constants) on a big input, then a 2x2 max pool and the head.
    At 34x34: 296 kB in + 296 kB out; weights-only tiling needs 592 kB, output-only tiling 296 kB in + 66 kB
    weights + 2 double-buffered output rows = 381 kB: neither fits, DORY refuses. At 33x33 output-only tiling
    fits (363 kB), but the max pool then reads from L3 in tiles that do not fit the conv's output tile."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(256, 256, 1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.gap(self.pool(self.relu(self.pw(x)))), 1))



def run_checker(check: str, directory: Path, json_out: Path, target: str = "gap8",
                timeout: int = CHECK_TIMEOUT) -> tuple[int, dict[str, Any] | None, str]:
    """Run the DORY checker harness (`check`: its check_dory.py) on a lowered directory: (exit status, its JSON
    report or None, the tail of its output)."""
    cmd = [sys.executable, check, str(directory), "--target", target, "--full", "--json-out", str(json_out)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, None, f"timeout after {timeout} s"
    result = json.loads(json_out.read_text()) if json_out.exists() else None
    return proc.returncode, result, (proc.stdout[-2000:] + proc.stderr[-2000:])


def dory_level(layer: dict[str, Any]) -> str:
    """DORY's decision for one layer of the checker's report: L3 when any of its tensors is L3-tiled."""
    tiled = layer["weights_L3_tiled"] or layer["input_L3_tiled"] or layer["output_L3_tiled"]
    return "L3" if tiled else "L2"


def dory_bytes(layer: dict[str, Any]) -> int | None:
    """DORY's own byte count of one layer (Layer_node accounting), from the checker's --full report."""
    mem = layer.get("memory_bytes")
    return None if mem is None else int(sum(v or 0 for v in mem.values()))
