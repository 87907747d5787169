"""duccio-fx passes, one per file. The kebab-case pass name matches the file name (`shape-propagation`
lives in `shape_propagation.py`). Analysis: shape-propagation, functional-layers, channel-analysis, layer-costs; transform:
mask-insertion, precision-insertion, supernet-insertion, choice-channels, choice-mask-insertion; export: precision-export, shrink-export, choice-export; lowering to DORY: remove-noops, fold-batchnorm, dory-layers, calibrate, integerize."""

from duccio_fx.passes.shape_propagation import ShapePropagation
from duccio_fx.passes.functional_layers import FunctionalLayers
from duccio_fx.passes.channel_analysis import ChannelAnalysis
from duccio_fx.passes.layer_costs import LayerCosts
from duccio_fx.passes.mask_insertion import MaskInsertion
from duccio_fx.passes.precision_insertion import PrecisionInsertion
from duccio_fx.passes.precision_export import PrecisionExport
from duccio_fx.passes.shrink_export import ShrinkExport
from duccio_fx.passes.supernet_insertion import SupernetInsertion
from duccio_fx.passes.choice_export import ChoiceExport
from duccio_fx.passes.choice_channels import ChoiceChannels
from duccio_fx.passes.choice_mask_insertion import ChoiceMaskInsertion
from duccio_fx.passes.remove_noops import RemoveNoops
from duccio_fx.passes.fold_batchnorm import FoldBatchNorm
from duccio_fx.passes.dory_layers import DoryLayers
from duccio_fx.passes.calibrate import Calibrate
from duccio_fx.passes.integerize import Integerize

__all__ = ["Calibrate", "ChannelAnalysis", "ChoiceChannels", "ChoiceExport", "ChoiceMaskInsertion", "DoryLayers", "FoldBatchNorm", "FunctionalLayers", "Integerize", "LayerCosts", "MaskInsertion",
           "PrecisionExport", "PrecisionInsertion", "RemoveNoops", "ShapePropagation", "ShrinkExport", "SupernetInsertion"]
