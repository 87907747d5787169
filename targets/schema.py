"""The schema of a hardware target description (pydantic), validated when a target file is loaded.

A target is data: memory levels (fastest first), bit widths, compute and the parameters of its latency
model. Sizes and clocks accept units (`64kB`, `100MHz`); unknown keys are errors, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from duccio_fx.common.units import parse_bytes, parse_frequency

Bytes = Annotated[int, BeforeValidator(parse_bytes)]
Hertz = Annotated[float, BeforeValidator(parse_frequency)]
TensorKind = Literal["weights", "activations"]
LayerKind = Literal["conv", "depthwise", "linear"]

# Names of the latency models a target may name. The models themselves live above the targets (in
# `duccio_fx.costs.latency`, which registers each name here), so loading a target checks a name, not code.
LATENCY_MODEL_NAMES: set[str] = set()


def register_latency_model_name(name: str) -> None:
    LATENCY_MODEL_NAMES.add(name)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemoryLevel(_Strict):
    """One level of the memory hierarchy (e.g. GAP8's L1, L2, L3)."""

    name: str = Field(min_length=1)
    size: Bytes = Field(gt=0, description="capacity in bytes")
    reserved: Bytes = Field(0, ge=0, description="bytes not available to layers (stack, code, ...)")
    reserved_for: str = Field("", description="what the reserved bytes hold")
    holds: tuple[TensorKind, ...] = Field(("weights", "activations"),
                                          description="which tensors of a layer live here")
    layerwise: bool = Field(False, description="layer-wise constraints (--layerwise C) target this level")
    bytes_per_cycle: float | None = Field(None, gt=0, description="transfer rate to the compute cores")
    off_chip: bool = False
    note: str = ""

    @model_validator(mode="after")
    def _reserved_below_size(self) -> MemoryLevel:
        if self.reserved >= self.size:
            raise ValueError(f"reserved ({self.reserved} B) must be smaller than size ({self.size} B)")
        return self

    @property
    def usable(self) -> int:
        """Bytes a layer can use: size minus reserved."""
        return self.size - self.reserved


class BitWidths(_Strict):
    """Bit widths of the deployed integer network."""

    weights: int = Field(8, ge=1, le=32)
    activations: int = Field(8, ge=1, le=32)
    bias: int = Field(32, ge=1, le=64, description="bias and accumulator (head outputs) bits")
    requant: int = Field(32, ge=0, le=64, description="bits of each per-channel requantization constant "
                                                      "k and l (DORY's BNRelu_bits); 0 = none")


class Compute(_Strict):
    cores: int = Field(gt=0)
    clock: Hertz = Field(gt=0, description="clock the latency model's cycles run at")
    peak_macs_per_cycle: float = Field(gt=0)
    note: str = ""


class Latency(_Strict):
    """Which latency model turns a layer into cycles, and its parameters."""

    model: str = Field(description="a registered latency model: 'gap8-tiled', 'gap8-analytic' or 'mac-rate'")
    macs_per_cycle: dict[LayerKind, float] = Field(default_factory=dict,
                                                   description="'mac-rate': sustained MAC/cycle per layer kind")
    constants: dict[str, float] = Field(default_factory=dict, description="'gap8-tiled': cycle constants that "
                                        "replace the model's defaults (duccio_fx.costs.pulp_tiled.PulpConstants)")
    charge_next_level: bool = Field(True, description="add transfer cycles for a layer that does not fit the "
                                                      "last layer-wise level (e.g. GAP8 layers that need L3)")
    note: str = ""

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in LATENCY_MODEL_NAMES:
            raise ValueError(f"unknown latency model {v!r}; known: {', '.join(sorted(LATENCY_MODEL_NAMES))} "
                             "(register more with duccio_fx.costs.latency.register_latency_model)")
        return v

    @model_validator(mode="after")
    def _rates_for_mac_rate(self) -> Latency:
        if self.model == "mac-rate":
            missing = [k for k in ("conv", "depthwise", "linear") if k not in self.macs_per_cycle]
            if missing:
                raise ValueError(f"'mac-rate' needs macs_per_cycle for {', '.join(missing)}")
        return self

    @field_validator("macs_per_cycle")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if x <= 0]
        if bad:
            raise ValueError(f"MAC/cycle must be > 0 (got {', '.join(f'{k}={v[k]}' for k in bad)})")
        return v


class Accounting(_Strict):
    """Quirks of the deployment tool's memory accounting, so "fits" means the same to both tools."""

    grouped_factor: int = Field(1, ge=1, description="multiplier on the weight and bias bytes of grouped and "
                                                     "depthwise convs (DORY's Layer_node uses 16)")
    note: str = ""


class Deployment(_Strict):
    toolchain: str = ""
    platform: str = ""
    double_buffering: int = Field(2, ge=1, le=2, description="tile copies the L2->L1 tiler keeps of each buffer")
    l1_tile_overhead: int = Field(0, ge=0, description="bytes the L1 tiler reserves beside a layer's tiles")
    l3_weights_buffer: int = Field(0, ge=0, description="bytes the deployed code reserves in L3 for all weights "
                                   "(0: no cap beyond the level's size)")
    l3_activation_buffer: int = Field(0, ge=0, description="bytes the deployed code reserves in L3 for one "
                                      "activation tensor (0: no cap)")


class Target(_Strict):
    """A hardware target: validated data, loaded by name, path or entry point (see duccio_fx.targets)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    sources: tuple[str, ...] = ()
    bits: BitWidths = BitWidths()
    compute: Compute
    memory: tuple[MemoryLevel, ...] = Field(min_length=1, description="memory levels, fastest first")
    latency: Latency
    accounting: Accounting = Accounting()
    deployment: Deployment = Deployment()

    @field_validator("memory")
    @classmethod
    def _unique_levels(cls, levels: tuple[MemoryLevel, ...]) -> tuple[MemoryLevel, ...]:
        names = [m.name for m in levels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"memory level names must be unique; repeated: {', '.join(dup)}")
        return levels

    def level(self, name: str) -> MemoryLevel:
        for m in self.memory:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def layerwise_levels(self) -> tuple[MemoryLevel, ...]:
        """The levels layer-wise constraints aim at (fastest first)."""
        return tuple(m for m in self.memory if m.layerwise)
