"""The path-based search method (DUCCIO's supernet DNAS): one choice among alternatives per eligible block.

    sp = duccio_fx.make_searchable(model, example_input, method="path")   # supernet-insertion runs here
    sp.costs("gap8")                                                         # Σ g_i · cost_i (cost_mode's g)
    loss = task_loss + sp.penalty(objective, "gap8", epoch)                 # a DuccioObjective's (cost_mode's)
    small = sp.export()                                                      # the argmax alternatives, plain

Options (`method_options` / CLI): `alternatives` (names and `PATTERN=names` rules), `estimator` ("all" or
"sampled"), `cost_mode` ("sampled": the one-hot g of the forward pass, paper eq. 8; "expected": softmax(θ);
"argmax": the costs of the architecture the search holds, every point's argmax, with the gradient of
softmax(θ); "neighbours": the penalty of the architecture held, with the gradient of the expected penalty of
the architectures one point away from it, see `PathSpace.penalty`), `temperature` (τ at the first search
epoch), `temperature_decay` (τ multiplies by it every epoch; 1 keeps it constant), `warmup_seed_share` (see
below), `seed_logit` (θ of every point's seed alternative when the search starts, the others 0) and
`argmax_share` (the share of the search's steps that run every point's argmax alternative, training the
weights of the architecture held, instead of a draw).

The path method's defaults are "neighbours" costs, seed logit 2 and argmax share 0.5 (the paper's:
"sampled", 0, 0). Measured on Fashion-MNIST (ResNet-8, 2 warmup, 6 search, 2 fine-tune epochs, seeds 0 and
1), the paper's settings ended 3 points under the seed at 50 % and 75 % size, although their architecture
trained from scratch beat the seed: the search trained it badly. Each step ran a random path (θ = 0: uniform
over 4 alternatives at 6 points), so the architecture held was rarely trained, and the costs of random paths
were over a bound the architecture held already met, so the search kept cutting (to 40 % of the seed at a
75 % bound). Argmax steps keep the held architecture trained; the held architecture's own costs put the
penalty on exactly what would be exported; and with seed logit 2 the points do not all flip at the first
step of the penalty (with ties at θ = 0 any move flips an argmax).

Why "neighbours" rather than "argmax" costs: argmax costs push every point toward its cheapest alternative
for as long as the held architecture is over a bound (their gradient is p_i · (cost_i − E cost)), and stop
the moment it is within: whichever cheap alternative flips first wins, even where a dearer one would also
meet the bound (identity over dwsep3 in the MNIST example at 75 %), and near a bound the search took turns
between an architecture just over it and one under it (MNIST at 25 %). With "neighbours", every flip that
meets the bounds is worth the same to the penalty, so the task loss chooses among them; a flip that breaks a
bound costs its whole metric, so a feasible architecture is held. On the MNIST example at 25 % this is 0.966
against 0.927 (benchmarks/README.md).

The warmup (θ frozen) trains the supernet on whole paths: each step runs the seed's path with probability
`warmup_seed_share` (default 0.5) and otherwise an alternative drawn uniformly at every point, and the last
third of the warmup epochs (at least one) runs the seed's path only. Uniform sampling throughout, as before,
left the seed's path at 0.42 validation accuracy after a 3-epoch warmup on the MNIST example (the mask
warmup: 0.95), since with so few steps every alternative stays undertrained and drags the shared layers
along; with this schedule the seed's path reaches 0.947, so the search starts, as the mask method does, from
a trained seed. BatchNorm statistics are re-estimated for the seed's path before each warmup validation.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.mixture import CostMixture
from duccio_fx.costs.model import Costs
from duccio_fx.costs.program import plain_costs
from duccio_fx.ir.meta import ChoiceInfo, LayerTerm, choice_info, duccio_meta, layer_term, layer_terms, restore_meta
from duccio_fx.ir.pass_manager import PassContext
from duccio_fx.ir.tracer import LeafSpec
from duccio_fx.passes.choice_export import ChoiceExport
from duccio_fx.passes.supernet_insertion import SupernetInsertion
from duccio_fx.pipeline import analyze
from duccio_fx.search.alternatives import AlternativeSelection
from duccio_fx.search.choice import Choice
from duccio_fx.search.choice_point import ESTIMATORS, ChoiceBank, ChoicePoint
from duccio_fx.search.constraints import ResolvedConstraint
from duccio_fx.search.objective import DuccioObjective
from duccio_fx.search.space import SearchSpace, register_search_method
from duccio_fx.targets import Target, load_target

COST_MODES = ("sampled", "expected", "argmax", "neighbours")
PATH_METHODS = ("path", "path+mask")  # the methods built on a supernet of choice points (they take its options)
# each method's defaults of the options they share (why: this module's and path_mask_method's docstrings)
PATH_DEFAULTS: dict[str, dict[str, Any]] = {
    "path": {"cost_mode": "neighbours", "seed_logit": 2.0, "argmax_share": 0.5},
    "path+mask": {"cost_mode": "expected", "seed_logit": 2.0, "argmax_share": 0.0}}


class PathSpace(SearchSpace):
    """A supernet: fixed layers plus `ChoicePoint`s, each with a logit vector θ over its alternatives."""

    recalibrate_in_warmup = True  # the warmup's paths share BatchNorms (the fixed layers', the seed path's)

    def __init__(self, graph_module: GraphModule, fixed: dict[str, str], seed_terms: Sequence[LayerTerm],
                 cost_mode: str = "sampled", temperature: float = 5.0, temperature_decay: float = 0.8,
                 warmup_seed_share: float = 0.5, dropped: dict[str, dict[str, str]] | None = None,
                 seed_logit: float = 0.0, argmax_share: float = 0.0) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.fixed = dict(fixed)
        self.dropped = dict(dropped or {})  # point → {alternative of the default set not offered: why}
        self._seed_terms = list(seed_terms)
        self.cost_mode = cost_mode
        self.temperature, self.temperature_decay = temperature, temperature_decay
        self.warmup_seed_share = warmup_seed_share
        self.seed_logit = seed_logit
        # graph order: a fixed layer's term, or a choice point's info
        self.layout: list[LayerTerm | ChoiceInfo] = [x for n in graph_module.graph.nodes
                                                     if (x := layer_term(n) or choice_info(n)) is not None]
        self.infos = [x for x in self.layout if isinstance(x, ChoiceInfo)]
        points = self.points()
        self.choice_bank = ChoiceBank([len(p.names) for p in points])  # every point's θ, one flat vector
        self.choice_bank.argmax_share = argmax_share
        for i, p in enumerate(points):
            p.bind(self.choice_bank, i)
        self._register_load_state_dict_pre_hook(_one_theta, with_module=True)
        self._meta = duccio_meta(graph_module)
        self._mixtures: dict[str | None, CostMixture] = {}
        self._slopes: dict[tuple[str | None, str, torch.device], torch.Tensor] = {}  # see _slope
        self.on_epoch(0)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        restore_meta(self.graph_module, self._meta)
        for i, p in enumerate(self.points()):  # (a copy's points read the copy's bank)
            p.bind(self.choice_bank, i)

    # -- the model -------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    def points(self) -> list[ChoicePoint]:
        """The choice points, in graph order."""
        return [self.graph_module.get_submodule(info.point) for info in self.infos]

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        """The θ of every point, one flat vector (train it without weight decay)."""
        return iter([self.choice_bank.theta])

    def on_epoch(self, epoch: int) -> None:
        """τ = temperature · temperature_decay^epoch."""
        self.choice_bank.temperature = self.temperature * self.temperature_decay ** epoch

    def on_warmup_epoch(self, epoch: int, epochs: int) -> None:
        """Whole paths, the seed's with probability `warmup_seed_share`; the last third of the epochs the seed's
        path only (see the module's docstring)."""
        seed_only = max(1, round(epochs / 3))
        self.choice_bank.seed_share = 1.0 if epoch >= epochs - seed_only else self.warmup_seed_share

    def on_search_start(self) -> None:
        """θ of every point's seed alternative starts at `seed_logit`, the others at 0 (see the module's
        docstring)."""
        with torch.no_grad():
            self.choice_bank.theta.zero_().index_fill_(0, self.choice_bank.start, self.seed_logit)

    def choices(self) -> dict[str, str]:
        """The alternative each point uses in evaluation and export (argmax θ)."""
        return {info.point: p.names[p.chosen()] for info, p in zip(self.infos, self.points())}

    def set_choices(self, choices: dict[str, str]) -> None:
        """Make these alternatives the argmax (θ = 1 on the chosen one, 0 elsewhere)."""
        points = dict(zip((i.point for i in self.infos), self.points()))
        for name, alt in choices.items():
            if name not in points:
                raise DuccioError(f"no choice point named {name!r}", where="PathSpace.set_choices",
                                  fix=f"use one of: {', '.join(points)}")
            p = points[name]
            if alt not in p.names:
                raise DuccioError(f"choice point {name!r} has no alternative {alt!r}", where="PathSpace.set_choices",
                                  fix=f"use one of: {', '.join(p.names)}")
            with torch.no_grad():
                p.theta.copy_(torch.nn.functional.one_hot(torch.tensor(p.names.index(alt)), len(p.names)))

    def resample(self) -> None:
        """Draw a new g at every point without running the model (the next training forward pass uses it)."""
        self.choice_bank.draw()

    def architecture(self) -> dict[str, Any]:
        return {info.point: {"choice": p.names[p.chosen()],
                             "probabilities": dict(zip(p.names, (round(float(x), 6) for x in p.probabilities())))}
                for info, p in zip(self.infos, self.points())}

    # -- costs -------------------------------------------------------------------------------------------
    def _mixture(self, target: Target | None) -> CostMixture:
        key = target.name if target is not None else None
        if key not in self._mixtures:
            fixed = [x for x in self.layout if isinstance(x, LayerTerm)]
            options = [[o.terms for o in info.options] for info in self.infos]
            self._mixtures[key] = CostMixture(fixed, options, target)
        return self._mixtures[key]

    def _weights(self) -> torch.Tensor:
        """Every point's weights over its alternatives, one flat vector: the g of the last draw in training
        (softmax(θ) with cost_mode="expected"), the argmax in evaluation."""
        bank = self.choice_bank
        if not self.training or bank.sample is None:
            return bank.argmax()
        if self.cost_mode in ("argmax", "neighbours"):
            p = bank.probabilities()
            return bank.argmax() - p.detach() + p
        return bank.probabilities() if self.cost_mode == "expected" else bank.sample

    def costs(self, target: Target | str | None = None) -> Costs:
        """Fixed layers + Σ_points Σ_i g_i · cost(alternative i), with the g of the last forward pass in
        training (softmax(θ) with cost_mode="expected") and the argmax in evaluation; differentiable w.r.t. θ.
        Per-layer tables name layers as the exported model will (alternatives not taken read 0)."""
        hw = load_target(target) if target is not None else None
        return self._mixture(hw).weighted(self._weights())

    def penalty(self, objective: DuccioObjective, target: Target | str | None, epoch: float) -> torch.Tensor:
        """With cost_mode="neighbours" (in training): the objective's penalty of the architecture held, with
        the gradient of Σ_k E_{i∼softmax(θ_k)} Σ_j λ_j · R_j · [R_j > T_j], R_j the metric of constraint j on the
        held architecture with point k at alternative i (a neighbour): a neighbour within every bound costs
        nothing, one over a bound its whole metric. Otherwise the objective's penalty on `costs(target)`."""
        bank = self.choice_bank
        if self.cost_mode != "neighbours" or not self.training or bank.sample is None:
            return super().penalty(objective, target, epoch)
        mixture = self._mixture(load_target(target) if target is not None else None)
        held = bank.argmax().to(torch.float64)
        costs = mixture.weighted(held)
        # every metric is linear in the option weights, so a neighbour's value is the held architecture's plus
        # the slope of its option minus that of the option its point holds now
        n = len(bank.sizes)
        neighbour_penalties = held.new_zeros(held.shape)
        for lam, c in zip(objective.lambdas(epoch), objective.constraints):
            slope = self._slope(mixture, c, held.device)
            held_slope = held.new_zeros(n).index_add(0, bank.segment, slope * held)[bank.segment]
            value = c.value(costs) + slope - held_slope
            neighbour_penalties += lam * torch.where(value > c.bound, value, 0.0)
        expected = (bank.probabilities().to(torch.float64) * neighbour_penalties).sum()
        return objective.penalty(costs, epoch) + expected - expected.detach()

    def _slope(self, mixture: CostMixture, constraint: ResolvedConstraint, device: torch.device) -> torch.Tensor:
        """∂R/∂w of the constraint's metric R over the option weights w (a constant: R is linear in w)."""
        key = (mixture.target.name if mixture.target is not None else None, constraint.label, device)
        if key not in self._slopes:
            with torch.enable_grad():
                w = torch.zeros(mixture.width, dtype=torch.float64, requires_grad=True)
                value = torch.as_tensor(constraint.value(mixture.weighted(w)), dtype=torch.float64)
                slope = (torch.autograd.grad(value, w, allow_unused=True)[0] if value.requires_grad else None)
            self._slopes[key] = (slope if slope is not None else torch.zeros_like(w)).detach().to(device)
        return self._slopes[key]

    def cost_values(self, target: Target | str | None = None) -> Costs:
        """Costs of the argmax architecture (what `export()` returns), computed as on the exported model."""
        hw = load_target(target) if target is not None else None
        chosen = self.choices()
        terms: list[LayerTerm] = []
        for x in self.layout:
            if isinstance(x, LayerTerm):
                terms.append(x)
            else:
                terms.extend(next(o for o in x.options if o.name == chosen[x.point]).terms)
        return self._with_unchosen(plain_costs(terms, hw))

    def _with_unchosen(self, costs: Costs) -> Costs:
        """`costs` of the chosen layers, whose per-layer tables also name every layer not chosen, at 0 (so a
        constraint scoped to a layer of another alternative reads 0)."""
        absent = {t.name: 0.0 for t in self.layer_candidates()}
        tables = {f: {**absent, **getattr(costs, f)}
                  for f in ("layer_params", "layer_macs", "layer_memory", "layer_size_bytes", "layer_bytes",
                            "layer_cycles", "layer_latency_s") if getattr(costs, f) is not None}
        return replace(costs, **tables)

    def minimum_costs(self, target: Target | str | None = None) -> Costs:
        """Every point at its cheapest alternative, metric by metric."""
        return self._mixture(load_target(target) if target is not None else None).least()

    @property
    def seed_terms(self) -> Sequence[LayerTerm]:
        return self._seed_terms

    def layer_candidates(self) -> Sequence[LayerTerm]:
        """Every layer of every alternative, plus the fixed layers: critical layers are chosen among them."""
        out: list[LayerTerm] = []
        for x in self.layout:
            out.extend([x] if isinstance(x, LayerTerm) else [t for o in x.options for t in o.terms])
        return out

    def structure(self) -> str:
        return (self.graph_module.code + repr(self) + repr([(i.point, [o.name for o in i.options]) for i in self.infos])
                + f"|warmup: whole paths, seed share {self.warmup_seed_share}, last third seed only")

    # -- export ------------------------------------------------------------------------------------------
    def export(self, context: PassContext | None = None) -> GraphModule:
        """A plain model of ordinary torch modules: the argmax alternative of every point (eval-exact)."""
        gm = copy.deepcopy(self.graph_module)
        (context or PassContext()).run(gm, [ChoiceExport(self.choices())])
        gm.train(self.training)
        return gm


@register_search_method("path")
def make_path_space(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[LeafSpec] = (),
                    context: PassContext | None = None, alternatives: str | Sequence[str] | None = None,
                    estimator: str = "all", cost_mode: str = PATH_DEFAULTS["path"]["cost_mode"],
                    temperature: float = 5.0, temperature_decay: float = 0.8, warmup_seed_share: float = 0.5,
                    seed_logit: float = PATH_DEFAULTS["path"]["seed_logit"],
                    argmax_share: float = PATH_DEFAULTS["path"]["argmax_share"]) -> PathSpace:
    """Analyse a copy of `model` and turn its eligible blocks (and its `Choice`s) into choice points."""
    gm, insertion, seed_terms = build_supernet(model, example_inputs, leaf_modules=leaf_modules, context=context,
                                               alternatives=alternatives, estimator=estimator, cost_mode=cost_mode,
                                               temperature=temperature, temperature_decay=temperature_decay,
                                               warmup_seed_share=warmup_seed_share, seed_logit=seed_logit,
                                               argmax_share=argmax_share)
    return PathSpace(gm, insertion.fixed, seed_terms, cost_mode, temperature, temperature_decay, warmup_seed_share,
                     insertion.dropped, seed_logit, argmax_share)


def build_supernet(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[LeafSpec] = (),
                   context: PassContext | None = None, alternatives: str | Sequence[str] | None = None,
                   estimator: str = "all", cost_mode: str = "sampled", temperature: float = 5.0,
                   temperature_decay: float = 0.8, warmup_seed_share: float = 0.5, seed_logit: float = 0.0,
                   argmax_share: float = 0.0) -> tuple[GraphModule, SupernetInsertion, list[LayerTerm]]:
    """Check the path options, analyse a copy of `model` and insert its choice points: the supernet's graph,
    the pass (its `fixed` and `dropped`) and the seed's layer terms."""
    if estimator not in ESTIMATORS:
        raise DuccioError(f"unknown estimator {estimator!r}", where="--estimator",
                          fix=f"use one of: {', '.join(ESTIMATORS)}")
    if cost_mode not in COST_MODES:
        raise DuccioError(f"unknown cost mode {cost_mode!r}", where="--path-costs",
                          fix=f"use one of: {', '.join(COST_MODES)}")
    if not temperature > 0 or not 0 < temperature_decay <= 1:
        raise DuccioError(f"temperature {temperature} and decay {temperature_decay} must be > 0 and in (0, 1]",
                          where="--temperature/--temperature-decay", fix="e.g. --temperature 5 --temperature-decay 0.8")
    if not 0 <= warmup_seed_share <= 1:
        raise DuccioError(f"warmup_seed_share {warmup_seed_share} must lie in [0, 1]", where="warmup_seed_share",
                          fix="e.g. 0.5: half of the warmup's steps run the seed's path")
    if not 0 <= seed_logit <= 20:
        raise DuccioError(f"seed logit {seed_logit} must lie in [0, 20]", where="--seed-logit",
                          fix="e.g. 2: each point starts the search favouring its seed alternative (0: uniform)")
    if not 0 <= argmax_share < 1:
        raise DuccioError(f"argmax share {argmax_share} must lie in [0, 1)", where="--argmax-share",
                          fix="e.g. 0.5: half of the search's steps train the architecture it holds now (1 would "
                              "leave θ untrained)")
    selection = AlternativeSelection.parse(alternatives)
    context = context or PassContext()
    model = copy.deepcopy(model)
    declared = {name: m for name, m in model.named_modules() if isinstance(m, Choice)}
    gm = analyze(model, example_inputs, leaf_modules, context=context)
    seed_terms = layer_terms(gm)
    insertion = SupernetInsertion(analyze, selection, declared, estimator)
    context.run(gm, [insertion])
    return gm, insertion, list(seed_terms)


def _one_theta(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """State dicts written when every point held its own θ (`graph_module.<point>.theta`): one flat θ."""
    key = prefix + "choice_bank.theta"
    old = [prefix + f"graph_module.{info.point}.theta" for info in module.infos]
    if key not in state_dict and old and all(k in state_dict for k in old):
        state_dict[key] = torch.cat([state_dict.pop(k) for k in old])
