"""duccio-fx on real architectures: every torchvision classifier with at most 30 M parameters and 40 timm models
(random weights, `num_classes=10`; nothing is downloaded), one row each:

* **costs**: the params and MACs of `duccio_fx.analyze` against the independent op-level count of
  `tests/counting.py` (a TorchDispatchMode: every convolution and every matmul with a parameter operand,
  however the model calls it; no torch.fx, no duccio-fx). Equal means equal as integers; a mismatch lists the
  layers that differ.
* **searchable**: the channels of searchable groups over the channels of all channel groups (what
  `duccio-fx inspect --json` reports as `searchable_channels`), and the frozen groups' reasons, shortened and
  counted.
* **export**: `make_searchable`, random masks (half the channels of every group, non-trivial BN statistics), the
  exported model against the searchable one in eval mode (max abs difference relative to the output scale,
  exact when <= 1e-4) and the costs of the masked search against the op-level count of the exported model.
* **DORY**: `check_lowerable` (the `dory-layers` checks) and, when it passes, `lower_to_dory` for GAP8: accepted,
  or the first refusal.

Each model runs in its own process with a timeout, so one failure or hang does not stop the table. Inputs are
`--size` (64) square images; a model that cannot run at that size (fixed-size ViT / Swin / LeViT, ...) is run at
its own default size (timm's `pretrained_cfg`, torchvision's 224), shown in the `size` column.

    python benchmarks/real_models.py [--models resnet18,timm:mobilenetv2_*] [--limit N] [--size 64]
        [--timeout 240] [--json real_models.json] [--md real_models.md]

`--models` takes names or shell-style patterns, optionally prefixed `tv:` or `timm:`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import multiprocessing as mp
import re
import sys
import time
import traceback
import types
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests/counting.py

MAX_PARAMS = 30_000_000
EXACT_RTOL = 1e-4

TIMM_MODELS = [
    "mobilenetv2_050", "mobilenetv2_100", "mobilenetv3_small_050", "mobilenetv3_large_100",
    "mobilenetv4_conv_small", "efficientnet_lite0", "efficientnet_b0", "efficientnet_es", "tinynet_a",
    "mnasnet_100", "fbnetc_100", "mixnet_s", "lcnet_050", "ghostnet_100", "rexnet_100", "hgnetv2_b0",
    "resnet18", "resnet50", "resnetv2_50x1_bit", "nf_regnet_b0", "regnetx_002", "regnety_004", "repvgg_a0",
    "mobileone_s0", "dla34", "densenet121", "cspresnet50", "ese_vovnet19b_dw", "convnext_atto", "edgenext_xx_small",
    "poolformer_s12", "fastvit_t8", "efficientformer_l1", "levit_128s", "efficientvit_m0", "mobilevit_xxs",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mixer_s16_224",
]


def import_model_libraries() -> tuple[Any, Any]:
    """torchvision and timm, without torchvision's compiled ops (they do not load on every CPU torch build; the
    model definitions do not need them)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import timm
    import torchvision
    return torchvision, timm


# --------------------------------------------------------------------------------------------------
# the model list
# --------------------------------------------------------------------------------------------------
def torchvision_models(torchvision: Any) -> list[str]:
    """Classifiers whose published parameter count (1000 classes) leaves them a chance of <= 30 M with 10
    classes; the exact count is checked on the built model."""
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        meta = [w.meta.get("num_params", 0) for w in torchvision.models.get_model_weights(name)]
        if min(meta or [0]) <= MAX_PARAMS * 1.1:
            out.append(name)
    return out


def select(all_models: list[tuple[str, str]], patterns: str | None, limit: int | None) -> list[tuple[str, str]]:
    chosen = all_models
    if patterns:
        keep = []
        for source, name in all_models:
            for pat in (p.strip() for p in patterns.split(",") if p.strip()):
                src, _, pname = pat.rpartition(":")
                src = {"tv": "torchvision"}.get(src, src)
                if (not src or src == source) and fnmatch.fnmatchcase(name, pname):
                    keep.append((source, name))
                    break
        chosen = keep
    return chosen[:limit] if limit else chosen


# --------------------------------------------------------------------------------------------------
# one model (in a child process)
# --------------------------------------------------------------------------------------------------
def build(source: str, name: str) -> tuple[Any, tuple[int, int], str]:
    """The model with random weights and 10 classes, its default input size, and a note."""
    torchvision, timm = import_model_libraries()
    if source == "timm":
        model = timm.create_model(name, pretrained=False, num_classes=10)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
        return model, size, ""
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
        note = ""
    except (TypeError, ValueError):
        model = torchvision.models.get_model(name, weights=None)
        note = "1000 classes"
    metas = [w.meta.get("min_size", (1, 1)) for w in torchvision.models.get_model_weights(name)]
    size = max(metas, default=(224, 224))
    return model, (max(size[0], 224), max(size[1], 224)), note


def _outputs(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    return []


def _short(text: str, n: int = 110) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= n else line[: n - 1] + "…"


def short_reason(clause: str) -> str:
    """A frozen group's reason without node names, shapes and numbers, so the same cause counts once."""
    c = clause.strip()
    if c.startswith("model input"):
        return "model input"
    if c.startswith("model output"):
        return "model output"
    m = re.match(r"(?:grouped convolution )?([\w.]+)(?: '[^']*')? at node '[^']*' (.*)", c)
    target, rest = (m.group(1), m.group(2)) if m else ("", c)
    target = target.split(".")[-1]
    if "grouped convolution" in c:
        return "grouped conv"
    if "is not in the op registry" in rest:
        return f"unregistered op {target}"
    if "normalises over the channels" in rest:
        return f"{target} over the channels"
    if "channels per group" in rest:
        return f"{target} over channel groups"
    if "splitting the" in rest:
        return "view into heads / shuffle"
    if "mixes the channel dim" in rest:
        return "reshape mixing channels"
    if "does not resize" in rest:
        return f"{target} with a fixed-size per-channel tensor"
    rest = re.sub(r"'[^']*'", "'…'", rest)
    rest = re.sub(r"\[[^\]]*\]", "[…]", rest)
    rest = re.sub(r"\d+", "N", rest)
    return _short(f"{target} {rest}".strip(), 70)


def frozen_reasons(groups: list[Any]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for g in groups:
        if g.frozen:
            counts.update({short_reason(c)
                           for c in re.split(r"; (?=[\w.]+ (?:'[^']*' )?at node |model |grouped )", g.reason)})
    return counts


def _randomize_bn(model: Any, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def run_one(source: str, name: str, size: int, seed: int = 0) -> dict[str, Any]:
    import torch

    import duccio_fx
    from duccio_fx.lower.dory import check_lowerable
    from duccio_fx.pipeline import graph_costs
    from tests import counting

    torch.manual_seed(seed)
    row: dict[str, Any] = {"source": source, "model": name, "errors": {}}
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    model, default_size, note = build(source, name)
    model.eval()
    row["all_params"] = sum(p.numel() for p in model.parameters())
    if row["all_params"] > MAX_PARAMS:
        row["skipped"] = f"{row['all_params'] / 1e6:.1f} M params > 30 M"
        return row

    times["build"] = time.perf_counter() - t0

    t = time.perf_counter()
    x = torch.randn(1, 3, size, size)
    try:  # the count is the model's first forward pass
        count = counting.count(model, x)
        row["size"] = size
    except Exception as err:  # noqa: BLE001 (any failure at --size: use the model's own size)
        x = torch.randn(1, 3, *default_size)
        count = counting.count(model, x)
        row["size"] = default_size[0] if default_size[0] == default_size[1] else list(default_size)
        note = f"{size}×{size} fails ({_short(type(err).__name__ + ': ' + str(err), 60)})"
    row["note"] = note
    times["count"] = time.perf_counter() - t
    row["counted"] = {"params": count.params, "macs": count.macs, "layers": len(count.layers)}
    if count.other:
        row["counted"]["other"] = count.other[:5]
    if count.unhandled:
        row["counted"]["unhandled"] = count.unhandled[:5]

    t = time.perf_counter()
    try:
        gm = duccio_fx.analyze(model, x)
        costs = graph_costs(gm)
        row["costs"] = {"params": int(costs.params), "macs": int(costs.macs)}
        row["costs_equal"] = row["costs"]["params"] == count.params and row["costs"]["macs"] == count.macs
        if not row["costs_equal"]:
            row["cost_diff"] = [f"costed - counted: {row['costs']['params'] - count.params:+,} params, "
                                f"{row['costs']['macs'] - count.macs:+,} MACs"] + counting.differences(
                counting.costed_per_layer(costs.layer_params, costs.layer_macs), count)
        groups = duccio_fx.channel_groups(gm)
        total = sum(g.channels for g in groups)
        searchable = sum(g.channels for g in groups if not g.frozen)
        row["groups"] = {"all": len(groups), "searchable": sum(1 for g in groups if not g.frozen),
                         "channels": total, "searchable_channels": searchable}
        row["searchable_pct"] = round(100.0 * searchable / total, 1) if total else 0.0
        row["frozen_reasons"] = dict(frozen_reasons(groups).most_common())
    except Exception as err:  # noqa: BLE001
        row["errors"]["analyze"] = _short(f"{type(err).__name__}: {err}", 300)
    times["analyze"] = time.perf_counter() - t

    if "analyze" not in row["errors"]:
        t = time.perf_counter()
        try:
            _randomize_bn(model, seed)
            sm = duccio_fx.make_searchable(model, x)
            gen = torch.Generator().manual_seed(seed)
            sm.set_masks({g.id: torch.rand(g.channels, generator=gen) < 0.5 for g in sm.channel_groups})
            sm.eval()
            with torch.no_grad():
                want = _outputs(sm(x))
            exported = sm.export().eval()
            with torch.no_grad():
                got = _outputs(exported(x))
            scale = max((float(w.abs().max()) for w in want), default=1.0) or 1.0
            diff = max((float((g - w).abs().max()) for g, w in zip(got, want)), default=0.0)
            if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
                diff = math.inf
            masked = sm.costs()
            exp_count = counting.count(exported, x)
            removed = sum(int((~m).sum()) for m in sm.masks().values())
            row["export"] = {"rel_diff": diff / scale, "exact": diff <= EXACT_RTOL * scale,
                             "removed_channels": removed,
                             "costs_equal": (int(masked["params"]), int(masked["macs"]))
                             == (exp_count.params, exp_count.macs),
                             "params": int(masked["params"]), "counted_params": exp_count.params,
                             "macs": int(masked["macs"]), "counted_macs": exp_count.macs}
        except Exception as err:  # noqa: BLE001
            row["errors"]["export"] = _short(f"{type(err).__name__}: {err}", 300)
        times["export"] = time.perf_counter() - t

    t = time.perf_counter()
    row["dory"] = dory_verdict(lambda: check_lowerable(model, x, "gap8")) or PENDING
    times["dory checks"] = time.perf_counter() - t
    row["seconds"] = {k: round(v, 2) for k, v in times.items()}
    row["_lower"] = (model, x)  # the lowering itself runs after the row is sent (see _child)
    return row


PENDING = "checks pass, lowering unfinished"


def dory_verdict(step: Any) -> str | None:
    """None when `step` passes, else the first refusal (and how many ops DORY cannot run)."""
    from duccio_fx import DuccioError

    try:
        step()
        return None
    except DuccioError as err:
        first = re.search(r"\b1\. (.*?)(?:\s+where:|\s+how to fix:|\s+2\. |$)", err.what, re.S)
        many = re.search(r"cannot run (\d+) ops", err.what)
        if first and many:
            return _short(f"{many.group(1)} ops refused, 1st: {first.group(1)}", 120)
        return _short(err.what, 120)
    except Exception as err:  # noqa: BLE001
        return _short(f"crash: {type(err).__name__}: {err}", 120)


def _child(conn: Any, source: str, name: str, size: int, threads: int, lower: bool) -> None:
    """Sends the row, then (when the DORY checks passed) runs the whole lowering and sends its verdict: a
    lowering that runs out of time still leaves the rest of the row."""
    import warnings

    import torch

    from duccio_fx import lower_to_dory

    warnings.filterwarnings("ignore", category=FutureWarning)  # torchvision's notes on weight initialisation
    torch.set_num_threads(threads)
    try:
        row = run_one(source, name, size)
    except BaseException as err:  # noqa: BLE001
        row = {"source": source, "model": name, "failed": _short(f"{type(err).__name__}: {err}", 300),
               "traceback": traceback.format_exc(limit=-4)}
    model, x = row.pop("_lower", (None, None))
    if row.get("dory") == PENDING and not lower:
        row["dory"] = "checks pass (lowering not run)"
    conn.send(row)
    if row.get("dory") == PENDING:
        t = time.perf_counter()
        verdict = dory_verdict(lambda: lower_to_dory(model, x, "gap8", calib_batches=1)) or "accepted"
        conn.send({"dory": verdict, "lowering_s": round(time.perf_counter() - t, 2)})
    conn.close()


def run_isolated(source: str, name: str, size: int, timeout: float, threads: int, lower: bool) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, source, name, size, threads, lower), daemon=True)
    start = time.perf_counter()
    proc.start()
    send.close()

    def receive() -> dict[str, Any] | None:
        left = timeout - (time.perf_counter() - start)
        try:
            return recv.recv() if left > 0 and recv.poll(left) else None
        except EOFError:
            return None

    row = receive()
    if row is None:
        row = {"source": source, "model": name,
               "failed": f"timeout after {timeout:.0f} s" if proc.is_alive()
               else f"process died (exit code {proc.exitcode})"}
    elif row.get("dory") == PENDING:
        update = receive()
        if update is None:
            row["dory"] = f"checks pass; lowering unfinished after {timeout:.0f} s" if proc.is_alive() \
                else "checks pass; the lowering's process died"
        else:
            row.update(update)
    if proc.is_alive():
        proc.kill()
    proc.join(5)
    row["wall_s"] = round(time.perf_counter() - start, 1)
    return row


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------
def _m(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _pct(a: int, b: int) -> str:
    if a == b:
        return "100 %"
    return f"{100.0 * a / b:.{1 if abs(a - b) / max(b, 1) > 1e-3 else 3}f} %" if b else "-"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | size | params (counted) | costed | MACs (counted) | costed | searchable | frozen groups: top reasons "
             "| export | DORY (gap8) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = f"{'tv' if r['source'] == 'torchvision' else 'timm'}:{r['model']}"
        if "failed" in r or "skipped" in r:
            lines.append(f"| {label} | | | | | | | {r.get('failed') or r.get('skipped')} | | |")
            continue
        c, k = r["counted"], r.get("costs")
        err = r["errors"]
        size = f"{r['size']}" + ("*" if r.get("note") and "fails" in r.get("note", "") else "")
        if k:
            costed_p, costed_m = _pct(k["params"], c["params"]), _pct(k["macs"], c["macs"])
        else:
            costed_p = costed_m = "analysis failed"
        reasons = "; ".join(f"{why} ×{n}" for why, n in [(w, n) for w, n in r.get("frozen_reasons", {}).items()
                                                        if w not in ("model input", "model output")][:3])
        if err.get("analyze"):
            reasons = _short(err["analyze"], 80)
        searchable = f"{r['searchable_pct']:.1f} %" if "searchable_pct" in r else "-"
        e = r.get("export")
        if e:
            export = ("exact" if e["exact"] else f"**{e['rel_diff']:.1e}**") \
                + ("" if e["costs_equal"] else " (costs ≠)")
        else:
            export = _short(err.get("export", "-"), 60)
        lines.append(f"| {label} | {size} | {_m(c['params'])} | {costed_p} | {_m(c['macs'])} | {costed_m} "
                     f"| {searchable} | {reasons} | {export} | {_short(r['dory'], 70)} |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in rows if "failed" not in r and "skipped" not in r]
    analysed = [r for r in done if "costs" in r]
    exported = [r for r in done if "export" in r]
    return {
        "models": len(rows),
        "skipped": [f"{r['model']}: {r['skipped']}" for r in rows if "skipped" in r],
        "failed": [f"{r['model']}: {r['failed']}" for r in rows if "failed" in r],
        "analysed": len(analysed),
        "analysis_failed": [f"{r['model']}: {r['errors']['analyze']}" for r in done if "analyze" in r["errors"]],
        "costs_equal": sum(1 for r in analysed if r["costs_equal"]),
        "cost_mismatches": {r["model"]: r.get("cost_diff", []) for r in analysed if not r["costs_equal"]},
        "exports": len(exported),
        "exports_exact": sum(1 for r in exported if r["export"]["exact"]),
        "export_costs_equal": sum(1 for r in exported if r["export"]["costs_equal"]),
        "export_failed": [f"{r['model']}: {r['errors']['export']}" for r in done if "export" in r["errors"]],
        "dory_accepted": sum(1 for r in done if r["dory"] == "accepted"),
        "dory_refusals": dict(Counter(_short(re.sub(r"\d[\d,]*", "N", re.sub(
            r"\(?'[^']*'\)?|^\d+ ops refused, 1st: ", "", r["dory"])), 60)
                                      for r in done if r["dory"] != "accepted").most_common()),
        "frozen_reasons_by_models": dict(Counter(w for r in analysed for w in r.get("frozen_reasons", {})
                                                 if w not in ("model input", "model output")).most_common(25)),
        "counter_unhandled": {r["model"]: r["counted"]["unhandled"] for r in done if r["counted"].get("unhandled")},
        "counter_other": {r["model"]: r["counted"]["other"] for r in done if r["counted"].get("other")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma list of names or patterns (prefix tv: or timm: to pick a source)")
    parser.add_argument("--limit", type=int, help="at most this many models")
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per model (default 240)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per model (default 1: batch-1 passes gain little from more, and lose "
                             "much when the cores are shared)")
    parser.add_argument("--no-lowering", action="store_true",
                        help="DORY verdict from the dory-layers checks only, without the whole lowering")
    parser.add_argument("--json", type=Path, help="write every row and the totals as JSON here")
    parser.add_argument("--md", type=Path, help="write the markdown table here (it is printed anyway)")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    torchvision, _ = import_model_libraries()
    import duccio_fx  # noqa: F401  (imported once here, before each model's process forks)
    from tests import counting  # noqa: F401
    candidates = [("torchvision", n) for n in torchvision_models(torchvision)] + [("timm", n) for n in TIMM_MODELS]
    chosen = select(candidates, args.models, args.limit)
    if not chosen:
        print(f"no model matches {args.models!r}", file=sys.stderr)
        return 1
    console = Console(stderr=True)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("models", total=len(chosen))
        for source, name in chosen:
            progress.update(task, description=f"{source}:{name}")
            row = run_isolated(source, name, args.size, args.timeout, args.threads, not args.no_lowering)
            rows.append(row)
            verdict = row.get("failed") or row.get("skipped") or (
                ("costs " + ("=" if row["costs_equal"] else "≠") if "costs" in row else "analysis failed")
                + ", export " + ("exact" if row.get("export", {}).get("exact") else "-")
                + f", DORY {_short(row['dory'], 40)}, {row['wall_s']} s")
            progress.console.print(f"{source}:{name}: {verdict}", soft_wrap=True)
            progress.advance(task)
    table = markdown(rows)
    totals = summary(rows)
    totals["seconds"] = round(time.perf_counter() - start, 1)
    totals["size"] = args.size
    print(table)
    print()
    print(f"{totals['models']} models: {totals['analysed']} analysed, costs equal on {totals['costs_equal']}, "
          f"exports exact {totals['exports_exact']}/{totals['exports']} (costs equal {totals['export_costs_equal']}), "
          f"DORY accepted {totals['dory_accepted']}; {len(totals['skipped'])} skipped, {len(totals['failed'])} "
          f"failed; {totals['seconds']:.0f} s")
    for key in ("skipped", "failed", "analysis_failed", "export_failed"):
        for line in totals[key]:
            print(f"  {key}: {line}")
    for model, diff in totals["cost_mismatches"].items():
        print(f"  costs ≠ {model}: " + "; ".join(diff))
    if args.md:
        args.md.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"totals": totals, "rows": rows}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
