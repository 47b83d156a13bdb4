"""SBS (Single-path Bit Sharing): joint pruning + mixed-precision search on the bit-sharing op.

Flow: ``convert`` a float model, ``search`` bits and filter-group pruning under a BOPs penalty,
``finetune`` the fixed configuration, ``export`` a physically pruned fixed-bit model, and save
or re-apply the configuration as JSON (``save_config`` / ``apply_config``).
"""
from mixedprec.sbs.config import LayerReport, apply_config, describe, load_config, save_config
from mixedprec.sbs.convert import (convert, fix_configuration, project_, pruning_groups, sbs_layers,
                                   set_batch_statistics, unconvert)
from mixedprec.sbs.export import Exported, export
from mixedprec.sbs import packing  # noqa: F401  (registers the SBS packer with mixedprec.nn.pack)
from mixedprec.sbs.layers import SBSConv2d, SBSLayer, SBSLinear
from mixedprec.sbs.policy import SBSPolicy
from mixedprec.sbs.quantizer import BatchStatistics, BitSharingQuantizer, check_act_grid
from mixedprec.sbs.trainer import finetune, search

__all__ = ["BatchStatistics", "BitSharingQuantizer", "Exported", "LayerReport", "SBSConv2d", "SBSLayer", "SBSLinear",
           "SBSPolicy", "apply_config", "check_act_grid", "convert", "describe", "export", "finetune",
           "fix_configuration", "load_config", "project_", "pruning_groups", "save_config",
           "sbs_layers", "search", "set_batch_statistics", "unconvert"]
