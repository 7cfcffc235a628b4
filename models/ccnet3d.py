"""CCNet for video clips: 3D (space-time) criss-cross attention in the RCCA head (TPAMI CCNet).

A clip [B, T, 3, H, W] is segmented frame by frame except inside the attention: the backbone, the
head's ``conva``, ``convb`` / bottleneck and the auxiliary head run on the B*T frames as one batch;
only the R criss-cross loops see the features as clips [B, C, T, h, w], where every position
attends to its row, its column and its temporal line (the same (y, x) in every frame). So frames
exchange information through attention alone, and with R = 0 they are independent.

Outputs are per frame, in clip order (frame t of clip b at index b*T + t):
training ``[main, aux(, ccl)]`` with [B*T, K, h, w] (what ``models.losses.SegLoss`` takes, with
labels [B*T, H, W]); eval mode: logits upsampled to the frame size, [B*T, K, H, W].

Parameter names and shapes are those of ``CCNet``: a checkpoint of the image model loads into the
clip model unchanged (the attention's 1x1 projections are stored as 2D convolutions), and with
T = 1 both compute the same thing.
"""
import jittor as jt
from jittor import nn

from .cc_attention import CrissCrossAttention3D
from .ccnet import CCNet, RCCAHead


class ClipCrissCrossAttention(CrissCrossAttention3D):
    """``CrissCrossAttention3D`` whose 1x1x1 projections are stored as 1x1 ``nn.Conv2d`` weights
    ([C', C, 1, 1], the 2D module's shapes) so 2D checkpoints fit. The computation is the same:
    the 3D module applies its projections per frame as a 2D convolution anyway."""
    projection_conv = nn.Conv2d


def frames_to_clips(x: jt.Var, clip_len: int) -> jt.Var:
    """[B*T, C, h, w] (frames in clip order) -> [B, C, T, h, w]."""
    frames, channels, height, width = x.shape
    return x.reshape(frames // clip_len, clip_len, channels, height, width).permute(0, 2, 1, 3, 4)


def clips_to_frames(x: jt.Var) -> jt.Var:
    """[B, C, T, h, w] -> [B*T, C, h, w], the inverse of ``frames_to_clips``."""
    batch, channels, clip_len, height, width = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(batch * clip_len, channels, height, width)


class TemporalRCCAHead(RCCAHead):
    """RCCA head on the frames of clips of ``clip_len`` frames: conva per frame, the R loops of
    space-time criss-cross attention on the clips, then convb / bottleneck per frame."""
    attention_class = ClipCrissCrossAttention

    def execute(self, x: jt.Var, return_context: bool = False, clip_len: int = 1) -> jt.Var | tuple[jt.Var, jt.Var]:
        context = self.conva(x)
        if self.recurrence:
            clips = frames_to_clips(context, clip_len)
            for _ in range(self.recurrence):
                clips = self.cca(clips)
            context = clips_to_frames(clips)
        return self.fuse(x, context, return_context)


class TemporalCCNet(CCNet):
    """CCNet on clips [B, T, 3, H, W]; outputs per frame, [B*T, ...] (module docstring).

    Built by ``models.build_model(..., temporal=True)``; same options as ``CCNet``.
    """
    head_class = TemporalRCCAHead
    temporal = True

    def execute(self, clips: jt.Var) -> jt.Var | list[jt.Var]:
        if len(clips.shape) != 5 or clips.shape[2] != 3 or min(clips.shape) < 1:
            raise ValueError(f"{type(self).__name__}: input must be clips [B, T, 3, H, W] (frames stacked "
                             f"along T), got shape {list(clips.shape)}")
        batch, clip_len = clips.shape[:2]
        frames = clips.reshape(batch * clip_len, *clips.shape[2:])
        return self.decode(self.backbone(frames), tuple(clips.shape[3:]), clip_len=clip_len)
