"""Mask-based search: masks, differentiable costs, exact shrinking export, saving and training."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import duccio_fx
from duccio_fx import zoo

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def counted(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Params and per-sample MACs of conv/linear modules, counted with forward hooks."""
    macs = [0]

    def hook(module, inputs, output):
        positions = math.prod(output.shape[1:-1]) if isinstance(module, nn.Linear) else math.prod(output.shape[2:])
        macs[0] += module.weight.numel() * positions

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LAYERS)]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    params = sum(p.numel() for m in model.modules() if isinstance(m, LAYERS) for p in m.parameters(recurse=False))
    return params, macs[0]


def randomize_statistics(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and biases, so a removed channel is *not* zero downstream."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def outputs(value):
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, (tuple, list)) else [value]


def random_masks(sm: duccio_fx.SearchableModel, seed: int, keep: float) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {grp.id: torch.rand(grp.channels, generator=g) < keep for grp in sm.channel_groups}


def check_exact(sm: duccio_fx.SearchableModel, x: torch.Tensor) -> nn.Module:
    exported = sm.export().eval()
    sm.eval()
    with torch.no_grad():
        for a, b in zip(outputs(sm(x)), outputs(exported(x))):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    costs = sm.costs()
    assert (int(costs["params"]), int(costs["macs"])) == counted(exported, x)
    assert not any(type(m).__module__.startswith("duccio_fx") for m in exported.modules())
    return exported


HEAVY = {"resnet50", "efficientnet_b0", "mobilenet_v2", "resnet18", "mobilenet_v3_small"}


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_model_exports_exactly_under_random_masks(name):
    model, x = zoo.build(name, batch=2)
    randomize_statistics(model)
    sm = duccio_fx.make_searchable(model, x)
    assert sm.channel_groups, "every zoo model has searchable groups"
    settings = [(1, 0.5)] if name in HEAVY else [(1, 0.5), (2, 0.15), (3, 0.9)]
    for seed, keep in settings:
        sm.set_masks(random_masks(sm, seed, keep))
        check_exact(sm, x)


def test_all_off_masks_keep_one_channel_per_group():
    model, x = zoo.build("resnet8", batch=2)
    randomize_statistics(model)
    sm = duccio_fx.make_searchable(model, x)
    sm.set_masks({g.id: torch.zeros(g.channels, dtype=torch.bool) for g in sm.channel_groups})
    assert all(int(m.sum()) == 1 for m in sm.masks().values())
    exported = check_exact(sm, x)
    assert exported.get_submodule("stack1.conv1").out_channels == 1
    assert exported.get_submodule("fc").in_features == 1


def test_initial_masks_keep_everything_and_export_matches_the_seed():
    model, x = zoo.build("dscnn", batch=3)
    randomize_statistics(model)
    model.eval()
    sm = duccio_fx.make_searchable(model, x)
    assert all(bool(m.all()) for m in sm.masks().values())
    assert int(sm.costs()["macs"]) == 2_656_768
    with torch.no_grad():
        torch.testing.assert_close(sm.eval()(x), model(x))
        torch.testing.assert_close(sm.export().eval()(x), model(x))


def test_the_users_model_is_not_modified():
    model, x = zoo.build("resnet8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sm = duccio_fx.make_searchable(model, x)
    sm.set_masks(random_masks(sm, 0, 0.3))
    sm.export()
    assert all(type(m).__module__.startswith("torch") or type(m).__module__.startswith("duccio_fx.zoo")
               for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_costs_are_differentiable_and_have_layer_memory():
    model, x = zoo.build("resnet8")
    sm = duccio_fx.make_searchable(model, x)
    costs = sm.costs()
    (costs["params"] + costs["macs"] * 1e-3).backward()
    (alpha,) = sm.arch_parameters()  # one flat α vector, group after group
    grads = alpha.grad.split(sm.bank.sizes)
    assert len(grads) == 6 and all(g.abs().sum() > 0 for g in grads)
    mem = costs["layer_memory"]
    assert int(mem["conv1"]) == 3 * 16 * 9 + 3 * 32 * 32 + 16 * 32 * 32
    arch = {id(p) for p in sm.arch_parameters()}
    assert not any(id(p) in arch for p in sm.weight_parameters())
    assert len(list(sm.weight_parameters())) == len(list(model.parameters()))


def test_set_masks_rejects_bad_input():
    model, x = zoo.build("resnet8")
    sm = duccio_fx.make_searchable(model, x)
    with pytest.raises(duccio_fx.DuccioError, match="not searchable"):
        sm.set_masks({0: torch.ones(3, dtype=torch.bool)})
    gid = sm.channel_groups[0].id
    with pytest.raises(duccio_fx.DuccioError, match="shape"):
        sm.set_masks({gid: torch.ones(5, dtype=torch.bool)})


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_searchable_and_exported_models_survive_save_and_load():
    model, x = zoo.build("mobilenet_v1", batch=2)
    randomize_statistics(model)
    sm = duccio_fx.make_searchable(model, x)
    sm.set_masks(random_masks(sm, 5, 0.4))
    sm.eval()
    exported = sm.export().eval()
    loaded_sm, loaded_ex = roundtrip(sm).eval(), roundtrip(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded_sm(x), sm(x))
        torch.testing.assert_close(loaded_ex(x), exported(x))
        torch.testing.assert_close(loaded_sm.export().eval()(x), exported(x))  # export a reloaded search later
    assert {k: int(v.sum()) for k, v in loaded_sm.masks().items()} == {k: int(v.sum()) for k, v in sm.masks().items()}


def test_state_dict_checkpoint_reloads_into_a_fresh_search():
    model, x = zoo.build("tcn", batch=2)
    randomize_statistics(model)
    sm = duccio_fx.make_searchable(model, x)
    sm.set_masks(random_masks(sm, 7, 0.5))
    state = roundtrip(sm.state_dict())
    fresh = duccio_fx.make_searchable(zoo.build("tcn")[0], x)
    fresh.load_state_dict(state)
    assert {k: v.tolist() for k, v in fresh.masks().items()} == {k: v.tolist() for k, v in sm.masks().items()}
    with torch.no_grad():
        torch.testing.assert_close(fresh.export().eval()(x), sm.export().eval()(x))
    exported = sm.export()
    reloaded = sm.export()
    reloaded.load_state_dict(roundtrip(exported.state_dict()))


@pytest.mark.slow
def test_training_with_a_size_penalty_shrinks_the_model_and_learns():
    torch.manual_seed(0)
    n, classes = 512, 4
    x = torch.randn(n, 1, 12, 12)
    y = torch.randint(0, classes, (n,))
    x[torch.arange(n), 0, y * 3, y * 3] += 4.0  # each class lights up its own pixel
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, classes))
    sm = duccio_fx.make_searchable(model, x[:2])
    seed_params = int(sm.costs()["params"])
    target = seed_params // 3
    opt = torch.optim.Adam([{"params": list(sm.weight_parameters()), "weight_decay": 1e-4},
                            {"params": list(sm.arch_parameters()), "weight_decay": 0.0}], lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    sm.train()
    for epoch in range(12):
        for i in range(0, n, 64):
            opt.zero_grad()
            penalty = torch.relu(sm.costs()["params"] - target) / seed_params
            loss = loss_fn(sm(x[i:i + 64]), y[i:i + 64]) + 2.0 * penalty
            loss.backward()
            opt.step()
    final = int(sm.costs()["params"])
    assert final < 0.6 * seed_params
    exported = sm.export().eval()
    with torch.no_grad():
        accuracy = (exported(x).argmax(1) == y).float().mean().item()
    assert accuracy > 2.0 / classes, accuracy
    assert counted(exported, x)[0] == final
