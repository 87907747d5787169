"""Finding and loading targets: built-in TOML files, a path, or a third-party entry point.

Lookup order for `load_target("x")`: an existing path (or anything ending in `.toml`), a built-in file
`targets/x.toml`, then the entry-point group `duccio_fx.targets`. An entry point may name a `Target`, a
function returning one (or a dict, or a path), or a path to a TOML file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from duccio_fx.common.errors import DuccioError
from duccio_fx.targets.schema import Target

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENTRY_POINT_GROUP = "duccio_fx.targets"


class TargetError(DuccioError):
    """A target could not be found, read or validated."""


@dataclass(frozen=True)
class TargetInfo:
    name: str
    origin: str  # "built-in", "entry point <dist>"
    description: str


def _builtin_files() -> dict[str, Path]:
    root = resources.files("duccio_fx.targets")
    return {Path(f.name).stem: Path(str(f)) for f in root.iterdir() if f.name.endswith(".toml")}


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _loc(errors_loc: tuple[Any, ...], data: Any) -> str:
    """`('memory', 1, 'size')` -> `memory[1] (L2).size`, naming the level when the data has one."""
    out, node = "", data
    for part in errors_loc:
        if isinstance(part, int):
            name = node[part].get("name") if isinstance(node, list) and part < len(node) and \
                isinstance(node[part], dict) else None
            out += f"[{part}]" + (f" ({name})" if name else "")
        else:
            out += ("." if out else "") + str(part)
        node = node[part] if isinstance(node, (list, dict)) and _has(node, part) else None
    return out or "(top level)"


def _has(container: Any, key: Any) -> bool:
    return (isinstance(container, dict) and key in container) or \
        (isinstance(container, list) and isinstance(key, int) and key < len(container))


def validate_target_data(data: dict[str, Any], source: str) -> Target:
    """Validate parsed target data; errors name the source, every bad field and its problem."""
    try:
        return Target.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            msg = str(e["msg"]).removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key (check its spelling; see `duccio-fx targets show gap8` for the fields)"
            elif e["type"] == "missing":
                msg = "missing required field"
            got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e.get('input')!r})"
            problems.append(f"{_loc(tuple(e['loc']), data)}: {msg}{got}")
        raise TargetError(f"invalid target description: {len(problems)} problem(s):\n    " + "\n    ".join(problems),
                          where=source, fix="correct the fields listed; sizes take units such as 512000, "
                                            "'64kB' or '8MB', clocks '100MHz'") from None


def load_target_file(path: str | Path) -> Target:
    path = Path(path)
    if not path.is_file():
        raise TargetError(f"target file {str(path)!r} does not exist", where=str(path),
                          fix="pass a built-in target name (`duccio-fx targets list`) or the path of a TOML file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"target file is not valid TOML: {exc}", where=str(path),
                          fix="fix the TOML syntax at the line and column shown") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetError(f"cannot read target file: {exc}", where=str(path)) from None
    return validate_target_data(data, str(path))


def _from_entry_point(ep: metadata.EntryPoint) -> Target:
    source = f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP})"
    try:
        obj = ep.load()
        if callable(obj) and not isinstance(obj, Target):
            obj = obj()
    except Exception as exc:  # a third-party package failing to import: report, do not crash
        raise TargetError(f"loading target {ep.name!r} failed: {type(exc).__name__}: {exc}", where=source,
                          fix="fix or uninstall the package that provides this entry point") from None
    if isinstance(obj, Target):
        return obj
    if isinstance(obj, dict):
        return validate_target_data(obj, source)
    if isinstance(obj, (str, Path)):
        return load_target_file(obj)
    raise TargetError(f"entry point gave a {type(obj).__name__}, not a target", where=source,
                      fix="point the entry point at a duccio_fx.targets.Target, a function returning one "
                          "(or a dict), or a TOML path")


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".toml") or "/" in spec or "\\" in spec or Path(spec).is_file()


def load_target(spec: str | Path | Target) -> Target:
    """A target by name (`gap8`), by path (`./my_board.toml`), or an entry point's name."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, Path) or _looks_like_path(spec):
        return load_target_file(spec)
    builtin = _builtin_files()
    if spec in builtin:
        return load_target_file(builtin[spec])
    eps = _entry_points()
    if spec in eps:
        return _from_entry_point(eps[spec])
    known = sorted(set(builtin) | set(eps))
    raise TargetError(f"unknown target {spec!r}", where="--target",
                      fix=f"use one of: {', '.join(known)}, or the path of a TOML target file")


def list_targets() -> list[TargetInfo]:
    """Built-in targets, then entry-point ones (a built-in name wins)."""
    out = []
    builtin = _builtin_files()
    for name, path in sorted(builtin.items()):
        try:
            desc = load_target_file(path).description
        except TargetError as err:
            desc = f"INVALID: {err.what.splitlines()[0]}"
        out.append(TargetInfo(name, "built-in", desc))
    for name, ep in sorted(_entry_points().items()):
        if name not in builtin:
            dist = getattr(ep, "dist", None)
            out.append(TargetInfo(name, f"entry point ({dist.name if dist else ep.value})", ""))
    return out


def target_record(spec: str | Path | Target) -> dict[str, Any]:
    """What a report stores to load the same target again (`target_from_record`): its name and origin, and
    for a TOML file its path and text (the run may be lowered or plotted after the file changed, or on
    another machine); a `Target` object or an entry point's target also keeps its validated data."""
    if isinstance(spec, Target):
        return {"name": spec.name, "origin": "object", "data": spec.model_dump(mode="json")}
    if isinstance(spec, Path) or _looks_like_path(spec):
        path = Path(spec)
        target = load_target_file(path)
        return {"name": target.name, "origin": "file", "path": str(path.resolve()),
                "toml": path.read_text(encoding="utf-8")}
    if spec in _builtin_files():
        return {"name": spec, "origin": "built-in"}
    target = load_target(spec)
    return {"name": spec, "origin": "entry point", "data": target.model_dump(mode="json")}


def target_from_record(record: dict[str, Any], where: str = "report.json") -> Target:
    """The target a `target_record` describes: a file's recorded TOML text (whatever the file holds now), a
    built-in or entry point by name, else the recorded data."""
    origin = record.get("origin")
    if origin == "file" and record.get("toml") is not None:
        source = f"{record.get('path', 'a target file')} (as recorded in {where})"
        try:
            data = tomllib.loads(record["toml"])
        except tomllib.TOMLDecodeError as exc:
            raise TargetError(f"the target recorded in {where} is not valid TOML: {exc}", where=source,
                              fix="pass --target explicitly") from None
        return validate_target_data(data, source)
    if origin == "file" and record.get("path"):
        return load_target_file(record["path"])
    if origin in ("built-in", "entry point") and record.get("name"):
        try:
            return load_target(record["name"])
        except TargetError:
            if record.get("data") is None:
                raise
    if record.get("data") is not None:
        return validate_target_data(record["data"], f"the target recorded in {where}")
    return load_target(record.get("name") or "")
