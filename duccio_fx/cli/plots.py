"""Pictures of runs and sweeps (PNG, matplotlib, an optional extra: `pip install "duccio-fx[plots]"`).

    plot_run(DIR)    history.png (task loss, validation metric, each constraint against its bound, λ, per
                     epoch) and layers.png (each layer's memory, seed vs result, against the target's
                     layer-wise level: the paper's Fig. 5)
    plot_sweep(DIR)  pareto.png (accuracy vs MACs and vs size, one colour per size target, one marker per
                     method, the seed as a black square, the size bounds drawn: the paper's Fig. 4)

They read only the JSON a run or a sweep writes, so they also work on results copied from another machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from duccio_fx.common.errors import DuccioError
from duccio_fx.targets import Target, load_target
from duccio_fx.targets.loader import target_from_record

MARKERS = {"mask": "o", "path": "^", "path+mask": "s"}
PHASE_COLOURS = {"warmup": "#bbbbbb", "search": "#fde9c9", "finetune": "#d8ecd3"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise DuccioError("plots need matplotlib, which is not installed", where="duccio-fx plot",
                          fix='pip install "duccio-fx[plots]" (or pip install matplotlib)') from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_path(directory: Path) -> list[Path]:
    """The PNGs of a run directory or a sweep directory."""
    directory = Path(directory)
    if (directory / "sweep.json").exists():
        return plot_sweep(directory)
    if (directory / "report.json").exists():
        return plot_run(directory)
    raise DuccioError(f"{directory} holds neither a finished run (report.json) nor a sweep (sweep.json)",
                      where=str(directory), fix="give the --out directory of `duccio-fx optimize` or `sweep`")


# -- one run -------------------------------------------------------------------------------------------

def plot_run(run: Path) -> list[Path]:
    report = json.loads((Path(run) / "report.json").read_text())
    return [_history(report, Path(run) / "history.png"), _layers(report, Path(run) / "layers.png")]


def epoch_ticks(report: dict[str, Any]) -> tuple[list[str], int | None]:
    """The label of each history record on the x axis (its epoch within its phase, counted from 1, as on the
    console and in report.json) and the position (1-based) of the exported search epoch, if recorded."""
    history = report["history"]
    shift = 0 if "exported_epoch" in report else 1  # reports written before counted from 0
    labels = [str(r["epoch"] + shift) for r in history]
    exported = report.get("exported_epoch")
    at = None
    if exported:
        at = next((i for i, r in enumerate(history, 1)
                   if r["phase"] == exported["phase"] and r["epoch"] + shift == exported["epoch"]), None)
    return labels, at


def _history(report: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    history = report["history"]
    x = list(range(1, len(history) + 1))
    labels, exported_at = epoch_ticks(report)
    constraints = report["constraints"]
    fig, axes = plt.subplots(2 + len(constraints), 1, figsize=(8, 2.4 * (2 + len(constraints))), sharex=True)
    for ax in axes:  # phases as background bands
        start = 0
        for i, rec in enumerate(history + [{"phase": None}]):
            if i == len(history) or rec["phase"] != history[start]["phase"]:
                ax.axvspan(start + 0.5, i + 0.5, color=PHASE_COLOURS[history[start]["phase"]], alpha=0.6, lw=0)
                start = i
        ax.grid(alpha=0.3)
    axes[0].plot(x, [r["train_loss"] for r in history], "o-", label="train (task) loss")
    axes[0].plot(x, [r["val_loss"] for r in history], "s-", label="validation loss")
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(x, [r["val_metric"] for r in history], "o-", color="tab:green")
    axes[1].set_ylabel("validation metric")
    for k, c in enumerate(constraints):
        ax = axes[2 + k]
        values = [(i, r["costs"].get(c["constraint"])) for i, r in zip(x, history) if r.get("costs")]
        ax.plot([i for i, v in values if v is not None], [v for _, v in values if v is not None], "o-",
                color="tab:blue", label=c["constraint"])
        unit = _unit(c["metric"])
        shown = f"{c['bound'] * 1e3:.4g} ms" if unit == "s" else f"{c['bound']:,.0f}{' ' + unit if unit else ''}"
        ax.axhline(c["bound"], color="tab:red", ls="--", label=f"bound {shown}")
        ax.set_ylabel(f"{c['constraint']}" + (f" ({unit})" if unit else ""))
        lambdas = [(i, r["lambdas"][k]) for i, r in zip(x, history) if r.get("lambdas") and len(r["lambdas"]) > k]
        if lambdas:
            twin = ax.twinx()
            twin.plot([i for i, _ in lambdas], [v for _, v in lambdas], "x:", color="tab:purple", label="λ")
            twin.set_ylabel("λ", color="tab:purple", rotation=0, labelpad=10)
        ax.legend(loc="upper right", fontsize=8)
    step = max(1, len(x) // 40)
    axes[-1].set_xticks(x[::step], labels[::step], fontsize=7)
    if exported_at is not None:
        for ax in axes:
            ax.axvline(exported_at, color="black", ls=":", lw=1)
        axes[0].annotate(f"exported (search epoch {labels[exported_at - 1]})", (exported_at, 1.0),
                         xycoords=("data", "axes fraction"), fontsize=7, ha="center", va="bottom")
    axes[-1].set_xlabel("epoch within its phase (grey: warmup, orange: search, green: fine-tune)")
    fig.suptitle(f"{Path(report['source']).name}: {report['status']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layers(report: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    seed, final = report["layers"]["seed"], report["layers"]["final"]
    key = "bytes" if any(v.get("bytes") is not None for v in seed.values()) else "elements"
    names = list(seed)
    extra = [n for n in final if n not in seed]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * (len(names) + len(extra)) + 2), 4))
    xs = range(len(names) + len(extra))
    ax.bar([i - 0.2 for i in xs], [seed.get(n, {}).get(key) or 0 for n in names + extra], 0.4,
           color="#999999", label="seed")
    ax.bar([i + 0.2 for i in xs], [final.get(n, {}).get(key) or 0 for n in names + extra], 0.4,
           color="tab:blue", label="result")
    ax.set_xticks(list(xs), names + extra, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("layer memory (B, DORY's accounting)" if key == "bytes" else "layer memory (elements)")
    budget = _layerwise_budget(report)
    largest = max([v.get(key) or 0 for v in list(seed.values()) + list(final.values())] + [1])
    if budget is not None:
        ax.axhline(budget[1], color="tab:red", ls="--", label=f"{budget[0]} usable ({budget[1]:,.0f} B)")
        if budget[1] > 5 * largest:  # layers far below the level would be invisible on a linear axis
            ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"per-layer memory, seed vs result ({report.get('target') or 'no target'})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _unit(metric: str) -> str:
    return {"size": "B", "layer_memory": "B", "latency": "s", "macs": "MAC"}.get(metric, "")


def report_target(report: dict[str, Any], *, strict: bool = False) -> Target | None:
    """The target a run was searched on: `target_spec` (a user's TOML file as recorded), else the name of a
    report written before it existed; None when the run had none (or, unless `strict`, it cannot be loaded)."""
    try:
        if report.get("target_spec"):
            return target_from_record(report["target_spec"])
        return load_target(report["target"]) if report.get("target") else None
    except DuccioError:
        if strict:
            raise
        return None


def _layerwise_budget(report: dict[str, Any]) -> tuple[str, float] | None:
    target = report_target(report)
    if target is None:
        return None
    levels = target.layerwise_levels
    return (levels[0].name, float(levels[0].usable)) if levels else None


# -- a sweep -------------------------------------------------------------------------------------------

def plot_sweep(sweep: Path) -> list[Path]:
    plt = _pyplot()
    data = json.loads((Path(sweep) / "sweep.json").read_text())
    points = [p for p in data["points"] if p.get("val_metric") is not None]
    if not points:
        raise DuccioError("the sweep has no finished point to plot", where=str(sweep), fix="run the sweep first")
    sizes = list(dict.fromkeys(p["size"] for p in points))
    colours = {s: plt.get_cmap("viridis")(i / max(1, len(sizes) - 1)) for i, s in enumerate(sizes)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, label in ((axes[0], "macs", "MACs per sample"), (axes[1], "size_bytes", "size on target (B)")):
        for p in points:
            ax.scatter(p[key], p["val_metric"], color=colours[p["size"]], marker=MARKERS.get(p["method"], "D"),
                       edgecolors="black" if p["status"] == "met" else "red", linewidths=0.6, s=46, zorder=3)
        seed = points[0]
        if seed.get(f"seed_{key}") is not None and seed.get("seed_val_metric") is not None:
            ax.scatter(seed[f"seed_{key}"], seed["seed_val_metric"], color="black", marker="s", s=60, zorder=4)
        ax.set_xlabel(label)
        scale, suffix = (1e6, " M") if key == "macs" else (1e3, " kB")
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _, s=scale, u=suffix: f"{v / s:g}{u}"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (after fine-tuning)")
    for s in sizes:  # the size bounds, from the constraints each point recorded
        bound = next((c["bound"] for p in points if p["size"] == s for c in p["constraints"]
                      if c["constraint"] == "size"), None)
        if bound is not None:
            axes[1].axvline(bound, color=colours[s], ls="--", lw=1)
    handles = [plt.Line2D([], [], color=colours[s], marker="o", ls="", label=f"size ≤ {s or 'none'}") for s in sizes]
    handles += [plt.Line2D([], [], color="grey", marker=MARKERS.get(m, "D"), ls="", label=m)
                for m in dict.fromkeys(p["method"] for p in points)]
    handles += [plt.Line2D([], [], color="black", marker="s", ls="", label="seed (after warmup)"),
                plt.Line2D([], [], color="white", marker="o", markeredgecolor="red", ls="", label="bound violated")]
    axes[1].legend(handles=handles, fontsize=8, loc="best", framealpha=0.8)
    failed = len(data["points"]) - len(points)
    fig.suptitle(f"{Path(data['model']).name} on {data['target']}: {len(points)} searches"
                 + (f" ({failed} failed: see sweep.json)" if failed else "")
                 + f", ops targets relative to the {data['ops_of']} run", fontsize=11)
    fig.tight_layout()
    path = Path(sweep) / "pareto.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
