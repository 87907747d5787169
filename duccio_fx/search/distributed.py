"""Data-parallel search on torch.distributed (gloo on CPUs, NCCL on GPUs), as `torchrun` starts it.

    torchrun --nproc-per-node 2 -m duccio_fx optimize model.py --max-size 50%    (or: optimize --nproc 2)

Every rank builds the same model (same seed) and runs the same recipe; what keeps them in step:

* training batches are sharded: a DataLoader is rebuilt over a DistributedSampler (its batch size is then
  per rank: the global batch is N times it); any other iterable deals its batches round-robin, in full
  rounds, so every rank takes the same number of steps;
* after each backward pass, the weight and architecture gradients are averaged over the ranks in one
  all-reduce, so every rank applies the same update and holds the same weights, masks and costs;
* the training loss of an epoch is averaged over the ranks (the warmup's L̂ calibrates λ);
* validation and BatchNorm recalibration read the whole, unsharded loaders on every rank, so the
  validation figures — and the decisions taken on them (early stop, best feasible epoch) — are identical;
* only rank 0 writes checkpoints, the warmup cache, reports and models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from duccio_fx.common.errors import DuccioError


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank and world size (1 and rank 0 without torch.distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world() -> World:
    """The world torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK), or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0"))) if size > 1 \
        else World()


def init_world(device: torch.device) -> World:
    """Join the process group torchrun set up (gloo for CPUs, NCCL for GPUs); a single process joins none."""
    world = launched_world()
    if world.active and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend)
        except Exception as err:  # noqa: BLE001 (the launcher's environment is wrong in some way)
            raise DuccioError(f"cannot join the torch.distributed group ({backend}): {err}",
                              where="torchrun environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)",
                              fix="start the run with `torchrun --nproc-per-node N -m duccio_fx optimize ...` "
                                  "or `duccio-fx optimize --nproc N ...`") from None
    return world


def rank_device(device: torch.device, world: World) -> torch.device:
    """On CUDA each rank takes its own GPU (cuda:LOCAL_RANK)."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.active else device


def broadcast_module(module: nn.Module, world: World) -> None:
    """Rank 0's parameters and buffers on every rank (they start equal anyway: this makes sure)."""
    if world.active:
        for tensor in module.state_dict().values():
            if isinstance(tensor, torch.Tensor):
                dist.broadcast(tensor, 0)


def average_gradients(parameters: Iterable[nn.Parameter], world: World) -> None:
    """Average every gradient over the ranks in one all-reduce (a missing gradient counts as zero)."""
    if not world.active:
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def sum_over_ranks(values: list[float], world: World, device: torch.device) -> list[float]:
    """Sums of `values` over the ranks (e.g. [loss sum, count])."""
    if not world.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class ShardedLoader:
    """This rank's share of a training loader; `set_epoch` picks the shuffle, as with a DistributedSampler."""

    def __init__(self, loader: Iterable[Any], world: World, seed: int) -> None:
        self.loader, self.world, self.epoch = loader, world, 0
        self.sharded: Iterable[Any] | None = None
        if isinstance(loader, DataLoader) and hasattr(loader.dataset, "__len__") and loader.batch_size is not None:
            self.sampler = DistributedSampler(loader.dataset, num_replicas=world.size, rank=world.rank,
                                              shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
            self.sharded = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=self.sampler,
                                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                      pin_memory=loader.pin_memory, drop_last=loader.drop_last)

    def __len__(self) -> int:
        if self.sharded is not None:
            return len(self.sharded)  # type: ignore[arg-type]
        return len(self.loader) // self.world.size  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """The shuffle of this epoch (the recipe numbers epochs per phase, so a resumed run repeats them)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        if self.sharded is not None:
            self.sampler.set_epoch(self.epoch)
            yield from self.sharded
            return
        round_: list[Any] = []
        for batch in self.loader:  # full rounds only: every rank takes the same number of steps
            round_.append(batch)
            if len(round_) == self.world.size:
                yield round_[self.world.rank]
                round_ = []
