"""duccio-fx: hardware-aware neural architecture search (DUCCIO) for tiny devices, on torch.fx."""

from duccio_fx import rules as _rules  # noqa: F401  (registers the built-in channel rules)
from duccio_fx.channels import ChannelGroup, GroupMember
from duccio_fx.errors import DuccioError, DuccioTraceError, ModelFileError, PassError, ShapePropagationError
from duccio_fx.pass_manager import DumpIR, Instrument, Pass, PassManager, PrintIR, TimePasses
from duccio_fx.pipeline import analyze, channel_groups
from duccio_fx.printer import format_ir
from duccio_fx.registry import REGISTRY, register_function, register_method, register_module
from duccio_fx.rules import RuleContext
from duccio_fx.searchable import SearchableModel, make_searchable
from duccio_fx.tracer import trace
from duccio_fx.constraints import Constraint
from duccio_fx.objective import DuccioObjective
from duccio_fx.search import SearchResult, SearchSettings, optimize
from duccio_fx.targets import Target, load_target

__version__ = "0.1.0"

__all__ = [
    "ChannelGroup", "Constraint", "DuccioError", "DuccioObjective", "SearchResult", "SearchSettings", "Target",
    "load_target", "optimize", "DuccioTraceError", "DumpIR", "GroupMember", "Instrument", "ModelFileError",
    "Pass", "PassError", "PassManager", "PrintIR", "REGISTRY", "RuleContext", "ShapePropagationError",
    "SearchableModel", "TimePasses", "analyze", "make_searchable", "channel_groups", "format_ir", "register_function", "register_method",
    "register_module", "trace",
]
