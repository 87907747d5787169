"""`--channel-multiple N` (mask method): one α per block of N channels, so every group keeps a multiple of N.

The bank's masks stay one entry per channel (each block's mask repeated over its channels), so the selects,
the costs and the export are the per-channel code of N = 1; these tests check the promises on top:
masks are block-aligned during real optimizer steps; kept widths are multiples of N (zoo models and generated
networks); the export is eval-exact and its measured costs equal the searchable costs; `set_masks` refuses a
mask that cuts a block; `minimum_masks` keeps one block; state dicts and pickles round-trip; N = 1 is
bit-identical to the per-channel bank; the CLI and the API refuse a bad N and non-mask methods.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import duccio_fx
from duccio_fx import zoo
from duccio_fx.cli import app
from duccio_fx.common.errors import DuccioError
from duccio_fx.ir.meta import channel_layout
from duccio_fx.search.masks import MaskBank, channel_blocks, hard_masks
from duccio_fx.targets import load_target
from tests.test_export_properties import counted_costs, randomize
from tests.test_optimize import model_file
from tests.test_properties import build, plans

runner = CliRunner()
GAP8 = load_target("gap8")
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# dscnn, resnet8: every width a multiple of 4 and 8; lenet5: 6 channels (4 + 2 with N = 4) and 84 (N = 8:
# 10 × 8 + 4); mobilenet_v1 and tcn: depthwise convs, 1-d convs
ZOO = ["dscnn", "resnet8", "lenet5", "mobilenet_v1", "tcn"]


def blocks_of(sm: duccio_fx.SearchableModel) -> dict[int, list[int]]:
    return {g.id: sizes for g, sizes in zip(sm.channel_groups, sm.bank.block_sizes)}


def assert_block_aligned(sm: duccio_fx.SearchableModel, where: str = "") -> None:
    """Every block of every group is wholly kept or wholly removed; a group N divides keeps a multiple of N."""
    n = sm.channel_multiple
    for gid, mask in sm.masks().items():
        blocks = blocks_of(sm)[gid]
        assert sum(blocks) == mask.numel()
        for part in mask.split(blocks):
            assert bool(part.all()) or not bool(part.any()), f"{where} g{gid}: block cut: {mask.int().tolist()}"
        if mask.numel() % n == 0:
            assert int(mask.sum()) % n == 0, f"{where} g{gid}: keeps {int(mask.sum())}, not a multiple of {n}"


def random_block_masks(sm: duccio_fx.SearchableModel, seed: int, keep: float = 0.5) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for gid, blocks in blocks_of(sm).items():
        on = torch.rand(len(blocks), generator=g) < keep
        out[gid] = torch.repeat_interleave(on, torch.tensor(blocks))
    return out


def expected_masks(sm: duccio_fx.SearchableModel, wanted: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """What masks() reports after set_masks(wanted): an empty mask keeps its first block (all α are 0, the
    first largest stays)."""
    out = {}
    for gid, mask in wanted.items():
        mask = mask.clone()
        if not mask.any():
            mask[:blocks_of(sm)[gid][0]] = True
        out[gid] = mask
    return out


def outputs(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


def check_export(sm: duccio_fx.SearchableModel, x: torch.Tensor, target=GAP8) -> nn.Module:
    """Export is eval-exact, the exported model's measured costs equal the searchable costs, and every
    conv / linear of the export is as wide as the masks say (a multiple of N where the group allows)."""
    sm.eval()
    exported = sm.export().eval()
    with torch.no_grad():
        for want, got in zip(outputs(sm(x)), outputs(exported(x))):
            scale = float(want.abs().max()) or 1.0
            assert float((got - want).abs().max()) <= 1e-5 * scale
        searched = sm.costs(target).floats()
    measured = duccio_fx.measure_costs(exported, (x[:1],), target).floats()
    assert (int(searched["params"]), int(searched["macs"])) == counted_costs(exported, x)
    for key in ("params", "macs", "size_bytes"):
        assert searched[key] == measured[key], key
    for key in ("cycles", "latency_s"):
        assert searched[key] == pytest.approx(measured[key], rel=1e-12), key
    assert searched["layer_bytes"] == measured["layer_bytes"]

    # widths: every defining conv / linear of the seed, as the masks say, in the exported model
    n, masks = sm.channel_multiple, sm.masks()
    modules = dict(exported.named_modules())
    for node in sm.graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(sm.graph_module.get_submodule(node.target), LAYERS):
            continue
        layout = channel_layout(node)
        kept = sum((s.stop - s.start) * s.block if s.group not in masks
                   else int(masks[s.group][s.start:s.stop].sum()) * s.block for s in layout.slices)
        module = modules[str(node.target)]
        width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        assert width == kept, f"{node.target}: {width} output channels, the masks keep {kept}"
        aligned = all(s.group in masks and masks[s.group].numel() % n == 0 and s.start % n == 0
                      and (s.stop - s.start) % n == 0 for s in layout.slices)
        if aligned:
            assert width % n == 0, f"{node.target}: {width} output channels, not a multiple of {n}"
    return exported


# -- the bank ---------------------------------------------------------------------------------------

def test_blocks_cut_groups_in_n_with_a_smaller_last_block():
    assert channel_blocks(16, 4) == [4] * 4
    assert channel_blocks(10, 4) == [4, 4, 2]
    assert channel_blocks(3, 4) == [3]
    assert channel_blocks(5, 1) == [1] * 5
    bank = MaskBank([7, 9], [8, 10], block=4)
    assert bank.sizes == [8, 10] and bank.block_sizes == [[4, 4], [4, 4, 2]]
    assert bank.alpha.shape == (5,) and bank.offsets() == [0, 8] and bank.alpha_offsets() == [0, 2]
    with torch.no_grad():
        bank.alpha.copy_(torch.tensor([1.0, 0.1, 0.2, 0.9, 0.3]))
    masks = bank()
    assert masks.tolist() == [1] * 4 + [0] * 4 + [0] * 4 + [1] * 4 + [0] * 2 + [1]  # + the trailing 1
    # straight-through: a block's α gets the sum of its channels' gradients
    weights = torch.arange(19, dtype=torch.float32)
    (bank() * weights).sum().backward()
    sums = [weights[a:b].sum() for a, b in ((0, 4), (4, 8), (8, 12), (12, 16), (16, 18))]
    assert torch.equal(bank.alpha.grad, torch.stack(sums))


def test_block_1_is_bit_identical_to_the_per_channel_bank():
    """N = 1: the same α (one per channel), the same masks and gradients as the per-channel formulas (the
    bank before blocks existed), the same state dict and repr (so warmup-cache keys and checkpoint signatures
    of default runs do not change)."""
    g = torch.Generator().manual_seed(0)
    sizes = [5, 1, 7, 3]
    bank = MaskBank([0, 1, 2, 3], sizes)
    assert bank.block == 1 and bank.channel_block is None
    with torch.no_grad():
        bank.alpha.copy_(torch.randn(16, generator=g))
        bank.alpha[8:10] = 0.75  # a tie for the largest of a group
    segment = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    ref_alpha = bank.alpha.detach().clone().requires_grad_(True)
    magnitude = ref_alpha.abs()
    reference = hard_masks(ref_alpha, segment, 4, 0.5) + (magnitude - magnitude.detach())
    got = bank.masks()
    assert torch.equal(got, reference) and torch.equal(bank.hard(), reference.detach())
    w = torch.randn(16, generator=g)
    (got * w).sum().backward()
    (reference * w).sum().backward()
    assert torch.equal(bank.alpha.grad, ref_alpha.grad)
    assert list(bank.state_dict()) == ["alpha"] and repr(bank) == "MaskBank()"
    model, x = zoo.build("resnet8")
    default = duccio_fx.make_searchable(model, x)
    one = duccio_fx.make_searchable(model, x, channel_multiple=1)
    assert default.structure() == one.structure() and default.bank.alpha.numel() == sum(default.bank.sizes)
    with torch.no_grad():
        assert torch.equal(default(x), one(x))


def test_old_per_group_state_dicts_still_load_into_a_block_1_bank():
    bank = MaskBank([0, 1], [3, 2])
    bank.load_state_dict({"alphas.0": torch.tensor([1.0, 0.2, 0.3]), "alphas.1": torch.tensor([0.1, 0.9])})
    assert bank.alpha.tolist() == pytest.approx([1.0, 0.2, 0.3, 0.1, 0.9])


# -- the search space -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dscnn", "resnet8", "lenet5"])
@pytest.mark.parametrize("n", [4, 8])
def test_masks_stay_block_aligned_during_optimizer_steps(name, n):
    torch.manual_seed(0)
    model, x = zoo.build(name, batch=4)
    sm = duccio_fx.make_searchable(model, x, channel_multiple=n)
    assert sm.channel_multiple == n and sm.bank.alpha.numel() == sum(len(b) for b in sm.bank.block_sizes)
    opt = torch.optim.Adam([{"params": list(sm.weight_parameters()), "lr": 1e-3},
                            {"params": list(sm.arch_parameters()), "lr": 0.15}])
    sm.train()
    seed_size = float(sm.cost_values(GAP8)["size_bytes"])
    removed = 0
    for step in range(8):
        out = sm(x)
        task = out.float().pow(2).mean()
        loss = task + 10.0 * torch.relu(sm.costs(GAP8)["size_bytes"] / seed_size - 0.3)
        opt.zero_grad()
        loss.backward()
        assert sm.bank.alpha.grad is not None and sm.bank.alpha.grad.shape == sm.bank.alpha.shape
        opt.step()
        assert_block_aligned(sm, f"{name} N={n} step {step}")
        removed = sum(int((~m).sum()) for m in sm.masks().values())
    assert removed > 0, "the penalty removed no block: the test exercised nothing"
    check_export(sm, x)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_export_of_block_masks_is_exact_and_costs_equal_the_measured_ones(name, n):
    model, x = zoo.build(name, batch=2)
    randomize(model, seed=3, add_biases=False)
    sm = duccio_fx.make_searchable(model, x, channel_multiple=n)
    for seed, keep in ((0, 0.5), (1, 0.2)):
        wanted = random_block_masks(sm, seed, keep)
        sm.set_masks(wanted)
        got = sm.masks()
        for gid, want in expected_masks(sm, wanted).items():
            assert torch.equal(got[gid], want)
        assert_block_aligned(sm, name)
        check_export(sm, x)


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans(), n=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 2**31 - 1),
       keep=st.sampled_from([0.0, 0.3, 0.7, 1.0]))
def test_generated_networks_keep_multiples_and_export_exactly(plan, n, seed, keep):
    model, x = build(plan)
    randomize(model, seed, add_biases=True)
    sm = duccio_fx.make_searchable(model, x, channel_multiple=n)
    for g in sm.all_groups:  # at most one block: not searched, with the reason
        if not g.frozen and g.channels <= n:
            assert g.id not in {c.id for c in sm.channel_groups} and "--channel-multiple" in sm.excluded[g.id]
    if sm.bank is None:
        return
    sm.set_masks(random_block_masks(sm, seed, keep))
    assert_block_aligned(sm)
    for row in sm.width_report():
        if row["searchable"]:
            assert row["kept"] == int(sm.masks()[row["id"]].sum())
            assert row["multiple_holds"] == (row["channels"] % n == 0)
            assert row["kept_multiple"] == (row["kept"] % n == 0)
    check_export(sm, x[:1])


def test_set_masks_refuses_a_mask_that_cuts_a_block():
    model, x = zoo.build("resnet8")
    sm = duccio_fx.make_searchable(model, x, channel_multiple=4)
    gid = sm.channel_groups[0].id
    mask = torch.ones(16, dtype=torch.bool)
    mask[5] = False
    with pytest.raises(DuccioError) as err:
        sm.set_masks({gid: mask})
    text = str(err.value)
    assert f"group {gid}" in text and "block 1 (channels 4..7)" in text and "blocks of 4" in text
    assert err.value.where == "SearchableModel.set_masks" and "channels 4..7 together" in err.value.fix
    with pytest.raises(DuccioError, match="expected \\(16,\\)"):
        sm.set_masks({gid: torch.ones(4, dtype=torch.bool)})  # one bool per channel, not per block
    mask[4:8] = False
    sm.set_masks({gid: mask})
    assert torch.equal(sm.masks()[gid], mask)


def test_minimum_keeps_one_block_the_smallest():
    model, x = zoo.build("lenet5")  # 6 channels: blocks 4 + 2; 16, 120, 84: blocks of 4
    sm = duccio_fx.make_searchable(model, x, channel_multiple=4)
    minimum = sm.minimum_masks()
    for gid, blocks in blocks_of(sm).items():
        k = blocks.index(min(blocks))
        want = torch.zeros(sum(blocks), dtype=torch.float64)
        want[sum(blocks[:k]):sum(blocks[:k + 1])] = 1
        assert torch.equal(minimum[gid], want)
    assert {int(m.sum()) for m in minimum.values()} == {2, 4}
    sm.set_masks({gid: m.bool() for gid, m in minimum.items()})
    assert sm.cost_values(GAP8)["size_bytes"] == sm.minimum_costs(GAP8)["size_bytes"]
    assert_block_aligned(sm)


def test_narrow_groups_are_not_searched_and_every_report_says_why():
    model, x = zoo.build("lenet5")
    sm = duccio_fx.make_searchable(model, x, channel_multiple=8)  # 6 channels: one (narrower) block
    rows = {r["id"]: r for r in sm.width_report()}
    narrow = next(r for r in rows.values() if r["channels"] == 6)
    assert not narrow["searchable"] and narrow["kept"] == 6
    assert "narrower than one block of --channel-multiple 8" in narrow["note"]
    fc2 = next(r for r in rows.values() if r["channels"] == 84)
    assert fc2["searchable"] and fc2["blocks"] == [8] * 10 + [4] and not fc2["multiple_holds"]
    assert "84 is not a multiple of 8" in fc2["note"] and "last block of 4" in fc2["note"]
    result = runner.invoke(app, ["inspect", "zoo:lenet5", "--channel-multiple", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["channel_multiple"] == 8 and report["widths"] == json.loads(json.dumps(list(rows.values())))
    table = runner.invoke(app, ["inspect", "zoo:lenet5", "--channel-multiple", "8"])
    assert table.exit_code == 0 and "blocks of 8 channels" in table.output and "10 × 8 + 4" in table.output


def test_state_dict_and_pickle_round_trip():
    model, x = zoo.build("dscnn")
    sm = duccio_fx.make_searchable(model, x, channel_multiple=4)
    sm.set_masks(random_block_masks(sm, 5))
    sm.eval()
    fresh = duccio_fx.make_searchable(model, x, channel_multiple=4)
    fresh.load_state_dict(sm.state_dict())
    fresh.eval()
    assert all(torch.equal(a, b) for a, b in zip(sm.masks().values(), fresh.masks().values()))
    buffer = io.BytesIO()
    torch.save(sm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.channel_multiple == 4 and loaded.bank.block_sizes == sm.bank.block_sizes
    with torch.no_grad():
        assert torch.equal(loaded(x), sm(x)) and torch.equal(fresh(x), sm(x))
    assert all(torch.equal(a, b) for a, b in zip(sm.masks().values(), loaded.masks().values()))
    # another N is another space: another structure (warmup-cache key, checkpoint signature), other shapes
    other = duccio_fx.make_searchable(model, x)
    assert other.structure() != sm.structure() and "channel_multiple=4" in sm.structure()
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(sm.state_dict())


def test_a_search_step_with_blocks_reads_nothing_from_the_device():
    from tests.test_step_sync import Switch, _recipe, _search_epoch

    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loader = Switch(x, y, 4)
    recipe = _recipe("mask", "cpu", loader, x, channel_multiple=4)
    assert recipe.space.channel_multiple == 4
    _search_epoch(recipe)
    assert loader.reads == [], f"host reads in a search step: {loader.reads}"
    assert recipe.signature()["method_options"] == {"channel_multiple": 4}


# -- options ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "4"])
def test_the_api_refuses_a_bad_multiple(bad):
    model, x = zoo.build("resnet8")
    with pytest.raises(DuccioError, match="channel_multiple must be a whole number >= 1"):
        duccio_fx.make_searchable(model, x, channel_multiple=bad)


def test_the_api_refuses_the_option_with_another_method():
    model, x = zoo.build("resnet8")
    with pytest.raises(DuccioError, match="'channel_multiple' does not belong to the path method"):
        duccio_fx.make_searchable(model, x, "path", channel_multiple=4)


@pytest.mark.parametrize("command", ["optimize", "inspect", "sweep"])
@pytest.mark.parametrize("args, code, message", [
    (["--channel-multiple", "0"], 1, "--channel-multiple must be a whole number >= 1, got 0"),
    (["--channel-multiple", "-2"], 1, "must be a whole number >= 1"),
    (["--channel-multiple", "2.5"], 2, "not a valid int"),
    (["--channel-multiple", "4", "--method", "path"], 1, "--channel-multiple belongs to the mask method"),
])
def test_the_cli_refuses_a_bad_multiple_and_other_methods(tmp_path, command, args, code, message):
    extra = {"optimize": ["--max-size", "50%", "--out", str(tmp_path / "o"), "--no-cache"],
             "inspect": [], "sweep": ["--out", str(tmp_path / "s")]}[command]
    result = runner.invoke(app, [command, model_file(tmp_path), *extra, *args])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_optimize_with_a_channel_multiple_keeps_multiples_and_reports_the_widths(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "50%", "--epochs", "1,2,1",
                                 "--out", str(out), "--no-cache", "--channel-multiple", "4"])
    assert result.exit_code == 0, result.output
    assert "blocks of 4 channels" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["channel_multiple"] == 4
    searched = [w for w in report["widths"] if w["searchable"]]
    assert [w["channels"] for w in searched] == [16, 32]
    assert all(w["kept"] % 4 == 0 and w["kept_multiple"] for w in searched)
    model = torch.load(out / "model.pt", weights_only=False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [w["kept"] for w in searched]
    assert report["final"]["size_bytes"] <= 0.5 * report["seed"]["size_bytes"]
    measured = duccio_fx.measure_costs(model, (torch.randn(1, 1, 8, 8),), GAP8)
    assert measured["size_bytes"] == report["final"]["size_bytes"]


@pytest.mark.cuda
def test_a_block_mask_step_on_cuda_syncs_nothing():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    model, x = zoo.build("resnet8", batch=4)
    sm = duccio_fx.make_searchable(model, x, channel_multiple=8).cuda()
    x = x.cuda()
    opt = torch.optim.Adam(sm.parameters(), lr=0.05)
    cpu = duccio_fx.make_searchable(model, x.cpu(), channel_multiple=8)
    for step in range(3):  # the first step builds the cost program (not checked)
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            loss = sm(x).pow(2).mean() + sm.costs(GAP8)["size_bytes"] * 1e-5
            opt.zero_grad()
            loss.backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert_block_aligned(sm)
    cpu.set_masks({gid: m.cpu() for gid, m in sm.masks().items()})
    assert float(cpu.cost_values(GAP8)["size_bytes"]) == float(sm.cost_values(GAP8)["size_bytes"])
    assert math.isfinite(float(loss))
