"""The one-shot recipe: warmup → search under every constraint → export → fine-tune.

* Warmup trains the weights with every channel on. It does not depend on the constraints, so its result
  is cached (keyed by the seed's weights and graph, the data, the seed and the warmup settings) and reused
  by the next search of the same model and data.
* Search trains weights and masks (separate parameter groups, no weight decay on the masks) with the DUCCIO
  penalty. It runs at least `search_epochs`, then goes on while a constraint is violated or the validation
  loss of feasible epochs is still improving (patience), up to `max_search_epochs`. The best feasible epoch
  (lowest validation loss with every constraint met) is exported.
* Fine-tune trains the exported, physically smaller model (weights only) and keeps the weights of its best
  validation loss (the exported weights themselves count as a candidate).

Every epoch ends with an atomic checkpoint; `resume=True` continues from it. Each epoch reseeds the RNG from
(seed, phase, epoch), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from duccio_fx.atomic import save_atomic
from duccio_fx.constraints import Constraint, ConstraintError, layerwise_constraints
from duccio_fx.cost_model import as_float, evaluate, layer_terms, target_costs
from duccio_fx.errors import DuccioError
from duccio_fx.feasibility import check_feasible
from duccio_fx.objective import DuccioObjective
from duccio_fx.searchable import SearchableModel, make_searchable
from duccio_fx.target_report import critical_layers

PHASES = ("warmup", "search", "finetune")
LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], float]


def cross_entropy(output: Any, target: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


def top1(output: Any, target: Any) -> float:
    return float((output.argmax(1) == target).float().mean())


@dataclass
class SearchSettings:
    warmup_epochs: int = 5
    search_epochs: int = 10  # minimum
    finetune_epochs: int = 5
    max_search_epochs: int | None = None  # default: 2 x search_epochs
    lr: float = 1e-3
    arch_lr: float | None = None  # None: auto, so α can cross the threshold within the minimum search
    weight_decay: float = 1e-4
    form: str = "max"
    schedule: str = "ramp"
    constant_lambda: float = 1.0
    ramp_fraction: float = 0.5  # λ reaches its target at this fraction of the minimum search epochs
    patience: int = 2
    threshold: float = 0.5
    seed: int = 0
    layerwise: float | None = None  # slack C: one layer-memory constraint per critical layer

    @property
    def search_limit(self) -> int:
        return self.max_search_epochs if self.max_search_epochs is not None else 2 * self.search_epochs


@dataclass
class EpochRecord:
    phase: str
    epoch: int
    train_loss: float
    val_loss: float
    val_metric: float
    seconds: float
    costs: dict[str, float] = field(default_factory=dict)
    violations: list[float] = field(default_factory=list)
    lambdas: list[float] = field(default_factory=list)


@dataclass
class SearchResult:
    model: nn.Module  # the exported, fine-tuned model
    searchable: SearchableModel
    constraints: list[Constraint]
    bounds: list[float]
    seed_costs: dict[str, Any]
    final_costs: dict[str, Any]
    seed_metric: float  # validation metric after warmup (all channels)
    search_metric: float  # of the exported model before fine-tuning
    final_metric: float
    history: list[EpochRecord]
    phase_seconds: dict[str, float]
    warmup_cached: bool
    critical: dict[str, str]

    @property
    def violations(self) -> list[float]:
        return [float(c.value(self.final_costs)) - b for c, b in zip(self.constraints, self.bounds)]

    @property
    def met(self) -> bool:
        return all(v <= 1e-9 * max(1.0, abs(b)) for v, b in zip(self.violations, self.bounds))


Progress = Callable[[str, dict[str, Any]], None]


def _seed_everything(seed: int, phase: str, epoch: int) -> None:
    torch.manual_seed(seed * 1_000_003 + PHASES.index(phase) * 10_007 + epoch)


def _move(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DuccioError("a data loader batch must be an (inputs, targets) pair", where="train_loader()/val_loader()",
                          fix="yield (inputs, targets) tuples, e.g. from a torch DataLoader over a TensorDataset")
    return batch[0], batch[1]


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def evaluate_model(model: nn.Module, loader: Iterable[Any], loss_fn: LossFn, metric_fn: MetricFn) -> tuple[float, float]:
    """Sample-weighted mean loss and metric over a loader, in eval mode."""
    was = model.training
    model.eval()
    total = loss_sum = metric_sum = 0.0
    with torch.no_grad():
        for batch in loader:
            x, y = _move(batch)
            out = _call(model, x)
            n = len(y)
            loss_sum += float(loss_fn(out, y)) * n
            metric_sum += float(metric_fn(out, y)) * n
            total += n
    model.train(was)
    if total == 0:
        raise DuccioError("the validation loader yielded no batches", where="val_loader()")
    return loss_sum / total, metric_sum / total


def _fingerprint(model: nn.Module, loader: Iterable[Any], settings: SearchSettings, example: Sequence[Any],
                 graph_code: str = "", loss_name: str = "") -> str:
    """Key of the warmup cache: seed weights, traced graph, loss, data, seed and warmup settings."""
    h = hashlib.sha256()
    h.update(graph_code.encode())
    h.update(loss_name.encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(str(model).encode())
    n = 0
    with torch.random.fork_rng():  # a shuffling loader: same order every time, global RNG untouched
        torch.manual_seed(0)
        for batch in loader:
            x, y = _move(batch)
            for t in list(x if isinstance(x, (tuple, list)) else [x]) + [y]:
                h.update(torch.as_tensor(t).detach().contiguous().numpy().tobytes()[:65536])
            n += 1
    h.update(f"{n}|{settings.warmup_epochs}|{settings.lr}|{settings.weight_decay}|{settings.seed}".encode())
    h.update(str([tuple(e.shape) for e in example]).encode())
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DUCCIO_FX_CACHE", Path.home() / ".cache" / "duccio-fx"))


class Recipe:
    """Runs the recipe on one model; see `optimize()` for the arguments."""

    def __init__(self, model: nn.Module, example_inputs: Sequence[Any], train_loader: Iterable[Any],
                 val_loader: Iterable[Any], constraints: Sequence[Constraint], target: Any = None,
                 settings: SearchSettings | None = None, *, loss_fn: LossFn = cross_entropy,
                 metric_fn: MetricFn = top1, leaf_modules: Sequence[Any] = (), checkpoint: Path | None = None,
                 cache_dir: Path | None = None, progress: Progress | None = None) -> None:
        self.settings = settings or SearchSettings()
        self.model, self.example = model, tuple(example_inputs)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.target = target
        self.loss_fn, self.metric_fn = loss_fn, metric_fn
        self.checkpoint = checkpoint
        self.cache_dir = cache_dir
        self.progress = progress or (lambda event, data: None)
        self.user_constraints = list(constraints)
        torch.manual_seed(self.settings.seed)
        self.sm = make_searchable(model, self.example, threshold=self.settings.threshold, leaf_modules=leaf_modules)
        self.seed_costs = self.sm.cost_values(target)
        self.critical: dict[str, str] = {}
        self.constraints = list(constraints)
        if self.settings.layerwise is not None:
            if target is None or not target.layerwise_levels:
                raise ConstraintError("--layerwise needs a target with a layer-wise memory level",
                                      where="--layerwise", fix="pass --target gap8 (or a target whose level has "
                                                               "layerwise = true)")
            self.critical = critical_layers(self.sm.layer_values(), target, self.settings.layerwise)
            self.constraints += layerwise_constraints(self.critical, target)
        if not self.constraints:
            raise ConstraintError("no constraint given", fix="name at least one bound, e.g. --max-size 50% "
                                                             "or --max-ops 2M (or --layerwise C with a target)")
        self.bounds = [c.resolve(self.seed_costs) for c in self.constraints]
        self.minima = check_feasible(self.sm, self.constraints, self.bounds, target)
        s = self.settings
        self.objective = DuccioObjective(self.constraints, self.bounds, form=s.form, schedule=s.schedule,
                                         ramp_epochs=max(s.ramp_fraction * s.search_epochs, 1e-9),
                                         constant_lambda=s.constant_lambda)
        self.history: list[EpochRecord] = []
        self.phase_seconds = {p: 0.0 for p in PHASES}

    # -- training -----------------------------------------------------------------------------------
    def _weight_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.settings.lr, weight_decay=self.settings.weight_decay)

    def _train_epoch(self, model: nn.Module, opt: torch.optim.Optimizer, phase: str, epoch: int) -> float:
        model.train()
        total = loss_sum = 0.0
        steps = max(len(self.train_loader), 1) if hasattr(self.train_loader, "__len__") else None
        for i, batch in enumerate(self.train_loader):
            x, y = _move(batch)
            task = self.loss_fn(_call(model, x), y)
            loss = task
            if phase == "search":
                frac = epoch + (i / steps if steps else 0.0)
                loss = task + self.objective.penalty(self.sm.costs(self.target), frac).float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(task.detach()) * len(y)
            total += len(y)
            self.progress("step", {"phase": phase, "epoch": epoch, "step": i, "steps": steps,
                                   "loss": float(task.detach())})
        if total == 0:
            raise DuccioError("the training loader yielded no batches", where="train_loader()")
        return loss_sum / total

    def _record(self, phase: str, epoch: int, train_loss: float, model: nn.Module, started: float,
                costs: dict[str, Any] | None = None) -> EpochRecord:
        val_loss, val_metric = evaluate_model(model, self.val_loader, self.loss_fn, self.metric_fn)
        rec = EpochRecord(phase, epoch, train_loss, val_loss, val_metric, time.perf_counter() - started)
        if costs is not None:
            rec.costs = {c.label: float(c.value(costs)) for c in self.constraints}
            rec.violations = self.objective.violations(costs)
            if phase == "search":
                rec.lambdas = self.objective.lambdas(epoch + 1)
        self.history.append(rec)
        self.phase_seconds[phase] += rec.seconds
        self.progress("epoch", {"record": rec, "constraints": self.constraints, "bounds": self.bounds})
        return rec

    # -- phases -------------------------------------------------------------------------------------
    def _warmup(self, state: dict[str, Any] | None = None) -> tuple[float, bool]:
        """Train weights with every channel on; returns (task loss L̂, whether it came from the cache)."""
        s = self.settings
        cache = None
        if self.cache_dir is not None and s.warmup_epochs > 0 and state is None:
            key = _fingerprint(self.model, self.train_loader, s, self.example, self.sm.graph_module.code,
                               getattr(self.loss_fn, "__qualname__", repr(self.loss_fn)))
            cache = Path(self.cache_dir) / "warmup" / f"{key}.pt"
            if cache.exists():
                state = torch.load(cache, weights_only=False)
                self.sm.load_state_dict(state["searchable"])
                self.history.extend(EpochRecord(**r) for r in state["history"])
                self.progress("cached", {"path": str(cache)})
                return state["loss"], True
        for p in self.sm.arch_parameters():
            p.requires_grad_(False)
        opt = self._weight_optimizer(self.sm.weight_parameters())
        loss, start = float("nan"), 0
        if state is not None:
            self.sm.load_state_dict(state["searchable"])
            opt.load_state_dict(state["optimizer"])
            loss, start = state["loss"], state["epoch"] + 1
        for epoch in range(start, s.warmup_epochs):
            _seed_everything(s.seed, "warmup", epoch)
            started = time.perf_counter()
            loss = self._train_epoch(self.sm, opt, "warmup", epoch)
            self._record("warmup", epoch, loss, self.sm, started, self.sm.cost_values(self.target))
            self._save({"phase": "warmup", "epoch": epoch, "searchable": self.sm.state_dict(),
                        "optimizer": opt.state_dict(), "loss": loss})
        for p in self.sm.arch_parameters():
            p.requires_grad_(True)
        if s.warmup_epochs == 0:
            loss, _ = evaluate_model(self.sm, self.train_loader, self.loss_fn, self.metric_fn)
        if cache is not None:
            save_atomic({"searchable": self.sm.state_dict(), "loss": loss,
                         "history": [asdict(r) for r in self.history if r.phase == "warmup"]}, cache)
        return loss, False

    def arch_lr(self) -> float:
        """The α learning rate. Adam moves each α by about lr per step, so the paper's 1e-3 (tuned for ~100
        GPU epochs) could not take a mask from 1 past 0.5 in a short CPU search; `auto` lets α travel about
        4 over the minimum search, within [1e-3, 5e-2]."""
        if self.settings.arch_lr is not None:
            return self.settings.arch_lr
        steps = len(self.train_loader) if hasattr(self.train_loader, "__len__") else 100
        return min(5e-2, max(1e-3, 4.0 / max(1, steps * self.settings.search_epochs)))

    def _search_optimizer(self) -> torch.optim.Optimizer:
        s = self.settings
        return torch.optim.Adam([
            {"params": list(self.sm.weight_parameters()), "weight_decay": s.weight_decay, "lr": s.lr},
            {"params": list(self.sm.arch_parameters()), "weight_decay": 0.0, "lr": self.arch_lr()},
        ])

    def _save(self, state: dict[str, Any]) -> None:
        if self.checkpoint is not None:
            state = dict(state, history=[asdict(r) for r in self.history], phase_seconds=dict(self.phase_seconds),
                         signature=self.signature())
            save_atomic(state, self.checkpoint)

    def signature(self) -> str:
        """What a checkpoint must agree on to be resumed."""
        model = hashlib.sha256((self.sm.graph_module.code + repr(
            [(k, tuple(v.shape)) for k, v in self.sm.state_dict().items()])).encode()).hexdigest()
        return repr((asdict(self.settings), [(c.metric, c.bound, c.relative, c.scope) for c in self.constraints],
                     self.target.name if self.target is not None else None, model))

    def run(self, resume: bool = False) -> SearchResult:
        s = self.settings
        state = self._load_checkpoint() if resume else None
        opt = self._search_optimizer()
        best: dict[str, Any] | None = None
        best_loss, since_best, start_epoch, cached = math.inf, 0, 0, False
        seed_metric = math.nan
        if state is None or state["phase"] == "warmup":
            lhat, cached = self._warmup(state)
            state = None
            _, seed_metric = evaluate_model(self.sm, self.val_loader, self.loss_fn, self.metric_fn)
            self.objective.calibrate(lhat, self.sm.cost_values(self.target))
        else:
            self.sm.load_state_dict(state["searchable"])
            self.objective.load_state_dict(state["objective"])
            seed_metric, cached = state["seed_metric"], state["cached"]
            if state["phase"] == "search":
                opt.load_state_dict(state["optimizer"])
                best, best_loss, since_best = state["best"], state["best_loss"], state["since_best"]
                start_epoch = state["epoch"] + 1

        if state is None or state["phase"] == "search":
            epoch = start_epoch
            while epoch < s.search_limit and not (epoch >= s.search_epochs and best is not None
                                                  and since_best >= s.patience):
                _seed_everything(s.seed, "search", epoch)
                started = time.perf_counter()
                loss = self._train_epoch(self.sm, opt, "search", epoch)
                costs = self.sm.cost_values(self.target)
                rec = self._record("search", epoch, loss, self.sm, started, costs)
                self.objective.escalate(costs, epoch + 1)
                feasible = all(v <= 0 for v in rec.violations)
                if feasible and rec.val_loss < best_loss:
                    best, best_loss, since_best = copy.deepcopy(self.sm.state_dict()), rec.val_loss, 0
                elif best is not None:
                    since_best += 1
                self._save({"phase": "search", "epoch": epoch, "searchable": self.sm.state_dict(),
                            "optimizer": opt.state_dict(), "objective": self.objective.state_dict(), "best": best,
                            "best_loss": best_loss, "since_best": since_best, "seed_metric": seed_metric,
                            "cached": cached})
                epoch += 1
            if best is not None:
                self.sm.load_state_dict(best)
            exported = self.sm.export()
            search_loss, search_metric = evaluate_model(exported, self.val_loader, self.loss_fn, self.metric_fn)
            ft_start, ft_opt = 0, self._weight_optimizer(exported.parameters())
            ft_best, ft_best_loss = copy.deepcopy(exported.state_dict()), search_loss
        else:
            exported, search_metric = state["exported"], state["search_metric"]
            ft_opt = self._weight_optimizer(exported.parameters())
            ft_opt.load_state_dict(state["optimizer"])
            ft_start = state["epoch"] + 1
            ft_best, ft_best_loss = state["ft_best"], state["ft_best_loss"]

        for epoch in range(ft_start, s.finetune_epochs):  # keeps the weights of the best validation loss
            _seed_everything(s.seed, "finetune", epoch)
            started = time.perf_counter()
            loss = self._train_epoch(exported, ft_opt, "finetune", epoch)
            rec = self._record("finetune", epoch, loss, exported, started)
            if rec.val_loss < ft_best_loss:
                ft_best, ft_best_loss = copy.deepcopy(exported.state_dict()), rec.val_loss
            self._save({"phase": "finetune", "epoch": epoch, "exported": exported, "optimizer": ft_opt.state_dict(),
                        "searchable": self.sm.state_dict(), "objective": self.objective.state_dict(),
                        "search_metric": search_metric, "seed_metric": seed_metric, "cached": cached,
                        "ft_best": ft_best, "ft_best_loss": ft_best_loss})
        exported.load_state_dict(ft_best)
        _, final_metric = evaluate_model(exported, self.val_loader, self.loss_fn, self.metric_fn)
        exported.eval()
        final_costs = exported_costs(exported, self.example, self.target)
        return SearchResult(exported, self.sm, self.constraints, self.bounds, self.seed_costs, final_costs,
                            seed_metric, search_metric, final_metric, list(self.history), dict(self.phase_seconds),
                            cached, self.critical)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        if self.checkpoint is None or not self.checkpoint.exists():
            return None
        state = torch.load(self.checkpoint, weights_only=False)
        if state.get("signature") != self.signature():
            raise DuccioError("the checkpoint was written by a run with another model, settings or constraints",
                              where=str(self.checkpoint),
                              fix="resume with the same options, or start a new run in another --out directory")
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.phase_seconds = dict(state["phase_seconds"])
        return state


def exported_costs(model: nn.Module, example_inputs: Sequence[Any], target: Any = None) -> dict[str, Any]:
    """Costs of a plain (exported) model, measured on its own graph: what the constraints are checked on."""
    from duccio_fx.pipeline import analyze

    values = evaluate(layer_terms(analyze(model, tuple(x[:1] for x in example_inputs)), {}), ())
    costs: dict[str, Any] = {"params": float(sum(v.params for v in values)), "macs": float(sum(v.macs for v in values)),
                             "layer_memory": {v.term.name: float(v.elements) for v in values}}
    if target is not None:
        costs.update(as_float(target_costs(values, target)))
    return costs


def optimize(model: nn.Module, example_inputs: Sequence[Any], train_loader: Iterable[Any], val_loader: Iterable[Any],
             constraints: Sequence[Constraint], target: Any = None, settings: SearchSettings | None = None,
             resume: bool = False, **kwargs: Any) -> SearchResult:
    """Warmup, search, export and fine-tune `model` (a copy) under `constraints`; see `Recipe`."""
    from duccio_fx.targets import load_target

    hw = load_target(target) if target is not None else None
    return Recipe(model, example_inputs, train_loader, val_loader, constraints, hw, settings, **kwargs).run(resume)
