"""`duccio-fx sweep`: a grid of ordinary `optimize` runs (methods × seeds × size × ops targets).

Each point is one `duccio-fx optimize` process writing its own run directory (`OUT/points/<label>/`), so a
point is resumable, inspectable and plottable on its own, and a failing point cannot take the others down.
Points run in waves, `--workers` at a time (or as Ray tasks with `--ray`):

  1. per (method, seed), one size-only point: it trains the warmup, which the cache (`OUT/cache`) then
     hands to every other point of that method and seed (the warmup does not depend on the constraints);
  2. every other point whose bounds are known;
  3. points whose ops target is a percentage of the size-only run's MACs (`--ops-of size-only`, the
     paper's protocol), once that run has finished.

A point whose `report.json` exists is finished and skipped when the sweep runs again; one with only a
checkpoint is resumed. `sweep.json` and `sweep.csv` list every point.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.markup import escape

from duccio_fx.cli.output import say
from duccio_fx.common.atomic import write_text_atomic
from duccio_fx.common.device import resolve_device
from duccio_fx.common.errors import DuccioError

OPS_OF = ("size-only", "seed")


@dataclass
class Point:
    """One search of the grid."""

    method: str
    seed: int
    size: str | None  # "50%" / "64kB", or None (no size bound)
    ops: str | None  # "25%" / "2M", or None
    status: str = "pending"  # pending | met | violated | failed | skipped
    run_dir: Path | None = None
    max_ops: str | None = None  # the --max-ops actually passed (absolute under --ops-of size-only)
    error: str = ""
    seconds: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        def part(name: str, value: str | None) -> str:
            return f"{name}-{re.sub(r'[^0-9A-Za-z.]+', '', (value or 'none').replace('%', 'pct'))}"
        return f"{self.method}_seed{self.seed}_{part('size', self.size)}_{part('ops', self.ops)}"

    @property
    def group(self) -> tuple[str, int]:
        return self.method, self.seed


def _split(text: str, what: str) -> list[str | None]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise DuccioError(f"{what} lists no value", where=what, fix=f"e.g. {what} 25%,50%,75%")
    return [None if v.lower() == "none" else v for v in values]


def build_grid(methods: str, seeds: str, sizes: str, ops: str, ops_of: str) -> list[Point]:
    """Every point of the grid; with `--ops-of size-only` each ops point also needs its size-only point."""
    if ops_of not in OPS_OF:
        raise DuccioError(f"unknown --ops-of {ops_of!r}", where="--ops-of", fix=f"use one of: {', '.join(OPS_OF)}")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise DuccioError(f"--seeds {seeds!r} is not a list of integers", where="--seeds", fix="e.g. --seeds 0,1,2") \
            from None
    size_list, ops_list = _split(sizes, "--size"), _split(ops, "--ops")
    if ops_of == "size-only" and None not in ops_list:
        ops_list = [None] + ops_list  # the reference runs the percentages apply to
    points = [Point(m, s, size, o) for m in [x.strip() for x in methods.split(",") if x.strip()]
              for s in seed_list for size in size_list for o in ops_list]
    if any(p.size is None and p.ops is None for p in points):
        raise DuccioError("a point of the grid has neither a size nor an ops bound", where="--size/--ops",
                          fix="give --size values, or ops values other than none")
    return points


def _relative_ops(point: Point, ops_of: str) -> bool:
    return ops_of == "size-only" and point.ops is not None and point.ops.endswith("%") and point.size is not None


def _waves(points: list[Point], ops_of: str) -> list[list[Point]]:
    first: dict[tuple[str, int], Point] = {}
    for p in points:
        if not _relative_ops(p, ops_of) and (p.group not in first or (p.ops is None and first[p.group].ops)):
            first[p.group] = p
    primes = list(first.values())
    later = [p for p in points if p not in primes and not _relative_ops(p, ops_of)]
    return [primes, later, [p for p in points if _relative_ops(p, ops_of)]]


def _reference(point: Point, points: list[Point]) -> Point | None:
    return next((q for q in points if q.group == point.group and q.size == point.size and q.ops is None), None)


@dataclass
class SweepSpec:
    model: str
    out: Path
    target: str
    epochs: str
    ops_of: str
    workers: int
    device: str
    extra: Sequence[str] = ()  # further optimize options, passed through
    threads: int = 0  # CPU threads per point (0: torch's default); local workers split the cores

    def __post_init__(self) -> None:
        if not self.threads and self.workers > 1 and resolve_device(self.device).type == "cpu":
            self.threads = max(1, (os.cpu_count() or 1) // self.workers)


def _command(spec: SweepSpec, p: Point, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "duccio_fx.cli", "optimize", spec.model, "--target", spec.target, "--method",
           p.method, "--seed", str(p.seed), "--epochs", spec.epochs, "--out", str(p.run_dir), "--cache",
           str(spec.out / "cache"), "--device", spec.device, *spec.extra]
    if p.size:
        cmd += ["--max-size", p.size]
    if p.max_ops:
        cmd += ["--max-ops", p.max_ops]
    return cmd + (["--resume"] if resume else [])


def run_point(spec: SweepSpec, p: Point) -> Point:
    """One optimize process; its output goes to `<run dir>/optimize.log`."""
    assert p.run_dir is not None
    resume = (p.run_dir / "checkpoint.pt").exists()
    p.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = dict(os.environ)
    if spec.threads:  # workers share the cores instead of each taking all of them
        env.setdefault("OMP_NUM_THREADS", str(spec.threads))
    with open(p.run_dir / "optimize.log", "a") as log:
        code = subprocess.run(_command(spec, p, resume), stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    p.seconds = time.perf_counter() - started
    _read(p)
    if p.status == "pending":
        tail = (p.run_dir / "optimize.log").read_text().strip().splitlines()[-3:]
        p.status, p.error = "failed", f"exit {code}: " + " | ".join(line.strip() for line in tail)
    return p


def _read(p: Point) -> None:
    report = p.run_dir / "report.json" if p.run_dir else None
    if report is not None and report.exists():
        p.report = json.loads(report.read_text())
        p.status = p.report["status"]


Executor = Callable[[SweepSpec, list[Point]], list[Point]]


def local_executor(spec: SweepSpec, points: list[Point]) -> list[Point]:
    pool = ThreadPoolExecutor(max_workers=max(1, spec.workers))  # each thread waits on one process
    futures = [pool.submit(run_point, spec, p) for p in points]
    try:
        return [f.result() for f in futures]
    except KeyboardInterrupt:  # Ctrl-C reached the running points too: they save a checkpoint and stop
        pool.shutdown(wait=True, cancel_futures=True)  # and no new point starts
        raise
    finally:
        pool.shutdown(wait=True)


def ray_executor(address: str) -> Executor:
    """Points as Ray tasks (one CPU each), on a cluster (`ADDRESS`) or a local Ray (`auto` starts one)."""
    try:
        import ray
    except ImportError:
        raise DuccioError("--ray needs Ray, which is not installed", where="--ray",
                          fix="pip install 'ray>=2.9' on every machine of the cluster, or drop --ray") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "auto" else address)
    remote = ray.remote(num_cpus=1)(run_point)

    def execute(spec: SweepSpec, points: list[Point]) -> list[Point]:
        return ray.get([remote.remote(spec, p) for p in points])

    return execute


def run_sweep(spec: SweepSpec, points: list[Point], console: Console, executor: Executor | None = None) -> int:
    """Runs what is missing, writes sweep.json / sweep.csv (and pareto.png); exit 0 when every point met its
    bounds, 3 when some point violated them or failed."""
    executor = executor or local_executor
    spec.out.mkdir(parents=True, exist_ok=True)
    for p in points:
        p.run_dir = spec.out / "points" / p.label
        if not _relative_ops(p, spec.ops_of):
            p.max_ops = p.ops
    for wave in _waves(points, spec.ops_of):
        todo = []
        for p in wave:
            _read(p)
            if _relative_ops(p, spec.ops_of):
                ref = _reference(p, points)
                if ref is not None and ref.report:
                    p.max_ops = str(max(1, int(ref.report["final"]["macs"] * float(p.ops.rstrip("%")) / 100)))
                elif p.status == "pending":
                    p.status, p.error = "failed", f"its size-only run {ref.label if ref else '?'} did not finish"
                    continue
            if p.status != "pending":
                say(console, f"{p.label}: finished earlier ({p.status}), skipped")
                continue
            todo.append(p)
        for p in executor(spec, todo) if todo else []:
            original = next(q for q in points if q.label == p.label)
            original.__dict__.update({k: v for k, v in p.__dict__.items() if k != "run_dir"})
            say(console, f"{p.label}: {p.status} in {p.seconds:.0f} s" + (f" ({escape(p.error)})" if p.error else ""))
    rows = [summary_row(p, spec.out) for p in points]
    write_text_atomic(spec.out / "sweep.json", json.dumps({"model": spec.model, "target": spec.target,
                                                           "epochs": spec.epochs, "ops_of": spec.ops_of,
                                                           "points": rows}, indent=2))
    write_text_atomic(spec.out / "sweep.csv", _csv(rows))
    return 0 if all(p.status == "met" for p in points) else 3


def summary_row(p: Point, out: Path) -> dict[str, Any]:
    final = p.report.get("final", {})
    return {"label": p.label, "method": p.method, "seed": p.seed, "size": p.size, "ops": p.ops,
            "max_ops": p.max_ops, "status": p.status, "met": p.status == "met",
            "constraints": [{k: c[k] for k in ("constraint", "bound", "final", "met")}
                            for c in p.report.get("constraints", [])],
            "size_bytes": final.get("size_bytes"), "macs": final.get("macs"), "latency_s": final.get("latency_s"),
            "val_metric": final.get("val_metric"),
            "seed_size_bytes": p.report.get("seed", {}).get("size_bytes"),
            "seed_macs": p.report.get("seed", {}).get("macs"),
            "seed_val_metric": p.report.get("seed", {}).get("val_metric_after_warmup"),
            "run_dir": str(p.run_dir.relative_to(out)) if p.run_dir else None, "error": p.error}


_CSV_COLUMNS = ("label", "method", "seed", "size", "ops", "max_ops", "status", "size_bytes", "macs", "latency_s",
                "val_metric", "run_dir", "error")


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
