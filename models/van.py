"""VAN (Visual Attention Network, Guo et al. 2022) backbones b0..b3 for CCNet.

Parameter names and shapes follow the official PyTorch code (Visual-Attention-Network/
VAN-Classification), so its ImageNet checkpoints load key for key (``WEIGHT_LAYOUTS`` below):

    patch_embed{i}.proj / .norm           overlapping patch embedding: conv + BatchNorm
    block{i}.{j}.norm1 / .norm2            BatchNorm before the attention / MLP branch
    block{i}.{j}.attn.proj_1 / .proj_2     1x1 convs around the large-kernel attention
    block{i}.{j}.attn.spatial_gating_unit.{conv0, conv_spatial, conv1}   LKA
    block{i}.{j}.mlp.{fc1, dwconv.dwconv, fc2}
    block{i}.{j}.layer_scale_1 / _2        per-channel residual scales (init 1e-2)
    norm{i}                                LayerNorm (eps 1e-6) closing stage i
    head                                   1000-way classifier (``VANClassifier`` only)

Output stride. VAN downsamples to stride 32, while CCNet's head is meant to see stride-8
features. ``output_stride`` 16 or 8 turns the stride-2 patch embedding of stage 4 (and 3) into
a stride-1 convolution and dilates every spatial convolution after it (patch embedding by the
dilation of the stage before, the blocks' 5x5 / 7x7-d3 / 3x3 depthwise convs by 2 or 4), the
"atrous" recipe DeepLab and CCNet apply to ResNet. Every kernel keeps its shape, so the
ImageNet weights stay valid and every filter still covers the same image area it was trained
on, only sampled densely (tests/test_van.py checks that the stride-8 features, subsampled,
equal the stride-32 ones). No new parameters; the cost is compute and memory in the later
stages (README, "VAN backbones", has the measured cost). The default is 8, the resolution
CCNet's head and its ResNet variant use.

Depthwise convolutions run on CPU through the OpenMP kernels below (``DepthwiseConv2d``):
Jittor's generic grouped convolution is single-threaded and much slower (README).
"""
import math
from typing import Any, Callable, Iterator, Sequence

import jittor as jt
from jittor import nn

from .registry import register_backbone
from .weights import WeightLayout, unchanged

# The official configurations; all sizes share the MLP ratios.
VAN_SIZES = {
    "van_b0": dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2)),
    "van_b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2)),
    "van_b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3)),
    "van_b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3)),
}
VAN_ALIASES = {"van_b2": ("van_base",)}
MLP_RATIOS = (8, 8, 4, 4)
LAYER_SCALE_INIT = 1e-2

# output_stride -> (stride of each stage's patch embedding, dilation of each stage's blocks)
STRIDE_PLANS = {
    32: ((4, 2, 2, 2), (1, 1, 1, 1)),
    16: ((4, 2, 2, 1), (1, 1, 1, 2)),
    8: ((4, 2, 1, 1), (1, 1, 2, 4)),
}


# ------------------------------------------------------------------ depthwise convolution on CPU
# Jittor 1.3.11 runs grouped convolutions on CPU as a generic single-threaded reindex/reduce
# kernel, so VAN's three depthwise convs per block dominated a training step. These jt.code kernels loop over (image, channel)
# planes with OpenMP and keep the inner loop over a contiguous row, bounds resolved per row.
# CUDA keeps Jittor's own depthwise kernel.

_DW_PLANE_SRC = r"""
    // out[n,c,oh,ow] = sum_k w[c,kh,kw] * in[n,c,oh-P+kh*D, ow-P+kw*D]  (w flipped when FLIP)
    const int N = in0_shape0, C = in0_shape1, H = in0_shape2, W = in0_shape3;
    const int KH = in1_shape2, KW = in1_shape3, OH = out0_shape2, OW = out0_shape3;
    const int P = data["pad"], D = data["dil"], FLIP = data["flip"];
    #pragma omp parallel for schedule(static)
    for (int nc = 0; nc < N * C; nc++) {
        const int c = nc % C;
        const in0_type* src = in0_p + (size_t)nc * H * W;
        out0_type* dst = out0_p + (size_t)nc * OH * OW;
        const in1_type* w = in1_p + (size_t)c * KH * KW;
        for (int i = 0; i < OH * OW; i++) dst[i] = 0;
        for (int kh = 0; kh < KH; kh++) {
            for (int oh = 0; oh < OH; oh++) {
                const int ih = oh - P + kh * D;
                if (ih < 0 || ih >= H) continue;
                const in0_type* row = src + (size_t)ih * W;
                out0_type* out = dst + (size_t)oh * OW;
                for (int kw = 0; kw < KW; kw++) {
                    const int off = kw * D - P;                       // iw = ow + off
                    const int lo = off < 0 ? -off : 0, hi = W - off < OW ? W - off : OW;
                    const out0_type wv = FLIP ? w[(KH - 1 - kh) * KW + (KW - 1 - kw)] : w[kh * KW + kw];
                    for (int ow = lo; ow < hi; ow++) out[ow] += wv * row[ow + off];
                }
            }
        }
    }
"""

_DW_WEIGHT_GRAD_SRC = r"""
    // gw[c,kh,kw] = sum_{n,oh,ow} gy[n,c,oh,ow] * x[n,c,oh-P+kh*D, ow-P+kw*D]
    const int N = in0_shape0, C = in0_shape1, H = in0_shape2, W = in0_shape3;
    const int OH = in1_shape2, OW = in1_shape3, KH = out0_shape2, KW = out0_shape3;
    const int P = data["pad"], D = data["dil"];
    #pragma omp parallel for schedule(static)
    for (int ck = 0; ck < C * KH * KW; ck++) {
        const int c = ck / (KH * KW), kh = ck % (KH * KW) / KW, kw = ck % KW;
        const int off = kw * D - P;
        const int lo = off < 0 ? -off : 0, hi = W - off < OW ? W - off : OW;
        double total = 0;
        for (int n = 0; n < N; n++) {
            const in0_type* x = in0_p + ((size_t)n * C + c) * H * W;
            const in1_type* gy = in1_p + ((size_t)n * C + c) * OH * OW;
            for (int oh = 0; oh < OH; oh++) {
                const int ih = oh - P + kh * D;
                if (ih < 0 || ih >= H) continue;
                const in0_type* row = x + (size_t)ih * W;
                const in1_type* g = gy + (size_t)oh * OW;
                out0_type acc = 0;
                for (int ow = lo; ow < hi; ow++) acc += g[ow] * row[ow + off];
                total += acc;
            }
        }
        out0_p[ck] = (out0_type)total;
    }
"""


def _dw_plane_conv(x, weight, out_hw, padding, dilation, flip=False):
    return jt.code((x.shape[0], x.shape[1]) + tuple(out_hw), x.dtype, [x, weight], cpu_src=_DW_PLANE_SRC,
                   data={"pad": padding, "dil": dilation, "flip": int(flip)})


class _DepthwiseConvCPU(jt.Function):
    """Stride-1 depthwise convolution (square kernel, symmetric padding) with its own backward."""

    def execute(self, x, weight, padding, dilation):
        self.saved = x, weight, padding, dilation
        k = weight.shape[2]
        out_hw = [x.shape[2] + 2 * padding - dilation * (k - 1), x.shape[3] + 2 * padding - dilation * (k - 1)]
        return _dw_plane_conv(x, weight, out_hw, padding, dilation)

    def grad(self, grad_out):
        x, weight, padding, dilation = self.saved
        k = weight.shape[2]
        # the input gradient is the same convolution of grad_out with the flipped kernel
        grad_x = _dw_plane_conv(grad_out, weight, x.shape[2:], dilation * (k - 1) - padding, dilation, flip=True)
        grad_w = jt.code(weight.shape, weight.dtype, [x, grad_out], cpu_src=_DW_WEIGHT_GRAD_SRC,
                         data={"pad": padding, "dil": dilation})
        return grad_x, grad_w, None, None


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(dim, dim, k, padding, dilation, groups=dim)`` (same parameters and names) that
    runs the OpenMP kernels above on CPU, and Jittor's own implementation elsewhere."""

    def __init__(self, dim: int, kernel_size: int, padding: int, dilation: int) -> None:
        super().__init__(dim, dim, kernel_size, padding=padding, dilation=dilation, groups=dim)

    def execute(self, x: jt.Var) -> jt.Var:
        if jt.flags.use_cuda:
            return super().execute(x)
        y = _DepthwiseConvCPU()(x, self.weight, self.padding[0], self.dilation[0])
        return y + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else y


def _depthwise(dim, kernel_size, dilation):
    """Depthwise conv whose 'same' padding follows its dilation (keeps the feature size)."""
    return DepthwiseConv2d(dim, kernel_size, padding=dilation * (kernel_size - 1) // 2, dilation=dilation)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def execute(self, x: jt.Var) -> jt.Var:
        if self.drop_prob == 0.0 or not self.is_training():
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = (jt.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype) + keep_prob).floor()
        return x / keep_prob * keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map (the official code's token LayerNorm).

    Computed as mean((x - mean)^2) rather than E[x^2] - E[x]^2 (what jittor's LayerNorm does):
    with eps = 1e-6 the latter loses precision on large activations.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = jt.ones(dim)
        self.bias = jt.zeros(dim)

    def execute(self, x: jt.Var) -> jt.Var:
        centred = x - x.mean(dim=1, keepdims=True)
        scale = 1.0 / jt.sqrt((centred * centred).mean(dim=1, keepdims=True) + self.eps)
        return centred * scale * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)


class LKA(nn.Module):
    """Large-kernel attention: 5x5 depthwise -> 7x7 depthwise dilation 3 -> 1x1, gates the input."""

    def __init__(self, dim: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv0 = _depthwise(dim, 5, dilation)
        self.conv_spatial = _depthwise(dim, 7, 3 * dilation)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def execute(self, x: jt.Var) -> jt.Var:
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class Attention(nn.Module):
    """1x1 -> GELU -> LKA -> 1x1, plus its own shortcut (as in the official code)."""

    def __init__(self, dim: int, dilation: int = 1) -> None:
        super().__init__()
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LKA(dim, dilation)
        self.proj_2 = nn.Conv2d(dim, dim, 1)

    def execute(self, x: jt.Var) -> jt.Var:
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x


class DWConv(nn.Module):
    """Wrapper that only exists so the official key name ``mlp.dwconv.dwconv`` comes out."""

    def __init__(self, dim: int, dilation: int = 1) -> None:
        super().__init__()
        self.dwconv = _depthwise(dim, 3, dilation)

    def execute(self, x: jt.Var) -> jt.Var:
        return self.dwconv(x)


class Mlp(nn.Module):
    """1x1 expand -> 3x3 depthwise -> GELU -> 1x1 project."""

    def __init__(self, dim: int, hidden_dim: int, dilation: int = 1) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.dwconv = DWConv(hidden_dim, dilation)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def execute(self, x: jt.Var) -> jt.Var:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class Block(nn.Module):
    """x + drop_path(ls1 * attn(bn1(x))), then x + drop_path(ls2 * mlp(bn2(x)))."""

    def __init__(self, dim: int, mlp_ratio: int, drop_path: float = 0.0, dilation: int = 1) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = Attention(dim, dilation)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dilation)
        self.layer_scale_1 = jt.full((dim,), LAYER_SCALE_INIT)
        self.layer_scale_2 = jt.full((dim,), LAYER_SCALE_INIT)

    def execute(self, x: jt.Var) -> jt.Var:
        x = x + self.drop_path(self.layer_scale_1.reshape(1, -1, 1, 1) * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2.reshape(1, -1, 1, 1) * self.mlp(self.norm2(x)))


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (7x7/4 for stage 1, 3x3/2 later) + BatchNorm."""

    def __init__(self, in_channels: int, dim: int, kernel_size: int, stride: int, dilation: int = 1) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size, stride=stride,
                              padding=dilation * (kernel_size // 2), dilation=dilation)
        self.norm = nn.BatchNorm2d(dim)

    def execute(self, x: jt.Var) -> jt.Var:
        return self.norm(self.proj(x))


class VAN(nn.Module):
    """VAN backbone: ``execute(x)`` returns the four stage features [B, C_i, H/s_i, W/s_i].

    ``out_channels`` = embed_dims; ``out_strides`` = (4, 8, 16, 32) for output_stride 32,
    (4, 8, 16, 16) for 16, (4, 8, 8, 8) for 8.
    """

    def __init__(self, embed_dims: Sequence[int], depths: Sequence[int], mlp_ratios: Sequence[int] = MLP_RATIOS,
                 drop_path_rate: float = 0.0, output_stride: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        embed_dims, depths, mlp_ratios = list(embed_dims), list(depths), list(mlp_ratios)
        if not len(embed_dims) == len(depths) == len(mlp_ratios) == 4:
            raise ValueError(f"VAN needs 4 stages: got embed_dims={embed_dims}, depths={depths}, "
                             f"mlp_ratios={mlp_ratios}")
        if output_stride not in STRIDE_PLANS:
            raise ValueError(f"VAN output_stride must be one of {sorted(STRIDE_PLANS)}, "
                             f"got {output_stride!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"VAN drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        strides, dilations = STRIDE_PLANS[output_stride]
        self.output_stride = output_stride
        self.out_channels = embed_dims
        self.out_strides = []
        self.depths = depths

        # stochastic depth rises linearly from 0 to drop_path_rate over all blocks
        total = sum(depths)
        drop_rates = [drop_path_rate * k / (total - 1) if total > 1 else 0.0 for k in range(total)]
        stride, first = 1, 0
        for i in range(4):
            # a patch embed that no longer downsamples keeps the previous stage's dilation, so
            # its 3x3 window spans the same pixels as the strided original (DeepLab convention)
            embed_dilation = dilations[i - 1] if i > 0 else 1
            patch_embed = OverlapPatchEmbed(in_channels if i == 0 else embed_dims[i - 1], embed_dims[i],
                                            kernel_size=7 if i == 0 else 3, stride=strides[i],
                                            dilation=embed_dilation)
            blocks = nn.ModuleList([Block(embed_dims[i], mlp_ratios[i], drop_rates[first + j], dilations[i])
                                    for j in range(depths[i])])
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", ChannelLayerNorm(embed_dims[i]))
            first += depths[i]
            stride *= strides[i]
            self.out_strides.append(stride)
        self._init_weights()

    def _init_weights(self):
        """The official initialisation: He-normal on fan_out for convs, trunc-normal for the head."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                kh, kw = module.weight.shape[2:]
                fan_out = kh * kw * module.out_channels // module.groups
                module.weight.assign(jt.randn(module.weight.shape) * math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    module.bias.assign(jt.zeros(module.bias.shape))
            elif isinstance(module, nn.Linear):
                module.weight.assign(jt.init.trunc_normal_(jt.zeros(module.weight.shape), std=0.02))
                if module.bias is not None:
                    module.bias.assign(jt.zeros(module.bias.shape))

    def stages(self) -> Iterator[tuple[OverlapPatchEmbed, nn.ModuleList, ChannelLayerNorm]]:
        for i in range(1, 5):
            yield getattr(self, f"patch_embed{i}"), getattr(self, f"block{i}"), getattr(self, f"norm{i}")

    def execute(self, x: jt.Var) -> list[jt.Var]:
        if x.ndim != 4 or x.shape[1] != self.patch_embed1.proj.in_channels:
            raise ValueError(f"VAN expects images [B, {self.patch_embed1.proj.in_channels}, H, W], "
                             f"got shape {list(x.shape)}")
        features = []
        for patch_embed, blocks, norm in self.stages():
            x = patch_embed(x)
            for block in blocks:
                x = block(x)
            x = norm(x)
            features.append(x)
        return features


class VANClassifier(VAN):
    """VAN with the ImageNet head (global average pool of stage 4 -> ``head``): logits [B, classes]."""

    def __init__(self, embed_dims: Sequence[int], depths: Sequence[int], num_classes: int = 1000,
                 **kwargs: Any) -> None:
        super().__init__(embed_dims, depths, **kwargs)
        self.head = nn.Linear(self.out_channels[-1], num_classes)
        self.head.weight.assign(jt.init.trunc_normal_(jt.zeros(self.head.weight.shape), std=0.02))
        self.head.bias.assign(jt.zeros(self.head.bias.shape))

    def execute(self, x: jt.Var) -> jt.Var:
        return self.head(super().execute(x)[-1].mean(dims=(2, 3)))


def _make_factory(name: str) -> Callable[..., VAN]:
    size = VAN_SIZES[name]

    # Explicit keywords, so that models.build_model can tell backbone options from typos.
    def factory(output_stride: int = 8, drop_path_rate: float = 0.1, embed_dims: Sequence[int] | None = None,
                depths: Sequence[int] | None = None, mlp_ratios: Sequence[int] = MLP_RATIOS, in_channels: int = 3,
                num_classes: int = 0) -> VAN:
        config = dict(embed_dims=embed_dims or size["embed_dims"], depths=depths or size["depths"],
                      mlp_ratios=mlp_ratios, drop_path_rate=drop_path_rate, output_stride=output_stride,
                      in_channels=in_channels)
        return VANClassifier(num_classes=num_classes, **config) if num_classes else VAN(**config)

    factory.__name__ = name
    factory.__doc__ = (f"{name}: four stage features for segmentation, or with ``num_classes`` the ImageNet "
                       "classifier. ``embed_dims`` / ``depths`` / ``mlp_ratios`` override the size (tiny "
                       "models for tests). Official weights: utils.checkpoint.load_backbone_weights.")
    return factory


for _name in VAN_SIZES:
    globals()[_name] = register_backbone(_name, aliases=VAN_ALIASES.get(_name, ()))(_make_factory(_name))


# The official names are ours (the module docstring lists them).
WEIGHT_LAYOUTS = (
    WeightLayout("van_official", "backbone", "official VAN ImageNet (Visual-Attention-Network)",
                 lambda keys: "patch_embed1.proj.weight" in keys, unchanged, classifier="head."),
)
