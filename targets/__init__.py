"""Hardware target descriptions, installed as `duccio_fx.targets`.

Each board is a TOML file in this package (`gap8.toml`, `gap9.toml`, `cortex_m7.toml`), validated by the
pydantic schema in `schema.py`. Users load one by name or path; other packages add theirs through the
`duccio_fx.targets` entry-point group.
"""

from duccio_fx.targets.loader import (ENTRY_POINT_GROUP, TargetError, TargetInfo, list_targets, load_target,
                                      load_target_file, validate_target_data)
from duccio_fx.targets.schema import BitWidths, Compute, Latency, MemoryLevel, Target

__all__ = ["BitWidths", "Compute", "ENTRY_POINT_GROUP", "Latency", "MemoryLevel", "Target", "TargetError",
           "TargetInfo", "list_targets", "load_target", "load_target_file", "validate_target_data"]
