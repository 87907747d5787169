"""duccio-fx passes, one per file. The kebab-case pass name matches the file name (`shape-propagation`
lives in `shape_propagation.py`)."""

from duccio_fx.passes.channel_analysis import ChannelAnalysis
from duccio_fx.passes.layer_costs import LayerCosts
from duccio_fx.passes.shape_propagation import ShapePropagation

__all__ = ["ChannelAnalysis", "LayerCosts", "ShapePropagation"]
