"""The one-shot recipe: warmup → search under every constraint → export → fine-tune.

* Warmup trains the weights with the seed architecture. It does not depend on the constraints, so its
  result is cached (`warmup_cache`) and reused by the next search of the same model and data.
* Search trains weights and architecture parameters (separate parameter groups, no weight decay on the
  architecture) with the DUCCIO penalty. It runs at least `search_epochs`, then goes on while a constraint
  is violated or the validation loss of feasible epochs is still improving (patience), up to
  `max_search_epochs`. The best feasible epoch (lowest validation loss with every constraint met) is exported.
* Fine-tune trains the exported, physically smaller model (weights only) and keeps the weights of its best
  validation loss (the exported weights themselves count as a candidate).

The recipe talks to the search method only through the `SearchSpace` protocol. Every epoch ends with an
atomic checkpoint; `resume=True` continues from it. Each epoch reseeds the RNG from (seed, phase, epoch),
so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from duccio_fx.common.device import resolve_amp, resolve_device, to_device
from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.memory import critical_layers, critical_slack, layer_bytes
from duccio_fx.costs.model import Costs
from duccio_fx.costs.terms import LayerValues, evaluate
from duccio_fx.ir.meta import LayerTerm, layer_terms
from duccio_fx.ir.pass_manager import PassContext
from duccio_fx.ir.precision import fake_quantize_weights
from duccio_fx.ir.tracer import LeafSpec
from duccio_fx.pipeline import analyze, graph_costs
from duccio_fx.search.checkpoint import Checkpoint
from duccio_fx.search.constraints import Constraint, ConstraintError, ResolvedConstraint, layerwise_constraints
from duccio_fx.search.distributed import (ShardedLoader, average_gradients, broadcast_module, init_world,
                                          rank_device, sum_over_ranks)
from duccio_fx.search.feasibility import check_feasible
from duccio_fx.search.objective import DuccioObjective
from duccio_fx.search.precision import bake_precision
from duccio_fx.search.settings import SearchSettings
from duccio_fx.search.space import SearchSpace, make_searchable
from duccio_fx.search.training import (PHASES, LossFn, MetricFn, StepLosses, batch_where, check_first_batch,
                                       cross_entropy, evaluate_model, loss_on_batch, recalibrate_batchnorm,
                                       seed_everything, split_batch, top1)
from duccio_fx.search.warmup_cache import WarmupCache, fingerprint
from duccio_fx.targets import Target, load_target


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
    architecture: dict[str, Any] = field(default_factory=dict)  # search epochs: the method's summary (path: choices)


@dataclass
class SearchResult:
    model: nn.Module  # the exported, fine-tuned model
    searchable: SearchSpace
    constraints: list[ResolvedConstraint]
    seed_costs: Costs
    final_costs: Costs  # measured on the exported model's own graph
    seed_metric: float  # validation metric after warmup (the seed architecture)
    search_metric: float  # of the exported model before fine-tuning
    final_metric: float
    history: list[EpochRecord]
    phase_seconds: dict[str, float]
    warmup_cached: bool
    critical: dict[str, str]
    final_terms: list[LayerTerm] = field(default_factory=list)  # the exported model's layers
    # the search epoch whose architecture was exported (EpochRecord.epoch, counted from 0) and whether it met
    # every constraint (the best feasible epoch), or the last one when no epoch did
    exported_epoch: int | None = None
    exported_feasible: bool = False

    @property
    def bounds(self) -> list[float]:
        return [c.bound for c in self.constraints]

    @property
    def violations(self) -> list[float]:
        return [c.violation(self.final_costs) for c in self.constraints]

    @property
    def met(self) -> bool:
        return all(c.met(self.final_costs) for c in self.constraints)


# progress(event, data): "step" {phase, epoch, step, steps, loss}, "epoch" {record, constraints},
# "cached" {path} (the warmup came from the cache), "resumed" {phase, epoch} (the checkpoint's last epoch),
# "done" {phase, epochs} (a phase ended after `epochs`)
Progress = Callable[[str, dict[str, Any]], None]


class Recipe:
    """Runs the recipe on one model; see `optimize()` for the arguments."""

    def __init__(self, model: nn.Module, example_inputs: Sequence[Any], train_loader: Iterable[Any],
                 val_loader: Iterable[Any], constraints: Sequence[Constraint], target: Target | str | None = None,
                 settings: SearchSettings | None = None, *, loss_fn: LossFn = cross_entropy,
                 metric_fn: MetricFn = top1, leaf_modules: Sequence[LeafSpec] = (), checkpoint: Path | None = None,
                 cache_dir: Path | None = None, progress: Progress | None = None,
                 context: PassContext | None = None, device: str | torch.device | None = "auto",
                 amp: str | None = None) -> None:
        self.settings = settings or SearchSettings()
        self.device = resolve_device(device)
        self.world = init_world(self.device)  # a single process, or one rank of a torchrun launch
        self.device = rank_device(self.device, self.world)
        self.amp = resolve_amp(amp, self.device)
        self.amp_name = str(self.amp).removeprefix("torch.") if self.amp is not None else None  # e.g. bfloat16
        self.model, self.example = model, tuple(example_inputs)
        self.train_loader, self.val_loader = train_loader, val_loader
        # the batches this rank trains on (all of them in a single process)
        self.train_batches = ShardedLoader(train_loader, self.world, self.settings.seed) if self.world.active \
            else train_loader
        self.target = target = load_target(target) if target is not None else None  # a name or a TOML path too
        self.loss_fn, self.metric_fn = loss_fn, metric_fn
        self.cache_dir = cache_dir
        self.progress = progress or (lambda event, data: None)
        self.context = context or PassContext()  # the user's instruments see every pass of the flow
        s = self.settings
        torch.manual_seed(s.seed)
        self.space = make_searchable(model, self.example, s.method, leaf_modules=leaf_modules, context=self.context,
                                     **s.method_options)
        self.space.to(self.device)  # the model, its masks or choices, and so its costs
        broadcast_module(self.space, self.world)
        self.example = to_device(self.example, self.device)
        for loader, name in ((train_loader, "train_loader"), (val_loader, "val_loader")):
            check_first_batch(self.space, loader, name, self.example, loss_fn, self.device)
        self.seed_costs = self.space.cost_values(target)
        self.critical: dict[str, str] = {}
        self.notes: list[str] = []  # what the user should know before training (printed by the CLI)
        self.constraints: list[ResolvedConstraint] = [c.resolve(self.seed_costs) for c in constraints]
        if s.layerwise is not None:
            if target is None or not target.layerwise_levels:
                raise ConstraintError("--layerwise needs a target with a layer-wise memory level",
                                      where="--layerwise", fix="pass --target gap8 (or a target whose level has "
                                                               "layerwise = true)")
            candidates = evaluate(self.space.layer_candidates())
            self.critical = critical_layers(candidates, target, s.layerwise)
            self.constraints += layerwise_constraints(self.critical, target)
            if not self.critical:
                self.notes.append(no_critical_layer_note(candidates, target, s.layerwise))
        if not self.constraints:
            raise ConstraintError("no constraint given" + (f": {self.notes[0]}" if self.notes else ""),
                                  fix="name at least one bound, e.g. --max-size 50% or --max-ops 2M (or "
                                      "--layerwise C with a target)")
        self.minima = check_feasible(self.space, self.constraints, target)
        self.objective = DuccioObjective(self.constraints, form=s.form, schedule=s.schedule,
                                         ramp_epochs=max(s.ramp_fraction * s.search_epochs, 1e-9),
                                         constant_lambda=s.constant_lambda)
        self.history: list[EpochRecord] = []
        self.phase_seconds = {p: 0.0 for p in PHASES}
        self.checkpoint = Checkpoint(checkpoint, self.signature(), self.device)

    # -- training -----------------------------------------------------------------------------------
    def _weight_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.settings.lr, weight_decay=self.settings.weight_decay)

    def _train_epoch(self, model: nn.Module, opt: torch.optim.Optimizer, phase: str, epoch: int) -> float:
        model.train()
        losses = StepLosses(self.device)
        steps = max(len(self.train_batches), 1) if hasattr(self.train_batches, "__len__") else None
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp is torch.float16)
        params = [p for group in opt.param_groups for p in group["params"]]
        if isinstance(self.train_batches, ShardedLoader):
            self.train_batches.set_epoch(PHASES.index(phase) * 10_007 + epoch)
        for i, batch in enumerate(self.train_batches):
            x, y = to_device(split_batch(batch), self.device)
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                _, task = loss_on_batch(model, x, y, self.loss_fn, where=batch_where(
                    f"{phase} epoch {epoch + 1}", i, steps, "train_loader()", x, y))
            loss = task.float()
            if phase == "search":  # the costs stay in float64, outside autocast
                frac = epoch + (i / steps if steps else 0.0)
                loss = loss + self.space.penalty(self.objective, self.target, frac).float()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            average_gradients(params, self.world)  # every rank applies the same update
            scaler.step(opt)
            scaler.update()
            losses.add(task, len(y))  # no host sync in the step: the loss is summed on the device
            self.progress("step", {"phase": phase, "epoch": epoch, "step": i, "steps": steps,
                                   "loss": losses.latest()})
        if losses.count == 0:
            raise DuccioError("the training loader yielded no batches", where="train_loader()")
        loss_sum, total = sum_over_ranks(list(losses.mean()), self.world, self.device)
        return loss_sum / total

    def _record(self, phase: str, epoch: int, train_loss: float, model: nn.Module, started: float,
                costs: Costs | None = None) -> EpochRecord:
        if phase == "search" or (phase == "warmup" and self.space.recalibrate_in_warmup):
            recalibrate_batchnorm(model, self.train_loader, self.settings.bn_recalibration_batches, self.device)
        val_loss, val_metric = evaluate_model(model, self.val_loader, self.loss_fn, self.metric_fn, self.device,
                                              during=f"{phase} epoch {epoch + 1}")
        rec = EpochRecord(phase, epoch, train_loss, val_loss, val_metric, time.perf_counter() - started)
        if costs is not None:
            rec.costs = {c.label: float(c.value(costs)) for c in self.constraints}
            rec.violations = self.objective.violations(costs)
            if phase == "search":
                rec.lambdas = self.objective.lambdas(epoch + 1)
                rec.architecture = self.space.architecture()
        self.history.append(rec)
        self.phase_seconds[phase] += rec.seconds
        self.progress("epoch", {"record": rec, "constraints": self.constraints})
        return rec

    # -- phases -------------------------------------------------------------------------------------
    def _warmup(self, state: dict[str, Any] | None = None) -> tuple[float, bool]:
        """Train the weights of the seed architecture; returns (task loss L̂, whether it came from the cache)."""
        s = self.settings
        cache = None
        if self.cache_dir is not None and s.warmup_epochs > 0 and state is None:
            key = fingerprint(self.model, self.train_loader, s, self.example,
                              self.space.structure() + f"|ranks {self.world.size}",  # the global batch differs
                              getattr(self.loss_fn, "__qualname__", repr(self.loss_fn)), amp=self.amp_name)
            cache = WarmupCache(self.cache_dir, key, map_location=self.device)
            cached = cache.load()
            if cached is not None:
                self.space.load_state(cached["searchable"])
                self.history.extend(EpochRecord(**r) for r in cached["history"])
                self.progress("cached", {"path": str(cache.path)})
                return cached["loss"], True
        for p in self.space.arch_parameters():
            p.requires_grad_(False)
        opt = self._weight_optimizer(self.space.weight_parameters())
        loss, start = float("nan"), 0
        if state is not None:
            self.space.load_state(state["searchable"])
            opt.load_state_dict(state["optimizer"])
            loss, start = state["loss"], state["epoch"] + 1
        for epoch in range(start, s.warmup_epochs):
            seed_everything(s.seed, "warmup", epoch)
            self.space.on_warmup_epoch(epoch, s.warmup_epochs)
            started = time.perf_counter()
            loss = self._train_epoch(self.space, opt, "warmup", epoch)
            self._record("warmup", epoch, loss, self.space, started, self.space.cost_values(self.target))
            self._save({"phase": "warmup", "epoch": epoch, "searchable": self.space.state(),
                        "optimizer": opt.state_dict(), "loss": loss})
        self.progress("done", {"phase": "warmup", "epochs": s.warmup_epochs})
        for p in self.space.arch_parameters():
            p.requires_grad_(True)
        if s.warmup_epochs == 0:
            loss, _ = evaluate_model(self.space, self.train_loader, self.loss_fn, self.metric_fn, self.device,
                                     name="train_loader()", during="the task loss after warmup")
        if cache is not None and self.world.main:
            cache.store(self.space.state(), loss, [asdict(r) for r in self.history if r.phase == "warmup"])
        return loss, False

    def arch_lr(self) -> float:
        """The architecture learning rate. Adam moves each θ by about lr per step, so the paper's 1e-3 (tuned
        for ~100 GPU epochs) could not take a mask from 1 past 0.5 in a short CPU search; `auto` lets θ travel
        about 4 over the minimum search, within [1e-3, 5e-2]."""
        if self.settings.arch_lr is not None:
            return self.settings.arch_lr
        steps = len(self.train_batches) if hasattr(self.train_batches, "__len__") else 100
        return min(5e-2, max(1e-3, 4.0 / max(1, steps * self.settings.search_epochs)))

    def _search_optimizer(self) -> torch.optim.Optimizer:
        s = self.settings
        return torch.optim.Adam([
            {"params": list(self.space.weight_parameters()), "weight_decay": s.weight_decay, "lr": s.lr},
            {"params": list(self.space.arch_parameters()), "weight_decay": 0.0, "lr": self.arch_lr()},
        ])

    def _save(self, state: dict[str, Any]) -> None:
        if not self.world.main:
            return  # rank 0 writes; the others hold the same state
        self.checkpoint.save(dict(state, history=[asdict(r) for r in self.history],
                                  phase_seconds=dict(self.phase_seconds)))

    def signature(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed, one entry per setting (named as in SearchSettings)."""
        model = hashlib.sha256((self.space.structure() + repr(
            [(k, tuple(v.shape)) for k, v in self.space.state_dict().items()])).encode()).hexdigest()
        signature = {**asdict(self.settings),
                     "constraints": [(c.label, c.bound, c.constraint.relative) for c in self.constraints],
                     "target": self.target.name if self.target is not None else None,
                     "model": model[:16], "ranks": self.world.size}
        if self.amp_name is not None:  # absent for full precision, so earlier checkpoints still resume
            signature["amp"] = self.amp_name
        return signature

    def run(self, resume: bool = False) -> SearchResult:
        s = self.settings
        state = self._load_checkpoint() if resume else None
        if state is not None:
            self.progress("resumed", {"phase": state["phase"], "epoch": state["epoch"]})
        opt = self._search_optimizer()
        best: dict[str, Any] | None = None
        best_loss, since_best, start_epoch, cached = math.inf, 0, 0, False
        best_epoch: int | None = None
        seed_metric = math.nan
        if state is None or state["phase"] == "warmup":
            lhat, cached = self._warmup(state)
            self.space.on_search_start()
            state = None
            _, seed_metric = evaluate_model(self.space, self.val_loader, self.loss_fn, self.metric_fn, self.device,
                                            during="the seed's validation after warmup")
            self.objective.calibrate(lhat, self.space.cost_values(self.target))
        else:
            self.space.load_state(state["searchable"])
            self.objective.load_state_dict(state["objective"])
            seed_metric, cached = state["seed_metric"], state["cached"]
            if state["phase"] == "search":
                opt.load_state_dict(state["optimizer"])
                best, best_loss, since_best = state["best"], state["best_loss"], state["since_best"]
                best_epoch = state.get("best_epoch")
                start_epoch = state["epoch"] + 1

        if state is None or state["phase"] == "search":
            epoch = start_epoch
            while epoch < s.search_limit and not (epoch >= s.search_epochs and best is not None
                                                  and since_best >= s.patience):
                seed_everything(s.seed, "search", epoch)
                self.space.on_epoch(epoch)
                started = time.perf_counter()
                loss = self._train_epoch(self.space, opt, "search", epoch)
                costs = self.space.cost_values(self.target)
                rec = self._record("search", epoch, loss, self.space, started, costs)
                self.objective.escalate(costs, epoch + 1)
                feasible = all(v <= 0 for v in rec.violations)
                if feasible and rec.val_loss < best_loss:
                    best, best_loss, since_best = copy.deepcopy(self.space.state()), rec.val_loss, 0
                    best_epoch = epoch
                elif best is not None:
                    since_best += 1
                self._save({"phase": "search", "epoch": epoch, "searchable": self.space.state(),
                            "optimizer": opt.state_dict(), "objective": self.objective.state_dict(), "best": best,
                            "best_loss": best_loss, "since_best": since_best, "best_epoch": best_epoch,
                            "seed_metric": seed_metric, "cached": cached})
                epoch += 1
            self.progress("done", {"phase": "search", "epochs": epoch})  # may stop before the limit
            if best is not None:
                self.space.load_state(best)
            exported_epoch, exported_feasible = (best_epoch, True) if best is not None else (epoch - 1, False)
            exported = self.space.export(self.context)
            fake_quantize_weights(exported)  # layers with a searched precision fine-tune on its grid (QAT)
            search_loss, search_metric = evaluate_model(exported, self.val_loader, self.loss_fn, self.metric_fn,
                                                        self.device, during="the exported model's validation")
            ft_start, ft_opt = 0, self._weight_optimizer(exported.parameters())
            ft_best, ft_best_loss = copy.deepcopy(exported.state_dict()), search_loss
        else:
            exported, search_metric = state["exported"], state["search_metric"]
            exported_epoch, exported_feasible = state.get("exported_epoch"), bool(state.get("exported_feasible"))
            ft_opt = self._weight_optimizer(exported.parameters())
            ft_opt.load_state_dict(state["optimizer"])
            ft_start = state["epoch"] + 1
            ft_best, ft_best_loss = state["ft_best"], state["ft_best_loss"]

        for epoch in range(ft_start, s.finetune_epochs):  # keeps the weights of the best validation loss
            seed_everything(s.seed, "finetune", epoch)
            started = time.perf_counter()
            loss = self._train_epoch(exported, ft_opt, "finetune", epoch)
            rec = self._record("finetune", epoch, loss, exported, started)
            if rec.val_loss < ft_best_loss:
                ft_best, ft_best_loss = copy.deepcopy(exported.state_dict()), rec.val_loss
            self._save({"phase": "finetune", "epoch": epoch, "exported": exported, "optimizer": ft_opt.state_dict(),
                        "searchable": self.space.state(), "objective": self.objective.state_dict(),
                        "search_metric": search_metric, "seed_metric": seed_metric, "cached": cached,
                        "ft_best": ft_best, "ft_best_loss": ft_best_loss, "exported_epoch": exported_epoch,
                        "exported_feasible": exported_feasible})
        self.progress("done", {"phase": "finetune", "epochs": s.finetune_epochs})
        exported.load_state_dict(ft_best)
        bake_precision(exported)  # plain modules, weights on their grids, activation ranges on their layers
        _, final_metric = evaluate_model(exported, self.val_loader, self.loss_fn, self.metric_fn, self.device,
                                         during="the final validation")
        exported.eval()
        final = analyze(exported, tuple(x[:1] for x in self.example), context=self.context)  # costs of the result
        final_terms = layer_terms(final)
        return SearchResult(exported, self.space, self.constraints, self.seed_costs, graph_costs(final, self.target),
                            seed_metric, search_metric, final_metric, list(self.history), dict(self.phase_seconds),
                            cached, self.critical, final_terms, exported_epoch=exported_epoch,
                            exported_feasible=exported_feasible)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        state = self.checkpoint.load()
        if state is None:
            return None
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.phase_seconds = dict(state["phase_seconds"])
        return state


def no_critical_layer_note(values: Sequence[LayerValues], target: Target, slack: float) -> str:
    """Why --layerwise C added no constraint, and which C would."""
    over = sorted(((found[1], v, found[0]) for v in values if (found := critical_slack(v, target)) is not None),
                  key=lambda t: t[0])
    if not over:
        return (f"--layerwise {slack:g} adds no constraint: every layer already fits "
                f"{', '.join(m.name for m in target.layerwise_levels)}")
    c, v, level = over[0]
    need = float(layer_bytes(v, target, target.level(level)))
    return (f"--layerwise {slack:g} adds no constraint: no layer overflows {level} by at most "
            f"{slack * 100:g} %; the smallest C that makes a layer critical is {math.ceil(c * 1000 - 1e-9) / 1000:g} "
            f"('{v.term.name}', {need:,.0f} B against {target.level(level).usable:,.0f} B usable)")


def optimize(model: nn.Module, example_inputs: Sequence[Any], train_loader: Iterable[Any], val_loader: Iterable[Any],
             constraints: Sequence[Constraint], target: Target | str | None = None,
             settings: SearchSettings | None = None, resume: bool = False, **kwargs: Any) -> SearchResult:
    """Warmup, search, export and fine-tune `model` (a copy) under `constraints`; see `Recipe`."""
    hw = load_target(target) if target is not None else None
    return Recipe(model, example_inputs, train_loader, val_loader, constraints, hw, settings, **kwargs).run(resume)
