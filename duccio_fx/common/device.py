"""Where the search runs: `--device auto|cpu|cuda|cuda:N|mps`, and moving batches there.

The model, its masks or choices, the costs and every batch live on one device; files (checkpoints, the
warmup cache, `model.pt`) load on any device. `auto` takes CUDA when torch sees a GPU, else the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from duccio_fx.common.errors import DuccioError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """A usable torch.device for `spec`; a device this machine does not have is a clear error."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DuccioError(f"unknown device {spec!r}", where="--device",
                          fix="use auto, cpu, cuda, cuda:N (N counts from 0) or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DuccioError(f"--device {spec}: torch sees no CUDA GPU on this machine (torch {torch.__version__}"
                              f"{', a CPU-only build' if torch.version.cuda is None else ''})", where="--device",
                              fix="use --device cpu (or auto), or install a CUDA build of torch on a GPU machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DuccioError(f"--device {spec}: this machine has {count} CUDA device(s)", where="--device",
                              fix=f"use cuda:0 … cuda:{count - 1}")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DuccioError(f"--device {spec}: Apple's MPS backend is not available here", where="--device",
                          fix="use --device cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DuccioError(f"unsupported device {spec!r}", where="--device", fix="use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `--amp bf16|fp16` on `device` (None: full precision)."""
    if amp in (None, "", "none", "off"):
        return None
    if amp not in AMP_DTYPES:
        raise DuccioError(f"unknown --amp {amp!r}", where="--amp", fix="use bf16 or fp16 (or leave it out)")
    if amp == "fp16" and device.type != "cuda":
        raise DuccioError(f"--amp fp16 needs a CUDA device (the search runs on {device})", where="--amp",
                          fix="use --amp bf16, or run on --device cuda")
    return AMP_DTYPES[amp]


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists and dicts) moved to `device`; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
