"""Built-in synthetic clip set where the class of a pixel is decided by another frame.

Every clip has ``CLIP_LEN`` = 3 frames of 96x96 px over one textured background (pixel noise
redrawn per frame). In frame 0 a few discs and squares are coloured red or blue; in the later
frames the same objects, at the same place, are all the same grey. Their class there is the colour
they had in frame 0 ("grey/was-red", "grey/was-blue"): nothing in frames 1-2 tells the two apart
(same grey, same noise, shape, size and position independent of the class), so a per-frame model
can only guess, while 3D criss-cross attention reaches frame 0 along each position's temporal line.
White rings, placed anew in every frame, are recognisable locally. 6 classes: background, ring,
red, blue (frame 0) and the two ``TEMPORAL_CLASSES`` (frames 1-2).

Generated on first use into ``$CCNET_HOME/demo_clips`` (default ``~/.cache/ccnet-jittor/demo_clips``),
deterministically (one seeded NumPy generator per clip) and atomically (written to a temporary
folder, then renamed), never into a folder that is neither empty nor a clip set of ours
(datasets/generated.py). Layout, label values = class index (255 = ignore)::

    demo_clips/training/clip_00000/frame_0.png label_0.png frame_1.png label_1.png ...
    demo_clips/validation/...
    demo_clips/demo_clips_info.json

Training augmentation is the usual pipeline (datasets/transforms.py: resize, crop, flip,
photometric) with the *same* random draws for every frame of a clip, so the objects stay aligned
along T. ``python -m datasets.demo_clips --out images/demo_clips_samples.png`` draws samples.
"""
import argparse
import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from utils.outputs import refuse_overwrite

from . import transforms as T
from .base import (BadSampleError, BadSampleWarning, DatasetError, SegDataset, make_lut, read_image, read_label,
                   register_dataset)
from .ade20k import SPLIT_FOLDERS
from .demo import _write_png, default_root as _demo_root
from .generated import ensure_generated, require_existing_root, set_version

CLIPS_VERSION = 1          # bump when the generator changes: cached sets are then regenerated
CLIP_SIZE = 96
CLIP_LEN = 3
CLIP_SPLITS = {"training": 300, "validation": 50}
INFO_FILE = "demo_clips_info.json"   # written last: marks a folder as a complete clip set of ours

CLIP_CLASSES = ("background", "ring", "red", "blue", "grey/was-red", "grey/was-blue")
CLIP_PALETTE = [[60, 60, 60], [250, 250, 120], [220, 40, 40], [50, 80, 230], [250, 140, 140],
                [140, 170, 255]]
BACKGROUND, RING, RED, BLUE, GREY_RED, GREY_BLUE = range(6)
TEMPORAL_CLASSES = (GREY_RED, GREY_BLUE)
GREY_OF = {RED: GREY_RED, BLUE: GREY_BLUE}
# >= 120 degrees apart in hue: photometric hue jitter (+-36 degrees) cannot swap them.
COLOURS = {RED: (205, 35, 35), BLUE: (40, 60, 210)}
OBJECT_GREY = 170
RING_WHITE = 245


# ------------------------------------------------------------------------------------ generator
def _place(free, mask, margin=3):
    """Claim ``mask`` (plus ``margin`` px around it) in ``free``; False if it overlaps."""
    grown = mask.copy()
    for _ in range(margin):
        grown[:-1] |= grown[1:]; grown[1:] |= grown[:-1]
        grown[:, :-1] |= grown[:, 1:]; grown[:, 1:] |= grown[:, :-1]
    if not free[grown].all():
        return False
    free[grown] = False
    return True


def make_clip(rng: np.random.Generator, size: int = CLIP_SIZE,
              clip_len: int = CLIP_LEN) -> tuple[np.ndarray, np.ndarray]:
    """One clip: (rgb uint8 [T, S, S, 3], label uint8 [T, S, S] of class indices)."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = rng.uniform([70, 80, 55], [125, 125, 100])
    coarse = rng.normal(0.0, 12.0, size=(4, 4, 3)).astype(np.float32)
    smooth = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((size, size), Image.BILINEAR))
                       for c in range(3)], axis=-1)
    background = base + smooth

    # Objects: fixed for the whole clip. Class, shape and size are drawn independently.
    free = np.ones((size, size), bool)
    objects = []
    for _ in range(int(rng.integers(3, 6))):
        for _try in range(30):
            cls = int(rng.choice(list(COLOURS)))
            r = int(rng.integers(7, 12))
            cy, cx = (int(v) for v in rng.integers(r + 2, size - r - 2, size=2))
            if rng.integers(2):
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
            if _place(free, mask):
                objects.append((mask, cls))
                break

    frames = np.empty((clip_len, size, size, 3), np.uint8)
    labels = np.full((clip_len, size, size), BACKGROUND, np.uint8)
    for t in range(clip_len):
        rgb = background + rng.normal(0.0, 7.0, size=(size, size, 3))
        for mask, cls in objects:
            colour = COLOURS[cls] if t == 0 else (OBJECT_GREY,) * 3
            rgb[mask] = np.asarray(colour, np.float32) + rng.normal(0.0, 5.0, size=(int(mask.sum()), 3))
            labels[t][mask] = cls if t == 0 else GREY_OF[cls]
        ring_free = free.copy()                      # rings move: new places in every frame
        for _ in range(int(rng.integers(1, 3))):
            for _try in range(30):
                r = int(rng.integers(7, 11))
                cy, cx = (int(v) for v in rng.integers(r + 2, size - r - 2, size=2))
                d2 = (yy - cy) ** 2 + (xx - cx) ** 2
                mask = (d2 <= r * r) & (d2 >= (r - 3) ** 2)
                if _place(ring_free, mask, margin=2):
                    rgb[mask] = RING_WHITE + rng.normal(0.0, 5.0, size=(int(mask.sum()), 3))
                    labels[t][mask] = RING
                    break
        frames[t] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return frames, labels


def generate(out_dir: str | os.PathLike, seed: int = 0, splits: Mapping[str, int] | None = None, size: int = CLIP_SIZE,
             clip_len: int = CLIP_LEN) -> dict:
    """Write the clip set into ``out_dir`` (which must not exist yet); returns its info dict."""
    splits = dict(CLIP_SPLITS if splits is None else splits)
    out_dir = Path(out_dir)
    for split_code, (split, count) in enumerate(sorted(splits.items())):
        for index in range(count):
            rng = np.random.default_rng([seed, split_code, index])      # one stream per clip
            frames, labels = make_clip(rng, size, clip_len)
            clip_dir = out_dir / split / f"clip_{index:05d}"
            clip_dir.mkdir(parents=True)
            for t in range(clip_len):
                _write_png(frames[t], clip_dir / f"frame_{t}.png")
                _write_png(labels[t], clip_dir / f"label_{t}.png")
    info = {"version": CLIPS_VERSION, "seed": seed, "size": size, "clip_len": clip_len, "splits": splits,
            "classes": list(CLIP_CLASSES), "temporal_classes": [CLIP_CLASSES[c] for c in TEMPORAL_CLASSES]}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=1))     # last: marks a complete set
    return info


ROOT_HINT = ("--data-root is for a clip set made earlier, your own clips in the same layout, or an "
             "empty folder to generate the set in; omit it to use $CCNET_HOME/demo_clips "
             "(default ~/.cache/ccnet-jittor/demo_clips)")


def ensure_demo_clips(root: str | os.PathLike | None = None, seed: int = 0, splits: Mapping[str, int] | None = None,
                      size: int = CLIP_SIZE, clip_len: int = CLIP_LEN) -> Path:
    """Return the clip folder, generating it first if it is absent, empty or an outdated clip set
    (``datasets.generated``: atomically; any other folder is an error and stays untouched)."""
    root = Path(root).expanduser() if root is not None else _demo_root("demo_clips")
    expected = {"version": CLIPS_VERSION, "seed": seed, "size": size, "clip_len": clip_len,
                "splits": dict(CLIP_SPLITS if splits is None else splits)}
    ensure_generated(root, INFO_FILE, expected, ("training", "validation", INFO_FILE), what="clip set",
                     hint=ROOT_HINT, build=lambda path: generate(path, seed=seed, splits=expected["splits"],
                                                                 size=size, clip_len=clip_len))
    return root


# -------------------------------------------------------------------------------------- dataset
class SameForAllFrames:
    """Apply a frame transform ``t(image, label, rng)`` to every frame of a clip with the same random
    draws (each frame starts from a copy of the generator), then stack: images [T, 3, h, w],
    labels [T, h, w]. Exact only while the draws do not depend on the pixels, which is why clips
    are cropped with ``cat_max_ratio=1`` (no content-dependent re-draws)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, frames: np.ndarray, labels: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        outputs = [self.transform(frame, label, copy.deepcopy(rng)) for frame, label in zip(frames, labels)]
        return np.stack([o[0] for o in outputs]), np.stack([o[1] for o in outputs])


@register_dataset("demo_clips")
class DemoClipsDataset(SegDataset):
    """The synthetic clip set above. A sample is a clip: ``load_raw(i)`` gives (rgb uint8
    [T, H, W, 3], label int32 [T, H, W]); ``dataset[i]`` in train mode the augmented float32
    [T, 3, h, w] frames and [T, h, w] labels. ``samples[i] = (clip folder, clip folder)``.

    ``data_root``: None for the generated set in ``$CCNET_HOME/demo_clips``; a given folder must
    exist: a clip set made earlier (read as it is; regenerated if an older version made it), an
    empty folder (generated there), or your own clips in the same layout (read, never written to).
    Extra options: ``seed`` (default 0), ``splits`` ({"training": n, "validation": m}).
    """
    CLASSES = CLIP_CLASSES
    PALETTE = CLIP_PALETTE
    TEMPORAL_CLASSES = TEMPORAL_CLASSES
    DEFAULT_CROP_SIZE = CLIP_SIZE
    DEFAULT_BASE_SIZE = (CLIP_SIZE, CLIP_SIZE)
    DEFAULT_RATIO_RANGE = (0.75, 1.25)
    LAYOUT = ("  {root}/\n"
              "    training/clip_00000/frame_0.png label_0.png frame_1.png label_1.png ...\n"
              "    validation/clip_00000/...      (label PNGs: class index per pixel, 255 = ignore)")
    DOWNLOAD = "nothing to download: the clip set is generated (datasets/demo_clips.py)"

    def __init__(self, data_root: str | os.PathLike | None = None, seed: int = 0,
                 splits: Mapping[str, int] | None = None, cat_max_ratio: float = 1.0, **kwargs: Any) -> None:
        if cat_max_ratio < 1.0:
            raise ValueError(f"DemoClipsDataset: cat_max_ratio={cat_max_ratio} would crop each frame of a "
                             f"clip differently (its re-draws depend on the labels); use 1.0")
        if data_root is not None:
            data_root = require_existing_root(data_root, type(self).__name__, ROOT_HINT)
        if data_root is None or set_version(data_root, INFO_FILE) not in (None, CLIPS_VERSION) \
                or not any(data_root.iterdir()):             # an outdated set of ours, or an empty folder
            data_root = ensure_demo_clips(data_root, seed=seed, splits=splits)
        super().__init__(data_root=data_root, cat_max_ratio=cat_max_ratio, **kwargs)
        self.train_transform = SameForAllFrames(self.train_transform)

    def scan(self) -> list[tuple[str, str]]:
        split_dir = self.require_dir(self.data_root / SPLIT_FOLDERS.get(self.split, self.split), "clip")
        samples, lengths = [], {}
        for clip_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            frames = sorted(clip_dir.glob("frame_*.png"))
            expected = [clip_dir / f"{kind}_{t}.png" for t in range(len(frames)) for kind in ("frame", "label")]
            missing = [p for p in expected if not p.is_file()]
            if not frames or missing:
                problem = (f"clip {clip_dir} is incomplete: missing {', '.join(p.name for p in missing)}" if missing
                           else f"clip {clip_dir} has no frame_<t>.png files")
                self._bad_clip(problem + "; expected frame_0.png, label_0.png, frame_1.png, ...")
                continue
            lengths.setdefault(len(frames), clip_dir)
            samples.append((str(clip_dir), str(clip_dir)))
        if len(lengths) > 1:
            raise DatasetError(f"{type(self).__name__} split {self.split!r}: clips must all have the same number "
                               f"of frames, found " + ", ".join(f"{n} ({p})" for n, p in sorted(lengths.items())))
        self.clip_len = next(iter(lengths), 0)
        return samples

    def _bad_clip(self, message):
        if not self.skip_bad:
            raise DatasetError(message + self._layout_help())
        warnings.warn(f"skip_bad=True: skipping {message}", BadSampleWarning, stacklevel=3)

    def label_lut(self, label_path: str | os.PathLike | None) -> np.ndarray:
        # label values are class indices already; one table serves every frame
        if getattr(self, "_lut", None) is None:
            self._lut = make_lut({**{i: i for i in range(len(CLIP_CLASSES))}, self.ignore_index: self.ignore_index})
        return self._lut

    def encode_train_ids(self, pred: np.ndarray) -> np.ndarray:
        return np.asarray(pred).astype(np.uint8)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        clip_dir = Path(self.samples[index][0])
        frames, labels = [], []
        for t in range(self.clip_len):
            frame_path, label_path = clip_dir / f"frame_{t}.png", clip_dir / f"label_{t}.png"
            rgb, raw = read_image(frame_path), read_label(label_path)
            if raw.shape != rgb.shape[:2] or (frames and rgb.shape != frames[0].shape):
                raise BadSampleError(f"clip {clip_dir}: {frame_path.name} is {rgb.shape[1]}x{rgb.shape[0]} and "
                                     f"{label_path.name} {raw.shape[1]}x{raw.shape[0]} (WxH); expected every "
                                     f"frame and label of a clip to have the size of frame_0.png")
            frames.append(rgb)
            labels.append(self.map_label(raw, label_path))
        return np.stack(frames), np.stack(labels)

    def __getitem__(self, index):
        if self.mode == "train":
            return super().__getitem__(index)        # train_transform is SameForAllFrames
        rgb, label = self.load_raw(int(index))
        return np.stack([T.normalize(frame) for frame in rgb]), label


# ------------------------------------------------------------------------------------- picture
def sample_grid(dataset: SegDataset, indices: Sequence[int], scale: int = 2) -> np.ndarray:
    """RGB picture: per clip, its frames on one row and their colourised labels below."""
    rows = []
    for index in indices:
        rgb, label = dataset.load_raw(index)
        rows.append(np.concatenate(list(rgb), axis=1))
        rows.append(np.concatenate([dataset.colorize(l) for l in label], axis=1))
    grid = np.concatenate(rows, axis=0)
    return np.asarray(Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the clip demo set and draw a few clips.")
    parser.add_argument("--out", default="images/demo_clips_samples.png", help="picture to write")
    parser.add_argument("--clips", type=int, default=2, help="how many validation clips to draw")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        refuse_overwrite([args.out], args.overwrite, "--out", instead="choose another --out")
    except FileExistsError as err:
        parser.error(str(err))
    dataset = DemoClipsDataset(split="val", mode="test")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample_grid(dataset, range(args.clips))).save(args.out)
    print(f"{args.clips} clips ({dataset.clip_len} frames each; rows: frames, labels) written to {args.out}")


if __name__ == "__main__":
    main()
