"""Does `gap8-tiled` pick the L1 tiles the real DORY tiler picks, layer by layer?

    DORY_CHECK=/path/to/check_dory.py DORY_VENV=/path/to/dory-venv \\
        python benchmarks/tile_agreement.py [--only resnet8,dscnn] [--out runs/tile_agreement] [--json]

For each zoo network: lower it for GAP8 (`lower_to_dory`), run the DORY checker on it (its tiler, commit be3d6dd)
and compare, for every conv/linear layer, DORY's L1 output tile [C, H, W] with the tile `choose_tiles` gives
the same layer on the `gap8` target: the same tile, or else the same number of tiles. Without `DORY_CHECK`
it exits 0 after saying so (CI has no DORY).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

import duccio_fx
from duccio_fx import zoo
from duccio_fx.costs.program import CostProgram
from duccio_fx.costs.pulp_tiled import choose_tiles
from duccio_fx.ir.meta import layer_terms
from duccio_fx.lower.dory import lower_to_dory
from duccio_fx.targets import load_target

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dory_probes import run_checker  # noqa: E402

NETWORKS = ("resnet8", "dscnn", "mobilenet_v1", "lenet5")


def our_tiles(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    """Output tile (channels, rows, columns) of every conv/linear layer, by layer name."""
    target = load_target("gap8")
    terms = layer_terms(duccio_fx.analyze(model, x))
    values = CostProgram(terms).values(None, target)
    tiles = choose_tiles(values.term, values.cin, values.cout, target)
    return {t.name: (int(tiles.cout[i]), int(tiles.rows[i]), int(tiles.cols[i])) for i, t in enumerate(terms)}


def source_name(source: str) -> str:
    """The module name in a lowering row's `source` ('stack1_conv1 (stack1.conv1)' -> 'stack1.conv1')."""
    return source.split("(")[-1].rstrip(")").strip() if "(" in source else source.strip()


def compare(name: str, out: Path, check: str) -> list[dict[str, Any]]:
    model, x = zoo.build(name)
    model.eval()
    bundle = lower_to_dory(model, [torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(0))],
                           "gap8", calib_batches=1)
    bundle.save(out / name)
    rc, result, tail = run_checker(check, out / name, out / f"{name}.dory.json")
    if not result or not result.get("layers"):
        raise SystemExit(f"{name}: the DORY checker gave no layers (exit {rc}): {tail[-500:]}")
    ours = our_tiles(model, x)
    rows = []
    for mine, dory in zip(bundle.report["layers"], result["layers"]):
        layer = source_name(mine["source"])
        if mine["kind"] not in ("conv", "depthwise", "linear") or layer not in ours:
            continue
        full = (dory["out_ch"], *dory["out_hw"]) if dory.get("out_hw") else None
        tile = tuple(dory["L1_tile"]["output_CHW"]) if dory["L1_tile"].get("output_CHW") else (dory["out_ch"], 1, 1)
        if len(tile) == 1:
            tile = (tile[0], 1, 1)
        mine_tile = ours[layer]
        whole = full if full is not None else tile
        count = lambda t: math.prod(math.ceil(a / max(b, 1)) for a, b in zip(whole, t))  # noqa: E731
        rows.append({"network": name, "layer": layer, "kind": mine["kind"], "dory_tile": list(tile),
                     "our_tile": list(mine_tile), "same_tile": tuple(tile) == tuple(mine_tile),
                     "dory_tiles": count(tile), "our_tiles": count(mine_tile),
                     "same_count": count(tile) == count(mine_tile)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(NETWORKS))
    parser.add_argument("--out", default="runs/tile_agreement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    check = os.environ.get("DORY_CHECK")
    if not check:
        print("DORY_CHECK is not set: nothing to compare with (set DORY_CHECK to check_dory.py and DORY_VENV)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for name in args.only.split(",") for r in compare(name, out, check)]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'network':13} {'layer':24} {'kind':9} {'DORY tile C,H,W':>16} {'ours':>16} {'tiles D/ours':>12}")
        for r in rows:
            mark = "" if r["same_tile"] else ("  same count" if r["same_count"] else "  differs")
            print(f"{r['network']:13} {r['layer'][:24]:24} {r['kind']:9} {str(tuple(r['dory_tile'])):>16} "
                  f"{str(tuple(r['our_tile'])):>16} {r['dory_tiles']:>5}/{r['our_tiles']:<5}{mark}")
    same = sum(r["same_tile"] for r in rows)
    count = sum(r["same_count"] for r in rows)
    print(f"{len(rows)} layers: the same tile on {same}, the same number of tiles on {count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
