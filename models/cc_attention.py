"""Criss-cross attention (DESIGN.md section 2).

PLACEHOLDER: only the plain-Jittor reference so far; the fused jt.code ops come with issue 2.
"""
import utils  # noqa: F401  (configures Jittor before it is imported)
import jittor as jt
from jittor import nn


def criss_cross_reference(query, key, value):
    """-inf-diagonal formulation: column energies (self masked) ++ row energies, one softmax."""
    b, _, h, w = query.shape
    energy_col = jt.matmul(query.permute(0, 3, 2, 1), key.permute(0, 3, 1, 2))     # [B,W,H(y),H(j)]
    diagonal = jt.init.eye(h, dtype=query.dtype) * -1e30  # finite so that H == 1 stays NaN-free
    energy_col = (energy_col + diagonal).permute(0, 2, 1, 3)                       # [B,H,W,H]
    energy_row = jt.matmul(query.permute(0, 2, 3, 1), key.permute(0, 2, 1, 3))     # [B,H,W,W]
    attention = nn.softmax(jt.concat([energy_col, energy_row], dim=3), dim=3)
    att_col = attention[:, :, :, :h].permute(0, 2, 1, 3)                            # [B,W,H,H]
    att_row = attention[:, :, :, h:]                                                # [B,H,W,W]
    out_col = jt.matmul(att_col, value.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)
    out_row = jt.matmul(att_row, value.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return out_col + out_row


class CrissCrossAttention(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.query_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = jt.zeros([1])

    def execute(self, x):
        out = criss_cross_reference(self.query_conv(x), self.key_conv(x), self.value_conv(x))
        return self.gamma * out + x
