"""Data-parallel search with torch.distributed (gloo, 2 CPU processes under torchrun) against one process
with the same global batch: the same updates, so the same history and the same exported weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env_cmd = [sys.executable, str(WORKER)]
    one = subprocess.run(env_cmd + [str(tmp_path / "one"), "32"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(WORKER), str(tmp_path / "two"), "16"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (a["ranks"], b["ranks"]) == (1, 2) and a["met"] and b["met"]
    assert [h[:2] for h in a["history"]] == [h[:2] for h in b["history"]]  # same epochs, same decisions
    for (_, _, ta, va), (_, _, tb, vb) in zip(a["history"], b["history"]):
        assert ta == pytest.approx(tb, rel=1e-4) and va == pytest.approx(vb, rel=1e-4)
    wa, wb = (torch.load(tmp_path / f"{n}.pt") for n in ("one", "two"))
    assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}  # the same architecture
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_optimize_nproc_launches_torchrun_and_rank_0_writes_the_run(tmp_path):
    from tests.test_optimize import MODEL_FILE
    import textwrap

    model = tmp_path / "tiny.py"
    model.write_text(textwrap.dedent(MODEL_FILE))
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "duccio_fx", "optimize", str(model), "--max-size", "50%",
                          "--epochs", "1,2,1", "--nproc", "2", "--device", "cpu", "--no-cache", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.count("constraints") == 1  # one summary: rank 1 is quiet
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "met" and (out / "model.onnx").exists()


def test_sharded_loaders_partition_the_data_and_repeat_an_epoch_exactly():
    from torch.utils.data import DataLoader, TensorDataset

    from duccio_fx.search.distributed import ShardedLoader, World

    data = TensorDataset(torch.arange(40).float().unsqueeze(1), torch.zeros(40, dtype=torch.long))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    ranks = [ShardedLoader(loader, World(r, 2), seed=7) for r in (0, 1)]

    def seen(shard, epoch):
        shard.set_epoch(epoch)
        return [int(v) for x, _ in shard for v in x.flatten()]

    for epoch in (0, 1):
        a, b = seen(ranks[0], epoch), seen(ranks[1], epoch)
        assert sorted(a + b) == list(range(40)) and len(a) == len(b) == 20 == 4 * len(ranks[0])
    assert seen(ranks[0], 3) == seen(ranks[0], 3) != seen(ranks[0], 4)  # set_epoch picks the shuffle
    odd = [(torch.full((1, 1), float(i)), torch.zeros(1, dtype=torch.long)) for i in range(7)]  # 7 batches
    dealt = [[int(x) for x, _ in ShardedLoader(odd, World(r, 2), seed=0)] for r in (0, 1)]
    assert dealt == [[0, 2, 4], [1, 3, 5]]  # full rounds only: both ranks take 3 steps
