"""Image/label transforms for semantic segmentation (numpy + Pillow, no Jittor).

Every training transform is a small callable ``t(image, label, rng) -> (image, label)`` where
``image`` is an RGB uint8 array [H, W, 3] (a float32 [3, H, W] array after ``Normalize``),
``label`` an int32 array [H, W] of train ids (ignore = 255) and ``rng`` a ``numpy.random.Generator``
(passed in, so tests and worker processes control the randomness). The training pipeline follows
mmsegmentation's: random resize (ratio 0.5-2.0 of a base scale, aspect ratio kept) -> random crop
(cat_max_ratio 0.75) -> horizontal flip -> photometric distortion -> normalize -> pad (image 0,
label 255). Labels are only ever resized with nearest neighbour, so no new label values appear.
"""
from typing import Callable, Sequence

import numpy as np
from PIL import Image

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)   # ImageNet RGB mean (0..255)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)      # ImageNet RGB std (0..255)


# ----------------------------------------------------------------------------------- helpers
def normalize(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, H, W], (x - mean) / std with ImageNet RGB statistics."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"normalize expects an RGB image [H, W, 3], got shape {rgb.shape}")
    chw = rgb.transpose(2, 0, 1).astype(np.float32)          # copies into [3, H, W] order
    chw -= MEAN[:, None, None]
    chw *= (1.0 / STD)[:, None, None]
    return chw


def denormalize(chw: np.ndarray) -> np.ndarray:
    """Inverse of ``normalize``: float32 [3, H, W] -> RGB uint8 [H, W, 3] (for pictures)."""
    rgb = np.asarray(chw, dtype=np.float32).transpose(1, 2, 0) * STD + MEAN
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def as_size(size: int | Sequence[int], what: str) -> tuple[int, int]:
    """An int or an (a, b) pair -> (a, b) of positive ints."""
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{what} must be a positive int or a pair of positive ints, got {size}")
    return size


def rescale_size(hw: Sequence[int], scale: float | Sequence[int]) -> tuple[int, int]:
    """Output (h, w) for resizing an image of size ``hw`` with its aspect ratio kept.

    ``scale`` is either a number (a plain scale factor) or a pair (long_max, short_min-ish) as in
    mmsegmentation's ``img_scale=(2048, 512)``: the image is scaled by the largest factor with
    which its long side fits ``max(scale)`` and its short side fits ``min(scale)``.
    """
    h, w = int(hw[0]), int(hw[1])
    if isinstance(scale, (int, float, np.integer, np.floating)):
        factor = float(scale)
    else:
        long_max, short_max = max(scale), min(scale)
        factor = min(long_max / max(h, w), short_max / min(h, w))
    if factor <= 0:
        raise ValueError(f"resize scale must be positive, got {scale}")
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def resize(array: np.ndarray, hw: Sequence[int], nearest: bool = False) -> np.ndarray:
    """Resize an [H, W] or [H, W, C] array to ``hw``: bilinear for images, nearest for labels."""
    array = np.asarray(array)
    h, w = int(hw[0]), int(hw[1])
    if array.shape[:2] == (h, w):
        return array
    if nearest:
        # Nearest neighbour by index arithmetic (the pixel-centre convention PIL and OpenCV use):
        # exact for any integer dtype, so label values can never be blended.
        rows = np.minimum(((np.arange(h) + 0.5) * array.shape[0] / h).astype(np.int64), array.shape[0] - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * array.shape[1] / w).astype(np.int64), array.shape[1] - 1)
        return array[rows[:, None], cols[None, :]]
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(f"bilinear resize expects an RGB uint8 image, got {array.dtype} {array.shape}")
    return np.asarray(Image.fromarray(array).resize((w, h), Image.BILINEAR))


def resize_keep_ratio(image: np.ndarray, scale: float | Sequence[int], nearest: bool = False) -> np.ndarray:
    """Test-time resize keeping the aspect ratio (see ``rescale_size`` for ``scale``).

    Images use bilinear interpolation, labels (``nearest=True``) nearest neighbour.
    """
    return resize(image, rescale_size(np.asarray(image).shape[:2], scale), nearest=nearest)


# ---------------------------------------------------------------------------------- transforms
class Compose:
    """Apply transforms in order; each gets the same ``rng``."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        for transform in self.transforms:
            image, label = transform(image, label, rng)
        return image, label

    def __repr__(self):
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


class RandomResize:
    """Resize by a random ratio in ``ratio_range`` of ``base_size``, keeping the aspect ratio.

    ``base_size``: (long, short) pair as in mmsegmentation (ADE20K (2048, 512)), an int (both
    sides), or None for the image's own size (the ratio is then the scale factor itself).
    """

    def __init__(self, base_size: Sequence[int] | None = None, ratio_range: Sequence[float] = (0.5, 2.0)) -> None:
        self.base_size = None if base_size is None else as_size(base_size, "base_size")
        lo, hi = (float(r) for r in ratio_range)
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {ratio_range}")
        self.ratio_range = (lo, hi)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ratio = rng.uniform(*self.ratio_range)
        if self.base_size is None:
            scale = ratio
        else:
            scale = (self.base_size[0] * ratio, self.base_size[1] * ratio)
        hw = rescale_size(image.shape[:2], scale)
        return resize(image, hw), resize(label, hw, nearest=True)


class RandomCrop:
    """Random crop of ``crop_size`` (h, w); mmsegmentation's ``cat_max_ratio`` rule.

    Up to 10 candidate crops are drawn until one has at least two classes and no single class
    above ``cat_max_ratio`` of its labelled pixels (ignore pixels not counted); otherwise the
    last candidate is used. Images smaller than the crop are left for ``Pad``.
    """

    def __init__(self, crop_size: int | Sequence[int], cat_max_ratio: float = 0.75, ignore_index: int = 255,
                 tries: int = 10) -> None:
        self.crop_size = as_size(crop_size, "crop_size")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = ignore_index
        self.tries = tries

    def _box(self, hw, rng):
        margin_h = max(hw[0] - self.crop_size[0], 0)
        margin_w = max(hw[1] - self.crop_size[1], 0)
        y0 = int(rng.integers(0, margin_h + 1))
        x0 = int(rng.integers(0, margin_w + 1))
        return y0, y0 + min(self.crop_size[0], hw[0]), x0, x0 + min(self.crop_size[1], hw[1])

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        box = self._box(image.shape[:2], rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.tries):
                crop = label[box[0]:box[1], box[2]:box[3]]
                values, counts = np.unique(crop, return_counts=True)
                counts = counts[values != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._box(image.shape[:2], rng)
        y0, y1, x0, x1 = box
        return image[y0:y1, x0:x1], label[y0:y1, x0:x1]


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = float(prob)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() < self.prob:
            return image[:, ::-1], label[:, ::-1]
        return image, label


class PhotoMetricDistortion:
    """mmsegmentation's photometric distortion on the RGB uint8 image (the label is untouched).

    In order, each step with probability 1/2: brightness (+-32), contrast (x0.5-1.5; either
    before or after the colour steps, chosen at random), saturation (x0.5-1.5), hue (+-18 of 180
    degrees/2, the OpenCV unit). Values are clipped to 0..255 after every step.
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: float = 18) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _affine(image, alpha=1.0, beta=0.0):
        return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _contrast(self, image, rng):
        if rng.integers(2):
            image = self._affine(image, alpha=rng.uniform(*self.contrast_range))
        return image

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image = np.ascontiguousarray(image)
        if rng.integers(2):
            image = self._affine(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = bool(rng.integers(2))
        if contrast_first:
            image = self._contrast(image, rng)
        do_saturation, do_hue = rng.integers(2), rng.integers(2)
        if do_saturation or do_hue:
            hsv = np.array(Image.fromarray(image).convert("HSV"))      # H, S, V all in 0..255
            if do_saturation:
                hsv[..., 1] = self._affine(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            if do_hue:
                # OpenCV's hue unit is 2 degrees (0..179); Pillow's is 360/256 degrees.
                shift = int(rng.integers(-self.hue_delta, self.hue_delta + 1)) * 256 / 180
                hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(round(shift))) % 256
            image = np.array(Image.fromarray(hsv, mode="HSV").convert("RGB"))
        if not contrast_first:
            image = self._contrast(image, rng)
        return image, label


class Normalize:
    """RGB uint8 [H, W, 3] -> float32 [3, H, W] with ImageNet mean/std; label -> int32."""

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        return normalize(image), np.ascontiguousarray(label, dtype=np.int32)


class Pad:
    """Pad bottom/right to ``size`` (h, w): image with 0 (after Normalize: the mean colour),
    label with ``ignore_index``. Works on [3, H, W] float or [H, W, 3] uint8 images."""

    def __init__(self, size: int | Sequence[int], ignore_index: int = 255) -> None:
        self.size = as_size(size, "pad size")
        self.ignore_index = ignore_index

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        h, w = label.shape
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph == 0 and pw == 0:
            return image, label
        channels_first = image.ndim == 3 and image.shape[1:] == (h, w)
        image_pad = ((0, 0), (0, ph), (0, pw)) if channels_first else ((0, ph), (0, pw), (0, 0))
        image = np.pad(image, image_pad, constant_values=0)
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.ignore_index)
        return image, label


def build_train_transform(crop_size: int | Sequence[int], base_size: Sequence[int] | None = None,
                          ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                          flip_prob: float = 0.5, photometric: bool = True, ignore_index: int = 255) -> "Compose":
    """The standard training pipeline (mmsegmentation order); outputs have shape ``crop_size``."""
    steps = [RandomResize(base_size, ratio_range),
             RandomCrop(crop_size, cat_max_ratio, ignore_index)]
    if flip_prob > 0:
        steps.append(RandomFlip(flip_prob))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [Normalize(), Pad(crop_size, ignore_index)]
    return Compose(steps)
