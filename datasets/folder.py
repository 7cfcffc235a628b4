"""Your own data: a folder of images and a folder of single-channel masks, matched by file name.

Accepted layouts (``images``/``masks`` folder names are options, ``labels`` or ``annotations``
are found too)::

    root/images/train/a.jpg  root/masks/train/a.png     split sub-folders, or
    root/images/a.jpg        root/masks/a.png           one folder, plus an optional list file
    root/train.txt           (one name per line, e.g. "a" or "sub/a"; or pass list_file=...)

Classes come from ``classes=[...]`` or ``num_classes=N``, or from a JSON file (``meta_file``,
default ``root/classes.json``)::

    {"classes": ["background", "road", "car"], "palette": [[0,0,0], [128,64,128], [0,0,142]],
     "ignore_index": 255, "reduce_zero_label": false}

Mask values are class indices 0..C-1 and ``ignore_index`` (default 255); with
``reduce_zero_label`` the masks use 1..C for the classes and 0 for "ignore" (ADE20K style).
"""
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .base import (DatasetError, DatasetNotFoundError, SegDataset, make_lut,
                   list_images, register_dataset, IGNORE_INDEX)

META_KEYS = {"classes", "palette", "ignore_index", "reduce_zero_label"}
MASK_DIR_NAMES = ("masks", "labels", "annotations")


def default_palette(n: int) -> list[list[int]]:
    """n distinct colours (PASCAL VOC's bit-interleaving scheme), class 0 black."""
    palette = []
    for index in range(n):
        r = g = b = 0
        c, shift = index, 7
        while c:
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
            shift -= 1
        palette.append([r, g, b])
    return palette


@register_dataset("folder")
class FolderDataset(SegDataset):
    DEFAULT_CROP_SIZE = 512
    DEFAULT_BASE_SIZE = None       # random resize relative to each image's own size
    LAYOUT = ("  {root}/images/<split>/NAME.jpg and {root}/masks/<split>/NAME.png   or\n"
              "  {root}/images/NAME.jpg, {root}/masks/NAME.png and optional {root}/<split>.txt "
              "(one NAME per line)\n"
              "  masks: single-channel PNGs holding class indices (0..C-1, ignore 255)\n"
              "  classes: classes=[...] / num_classes=N, or {root}/classes.json "
              "{{\"classes\": [...], \"palette\": [[r,g,b], ...]}}")

    def __init__(self, data_root: str | os.PathLike | None = None, img_dir: str = "images", mask_dir: str | None = None,
                 list_file: str | None = None, classes: Sequence[str] | None = None, num_classes: int | None = None,
                 palette: Sequence[Sequence[int]] | None = None, ignore_index: int | None = None,
                 reduce_zero_label: bool | None = None, meta_file: str | None = None, **kwargs: Any) -> None:
        if data_root is None:
            raise DatasetNotFoundError("the folder dataset needs data_root (the folder holding "
                                       "images/ and masks/)\nExpected layout:\n" +
                                       self.LAYOUT.format(root="<data_root>"))
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise DatasetNotFoundError(f"folder dataset: data root {root} does not exist.\nExpected layout:\n"
                                       + self.LAYOUT.format(root=root))
        meta = self._read_meta(root, meta_file)
        if isinstance(classes, str):
            classes = [c.strip() for c in classes.split(",") if c.strip()]
        classes = classes if classes is not None else meta.get("classes")
        if classes is None and num_classes is not None:
            classes = [f"class_{i}" for i in range(int(num_classes))]
        if not classes:
            raise DatasetError(
                f"folder dataset {root}: the classes are unknown. Pass classes=[names] or "
                f"num_classes=N, or write {root / 'classes.json'} like "
                f'{{"classes": ["background", "object"]}}')
        if num_classes is not None and int(num_classes) != len(classes):
            raise DatasetError(f"num_classes={num_classes} but {len(classes)} class names were given")
        self.CLASSES = tuple(str(c) for c in classes)
        palette = palette if palette is not None else meta.get("palette")
        if palette is None:
            palette = default_palette(len(self.CLASSES))
        if len(palette) != len(self.CLASSES) or any(len(c) != 3 for c in palette):
            raise DatasetError(f"the palette needs one [r, g, b] per class ({len(self.CLASSES)}), "
                               f"got {len(palette)} entries")
        self.PALETTE = [list(map(int, c)) for c in palette]
        self.mask_ignore_value = int(ignore_index if ignore_index is not None
                                     else meta.get("ignore_index", IGNORE_INDEX))
        self.reduce_zero_label = bool(reduce_zero_label if reduce_zero_label is not None
                                      else meta.get("reduce_zero_label", False))
        first = 1 if self.reduce_zero_label else 0
        if first <= self.mask_ignore_value < first + len(self.CLASSES):
            raise DatasetError(f"ignore_index={self.mask_ignore_value} collides with the class values "
                               f"{first}..{first + len(self.CLASSES) - 1}")
        if len(self.CLASSES) > 255:
            raise DatasetError("at most 255 classes are supported (train ids are stored in uint8 "
                               "crops with 255 as ignore)")
        self.img_dir, self.mask_dir, self.list_file = img_dir, mask_dir, list_file
        self._lut = self._build_lut()
        super().__init__(data_root=root, **kwargs)

    # ------------------------------------------------------------------------------- metadata
    @staticmethod
    def _read_meta(root, meta_file):
        path = Path(meta_file) if meta_file is not None else root / "classes.json"
        if meta_file is None and not path.is_file():
            return {}
        try:
            meta = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DatasetNotFoundError(f"class file {path} does not exist") from None
        except (OSError, ValueError) as err:
            raise DatasetError(f"cannot read class file {path}: {err}") from None
        if not isinstance(meta, dict):
            raise DatasetError(f"class file {path}: expected a JSON object with keys {sorted(META_KEYS)}")
        unknown = set(meta) - META_KEYS
        if unknown:
            raise DatasetError(f"class file {path}: unknown key(s) {sorted(unknown)}; "
                               f"valid keys: {sorted(META_KEYS)}")
        return meta

    def _build_lut(self):
        first = 1 if self.reduce_zero_label else 0
        mapping = {first + k: k for k in range(len(self.CLASSES))}
        mapping[self.mask_ignore_value] = IGNORE_INDEX
        if self.reduce_zero_label:
            mapping[0] = IGNORE_INDEX
        return make_lut(mapping, size=max(256, max(mapping) + 1))

    # ------------------------------------------------------------------------------- file list
    def _find_mask_dir(self):
        names = (self.mask_dir,) if self.mask_dir else MASK_DIR_NAMES
        for name in names:
            if (self.data_root / name).is_dir():
                return self.data_root / name
        return self.require_dir(self.data_root / names[0], "mask")

    def scan(self) -> list[tuple[Path, Path]]:
        image_root = self.require_dir(self.data_root / self.img_dir, "image")
        mask_root = self._find_mask_dir()
        if (image_root / self.split).is_dir():
            image_dir = image_root / self.split
            mask_dir = self.require_dir(mask_root / self.split, "mask")
            wanted = None
        else:
            image_dir, mask_dir = image_root, mask_root
            wanted = self._read_list()
        images = list_images(image_dir, recursive=True)
        masks = list_images(mask_dir, (".png", ".bmp", ".tif", ".tiff"), recursive=True)
        if wanted is not None:
            missing = [name for name in wanted if name not in images and name not in masks]
            if missing:
                raise DatasetError(f"list file {self._list_path()} names {len(missing)} sample(s) with "
                                   f"neither an image in {image_dir} nor a mask in {mask_dir}: "
                                   f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
            keep = set(wanted)
            images = {k: v for k, v in images.items() if k in keep}
            masks = {k: v for k, v in masks.items() if k in keep}
        elif image_dir == image_root and self.split not in ("train", None):   # no split sub-folder
            warnings.warn(f"folder dataset {self.data_root}: no {self.split!r} sub-folder and no list "
                          f"file {self._list_path()}; split {self.split!r} uses all files in "
                          f"{image_dir}", UserWarning, stacklevel=2)
        return self.pair_files(images, masks, image_dir, mask_dir)

    def _list_path(self):
        return Path(self.list_file) if self.list_file else self.data_root / f"{self.split}.txt"

    def _read_list(self):
        path = self._list_path()
        if not path.is_file():
            if self.list_file:
                raise DatasetNotFoundError(f"list file {path} does not exist")
            return None
        names = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                names.append(str(Path(line).with_suffix("")) if Path(line).suffix.lower()
                             in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp") else line)
        return names

    # ----------------------------------------------------------------------------- label codes
    def label_lut(self, label_path: str | os.PathLike | None) -> np.ndarray:
        return self._lut

    def encode_train_ids(self, pred: np.ndarray) -> np.ndarray:
        """Train ids -> mask values as stored in this folder (+1 with reduce_zero_label)."""
        out = pred + (1 if self.reduce_zero_label else 0)
        return out.astype(np.uint8 if out.max(initial=0) < 256 else np.uint16)
