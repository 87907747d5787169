"""Channel spaces, coupling constraints and their resolution into channel groups.

Every op that *defines* channels (a conv, a linear, a model input, an op we cannot see through) opens a
*space* of C channels. A tensor's channel dimension is described by a `RawLayout`: a list of segments of
spaces (concat joins segments, slicing cuts them, a flatten repeats each channel `block` times).
Ops that need equal channel sets (add, mul, ...) record a *coupling* between two segments. Resolution
cuts every space at the boundaries the constraints need, propagates those cuts through the couplings until
nothing changes, then unions the pieces: each resulting class is one `ChannelGroup`, which later gets one
mask. A piece that touches anything frozen freezes its whole class, and the reasons travel with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx


@dataclass(frozen=True)
class Segment:
    """Channels `[start, stop)` of space `space`, each repeated `block` times along the tensor dim."""

    space: int
    start: int
    stop: int
    block: int = 1

    @property
    def channels(self) -> int:
        return self.stop - self.start

    @property
    def width(self) -> int:
        return self.channels * self.block


@dataclass(frozen=True)
class RawLayout:
    """Unresolved layout of one tensor: its channel dimension `dim` and the segments along it."""

    dim: int
    segments: tuple[Segment, ...]

    @property
    def width(self) -> int:
        return sum(s.width for s in self.segments)

    def with_dim(self, dim: int) -> RawLayout:
        return RawLayout(dim, self.segments)

    def slice(self, start: int, stop: int) -> RawLayout | None:
        """Entries `[start, stop)` of the channel dim, or None if the cut falls inside a channel's block."""
        out: list[Segment] = []
        pos = 0
        for seg in self.segments:
            lo, hi = max(start, pos), min(stop, pos + seg.width)
            if lo < hi:
                a, b = lo - pos, hi - pos
                if a % seg.block or b % seg.block:
                    return None
                out.append(Segment(seg.space, seg.start + a // seg.block, seg.start + b // seg.block, seg.block))
            pos += seg.width
        return RawLayout(self.dim, tuple(out))

    def repeat_each(self, factor: int) -> RawLayout:
        """Each channel now owns `factor` times as many consecutive entries (flatten, dw multiplier)."""
        return RawLayout(self.dim, tuple(Segment(s.space, s.start, s.stop, s.block * factor) for s in self.segments))

    def shrink_block(self, factor: int) -> RawLayout | None:
        """Inverse of `repeat_each` (un-flatten), or None when a channel's block does not divide evenly."""
        if any(s.block % factor for s in self.segments):
            return None
        return RawLayout(self.dim, tuple(Segment(s.space, s.start, s.stop, s.block // factor) for s in self.segments))


@dataclass
class Space:
    """Output channels of one defining node."""

    id: int
    size: int
    node: str
    owner: str
    kind: str  # "producer" | "input" | "opaque"


@dataclass(frozen=True)
class GroupMember:
    """Channels `[start, stop)` of the output of node `node` (module `owner`) belong to the group."""

    node: str
    owner: str
    start: int
    stop: int


@dataclass(frozen=True)
class ChannelGroup:
    """A set of output channels that must be kept or removed together (one mask in the search).

    `producers` are the modules (or node names for functional ops and inputs) whose output channels form
    the group; `consumers` are those whose weights are indexed by these channels on their input side
    (convs, linears, batch norms, depthwise filters). A frozen group never changes; `reason` says why.
    """

    id: int
    channels: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    frozen: bool
    reason: str
    members: tuple[GroupMember, ...] = field(default=(), compare=False)

    @property
    def searchable(self) -> bool:
        return not self.frozen


@dataclass(frozen=True)
class Atom:
    space: int
    start: int
    stop: int


class ChannelSolver:
    """Collects spaces and constraints while rules run, then resolves them into groups."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self._couplings: list[tuple[Segment, Segment]] = []
        self._freezes: list[tuple[Segment, str]] = []
        self._consumers: list[tuple[Segment, str]] = []
        self._cuts: list[Segment] = []
        self._frozen_spaces: dict[int, str] = {}

    # -- recording ---------------------------------------------------------------------------------
    def new_space(self, size: int, node: str, owner: str, kind: str, frozen: str | None = None) -> Segment:
        space = Space(len(self.spaces), size, node, owner, kind)
        self.spaces.append(space)
        if frozen:
            self._frozen_spaces[space.id] = frozen
        return Segment(space.id, 0, size)

    def couple(self, a: RawLayout, b: RawLayout) -> str | None:
        """Require the channel entries of `a` and `b` to be the same channels; None or why it cannot."""
        if a.width != b.width:
            return f"channel widths differ ({a.width} vs {b.width})"
        pieces: list[tuple[Segment, Segment]] = []
        ia = ib = 0
        oa = ob = 0  # offsets (in entries) already consumed inside the current segments
        sa, sb = list(a.segments), list(b.segments)
        while ia < len(sa) and ib < len(sb):
            x, y = sa[ia], sb[ib]
            if x.block != y.block or oa % x.block or ob % y.block:
                return "the two operands lay their channels out differently (one is flattened or repeated)"
            n = min(x.width - oa, y.width - ob)
            if n % x.block:
                return "the two operands lay their channels out differently (blocks do not line up)"
            ca, cb = x.start + oa // x.block, y.start + ob // y.block
            k = n // x.block
            pieces.append((Segment(x.space, ca, ca + k), Segment(y.space, cb, cb + k)))
            oa += n
            ob += n
            if oa == x.width:
                ia, oa = ia + 1, 0
            if ob == y.width:
                ib, ob = ib + 1, 0
        self._couplings.extend(pieces)
        return None

    def freeze(self, layout: RawLayout, reason: str) -> None:
        for seg in layout.segments:
            self._freezes.append((seg, reason))

    def consume(self, layout: RawLayout, consumer: str) -> None:
        for seg in layout.segments:
            self._consumers.append((seg, consumer))

    def cut(self, layout: RawLayout) -> None:
        """Keep the boundaries of this (sliced) layout as group boundaries, so each slice keeps ≥ 1 channel."""
        self._cuts.extend(layout.segments)

    # -- resolution --------------------------------------------------------------------------------
    def resolve(self) -> tuple[list[ChannelGroup], dict[int, list[tuple[Atom, int]]]]:
        """Groups in a stable order, and for each space its atoms with the group id of each."""
        cuts: dict[int, set[int]] = {s.id: {0, s.size} for s in self.spaces}
        for seg in [p for pair in self._couplings for p in pair] + [f[0] for f in self._freezes] + self._cuts:
            cuts[seg.space].update((seg.start, seg.stop))
        self._propagate_cuts(cuts)

        atoms: dict[int, list[Atom]] = {}
        for sid, points in cuts.items():
            pts = sorted(points)
            atoms[sid] = [Atom(sid, a, b) for a, b in zip(pts, pts[1:])]

        graph = nx.Graph()
        for sid in sorted(atoms):
            graph.add_nodes_from(atoms[sid])
        for a, b in self._couplings:
            for x, y in zip(self._atoms_in(atoms, a), self._atoms_in(atoms, b)):
                graph.add_edge(x, y)

        order = {atom: i for i, atom in enumerate(a for sid in sorted(atoms) for a in atoms[sid])}
        classes = sorted((sorted(c, key=order.__getitem__) for c in nx.connected_components(graph)),
                         key=lambda c: order[c[0]])
        group_of: dict[Atom, int] = {atom: gid for gid, cls in enumerate(classes) for atom in cls}

        reasons: dict[int, list[str]] = {}
        for sid, why in self._frozen_spaces.items():
            for atom in atoms[sid]:
                reasons.setdefault(group_of[atom], []).append(why)
        for seg, why in self._freezes:
            for atom in self._atoms_in(atoms, seg):
                reasons.setdefault(group_of[atom], []).append(why)
        consumers: dict[int, list[str]] = {}
        for seg, who in self._consumers:
            for atom in self._atoms_overlapping(atoms, seg):
                consumers.setdefault(group_of[atom], []).append(who)

        groups = []
        for gid, cls in enumerate(classes):
            members = tuple(GroupMember(self.spaces[a.space].node, self.spaces[a.space].owner, a.start, a.stop)
                            for a in cls)
            why = list(dict.fromkeys(reasons.get(gid, [])))
            groups.append(ChannelGroup(
                id=gid,
                channels=cls[0].stop - cls[0].start,
                producers=tuple(dict.fromkeys(m.owner for m in members)),
                consumers=tuple(dict.fromkeys(consumers.get(gid, []))),
                frozen=bool(why),
                reason="; ".join(why),
                members=members,
            ))
        per_space = {sid: [(a, group_of[a]) for a in atoms[sid]] for sid in atoms}
        return groups, per_space

    def _propagate_cuts(self, cuts: dict[int, set[int]]) -> None:
        """A cut inside one side of a coupling is a cut at the same offset on the other side."""
        changed = True
        while changed:
            changed = False
            for a, b in self._couplings:
                for src, dst in ((a, b), (b, a)):
                    inner = [p - src.start for p in cuts[src.space] if src.start < p < src.stop]
                    for off in inner:
                        if dst.start + off not in cuts[dst.space]:
                            cuts[dst.space].add(dst.start + off)
                            changed = True

    @staticmethod
    def _atoms_in(atoms: dict[int, list[Atom]], seg: Segment) -> list[Atom]:
        return [a for a in atoms[seg.space] if seg.start <= a.start and a.stop <= seg.stop]

    @staticmethod
    def _atoms_overlapping(atoms: dict[int, list[Atom]], seg: Segment) -> list[Atom]:
        return [a for a in atoms[seg.space] if a.start < seg.stop and seg.start < a.stop]
