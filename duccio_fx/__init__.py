"""duccio-fx: hardware-aware neural architecture search (DUCCIO) for tiny devices, on torch.fx.

The package face: the names users need, from the layers below (see README "Architecture").
"""

from duccio_fx.common.errors import DuccioError, DuccioTraceError, ModelFileError, PassError, ShapePropagationError
from duccio_fx.ir import builtin_rules as _builtin_rules  # noqa: F401  (fills the default op registry)
from duccio_fx.ir.channels import ChannelGroup, GroupMember
from duccio_fx.ir.pass_manager import DumpIR, Instrument, Pass, PassContext, PassManager, PrintIR, TimePasses
from duccio_fx.ir.precision import act_bits_of, bake_weight_bits, set_act_bits, set_weight_bits, weight_bits_of
from duccio_fx.ir.printer import format_ir, register_meta_formatter
from duccio_fx.ir.registry import REGISTRY, add_hook, register_function, register_method, register_module
from duccio_fx.ir.rule_api import RuleContext
from duccio_fx.costs.latency import register_latency_model
from duccio_fx.costs.metrics import Metric, register_metric
from duccio_fx.costs.model import Costs
from duccio_fx.pipeline import analyze, channel_groups, measure_costs, trace
from duccio_fx.search.space import SearchSpace, make_searchable, register_search_method, search_methods
from duccio_fx.search.mask_method import SearchableModel  # registers the "mask" method
from duccio_fx.search.path_mask_method import PathMaskSpace  # registers the "path+mask" method
from duccio_fx.search.path_method import PathSpace  # registers the "path" method
from duccio_fx.search.choice import Choice
from duccio_fx.search.alternatives import BlockSpec, NotApplicable, register_alternative
from duccio_fx.search.constraints import Constraint, ResolvedConstraint
from duccio_fx.search.objective import DuccioObjective
from duccio_fx.search.recipe import SearchResult, optimize
from duccio_fx.search.settings import SearchSettings
from duccio_fx.lower.backend import Lowered, backends, lower, register_backend
from duccio_fx.lower import onnx_float as _onnx_float  # noqa: F401  (registers the "onnx" backend)
from duccio_fx.lower.dory import DoryBundle, lower_to_dory
from duccio_fx.targets import Target, load_target

__version__ = "0.1.0"

__all__ = [
    "BlockSpec", "ChannelGroup", "Choice", "Constraint", "Costs", "DoryBundle", "DuccioError", "DuccioObjective", "DuccioTraceError", "DumpIR",
    "act_bits_of", "GroupMember", "Instrument", "Lowered", "Metric", "ModelFileError", "NotApplicable", "Pass", "PassContext", "PassError",
    "PassManager", "PathMaskSpace", "PathSpace", "PrintIR", "REGISTRY", "ResolvedConstraint", "RuleContext", "SearchableModel", "SearchResult",
    "SearchSettings", "SearchSpace", "ShapePropagationError", "Target", "TimePasses", "add_hook", "analyze",
    "backends", "bake_weight_bits", "channel_groups", "format_ir", "load_target", "lower", "lower_to_dory", "make_searchable", "measure_costs",
    "optimize", "register_alternative", "register_backend", "register_function", "register_latency_model", "register_meta_formatter",
    "register_method", "register_metric", "register_module", "register_search_method", "search_methods",
    "set_act_bits", "set_weight_bits", "trace", "weight_bits_of",
]
