"""Named SBS settings for the networks the papers report on, each setting with its source.

``SBSPolicy.preset(name)`` builds a policy from one of them. A source says where a value comes
from: the SBS authors' public reference code (as read line by line in this project's issue 18;
the code itself is not part of this repository), DESIGN.md's reading of the paper, or this
project's own choice where neither says. docs/sbs.md shows the same table.
"""
from __future__ import annotations

from dataclasses import dataclass

REFERENCE_CODE = "SBS authors' public reference code (issue 18)"
PAPER = "the paper, as DESIGN.md reads it"
OURS = "this project's choice"


@dataclass(frozen=True)
class Setting:
    value: object
    source: str


PRESETS: dict[str, dict[str, Setting]] = {
    "cifar-preresnet": {
        "group_size": Setting(4, REFERENCE_CODE + ": 4 filters per group on CIFAR pre-activation ResNets"),
        "per_group_thresholds": Setting(False, REFERENCE_CODE + ": one threshold per pruned layer"),
        "first_last_bits": Setting(8, PAPER + " (the reference's CIFAR code keeps the first conv's input in "
                                          "float; not reproduced)"),
        "act_grid": Setting("unsigned", REFERENCE_CODE + ": activations clipped to an unsigned grid"),
        "max_prune_ratio": Setting(0.5, OURS + " (the cap itself is the reference's clip_pruning_thresholds)"),
    },
    "imagenet-resnet": {
        "group_size": Setting(8, REFERENCE_CODE + ": 8 filters per group on ImageNet ResNets"),
        "per_group_thresholds": Setting(True, REFERENCE_CODE + ": one threshold per group on ImageNet ResNets"),
        "first_last_bits": Setting(8, PAPER),
        "act_grid": Setting("unsigned", REFERENCE_CODE + ": activations clipped to an unsigned grid"),
        "max_prune_ratio": Setting(0.5, OURS),
    },
    "mobilenet-v2": {
        "group_size": Setting(16, REFERENCE_CODE + ": 16 filters per group on MobileNetV2"),
        "per_group_thresholds": Setting(False, OURS + " (issue 18 names per-group thresholds for ImageNet "
                                               "ResNets only)"),
        "first_last_bits": Setting(8, PAPER),
        "act_grid": Setting("asymmetric", REFERENCE_CODE + ": an asymmetric grid with a learnable offset for the "
                                          "signed inputs of the linear bottlenecks"),
        "max_prune_ratio": Setting(0.5, OURS),
    },
}


def preset_settings(name: str) -> dict[str, object]:
    """The policy fields a preset sets, by name."""
    if name not in PRESETS:
        raise ValueError(f"SBSPolicy.preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return {field: setting.value for field, setting in PRESETS[name].items()}


def preset_table() -> str:
    """The presets as a Markdown table (docs/sbs.md holds a copy; a test keeps them equal)."""
    rows = ["| preset | setting | value | source |", "|---|---|---|---|"]
    for name, settings in PRESETS.items():
        rows += [f"| {name} | `{field}` | `{setting.value!r}` | {setting.source} |" for field, setting in settings.items()]
    return "\n".join(rows)
