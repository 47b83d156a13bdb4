"""SBS (Single-path Bit Sharing): joint pruning + mixed-precision search on the bit-sharing op.

Flow: ``convert`` a float model, ``search`` bits and filter-group pruning under a BOPs penalty,
``finetune`` the fixed configuration, ``export`` a physically pruned fixed-bit model, and save
or re-apply the configuration as JSON (``save_config`` / ``apply_config``).
"""
from mixedprec.sbs.convert import convert, fix_configuration, project_, sbs_layers, unconvert
from mixedprec.sbs.layers import SBSConv2d, SBSLayer, SBSLinear
from mixedprec.sbs.policy import SBSPolicy
from mixedprec.sbs.quantizer import BitSharingQuantizer, force_backend

__all__ = ["BitSharingQuantizer", "SBSConv2d", "SBSLayer", "SBSLinear", "SBSPolicy", "convert",
           "fix_configuration", "force_backend", "project_", "sbs_layers", "unconvert"]
