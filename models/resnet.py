"""Dilated ResNet-18/34/50/101/152 backbones for CCNet.

Parameter names follow the official CCNet code (speedinghzl/CCNet), which
are also torchvision's names, so both kinds of checkpoint map key for key:

    conv1 bn1 [conv2 bn2 conv3 bn3]      stem (deep: three 3x3 convs; standard: one 7x7 conv)
    layer{1..4}.{i}.conv{1,2[,3]} / bn{1,2[,3]}
    layer{k}.0.downsample.{0,1}           1x1 projection conv + BN of a stage's first block

Choices the segmentation literature made and that we keep configurable:

* ``stem="deep"`` (default, the official CCNet / "ResNet-C" stem): 3x3 convs base-base-2*base,
  then a ceil-mode max pool; ``stem="standard"``: torchvision's 7x7 conv and floor-mode pool.
  ``stem_widths`` gives the deep stem other widths (OpenMMLab's ResNetV1c: base/2-base/2-base) and
  ``stem_pool_ceil`` the max pool's rounding (V1c floors), so every published variant is built
  directly and its weights fit as they are.
* ``output_stride`` 8 (default: layer3 dilation 2, layer4 dilation 4, as the official code),
  16 or 32. Stages that stop striding dilate instead so every filter still covers the image
  area it was trained on.
* ``multi_grid``: per-block multipliers of layer4's dilation, cycled (official: (1, 1, 1)).
* ``contract_dilation`` (mmsegmentation): the first block of a dilated stage uses half the
  dilation, bridging from the previous stage's sampling grid. Off in the official code.
* The stride of a bottleneck sits on its 3x3 conv (official code, torchvision >= 0.2 "v1.5").
* ``base_channels`` (default 64) scales every width, so tests can build tiny networks.

Each BatchNorm and the ReLU after it are one ``BatchNormAct`` (models/norm_act.py: same parameter
names, a backbone that keeps less for backward); the ReLU after a residual sum is its ``relu``.
"""
from typing import Callable, Sequence

import jittor as jt
from jittor import nn

from .norm_act import BatchNormAct, relu
from .registry import register_backbone
from .weights import StateDict, WeightLayout, has_all, rename, unchanged

# output_stride -> (stride, dilation) of layer1..layer4
STRIDE_PLANS = {
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    32: ((1, 1), (2, 1), (2, 1), (2, 1)),
}

# name -> (block type, blocks per stage)
DEPTHS = {
    "resnet10": ("basic", (1, 1, 1, 1)),       # no ImageNet weights: small receptive field, demos
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 conv whose padding keeps the size (at stride 1) for any dilation."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs. Both are dilated in a dilated stage (as in Dilated Residual Networks), so
    the block keeps the receptive field of its undilated ImageNet counterpart."""
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride, dilation)
        self.bn1 = BatchNormAct(planes, "relu")
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = BatchNormAct(planes, "identity")
        self.downsample = downsample

    def execute(self, x: jt.Var) -> jt.Var:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride and dilation here) -> 1x1 expand by 4."""
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = BatchNormAct(planes, "relu")
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = BatchNormAct(planes, "relu")
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = BatchNormAct(planes * self.expansion, "identity")
        self.downsample = downsample

    def execute(self, x: jt.Var) -> jt.Var:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return relu(out + shortcut)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """Backbone returning the four stage features [layer1, layer2, layer3, layer4]."""

    def __init__(self, block: str = "bottleneck", layers: Sequence[int] = (3, 4, 23, 3), stem: str = "deep",
                 output_stride: int = 8, multi_grid: Sequence[int] = (1, 1, 1), base_channels: int = 64,
                 contract_dilation: bool = False, stem_widths: Sequence[int] | None = None,
                 stem_pool_ceil: bool | None = None) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; expected one of {sorted(BLOCKS)}")
        if output_stride not in STRIDE_PLANS:
            raise ValueError(f"output_stride must be one of {sorted(STRIDE_PLANS)}, got {output_stride!r}")
        if stem not in ("deep", "standard"):
            raise ValueError(f"stem must be 'deep' or 'standard', got {stem!r}")
        multi_grid = tuple(multi_grid) if multi_grid else (1,)
        if not all(isinstance(g, int) and g >= 1 for g in multi_grid):
            raise ValueError(f"multi_grid must hold positive ints, got {multi_grid!r}")
        if not (isinstance(base_channels, int) and base_channels >= 1):
            raise ValueError(f"base_channels must be a positive int, got {base_channels!r}")
        if stem_widths is not None:
            if stem != "deep":
                raise ValueError(f"stem_widths {stem_widths!r} needs the deep stem, got stem={stem!r}")
            stem_widths = tuple(stem_widths)
            if len(stem_widths) != 3 or not all(isinstance(w, int) and w >= 1 for w in stem_widths):
                raise ValueError(f"stem_widths must be three positive ints, got {stem_widths!r}")
        if stem_pool_ceil not in (None, True, False):
            raise ValueError(f"stem_pool_ceil must be True, False or None, got {stem_pool_ceil!r}")
        block_type = BLOCKS[block]
        self.stem = stem
        self.output_stride = output_stride

        if stem == "deep":
            widths = stem_widths or (base_channels, base_channels, 2 * base_channels)
            self.conv1 = conv3x3(3, widths[0], stride=2)
            self.bn1 = BatchNormAct(widths[0], "relu")
            self.conv2 = conv3x3(widths[0], widths[1])
            self.bn2 = BatchNormAct(widths[1], "relu")
            self.conv3 = conv3x3(widths[1], widths[2])
            self.bn3 = BatchNormAct(widths[2], "relu")
            in_channels = widths[2]
        else:
            self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
            self.bn1 = BatchNormAct(base_channels, "relu")
            in_channels = base_channels
        # The deep stem pools in ceil mode as the official code, the standard stem floors as
        # torchvision: the two disagree on even sides, and the weights were trained with one.
        ceil_mode = stem == "deep" if stem_pool_ceil is None else stem_pool_ceil
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode)

        plan = STRIDE_PLANS[output_stride]
        self.out_channels, self.out_strides = [], []
        stride_so_far = 4
        for index, (blocks, (stride, dilation)) in enumerate(zip(layers, plan)):
            planes = base_channels * 2 ** index
            grid = multi_grid if index == 3 else (1,)
            dilations = [dilation * grid[i % len(grid)] for i in range(blocks)]
            if contract_dilation and dilation > 1:
                dilations[0] = dilation // 2 * grid[0]
            layer = self._make_layer(block_type, in_channels, planes, stride, dilations)
            setattr(self, f"layer{index + 1}", layer)
            in_channels = planes * block_type.expansion
            stride_so_far *= stride
            self.out_channels.append(in_channels)
            self.out_strides.append(stride_so_far)

    @staticmethod
    def _make_layer(block_type, in_channels, planes, stride, dilations):
        out_channels = planes * block_type.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                BatchNormAct(out_channels, "identity"))
        blocks = [block_type(in_channels, planes, stride, dilations[0], downsample)]
        blocks += [block_type(out_channels, planes, 1, d) for d in dilations[1:]]
        return nn.Sequential(*blocks)

    def execute_stem(self, x: jt.Var) -> jt.Var:
        x = self.bn1(self.conv1(x))
        if self.stem == "deep":
            x = self.bn3(self.conv3(self.bn2(self.conv2(x))))
        return self.maxpool(x)

    def execute(self, x: jt.Var) -> list[jt.Var]:
        x = self.execute_stem(x)
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


def _make_factory(name: str) -> Callable[..., ResNet]:
    block, layers = DEPTHS[name]

    def factory(stem: str = "deep", output_stride: int = 8, multi_grid: Sequence[int] = (1, 1, 1),
                base_channels: int = 64, contract_dilation: bool = False, stem_widths: Sequence[int] | None = None,
                stem_pool_ceil: bool | None = None) -> ResNet:
        return ResNet(block, layers, stem=stem, output_stride=output_stride, multi_grid=multi_grid,
                      base_channels=base_channels, contract_dilation=contract_dilation,
                      stem_widths=stem_widths, stem_pool_ceil=stem_pool_ceil)

    factory.__name__ = name
    factory.__doc__ = f"{name} ({block} blocks {layers}); options as ResNet."
    return factory


for _name in DEPTHS:
    globals()[_name] = register_backbone(_name)(_make_factory(_name))


# ------------------------------------------------------------------ published ImageNet weights
# torchvision's and MIT CSAIL's names are ours; OpenMMLab's ResNetV1c calls its deep stem
# ``stem.{0,1,3,4,6,7}`` (conv, BN, ReLU three times) and may keep everything under ``backbone.``.
V1C_STEM_NAMES = (("stem.0", "conv1"), ("stem.1", "bn1"), ("stem.3", "conv2"), ("stem.4", "bn2"),
                  ("stem.6", "conv3"), ("stem.7", "bn3"))


def from_v1c(state: StateDict) -> tuple[StateDict, dict[str, str]]:
    """OpenMMLab ResNetV1c keys -> ours."""
    out = {}
    for key, value in state.items():
        key = key[len("backbone."):] if key.startswith("backbone.") else key
        out[rename(key, V1C_STEM_NAMES) or key] = value
    return out, {}


WEIGHT_LAYOUTS = (
    WeightLayout("resnet_mmseg_v1c", "backbone", "OpenMMLab ResNetV1c ImageNet (open-mmlab://resnetXX_v1c)",
                 lambda keys: "stem.0.weight" in keys or "backbone.stem.0.weight" in keys, from_v1c,
                 classifier="fc."),
    WeightLayout("resnet_mit_csail", "backbone", "MIT CSAIL ImageNet ResNet (deep stem, resnet101-imagenet.pth)",
                 lambda keys: has_all(keys, "conv1.weight", "conv2.weight", "conv3.weight", "layer1.0.conv1.weight"),
                 unchanged, classifier="fc."),
    WeightLayout("resnet_torchvision", "backbone", "torchvision / jittor.models ImageNet ResNet (7x7 stem)",
                 lambda keys: has_all(keys, "conv1.weight", "layer1.0.conv1.weight") and "conv2.weight" not in keys,
                 unchanged, classifier="fc."),
)
