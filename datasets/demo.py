"""Built-in synthetic demo set where long-range context decides the class.

Every 128x128 image has a frame. Its left strip (16 px wide) is cut into row segments 16-40 px
tall, each red or blue; its top strip into column segments, each cyan or orange; the right and
bottom strips (8 px) are neutral grey. Inside lie grey discs, grey squares and white rings on a
textured background. 11 classes:

* background, frame (the neutral strips), ring, and the four marker classes (marker/red, ...):
  all recognisable locally;
* a grey **disc** is "disc/red-row" or "disc/blue-row" depending only on the colour of the left
  marker of *its row* (a disc always fits inside one segment's rows);
* a grey **square** is "square/cyan-col" or "square/orange-col" depending only on the colour of
  the top marker of *its column*.

Discs of both classes look exactly alike (same grey, same noise), as do squares, and they lie in
the right (discs) or lower (squares) part of the image, 54-100 px from their marker, while the
marker colour changes every 16-40 px along the strip: a model must look far along the same row
or column, which is what criss-cross attention does (R=1 already sees the whole row and column,
R=2 the whole image). ``CONTEXT_CLASSES`` lists those four classes. The markers are classes of
their own so that the features at a marker encode its colour from the start; attention then only
has to carry that along the row or column.

The set is generated on first use into ``$CCNET_HOME/demo`` (default ``~/.cache/ccnet-jittor/demo``)
in ADE20K's layout (``images/{training,validation}/*.png``, ``annotations/...``, annotation value
= class index + 1) and read by the ADE20K loader. Generation is deterministic (seeded NumPy, one
generator per image) and atomic (written to a temporary folder, then renamed), and never touches
a folder that is not empty and not a demo set (datasets/generated.py).

``python -m datasets.demo --out images/demo_samples.png`` draws a few samples with their labels.
"""
import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from utils.outputs import refuse_overwrite
from utils.supervisor import launch_rank

from .ade20k import ADE20KDataset
from .base import SegDataset, register_dataset
from .generated import ensure_generated, require_existing_root, set_version

DEMO_VERSION = 4           # bump when the generator changes: cached sets are then regenerated
DEMO_SIZE = 128
DEMO_SPLITS = {"training": 300, "validation": 50}
INFO_FILE = "demo_info.json"   # written last: marks a folder as a complete demo set of ours
FRAME = 8                  # width of the neutral frame strips (right, bottom), in pixels
MARKER = 16                # width of the marker strips (left, top), in pixels

DEMO_CLASSES = ("background", "frame", "ring",
                "marker/red", "marker/blue", "marker/cyan", "marker/orange",
                "disc/red-row", "disc/blue-row", "square/cyan-col", "square/orange-col")
DEMO_PALETTE = [[60, 60, 60], [230, 230, 230], [250, 250, 120],
                [140, 20, 20], [20, 40, 140], [20, 120, 130], [160, 90, 10],
                [240, 60, 60], [70, 110, 250], [60, 230, 230], [255, 170, 60]]
(BACKGROUND, FRAME_CLASS, RING, MARK_RED, MARK_BLUE, MARK_CYAN, MARK_ORANGE,
 DISC_RED, DISC_BLUE, SQUARE_CYAN, SQUARE_ORANGE) = range(11)
CONTEXT_CLASSES = (DISC_RED, DISC_BLUE, SQUARE_CYAN, SQUARE_ORANGE)
# The markers have classes of their own, so that the features at the marker already encode its
# colour: attention then only has to carry it along the row/column (learned in a few hundred steps).
MARKER_OF = {DISC_RED: MARK_RED, DISC_BLUE: MARK_BLUE, SQUARE_CYAN: MARK_CYAN, SQUARE_ORANGE: MARK_ORANGE}

# Marker colours: each pair is >= 120 degrees apart in hue, so photometric hue jitter (+-36
# degrees) cannot turn one into the other.
ROW_COLOURS = {DISC_RED: (205, 35, 35), DISC_BLUE: (40, 60, 210)}
COLUMN_COLOURS = {SQUARE_CYAN: (30, 190, 200), SQUARE_ORANGE: (235, 140, 25)}
OBJECT_GREY = 178
RING_WHITE = 245
NEUTRAL_GREY = (110, 110, 110)
FAR_FRACTION = 0.625       # disc centres right of / square centres below this fraction of the size


def default_root(name: str = "demo") -> Path:
    """``$CCNET_HOME/<name>``, default ``~/.cache/ccnet-jittor/demo`` (generated sets live there)."""
    home = os.environ.get("CCNET_HOME") or os.path.join("~", ".cache", "ccnet-jittor")
    return Path(home).expanduser() / name


# ------------------------------------------------------------------------------------ generator
def _segments(rng, start, stop, low=16, high=40):
    """Cut [start, stop) into consecutive segments of random length in [low, high]."""
    cuts, pos = [], start
    while pos < stop:
        length = int(rng.integers(low, high + 1))
        if stop - (pos + length) < low:          # no stub at the end
            length = stop - pos
        cuts.append((pos, pos + length))
        pos += length
    return cuts


def _noisy(rng, shape, colour, sigma):
    return np.asarray(colour, np.float32) + rng.normal(0.0, sigma, size=shape + (3,)).astype(np.float32)


def make_sample(rng: np.random.Generator, size: int = DEMO_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One (rgb uint8 [S, S, 3], label uint8 [S, S] of class indices) pair."""
    s, f = size, FRAME
    yy, xx = np.mgrid[0:s, 0:s]

    # Background: a muted colour with smooth large-scale variation and pixel noise.
    base = rng.uniform([70, 80, 55], [125, 125, 100])
    coarse = rng.normal(0.0, 12.0, size=(5, 5, 3)).astype(np.float32)
    smooth = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((s, s), Image.BILINEAR))
                       for c in range(3)], axis=-1)
    rgb = base + smooth + rng.normal(0.0, 7.0, size=(s, s, 3))
    label = np.full((s, s), BACKGROUND, np.uint8)
    free = np.ones((s, s), bool)                     # interior pixels not yet used by an object
    free[:MARKER + 2, :] = free[-f - 2:, :] = free[:, :MARKER + 2] = free[:, -f - 2:] = False

    # Frame: the left strip is cut into row segments (red/blue), the top strip into column
    # segments (cyan/orange); the right and bottom strips and the corners are neutral grey. One
    # marker per row/column, on the far side of the objects: the cue is 50-100 pixels away.
    rows = [(a, b, int(rng.choice(list(ROW_COLOURS)))) for a, b in _segments(rng, MARKER, s - f)]
    cols = [(a, b, int(rng.choice(list(COLUMN_COLOURS)))) for a, b in _segments(rng, MARKER, s - f)]
    m = MARKER
    label[:m, :] = label[-f:, :] = label[:, :m] = label[:, -f:] = FRAME_CLASS
    rgb[label == FRAME_CLASS] = _noisy(rng, (int((label == FRAME_CLASS).sum()),), NEUTRAL_GREY, 6.0)
    for a, b, cls in rows:
        rgb[a:b, :m] = _noisy(rng, (b - a, m), ROW_COLOURS[cls], 6.0)
        label[a:b, :m] = MARKER_OF[cls]
    for a, b, cls in cols:
        rgb[:m, a:b] = _noisy(rng, (m, b - a), COLUMN_COLOURS[cls], 6.0)
        label[:m, a:b] = MARKER_OF[cls]

    def place(mask, cls, colour):
        grown = mask.copy()                          # keep 2 pixels between objects
        grown[:-2] |= mask[2:]; grown[2:] |= mask[:-2]
        grown[:, :-2] |= grown[:, 2:]; grown[:, 2:] |= grown[:, :-2]
        if not free[grown].all():
            return False
        free[grown] = False
        rgb[mask] = np.asarray(colour, np.float32) + rng.normal(0.0, 5.0, size=(int(mask.sum()), 3))
        label[mask] = cls
        return True

    # Far from the markers: discs in the right part of the image, squares in the lower part.
    far = int(FAR_FRACTION * s)
    for _ in range(int(rng.integers(2, 5))):         # discs: class from their row segment
        for _try in range(30):
            a, b, cls = rows[int(rng.integers(len(rows)))]
            r = int(rng.integers(6, min(10, (b - a - 2) // 2) + 1))
            cy = int(rng.integers(a + r + 1, b - r))
            cx = int(rng.integers(far, s - f - r - 3))
            if place((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, cls, (OBJECT_GREY,) * 3):
                break
    for _ in range(int(rng.integers(2, 5))):         # squares: class from their column segment
        for _try in range(30):
            a, b, cls = cols[int(rng.integers(len(cols)))]
            side = int(rng.integers(11, min(18, b - a - 2) + 1))
            x0 = int(rng.integers(a + 1, b - side))
            y0 = int(rng.integers(far - side // 2, s - f - side - 3))
            mask = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
            if place(mask, cls, (OBJECT_GREY,) * 3):
                break
    for _ in range(int(rng.integers(1, 3))):         # rings: recognisable locally, anywhere inside
        for _try in range(30):
            r = int(rng.integers(8, 13))
            cy, cx = (int(v) for v in rng.integers(MARKER + r + 3, s - f - r - 3, size=2))
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            if place((d2 <= r * r) & (d2 >= (r - 4) ** 2), RING, (RING_WHITE,) * 3):
                break
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), label


def _write_png(array, path):
    # Fixed settings: the bytes depend only on the pixels (and zlib), so runs can be compared.
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def generate(out_dir: str | os.PathLike, seed: int = 0, splits: Mapping[str, int] | None = None, size: int = DEMO_SIZE,
             progress: bool = True) -> dict:
    """Write the demo set into ``out_dir`` (which must not exist yet)."""
    splits = dict(DEMO_SPLITS if splits is None else splits)
    out_dir = Path(out_dir)
    total = sum(splits.values())
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="generating demo set", unit="img", leave=False)
    for split_code, (split, count) in enumerate(sorted(splits.items())):
        image_dir = out_dir / "images" / split
        label_dir = out_dir / "annotations" / split
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for index in range(count):
            rng = np.random.default_rng([seed, split_code, index])   # one stream per image
            rgb, label = make_sample(rng, size)
            name = f"demo_{split}_{index:05d}.png"
            _write_png(rgb, image_dir / name)
            _write_png(label + 1, label_dir / name)       # ADE20K encoding: 0 = ignore
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    info = {"version": DEMO_VERSION, "seed": seed, "size": size, "splits": splits,
            "classes": list(DEMO_CLASSES), "context_classes": [DEMO_CLASSES[c] for c in CONTEXT_CLASSES]}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=1))     # last: marks a complete set
    return info


# What a given --data-root that is not a demo set should be instead.
ROOT_HINT = ("--data-root is for reading a demo set made earlier; omit it to use $CCNET_HOME/demo "
             "(default ~/.cache/ccnet-jittor/demo), or give an empty folder to generate one there. "
             "Your own images in ADE20K's layout: --dataset ade20k")


def ensure_demo(root: str | os.PathLike | None = None, seed: int = 0, splits: Mapping[str, int] | None = None,
                size: int = DEMO_SIZE, progress: bool = True) -> Path:
    """Return the demo folder, generating it first if it is absent, empty or an outdated demo set
    (``datasets.generated``: atomically; any other folder is an error and stays untouched)."""
    root = Path(root).expanduser() if root is not None else default_root()
    splits = dict(DEMO_SPLITS if splits is None else splits)
    # Under MPI every rank generates its own copy (a few seconds); only rank 0 reports it.
    progress = progress and launch_rank() == 0
    start = time.time()
    expected = {"version": DEMO_VERSION, "seed": seed, "size": size, "splits": splits}
    entries = ("images", "annotations", INFO_FILE)
    if ensure_generated(root, INFO_FILE, expected, entries, what="demo set", hint=ROOT_HINT,
                        build=lambda path: generate(path, seed=seed, splits=splits, size=size, progress=progress)):
        if progress:
            print(f"demo set: {sum(splits.values())} images generated in {root} ({time.time() - start:.1f} s)")
    return root


# -------------------------------------------------------------------------------------- dataset
@register_dataset("demo")
class DemoDataset(ADE20KDataset):
    """The synthetic set above, read through the ADE20K loader (generated on first use).

    ``data_root``: None for ``$CCNET_HOME/demo``; a given folder must exist and be a demo set made
    earlier (read as it is; regenerated if an older version made it) or empty (generated there).

    Extra options: ``seed`` (default 0), ``splits`` ({"training": n, "validation": m}).
    Its default augmentation never crops (random resize 0.75-1.0 of 128 px, crop 128), because a
    crop could cut off the markers that decide the context classes; flips are fine (the model
    then finds the markers on the right or at the top).
    """
    CLASSES = DEMO_CLASSES
    PALETTE = DEMO_PALETTE
    CONTEXT_CLASSES = CONTEXT_CLASSES
    DEFAULT_CROP_SIZE = DEMO_SIZE
    DEFAULT_BASE_SIZE = (DEMO_SIZE, DEMO_SIZE)
    DEFAULT_RATIO_RANGE = (0.75, 1.0)
    DOWNLOAD = "nothing to download: the demo set is generated (datasets/demo.py)"

    def __init__(self, data_root: str | os.PathLike | None = None, seed: int = 0,
                 splits: Mapping[str, int] | None = None, **kwargs: Any) -> None:
        if data_root is not None:
            data_root = require_existing_root(data_root, type(self).__name__, ROOT_HINT)
        if data_root is None or set_version(data_root, INFO_FILE) != DEMO_VERSION:
            data_root = ensure_demo(data_root, seed=seed, splits=splits)
        super().__init__(data_root=data_root, **kwargs)

    @property
    def context_class_names(self) -> tuple[str, ...]:
        return tuple(self.CLASSES[c] for c in self.CONTEXT_CLASSES)


# ------------------------------------------------------------------------------------- picture
def sample_grid(dataset: SegDataset, indices: Sequence[int], scale: int = 2) -> np.ndarray:
    """A PNG-ready picture: per sample, the image and its coloured label side by side, and a
    legend below (context-dependent classes marked with *)."""
    from PIL import ImageDraw
    tiles = []
    for index in indices:
        rgb, label = dataset.load_raw(index)
        pair = np.concatenate([rgb, np.full((rgb.shape[0], 4, 3), 255, np.uint8),
                               dataset.colorize(label)], axis=1)
        tiles.append(np.kron(pair, np.ones((scale, scale, 1), np.uint8)))
    gap = np.full((tiles[0].shape[0], 12, 3), 255, np.uint8)
    cols = 2
    rows = [np.concatenate(sum(([t, gap] for t in tiles[i:i + cols]), [])[:-1], axis=1)
            for i in range(0, len(tiles), cols)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 12), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    legend_h = 18 * ((len(dataset.CLASSES) + 2) // 3) + 8
    canvas = Image.new("RGB", (grid.width, grid.height + legend_h), "white")
    canvas.paste(grid, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (name, colour) in enumerate(zip(dataset.CLASSES, dataset.PALETTE)):
        x, y = 8 + (k % 3) * (grid.width // 3), grid.height + 4 + 18 * (k // 3)
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(colour), outline=(0, 0, 0))
        star = " *" if k in CONTEXT_CLASSES else ""
        draw.text((x + 18, y), name + star, fill=(0, 0, 0))
    return canvas


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the demo set and draw a few samples.")
    parser.add_argument("--out", default="images/demo_samples.png", help="PNG to write")
    parser.add_argument("--root", default=None, help="demo folder (default $CCNET_HOME/demo)")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--num", type=int, default=6, help="number of samples to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        refuse_overwrite([args.out], args.overwrite, "--out", instead="choose another --out")
    except FileExistsError as err:
        parser.error(str(err))
    dataset = DemoDataset(data_root=args.root, seed=args.seed, split=args.split, mode="test")
    picture = sample_grid(dataset, range(min(args.num, dataset.num_samples)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out)
    print(f"wrote {args.out} ({args.num} samples of {dataset.data_root}); "
          f"context-dependent classes: {', '.join(dataset.context_class_names)}")


if __name__ == "__main__":
    main()
