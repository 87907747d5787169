"""On a CUDA GPU: costs equal the CPU's, the mask step does not synchronize, the recipe runs under amp.

Every test here is marked `cuda` and skips where torch sees no GPU (this project's CI has none);
`benchmarks/gpu_check.sh` runs them on a GPU machine with `pytest -m cuda`.
"""

from __future__ import annotations

import pytest
import torch

import duccio_fx
from duccio_fx import zoo
from duccio_fx.search.recipe import Recipe

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("method", ["mask", "path"])
def test_costs_and_gradients_on_cuda_equal_those_on_the_cpu(method):
    model, x = zoo.build("resnet8")
    spaces = {d: duccio_fx.make_searchable(model, x, method=method).to(d) for d in ("cpu", "cuda")}
    spaces["cuda"].load_state_dict(spaces["cpu"].state_dict())
    out = {}
    for device, space in spaces.items():
        space.train()
        torch.manual_seed(0)
        space(x.to(device))
        if method == "path":  # the same g on both devices
            space.choice_bank.sample = spaces["cpu"].choice_bank.sample.detach().to(device).requires_grad_(True)
        costs = space.costs("gap8")
        costs.size_bytes.backward()
        out[device] = ({k: float(costs[k]) for k in ("params", "macs", "size_bytes", "cycles")},
                       next(space.arch_parameters()).grad)
    assert out["cuda"][0] == out["cpu"][0]
    if method == "mask":
        torch.testing.assert_close(out["cuda"][1].cpu(), out["cpu"][1], rtol=1e-6, atol=1e-6)


def test_a_mask_search_step_on_cuda_does_not_synchronize():
    model, x = zoo.build("resnet8", batch=8)
    y = torch.randint(0, 10, (8,), device="cuda")
    space = duccio_fx.make_searchable(model, x[:1]).cuda().train()
    opt = torch.optim.Adam(space.parameters(), lr=1e-3)
    x = x.cuda()

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(space(x), y)
        loss = loss + 1e-6 * torch.relu(space.costs("gap8")["size_bytes"] - 1000.0).float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # builds the cost program on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_the_recipe_runs_on_cuda_with_and_without_amp(tmp_path, amp):
    from tests.test_optimize import _tiny_args

    result = Recipe(*_tiny_args(tmp_path), device="cuda", amp=amp).run()
    assert result.history and all(r.train_loss == r.train_loss for r in result.history)
