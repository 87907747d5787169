"""One search, started either alone or by torchrun (tests/test_distributed.py): a BN-free CNN on fixed
data, unshuffled loaders, so N ranks with batch B see exactly the global batches of one process with N*B."""

from __future__ import annotations

import json
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from duccio_fx.search.constraints import Constraint
from duccio_fx.search.recipe import Recipe
from duccio_fx.search.settings import SearchSettings
from duccio_fx.targets import load_target


def main(out: str, batch: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 4))
    settings = SearchSettings(warmup_epochs=1, search_epochs=2, max_search_epochs=3, finetune_epochs=1, seed=3)
    recipe = Recipe(model, (x[:1],), DataLoader(TensorDataset(x[:192], y[:192]), batch_size=batch),
                    DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64), [Constraint.parse("size", "50%")],
                    load_target("gap8"), settings, device="cpu")
    result = recipe.run()
    if recipe.world.main:
        torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, out + ".pt")
        with open(out + ".json", "w") as f:
            json.dump({"ranks": recipe.world.size, "met": result.met,
                       "history": [(r.phase, r.epoch, r.train_loss, r.val_loss) for r in result.history]}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
