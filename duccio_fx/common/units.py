"""Quantities with units, as users write them: `64kB`, `100 MHz`, `2M`, `5ms`.

One parser for target files and command-line bounds, so `64kB` means the same everywhere. Decimal
prefixes are powers of 1000 and binary ones (`KiB`, `MiB`) powers of 1024, as in DORY's and the
datasheets' numbers. Errors are `ValueError`s whose message says what was expected; callers add where.
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"^\s*([+-]?(?:\d[\d_]*)?(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*([A-Za-zµ%]*)\s*$")

BYTE_UNITS = {"": 1, "B": 1, "kB": 1000, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
              "GB": 1000**3, "GiB": 1024**3}
FREQUENCY_UNITS = {"": 1, "Hz": 1, "kHz": 1e3, "MHz": 1e6, "GHz": 1e9}
COUNT_UNITS = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def split_quantity(text: str) -> tuple[float, str]:
    """`'64 kB'` -> `(64.0, 'kB')`; raises ValueError when it is not a number with an optional unit."""
    match = _NUMBER.match(text)
    if not match or match.group(1) in ("", "+", "-", "."):
        raise ValueError(f"{text!r} is not a number with an optional unit")
    return float(match.group(1).replace("_", "")), match.group(2)


def _scaled(value: object, units: dict[str, float], kind: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a {kind}, got a boolean")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a {kind} (a number or a string such as "
                         f"'{_example(kind)}'), got {type(value).__name__}")
    number, unit = split_quantity(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    if unit not in units:
        raise ValueError(f"unknown unit {unit!r} for a {kind} in {value!r}; use one of "
                         f"{', '.join(u for u in units if u)}")
    return number * units[unit]


def _example(kind: str) -> str:
    return {"size in bytes": "64kB", "frequency": "100MHz", "count": "2M", "time": "5ms"}.get(kind, "1")


def parse_bytes(value: object) -> int:
    """A size in bytes: `512000`, `'64kB'`, `'128 KiB'`, `'8MB'`. Must be a whole number of bytes."""
    size = _scaled(value, BYTE_UNITS, "size in bytes")
    if size != int(size):
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(size)


def parse_frequency(value: object) -> float:
    """A frequency in Hz: `100000000`, `'100MHz'`."""
    return _scaled(value, FREQUENCY_UNITS, "frequency")


def parse_count(value: object) -> float:
    """A plain count with an optional SI suffix: `'30k'`, `'2M'`, `'1.5G'`."""
    return _scaled(value, COUNT_UNITS, "count")


def parse_time(value: object) -> float:
    """A duration in seconds: `'5ms'`, `'200us'`, `'0.1s'` (a unit is required)."""
    if isinstance(value, str) and split_quantity(value)[1] == "":
        raise ValueError(f"{value!r} has no unit; write e.g. '5ms', '200us' or '0.1s'")
    return _scaled(value, TIME_UNITS, "time")


def human_bytes(n: float) -> str:
    """`65536` -> `'65.5 kB'` (decimal prefixes, like the parser's `kB`)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
