"""The build options that weights show by their shapes: backbone depth and widths, stem, VAN
size, classes and head widths. (What shapes cannot show comes from the layout, the model zoo
entry or the config saved with our own files.)"""
from typing import Any

from models.resnet import DEPTHS
from models.van import MLP_RATIOS, VAN_SIZES
from models.weights import StateDict

from .torchfile import CheckpointError


def _blocks_per_stage(state: StateDict, stage_prefix: str) -> tuple[int, ...]:
    """Number of blocks of each of the four stages ``{stage_prefix}{1..4}.{j}.``."""
    return tuple(len({int(k[len(f"{stage_prefix}{i}."):].split(".")[0]) for k in state
                      if k.startswith(f"{stage_prefix}{i}.")}) for i in range(1, 5))


def _resnet_options(state: StateDict) -> dict[str, Any]:
    block = "bottleneck" if "backbone.layer1.0.conv3.weight" in state else "basic"
    layers = _blocks_per_stage(state, "backbone.layer")
    name = next((n for n, (b, l) in DEPTHS.items() if b == block and tuple(l) == layers), None)
    if name is None:
        raise CheckpointError(f"ResNet with {block} blocks {layers} matches none of "
                              f"{', '.join(f'{n} {l}' for n, (_, l) in DEPTHS.items())}")
    base = int(state["backbone.layer1.0.conv1.weight"].shape[0])
    options = dict(backbone=name, base_channels=base)
    if "backbone.conv2.weight" in state:
        widths = tuple(int(state[f"backbone.conv{i}.weight"].shape[0]) for i in (1, 2, 3))
        options["stem"] = "deep"
        if widths != (base, base, 2 * base):
            options["stem_widths"] = widths
    else:
        options["stem"] = "standard"
    return options


def _van_options(state: StateDict) -> dict[str, Any]:
    dims = tuple(int(state[f"backbone.patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5))
    depths = _blocks_per_stage(state, "backbone.block")
    ratios = tuple(int(state[f"backbone.block{i}.0.mlp.fc1.weight"].shape[0]) // d for i, d in zip(range(1, 5), dims))
    for name, size in VAN_SIZES.items():
        if tuple(size["embed_dims"]) == dims and tuple(size["depths"]) == depths and ratios == tuple(MLP_RATIOS):
            return dict(backbone=name)
    return dict(backbone="van_b0", embed_dims=dims, depths=depths, mlp_ratios=ratios)


def options_from_weights(state: StateDict, kind: str) -> dict[str, Any]:
    """build_model options read off a state dict in our names (``kind``: "segmentor" adds the
    classes and head widths)."""
    options = _van_options(state) if "backbone.patch_embed1.proj.weight" in state else _resnet_options(state)
    if kind == "segmentor":
        options.update(num_classes=int(state["head.bottleneck.3.weight"].shape[0]),
                       head_channels=int(state["head.bottleneck.0.weight"].shape[0]),
                       aux_channels=int(state["dsn.0.weight"].shape[0]))
    return options
