"""CCNet segmentor: backbone -> RCCA head (main logits) + auxiliary FCN head on stage 3.

Module and parameter names follow the official code (speedinghzl/CCNet) so
its checkpoints map key for key (the official backbone keys sit at the top level, ours under
``backbone.``):

    head.conva.{0,1}        conv3x3(C4 -> C4/4) + BN/act
    head.cca.*              CrissCrossAttention(C4/4), one module applied R times
    head.convb.{0,1}        conv3x3(C4/4 -> C4/4) + BN/act
    head.bottleneck.{0,1,3} conv3x3(C4 + C4/4 -> 512) + BN/act, [2] Dropout2d(0.1), conv1x1 -> classes
    dsn.{0,1,3}             conv3x3(C3 -> 512, bias) + BN/act, [2] Dropout2d(0.1), conv1x1 -> classes

The official code uses InPlaceABNSync, one module doing BatchNorm and LeakyReLU(0.01) together;
``BatchNormAct`` (models/norm_act.py) plays that part so indices 1 and 3 stay where the official
keys expect them. Head activations: "leaky_relu" (official, InPlaceABN's default) or "relu"
(mmsegmentation's CCHead).
"""
from typing import Any

import numpy as np

import jittor as jt
from jittor import nn

from .cc_attention import CrissCrossAttention
from .norm_act import BatchNormAct
from .resnet import from_v1c
from .weights import StateDict, WeightLayout, rename, unchanged


def conv_bn_act(in_channels: int, out_channels: int, activation: str, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
                         BatchNormAct(out_channels, activation))


class RCCAHead(nn.Module):
    """Recurrent criss-cross attention head (the official RCCAModule).

    ``recurrence`` R: how many times the one shared ``cca`` module is applied; R = 0 builds no
    attention module at all (a plain conv head, the paper's baseline). ``execute`` returns the
    logits, or (logits, attention output) with ``return_context=True`` (for the CCL projection).
    ``attention_class`` is the attention module it builds (a subclass swaps in the clip version).
    ``gamma_init``: starting value of the attention's residual scale (official: 0; see
    CrissCrossAttention).
    """
    attention_class = CrissCrossAttention

    def __init__(self, in_channels: int, num_classes: int, recurrence: int = 2, channels: int = 512,
                 activation: str = "leaky_relu", dropout: float = 0.1, gamma_init: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(recurrence, int) and recurrence >= 0):
            raise ValueError(f"recurrence must be an int >= 0, got {recurrence!r}")
        inter_channels = in_channels // 4
        self.recurrence = recurrence
        self.inter_channels = inter_channels
        self.conva = conv_bn_act(in_channels, inter_channels, activation)
        self.cca = self.attention_class(inter_channels, gamma_init=gamma_init) if recurrence > 0 else None
        self.convb = conv_bn_act(inter_channels, inter_channels, activation)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels + inter_channels, channels, 3, padding=1, bias=False),
            BatchNormAct(channels, activation),
            nn.Dropout2d(dropout, is_train=True),
            nn.Conv2d(channels, num_classes, 1))

    def execute(self, x: jt.Var, return_context: bool = False) -> jt.Var | tuple[jt.Var, jt.Var]:
        context = self.conva(x)
        for _ in range(self.recurrence):
            context = self.cca(context)
        return self.fuse(x, context, return_context)

    def fuse(self, x: jt.Var, context: jt.Var, return_context: bool = False) -> jt.Var | tuple[jt.Var, jt.Var]:
        """convb on the attention output, concatenated with the head input -> class logits."""
        out = self.bottleneck(jt.concat([x, self.convb(context)], dim=1))
        return (out, context) if return_context else out


def auxiliary_head(in_channels: int, num_classes: int, channels: int = 512, activation: str = "leaky_relu",
                   dropout: float = 0.1) -> nn.Sequential:
    """The official ``dsn`` branch (first conv with bias, as in the official code)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=True),
        BatchNormAct(channels, activation),
        nn.Dropout2d(dropout, is_train=True),
        nn.Conv2d(channels, num_classes, 1))


class CCNet(nn.Module):
    """Backbone + RCCA head + auxiliary head.

    Training mode: ``model(x)`` -> ``[main_logits, aux_logits]`` at feature resolution (stride 8
    for the default backbones), plus ``ccl_features`` ([B, ccl_dim, h, w], the RCCA output
    projected by a 1x1 conv) as a third item when ``ccl_dim > 0``.
    Eval mode (``model.eval()``): main logits bilinearly upsampled to the input size.
    ``head_class``: the RCCA head it builds (models/ccnet3d.py swaps in the clip head).
    ``cca_gamma_init``: starting gamma of the criss-cross attention (official 0; a short schedule
    such as the demo preset's starts it at 1, or the attention weights barely move, see
    CrissCrossAttention).
    """
    head_class = RCCAHead
    temporal = False            # True: input clips [B, T, 3, H, W] (models/ccnet3d.py)
    config = None               # the ModelConfig it was built from, set by models.build_model

    def __init__(self, backbone: nn.Module, num_classes: int, recurrence: int = 2, head_channels: int = 512,
                 aux_channels: int = 512, head_act: str = "leaky_relu", dropout: float = 0.1, ccl_dim: int = 0,
                 cca_gamma_init: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not (isinstance(ccl_dim, int) and ccl_dim >= 0):
            raise ValueError(f"ccl_dim must be an int >= 0, got {ccl_dim!r}")
        if isinstance(cca_gamma_init, bool) or not isinstance(cca_gamma_init, (int, float)):
            raise ValueError(f"cca_gamma_init must be a number, got {cca_gamma_init!r}")
        channels = list(getattr(backbone, "out_channels", ()))
        if len(channels) != 4:
            raise ValueError(f"backbone must expose out_channels (4 ints), got {channels!r}")
        self.num_classes = num_classes
        self.recurrence = recurrence
        self.backbone = backbone
        self.head = self.head_class(channels[3], num_classes, recurrence, head_channels, head_act, dropout,
                                    cca_gamma_init)
        self.dsn = auxiliary_head(channels[2], num_classes, aux_channels, head_act, dropout)
        self.ccl_dim = ccl_dim
        # Category consistent loss (TPAMI): a 1x1 conv maps the RCCA output to a small space.
        self.ccl_proj = nn.Conv2d(self.head.inter_channels, ccl_dim, 1) if ccl_dim else None

    def execute(self, x: jt.Var) -> jt.Var | list[jt.Var]:
        return self.decode(self.backbone(x), tuple(x.shape[2:]))

    def decode(self, features: list[jt.Var], size: tuple[int, int], **head_kwargs: Any) -> jt.Var | list[jt.Var]:
        """Heads on the backbone's stage features: the training outputs, or in eval mode the main
        logits upsampled to ``size``. ``head_kwargs`` go to the head (the clip head's ``clip_len``)."""
        if not self.is_training():
            logits = self.head(features[3], **head_kwargs)
            return nn.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        logits, context = self.head(features[3], return_context=True, **head_kwargs)
        outputs = [logits, self.dsn(features[2])]
        if self.ccl_proj is not None:
            outputs.append(self.ccl_proj(context))
        return outputs


# ------------------------------------------------------------------ published CCNet checkpoints
# The official code keeps the backbone at the top level and, in some releases, the old head
# names conv1a / conv1b / pc.
OFFICIAL_HEAD_NAMES = (("head.conv1a", "head.conva"), ("head.conv1b", "head.convb"), ("head.pc", "head.cca"))


def from_official(state: StateDict) -> tuple[StateDict, dict[str, str]]:
    """Official CCNet keys -> ours."""
    out = {}
    for key, value in state.items():
        if key.startswith(("head.", "dsn.")):
            out[rename(key, OFFICIAL_HEAD_NAMES) or key] = value
        else:
            out["backbone." + key] = value
    return out, {}


# mmsegmentation: ResNetV1c backbone, CCHead (convs / conv_cat / conv_seg) and an FCNHead.
MMSEG_HEAD_NAMES = (
    ("decode_head.convs.0.conv", "head.conva.0"), ("decode_head.convs.0.bn", "head.conva.1"),
    ("decode_head.convs.1.conv", "head.convb.0"), ("decode_head.convs.1.bn", "head.convb.1"),
    ("decode_head.conv_cat.conv", "head.bottleneck.0"), ("decode_head.conv_cat.bn", "head.bottleneck.1"),
    ("decode_head.conv_seg", "head.bottleneck.3"), ("decode_head.cca.gamma.scale", "head.cca.gamma"),
    ("decode_head.cca", "head.cca"),
    ("auxiliary_head.convs.0.conv", "dsn.0"), ("auxiliary_head.convs.0.bn", "dsn.1"),
    ("auxiliary_head.conv_seg", "dsn.3"),
)


def from_mmseg(state: StateDict) -> tuple[StateDict, dict[str, str]]:
    """mmsegmentation CCNet keys -> ours."""
    backbone, _ = from_v1c({k: v for k, v in state.items() if k.startswith("backbone.")})
    out, filled = {"backbone." + k: v for k, v in backbone.items()}, {}
    for key, value in state.items():
        if not key.startswith("backbone."):
            new = rename(key, MMSEG_HEAD_NAMES) or key
            out[new] = value.reshape(1) if new == "head.cca.gamma" else value   # mmcv's Scale is 0-dim
    if "dsn.0.weight" in out and "dsn.0.bias" not in out:
        # mmseg's auxiliary conv is followed by BN and has no bias; the official dsn conv has one.
        # A zero bias is the same function.
        out["dsn.0.bias"] = np.zeros(out["dsn.0.weight"].shape[0], np.float32)
        filled["dsn.0.bias"] = "zeros (mmseg's auxiliary conv has no bias)"
    return out, filled


WEIGHT_LAYOUTS = (
    WeightLayout("ccnet_jittor", "segmentor", "ccnet-jittor (this project)",
                 lambda keys: any(k.startswith("backbone.") for k in keys)
                 and any(k.startswith(("head.", "dsn.")) for k in keys), unchanged),
    WeightLayout("ccnet_mmseg", "segmentor", "mmsegmentation CCNet (ResNetV1c + CCHead + FCNHead)",
                 lambda keys: any(k.startswith("decode_head.") for k in keys), from_mmseg,
                 implies=dict(head_act="relu", contract_dilation=True, stem_pool_ceil=False)),
    WeightLayout("ccnet_official", "segmentor", "official CCNet (speedinghzl/CCNet)",
                 lambda keys: "layer1.0.conv1.weight" in keys
                 and any(k.startswith(("head.conva.", "head.conv1a.")) for k in keys),
                 from_official, implies=dict(head_act="leaky_relu", contract_dilation=False, stem_pool_ceil=True)),
)
