"""DORY's text inputs beside the ONNX: `config.json`, `input.txt` and the golden `out_layer{i}.txt` files.

Golden files hold one integer per line followed by a comma, in HWC order (an FC output is [C]), after a
`# name (shape [H, W, C]),` header; DORY reads them with `np.loadtxt(delimiter=',', usecols=[0])` and sums
them into the checksums the generated application checks on the board.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def to_hwc(values: np.ndarray) -> np.ndarray:
    """A [C, H, W] activation in DORY's HWC order (a [C] vector is unchanged)."""
    return np.transpose(values, (1, 2, 0)) if values.ndim == 3 else values


def from_hwc(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `to_hwc` for a flat file content and the CHW `shape`."""
    if len(shape) == 3:
        c, h, w = shape
        return flat.reshape(h, w, c).transpose(2, 0, 1)
    return flat.reshape(shape)


def golden_text(name: str, values: np.ndarray) -> str:
    """The text of one golden file for the [C, H, W] (or [C]) integer activation `values`."""
    hwc = to_hwc(np.asarray(values, dtype=np.int64))
    header = f"# {name} (shape {list(hwc.shape)}),\n"
    return header + "".join(f"{int(v)},\n" for v in hwc.reshape(-1))


def read_golden(path: str | Path) -> np.ndarray:
    """A golden file's integers, flat, in file (HWC) order; accepts floats such as `206.000` like DORY."""
    values = np.loadtxt(str(path), delimiter=",", usecols=[0], comments="#", ndmin=1)
    if not np.all(values == np.round(values)):
        raise ValueError(f"{path}: golden values must be integers")
    return values.astype(np.int64)


def config_json(onnx_file: str, *, code_reserved_bytes: int, bnrelu_bits: int, input_bits: int,
                input_signed: bool, n_inputs: int = 1) -> str:
    """DORY's network configuration (`network_generate.py Quantlab PULP.GAP8 config.json`)."""
    config = {"onnx_file": onnx_file, "code reserved space": int(code_reserved_bytes),
              "BNRelu_bits": int(bnrelu_bits), "input_bits": int(input_bits), "input_signed": bool(input_signed),
              "n_inputs": int(n_inputs)}
    return json.dumps(config, indent=2) + "\n"
