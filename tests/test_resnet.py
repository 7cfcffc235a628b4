"""Dilated ResNet backbones: sizes, parameter counts, per-block stride/dilation, official names."""
import numpy as np
import pytest

import jittor as jt

from models import BACKBONES, resolve_backbone_name
from models.resnet import BasicBlock, Bottleneck

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# torchvision's published parameter counts (1000-class fc included).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808}


def trainable_params(module):
    return sum(int(np.prod(p.shape)) for p in module.parameters() if not p.is_stop_grad())


def conv_out(n, kernel, stride, padding, dilation=1, ceil=False):
    span = n + 2 * padding - dilation * (kernel - 1) - 1
    return (-(-span // stride) if ceil else span // stride) + 1


def expected_sizes(n, output_stride, stem="deep"):
    """Side of the four stage outputs, from the conv/pool arithmetic of the architecture."""
    n = conv_out(n, 3, 2, 1) if stem == "deep" else conv_out(n, 7, 2, 3)
    n = conv_out(n, 3, 2, 1, ceil=(stem == "deep"))
    sizes = [n]
    for stride in {8: (2, 1, 1), 16: (2, 2, 1), 32: (2, 2, 2)}[output_stride]:
        n = conv_out(n, 3, stride, 1) if stride > 1 else n
        sizes.append(n)
    return sizes


def blocks_of(net):
    for index in range(1, 5):
        for block in getattr(net, f"layer{index}"):
            yield index, block


@pytest.mark.parametrize("name", RESNETS)
def test_standard_stem_parameter_count_matches_torchvision(name):
    net = BACKBONES[name](stem="standard")
    fc = net.out_channels[3] * 1000 + 1000
    assert trainable_params(net) == TORCHVISION_PARAMS[name] - fc
    assert net.out_channels == ([64, 128, 256, 512] if name in ("resnet18", "resnet34") else [256, 512, 1024, 2048])


def test_deep_stem_resnet101_parameter_count():
    # Deep stem vs the 7x7 stem: three 3x3 convs (3->64->64->128) + BNs instead of 7x7x3x64 + BN,
    # and layer1.0 then reads 128 channels (its conv1 and downsample conv grow by 64 inputs).
    standard = TORCHVISION_PARAMS["resnet101"] - (2048 * 1000 + 1000)
    stem_delta = (27 * 64 + 2 * 64 + 9 * 64 * 64 + 2 * 64 + 9 * 64 * 128 + 2 * 128) - (49 * 3 * 64 + 2 * 64)
    layer1_delta = 64 * 64 + 64 * 256
    net = BACKBONES["resnet101"]()
    assert trainable_params(net) == standard + stem_delta + layer1_delta


def test_resnet10_is_resnet18_with_one_block_per_stage():
    """resnet10 (no ImageNet weights; the demo's small-receptive-field backbone): torchvision's
    resnet18 without the second basic block of each stage (two 3x3 convs + two BNs each)."""
    net = BACKBONES["resnet10"](stem="standard")
    second_blocks = sum(2 * 9 * p * p + 2 * 2 * p for p in (64, 128, 256, 512))
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert trainable_params(net) == TORCHVISION_PARAMS["resnet18"] - (512 * 1000 + 1000) - second_blocks


@pytest.mark.parametrize("name", ("resnet10",) + RESNETS)
def test_stage_shapes_at_odd_input_size(name):
    net = BACKBONES[name](base_channels=4)
    feats = net(jt.randn(1, 3, 97, 129))
    heights, widths = expected_sizes(97, 8), expected_sizes(129, 8)
    assert [list(f.shape) for f in feats] == [[1, c, h, w] for c, h, w in zip(net.out_channels, heights, widths)]
    assert heights == [25, 13, 13, 13] and widths == [33, 17, 17, 17]
    assert net.out_strides == [4, 8, 8, 8]
    assert np.isfinite(feats[3].numpy()).all()


@pytest.mark.parametrize("output_stride,stem", [(16, "deep"), (32, "standard"), (8, "standard")])
def test_output_stride_and_stem_options(output_stride, stem):
    net = BACKBONES["resnet18"](base_channels=4, output_stride=output_stride, stem=stem)
    feats = net(jt.randn(1, 3, 97, 129))
    assert [f.shape[2] for f in feats] == expected_sizes(97, output_stride, stem)
    assert [f.shape[3] for f in feats] == expected_sizes(129, output_stride, stem)
    assert net.out_strides == {8: [4, 8, 8, 8], 16: [4, 8, 16, 16], 32: [4, 8, 16, 32]}[output_stride]


def three_by_three_convs(block):
    return [block.conv1, block.conv2] if isinstance(block, BasicBlock) else [block.conv2]


@pytest.mark.parametrize("output_stride,multi_grid,contract,expected", [
    # expected (stride of the stage's first block, dilation of every block) for layer1..layer4
    (8, (1, 1, 1), False, [(1, [1] * 3), (2, [1] * 4), (1, [2] * 23), (1, [4, 4, 4])]),
    (16, (1, 1, 1), False, [(1, [1] * 3), (2, [1] * 4), (2, [1] * 23), (1, [2, 2, 2])]),
    (32, (1, 1, 1), False, [(1, [1] * 3), (2, [1] * 4), (2, [1] * 23), (2, [1, 1, 1])]),
    (8, (1, 2, 4), False, [(1, [1] * 3), (2, [1] * 4), (1, [2] * 23), (1, [4, 8, 16])]),
    (8, (1, 1, 1), True, [(1, [1] * 3), (2, [1] * 4), (1, [1] + [2] * 22), (1, [2, 4, 4])]),
])
def test_stride_and_dilation_of_every_3x3_conv(output_stride, multi_grid, contract, expected):
    net = BACKBONES["resnet101"](base_channels=2, output_stride=output_stride, multi_grid=multi_grid,
                                 contract_dilation=contract)
    for index, (first_stride, dilations) in enumerate(expected, start=1):
        layer = list(getattr(net, f"layer{index}"))
        assert len(layer) == len(dilations)
        for position, (block, dilation) in enumerate(zip(layer, dilations)):
            conv = block.conv2
            stride = first_stride if position == 0 else 1
            assert tuple(conv.stride) == (stride, stride), (index, position)
            assert tuple(conv.dilation) == (dilation, dilation), (index, position)
            assert tuple(conv.padding) == (dilation, dilation), (index, position)   # size-preserving
            assert tuple(block.conv1.stride) == (1, 1) and tuple(block.conv3.stride) == (1, 1)


def test_basic_block_dilates_both_convs_and_strides_the_first():
    net = BACKBONES["resnet34"](base_channels=2)
    layer3 = list(net.layer3)
    assert [(tuple(b.conv1.dilation), tuple(b.conv2.dilation)) for b in net.layer4] == [((4, 4), (4, 4))] * 3
    assert all(tuple(c.dilation) == (2, 2) for b in layer3 for c in three_by_three_convs(b))
    first = list(net.layer2)[0]
    assert tuple(first.conv1.stride) == (2, 2) and tuple(first.conv2.stride) == (1, 1)


def test_official_parameter_names():
    net = BACKBONES["resnet101"](base_channels=2)
    keys = set(net.state_dict())
    for stem_key in ("conv1.weight", "bn1.running_var", "conv2.weight", "bn2.bias", "conv3.weight", "bn3.weight"):
        assert stem_key in keys
    for layer, blocks in zip(range(1, 5), (3, 4, 23, 3)):
        for i in range(blocks):
            for part in ("conv1.weight", "bn1.weight", "conv2.weight", "bn2.running_mean", "conv3.weight", "bn3.bias"):
                assert f"layer{layer}.{i}.{part}" in keys
        assert f"layer{layer}.0.downsample.0.weight" in keys and f"layer{layer}.0.downsample.1.running_var" in keys
    downsample_blocks = {k.split(".downsample")[0] for k in keys if ".downsample." in k}
    assert downsample_blocks == {"layer1.0", "layer2.0", "layer3.0", "layer4.0"}
    assert not any(k.startswith(("fc", "stem", "layer5")) for k in keys)
    standard = set(BACKBONES["resnet18"](stem="standard", base_channels=2).state_dict())
    assert "conv1.weight" in standard and "conv2.weight" not in standard and "layer1.0.downsample.0.weight" not in standard


@pytest.mark.parametrize("opts,fragment", [
    (dict(output_stride=4), "output_stride"),
    (dict(stem="tiny"), "stem"),
    (dict(multi_grid=(1, 0)), "multi_grid"),
    (dict(base_channels=0), "base_channels"),
    (dict(stem="standard", stem_widths=(32, 32, 64)), "stem_widths .* needs the deep stem"),
    (dict(stem_widths=(32, 64)), "stem_widths must be three positive ints"),
    (dict(stem_pool_ceil="yes"), "stem_pool_ceil must be True, False or None"),
])
def test_bad_options_raise(opts, fragment):
    with pytest.raises(ValueError, match=fragment):
        BACKBONES["resnet50"](**opts)


def test_stem_widths_and_pooling_are_build_options():
    """OpenMMLab's ResNetV1c stem (base/2, base/2, base; floor-mode pooling) is built directly:
    layer1 reads the last stem width, with an identity shortcut where the widths agree."""
    net = BACKBONES["resnet18"](stem_widths=(32, 32, 64), stem_pool_ceil=False)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert [shapes[f"conv{i}.weight"] for i in (1, 2, 3)] == [(32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3)]
    assert shapes["layer1.0.conv1.weight"] == (64, 64, 3, 3) and "layer1.0.downsample.0.weight" not in shapes
    wide = BACKBONES["resnet50"](stem_widths=(32, 32, 64))
    assert tuple(wide.layer1[0].downsample[0].weight.shape) == (256, 64, 1, 1)
    x = jt.randn(1, 3, 96, 96)                 # the pool sees 48: 25 (ceil) or 24 (floor)
    assert net(x)[0].shape[2] == conv_out(conv_out(96, 3, 2, 1), 3, 2, 1, ceil=False) == 24
    assert BACKBONES["resnet18"](stem_widths=(32, 32, 64))(x)[0].shape[2] == 25
    assert BACKBONES["resnet18"](stem="standard", stem_pool_ceil=True)(x)[0].shape[2] == 25


def test_every_resnet_is_registered():
    assert all(resolve_backbone_name(n) == n for n in RESNETS)
