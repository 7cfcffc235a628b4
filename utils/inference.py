"""Test-time inference: whole image or sliding window, multi-scale, horizontal flip.

``inference(model, image, ...)`` returns class scores at the *original* image size.

How the views are combined, and why:

* **sliding window** (``mode="slide"``): tiles of ``crop_size`` every ``stride`` pixels; the last
  tile of a row/column is shifted back so it ends at the border (never past it); a tile smaller
  than ``crop_size`` (image smaller than the window) is zero-padded at the bottom/right --
  zero in *normalised* space, i.e. the mean colour -- and the padded part of its output is
  dropped. Overlapping **logits** are averaged. This is the official CCNet evaluation
  (``predict_sliding`` in speedinghzl/CCNet) and mmsegmentation's ``slide_inference``.
* **scales and flip**: each view (scale x flip) is resized back to the original size and their
  **softmax probabilities** are averaged, as mmsegmentation's ``aug_test`` does (its published
  published multi-scale numbers are what users compare with). Averaging probabilities
  keeps one over-confident view from dominating; the official CCNet script averages logits,
  available here as ``average="logit"``. With more than one view the function returns the log of
  the averaged probabilities: still a logit tensor (softmax of it gives the averaged
  probabilities, argmax is the prediction). With a single view it returns the raw logits.
* **scale reference**: with ``base_size=(long, short)`` a scale ``s`` resizes the image keeping its
  aspect ratio to fit ``(long*s, short*s)`` (mmsegmentation's ``Resize(keep_ratio=True)``; ADE20K
  uses (2048, 512)); without it, ``s`` multiplies the original size.

The model must be in eval mode (``model.eval()``): CCNet then returns logits upsampled to its
input size.
"""
import math
from typing import Any, Callable, Sequence

import numpy as np

import jittor as jt
from jittor import nn

MODES = ("whole", "slide")
AVERAGES = ("prob", "logit")


def inference(model: Callable[[jt.Var], Any], image: np.ndarray | jt.Var, mode: str = "whole",
              crop_size: int | Sequence[int] | None = None, stride: int | Sequence[int] | None = None,
              scales: Sequence[float] = (1.0,), flip: bool = False, base_size: Sequence[int] | None = None,
              average: str = "prob") -> jt.Var:
    """Scores ``[B, C, H, W]`` (or ``[C, H, W]`` for a single ``[3, H, W]`` image) as a ``jt.Var``.

    ``image``: normalised float image(s), numpy or ``jt.Var``, ``[3, H, W]`` or ``[B, 3, H, W]``.
    ``crop_size`` / ``stride``: int or (h, w); sliding mode only (stride defaults to 2/3 of the
    crop, the official 1/3 overlap).
    """
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; choose one of {MODES}")
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r}; choose one of {AVERAGES}")
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive numbers, got {scales}")
    if mode == "slide":
        if crop_size is None:
            raise ValueError("sliding-window inference needs crop_size (e.g. test.py --window 512)")
        crop_size = _pair(crop_size, "crop_size")
        stride = _pair(stride, "stride") if stride is not None else tuple(
            int(math.ceil(c * 2 / 3)) for c in crop_size)

    x = image if isinstance(image, jt.Var) else jt.array(np.ascontiguousarray(image, dtype=np.float32))
    single = x.ndim == 3
    if single:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an image [3,H,W] or batch [B,3,H,W], got shape {tuple(image.shape)}")
    height, width = x.shape[2], x.shape[3]

    with jt.no_grad():
        views = []
        for scale in scales:
            size = _scaled_size(height, width, scale, base_size)
            scaled = x if size == (height, width) else _resize(x, size)
            views.append(_forward(model, scaled, mode, crop_size, stride))
            if flip:
                views.append(_forward(model, scaled.flip(3), mode, crop_size, stride).flip(3))
        views = [v if tuple(v.shape[2:]) == (height, width) else _resize(v, (height, width)) for v in views]
        if len(views) == 1:
            scores = views[0]
        elif average == "logit":
            scores = sum(views) / len(views)
        else:
            probs = sum(nn.softmax(v, dim=1) for v in views) / len(views)
            scores = jt.log(probs.maximum(1e-12))
        scores.sync()
    return scores[0] if single else scores


def clip_inference(model: nn.Module, frames: np.ndarray, **options: Any) -> jt.Var:
    """Scores ``[T, C, H, W]`` for the normalised frames ``[T, 3, H, W]`` of one clip.

    A temporal model (``model.temporal``, models/ccnet3d.py) sees the frames as one clip, so they
    attend to each other; any other model segments them one by one. ``options`` are those of
    ``inference`` and apply to every frame alike (a sliding-window tile is the same window in
    every frame, a flip flips every frame), which keeps the frames aligned along T.
    """
    if getattr(model, "temporal", False):
        def as_clip(x):                     # inference's batch of views [T, 3, h, w] -> one clip
            return model(x.unsqueeze(0))
        return inference(as_clip, frames, **options)
    return inference(model, frames, **options)


def _forward(model, x, mode, crop_size, stride):
    return _whole(model, x) if mode == "whole" else _slide(model, x, crop_size, stride)


def _whole(model, x):
    out = model(x)
    if isinstance(out, (list, tuple)):      # a model left in training mode returns [main, aux]
        out = out[0]
    if tuple(out.shape[2:]) != tuple(x.shape[2:]):
        out = _resize(out, tuple(x.shape[2:]))
    return out


def tile_boxes(height: int, width: int, crop_size: Sequence[int],
               stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every sliding-window tile, row-major (official CCNet tiling)."""
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    rows = max(int(math.ceil((height - crop_h) / stride_h)), 0) + 1
    cols = max(int(math.ceil((width - crop_w) / stride_w)), 0) + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            y2 = min(row * stride_h + crop_h, height)
            x2 = min(col * stride_w + crop_w, width)
            boxes.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return boxes


def _slide(model, x, crop_size, stride):
    # Tiles are cut, zero-padded and summed in numpy: every tile then reaches the model with the
    # same shape (one set of compiled kernels), whereas per-offset slicing / padding ops on jt.Vars
    # would compile new kernels for every tile position and image size.
    batch, channels, height, width = x.shape
    crop_h, crop_w = crop_size
    image = x.numpy()
    total, count = None, np.zeros((height, width), dtype=np.float32)
    for y1, y2, x1, x2 in tile_boxes(height, width, crop_size, stride):
        tile = np.zeros((batch, channels, crop_h, crop_w), dtype=np.float32)
        tile[:, :, :y2 - y1, :x2 - x1] = image[:, :, y1:y2, x1:x2]
        out = _whole(model, jt.array(tile)).numpy()
        if total is None:
            total = np.zeros((batch, out.shape[1], height, width), dtype=np.float32)
        total[:, :, y1:y2, x1:x2] += out[:, :, :y2 - y1, :x2 - x1]
        count[y1:y2, x1:x2] += 1
    return jt.array(total / count)


def _scaled_size(height, width, scale, base_size):
    if base_size is None:
        factor_h = factor_w = scale
    else:
        long_side, short_side = (float(v) * scale for v in base_size)
        factor_h = factor_w = min(long_side / max(height, width), short_side / min(height, width))
    return max(int(height * factor_h + 0.5), 1), max(int(width * factor_w + 0.5), 1)


def _resize(x, size):
    return nn.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _pair(value, name):
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value[0], value[0]
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{name} must be one or two positive ints, got {value}")
    return value
