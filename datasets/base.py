"""Common machinery of the segmentation datasets: registry, file pairing, decoding, bad input.

A dataset class only says where its files are (``scan``), how its on-disk label values map to
train ids (``label_lut``) and back (``encode_train_ids``, range-checked by ``encode_prediction``); everything else lives here:

* ``SegDataset`` is a ``jittor.dataset.Dataset``: ``set_attrs(batch_size=..., shuffle=...,
  num_workers=..., drop_last=...)`` and ``for images, labels in dataset`` work as usual, and under
  MPI Jittor gives each process its share of every batch (we do not override the index logic).
  Note Jittor's convention: ``len(dataset)`` is the number of *batches*; ``num_samples`` is the
  number of samples (the default batch size is 1, so the two agree until you batch).
* Bad input fails loudly, naming the file(s) and what was expected. Pairing problems (an image
  without a label or the reverse) are found up-front when the file lists are built; decoding
  problems (unreadable/truncated files, size mismatch, label values out of range) when a sample
  is loaded, because decoding 20k ADE20K files up-front would take minutes.
* ``skip_bad=True`` turns those errors into warnings: unpaired files are dropped at start-up,
  undecodable samples are replaced by the next good one, and every pass over the data ends with a
  warning that says how many samples were skipped. Never silently.
"""
import multiprocessing as mp
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from jittor.dataset import Dataset

from . import transforms as T

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

DATASETS = {}        # name -> SegDataset subclass


def register_dataset(name: str) -> Callable[[type], type]:
    """Class decorator: make a dataset available to ``build_dataset(name, ...)``."""
    def wrap(cls: type) -> type:
        if name in DATASETS:
            if DATASETS[name].__qualname__ == cls.__qualname__:
                return cls        # the same module run again (python -m datasets.demo): keep the first
            raise KeyError(f"dataset {name!r} is registered twice")
        DATASETS[name] = cls
        cls.NAME = name
        return cls
    return wrap


def build_dataset(name: str, data_root: str | os.PathLike | None = None, split: str = "train", mode: str = "train",
                  crop_size: int | Sequence[int] | None = None, base_size: Sequence[int] | None = None,
                  **options: Any) -> "SegDataset":
    """Build a registered dataset (``DATASETS``: ade20k, cityscapes, folder, demo).

    ``crop_size`` / ``base_size`` of None mean the dataset's own defaults (e.g. ADE20K crop 512,
    base scale (2048, 512)); other keyword options go to the dataset class (``skip_bad``,
    ``ratio_range``, ``cat_max_ratio``, ``photometric``, ``flip_prob``, ``batch_size``, ...).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](data_root=data_root, split=split, mode=mode, crop_size=crop_size,
                          base_size=base_size, **options)


# ------------------------------------------------------------------------------------- errors
class DatasetNotFoundError(FileNotFoundError):
    """The dataset root or one of its split folders does not exist."""


class DatasetError(ValueError):
    """The dataset's files are inconsistent (e.g. an image without a label)."""


class BadSampleError(DatasetError):
    """One sample cannot be used: unreadable file, size mismatch or invalid label values."""


class BadSampleWarning(UserWarning):
    """A bad sample was skipped (``skip_bad=True``)."""


def _listing(paths, limit=8):
    paths = sorted(str(p) for p in paths)
    shown = "\n".join(f"    {p}" for p in paths[:limit])
    more = f"\n    ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return shown + more


# --------------------------------------------------------------------------------- file reading
def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 [H, W, 3]; BadSampleError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()                       # decode now: truncated files fail here
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:   # PIL.UnidentifiedImageError is an OSError
        raise BadSampleError(
            f"cannot read image {path}: {err}. Expected a complete image file "
            f"(jpg/png); the file may be truncated or corrupt.") from None


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Single-channel label map [H, W] (uint8/uint16/int32) exactly as stored on disk."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                return np.asarray(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(
            f"cannot read label {path}: {err}. Expected a complete single-channel PNG "
            f"(one class value per pixel); the file may be truncated or corrupt.") from None
    raise BadSampleError(
        f"label {path} has image mode {mode!r}; expected a single-channel PNG with one class value "
        f"per pixel (mode L, P or I;16). Colour-coded masks (RGB) must be converted to class "
        f"indices first.")


def list_images(folder: str | os.PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES,
                recursive: bool = False) -> dict[str, Path]:
    """{relative stem: path} of the files in ``folder`` ending with one of ``suffixes``."""
    folder = Path(folder)
    found = {}
    paths = folder.rglob("*") if recursive else (Path(e.path) for e in os.scandir(folder))
    for path in paths:
        if path.suffix.lower() in suffixes and path.is_file():
            stem = str(path.relative_to(folder).with_suffix(""))
            found[stem] = path
    return found


class _SharedCounter:
    """An int shared with forked worker processes (Jittor's loader workers skip samples too)."""

    def __init__(self, value=0):
        self._value = mp.Value("q", value)

    def add(self, n=1):
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self):
        return self._value.value

    def __deepcopy__(self, memo):
        return _SharedCounter(self.value)

    def __getstate__(self):               # spawn-based pickling: a private copy is the best we can do
        return {"value": self.value}

    def __setstate__(self, state):
        self._value = mp.Value("q", state["value"])


# ------------------------------------------------------------------------------------ datasets
class SegDataset(Dataset):
    """Base class: (image, label) pairs, label mapping, augmentation and bad-input handling.

    Subclasses set ``CLASSES``, ``PALETTE`` and the defaults below, and implement ``scan()``
    (returning the sorted list of (image_path, label_path)), ``label_lut(label_path)`` and
    ``encode_train_ids`` (valid train ids -> on-disk values).
    """
    NAME = None
    CLASSES = ()
    PALETTE = []
    ignore_index = IGNORE_INDEX
    DEFAULT_ROOT = None            # used when data_root is None
    DEFAULT_CROP_SIZE = 512
    DEFAULT_BASE_SIZE = None       # None: random resize relative to the image's own size
    DEFAULT_RATIO_RANGE = (0.5, 2.0)
    LAYOUT = ""                    # expected on-disk layout, shown when files are missing
    DOWNLOAD = ""                  # where to get the data, shown when files are missing

    def __init__(self, data_root: str | os.PathLike | None = None, split: str = "train", mode: str = "train",
                 crop_size: int | Sequence[int] | None = None, base_size: Sequence[int] | None = None,
                 ratio_range: Sequence[float] | None = None, cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True, skip_bad: bool = False, batch_size: int = 1,
                 shuffle: bool | None = None, num_workers: int = 0, drop_last: bool = False) -> None:
        super().__init__(batch_size=batch_size, shuffle=(mode == "train") if shuffle is None else shuffle,
                         num_workers=num_workers, drop_last=drop_last)
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        root = data_root if data_root is not None else self.DEFAULT_ROOT
        if root is None:
            raise DatasetNotFoundError(f"{type(self).__name__} needs data_root")
        self.data_root = Path(root).expanduser()
        self.split = split
        self.mode = mode
        self.skip_bad = bool(skip_bad)
        self.crop_size = T.as_size(crop_size or self.DEFAULT_CROP_SIZE, "crop_size")
        self.base_size = base_size if base_size is not None else self.DEFAULT_BASE_SIZE
        self.ratio_range = tuple(ratio_range or self.DEFAULT_RATIO_RANGE)
        self.train_transform = T.build_train_transform(
            self.crop_size, self.base_size, self.ratio_range, cat_max_ratio=cat_max_ratio,
            flip_prob=flip_prob, photometric=photometric, ignore_index=self.ignore_index)
        self._skipped = _SharedCounter()
        self.bad_samples = {}          # index -> reason (this process only)
        self.samples = self.scan()
        if not self.samples:
            raise DatasetError(f"no samples found for split {split!r} under {self.data_root}"
                               + self._layout_help())
        self.set_attrs(total_len=len(self.samples))

    # --------------------------------------------------------------------------- subclass API
    def scan(self) -> list[tuple[str | Path, str | Path]]:
        raise NotImplementedError

    def label_lut(self, label_path: str | os.PathLike | None) -> np.ndarray:
        """int32 lookup table: on-disk label value -> train id (0..C-1, 255 = ignore, -1 = invalid)."""
        raise NotImplementedError

    def encode_prediction(self, pred: np.ndarray) -> np.ndarray:
        """Train-id prediction [H, W] -> label map in the dataset's on-disk encoding."""
        pred = np.asarray(pred)
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"prediction values must be in 0..{self.num_classes - 1}, "
                             f"got {pred.min()}..{pred.max()}")
        return self.encode_train_ids(pred)

    def encode_train_ids(self, pred: np.ndarray) -> np.ndarray:
        """The dataset's own encoding of valid train ids (numpy array in 0..C-1)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ attributes
    @property
    def num_classes(self) -> int:
        return len(self.CLASSES)

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def skipped_count(self) -> int:
        """How many times a bad sample was skipped so far (all worker processes together)."""
        return self._skipped.value

    def __repr__(self):
        return (f"{type(self).__name__}(root={str(self.data_root)!r}, split={self.split!r}, "
                f"mode={self.mode!r}, samples={len(self.samples)}, classes={self.num_classes})")

    # ---------------------------------------------------------------------------- file layout
    def _layout_help(self):
        text = ""
        if self.LAYOUT:
            text += "\nExpected layout:\n" + self.LAYOUT.format(root=self.data_root).rstrip()
        if self.DOWNLOAD:
            text += "\nDownload: " + self.DOWNLOAD
        return text

    def require_dir(self, path: str | os.PathLike, what: str) -> Path:
        """Raise DatasetNotFoundError (with the expected layout) unless ``path`` is a folder."""
        path = Path(path)
        if not self.data_root.is_dir():
            raise DatasetNotFoundError(
                f"{type(self).__name__}: data root {self.data_root} does not exist." + self._layout_help())
        if not path.is_dir():
            raise DatasetNotFoundError(
                f"{type(self).__name__}: {what} folder {path} does not exist (split {self.split!r})."
                + self._layout_help())
        return path

    def pair_files(self, images: Mapping[str, Path], labels: Mapping[str, Path], image_dir: Path,
                   label_dir: Path) -> list[tuple[Path, Path]]:
        """Pair ``{key: image_path}`` with ``{key: label_path}``; unpaired files are an error
        (or, with skip_bad, dropped with a warning). Returns sorted [(image, label)]."""
        lonely_images = [images[k] for k in images.keys() - labels.keys()]
        lonely_labels = [labels[k] for k in labels.keys() - images.keys()]
        problems = []
        if lonely_images:
            problems.append(f"{len(lonely_images)} image(s) in {image_dir} have no label in "
                            f"{label_dir}:\n{_listing(lonely_images)}")
        if lonely_labels:
            problems.append(f"{len(lonely_labels)} label(s) in {label_dir} have no image in "
                            f"{image_dir}:\n{_listing(lonely_labels)}")
        if problems:
            message = (f"{type(self).__name__} split {self.split!r}: every image needs a label with "
                       f"the same name and vice versa.\n" + "\n".join(problems))
            if not self.skip_bad:
                raise DatasetError(message + "\nFix the files, or pass skip_bad=True to skip them.")
            warnings.warn(message + f"\nskip_bad=True: skipping these "
                          f"{len(lonely_images) + len(lonely_labels)} unpaired file(s).",
                          BadSampleWarning, stacklevel=3)
        return [(str(images[k]), str(labels[k])) for k in sorted(images.keys() & labels.keys())]

    # --------------------------------------------------------------------------------- loading
    def map_label(self, raw: np.ndarray, label_path: str | os.PathLike | None) -> np.ndarray:
        """On-disk values -> int32 train ids, or BadSampleError naming the invalid values."""
        lut = self.label_lut(label_path)
        raw = np.asarray(raw)
        beyond_table = raw >= len(lut)
        mapped = np.where(beyond_table, -1, lut[np.minimum(raw, len(lut) - 1)])
        invalid = mapped < 0
        if invalid.any():
            values = np.unique(raw[invalid])
            shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
            raise BadSampleError(f"label {label_path} has value(s) {shown} outside the valid range: "
                                 f"{self.valid_label_text(label_path)}")
        return mapped.astype(np.int32, copy=False)

    def valid_label_text(self, label_path: str | os.PathLike | None) -> str:
        valid = np.flatnonzero(self.label_lut(label_path) >= 0)
        return f"expected values in {{{_ranges(valid)}}}"

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 [H, W, 3], label int32 [H, W] train ids / 255), no augmentation.

        Raises BadSampleError for a bad sample even with skip_bad (callers that skip: ``iter_raw``).
        """
        image_path, label_path = self.samples[index]
        rgb = read_image(image_path)
        raw = read_label(label_path)
        if raw.shape != rgb.shape[:2]:
            raise BadSampleError(
                f"image {image_path} is {rgb.shape[1]}x{rgb.shape[0]} (WxH) but its label "
                f"{label_path} is {raw.shape[1]}x{raw.shape[0]}; expected the same size.")
        return rgb, self.map_label(raw, label_path)

    def iter_raw(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield (index, rgb, label) for every sample (``load_raw``); with skip_bad, bad ones are
        skipped with a warning and counted, and a summary warning comes at the end."""
        skipped = 0
        for index in range(len(self.samples)):
            try:
                rgb, label = self.load_raw(index)
            except BadSampleError as err:
                if not self.skip_bad:
                    raise
                self._note_bad(index, err)
                skipped += 1
                continue
            yield index, rgb, label
        self._warn_summary(skipped)

    def _note_bad(self, index, err):
        self._skipped.add(1)
        self.bad_samples[index] = str(err)
        warnings.warn(f"skip_bad=True: skipping sample {index}: {err}", BadSampleWarning, stacklevel=3)

    def _warn_summary(self, skipped):
        if skipped:
            warnings.warn(f"{type(self).__name__} split {self.split!r}: skipped {skipped} bad sample "
                          f"load(s) out of {len(self.samples)} samples in this pass (skip_bad=True; "
                          f"the files are named in the warnings above).", BadSampleWarning, stacklevel=3)

    def _augment_rng(self):
        # Drawn from NumPy's global generator, which Jittor seeds per worker process
        # (jt.set_global_seed), so workers and MPI ranks do not repeat each other's augmentation.
        return np.random.default_rng(np.random.randint(0, 2**31 - 1))

    def __getitem__(self, index):
        index = int(index)
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                rgb, label = self.load_raw(i)
                break
            except BadSampleError as err:
                if not self.skip_bad:
                    raise
                self._note_bad(i, err)
        else:
            raise BadSampleError(f"{type(self).__name__}: every one of the {len(self.samples)} samples is bad")
        if self.mode == "train":
            return self.train_transform(rgb, label, self._augment_rng())
        return T.normalize(rgb), label

    def __iter__(self):
        # Delegate batching/sharding to Jittor untouched; only add the end-of-pass skip summary.
        before = self._skipped.value
        yield from super().__iter__()
        self._warn_summary(self._skipped.value - before)

    # ----------------------------------------------------------------------------- visualising
    def colorize(self, label: np.ndarray) -> np.ndarray:
        """Train-id label [H, W] -> RGB uint8 picture with the dataset palette (ignore = black)."""
        from utils.visualize import colorize
        return colorize(label, self.PALETTE, self.ignore_index)


def _ranges(values):
    """[0,1,2,5,255] -> '0..2, 5, 255'."""
    parts, start = [], None
    values = list(int(v) for v in values)
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(parts)


def make_lut(mapping: Mapping[int, int], size: int = 256) -> np.ndarray:
    """int32 lookup table of ``size`` entries from {disk value: train id}; the rest -1 (invalid)."""
    lut = np.full(size, -1, dtype=np.int32)
    for value, train_id in mapping.items():
        lut[value] = train_id
    return lut
