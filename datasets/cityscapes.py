"""Cityscapes (fine annotations): 19 evaluation classes.

Ground truth comes as ``*_gtFine_labelIds.png`` (the 34 label ids of the official
``cityscapesscripts/helpers/labels.py``), mapped here to the 19 train ids (all other ids -> 255);
``*_gtFine_labelTrainIds.png`` files made by ``createTrainIdLabelImgs`` are read as they are.
Predictions are written back as label ids, the format of the official evaluation server.
"""
import os
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np

from .base import SegDataset, make_lut, register_dataset, IGNORE_INDEX

CityscapesLabel = namedtuple("CityscapesLabel", "name id train_id color")

# The official table (cityscapesscripts labels.py): name, label id, train id, colour.
# Train id 255 = not evaluated. 'license plate' has id -1 and never appears in labelIds PNGs.
CITYSCAPES_LABELS = (
    CityscapesLabel("unlabeled", 0, 255, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, (119, 11, 32)),
    CityscapesLabel("license plate", -1, 255, (0, 0, 142)),
)

_EVALUATED = sorted((l for l in CITYSCAPES_LABELS if l.train_id != IGNORE_INDEX), key=lambda l: l.train_id)
CITYSCAPES_CLASSES = tuple(l.name for l in _EVALUATED)
CITYSCAPES_PALETTE = [list(l.color) for l in _EVALUATED]
ID_TO_TRAIN_ID = {l.id: l.train_id for l in CITYSCAPES_LABELS if l.id >= 0}
TRAIN_ID_TO_ID = np.array([l.id for l in _EVALUATED], dtype=np.uint8)

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIXES = {"labelIds": "_gtFine_labelIds.png", "labelTrainIds": "_gtFine_labelTrainIds.png"}


@register_dataset("cityscapes")
class CityscapesDataset(SegDataset):
    """``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``gtFine/<split>/<city>/*_gtFine_*.png``.

    ``label_type``: "auto" (labelIds when present, else labelTrainIds), "labelIds" or
    "labelTrainIds".
    """
    CLASSES = CITYSCAPES_CLASSES
    PALETTE = CITYSCAPES_PALETTE
    DEFAULT_ROOT = os.path.join(os.environ.get("CCNET_DATA", "data"), "cityscapes")
    DEFAULT_CROP_SIZE = 769                 # the official CCNet recipe
    DEFAULT_BASE_SIZE = (2048, 1024)        # images are 2048x1024: ratio = scale factor
    LAYOUT = ("  {root}/\n"
              "    leftImg8bit/train/<city>/<city>_000000_000019_leftImg8bit.png ...  (2975 images)\n"
              "    leftImg8bit/val/<city>/...                                         (500 images)\n"
              "    gtFine/train/<city>/<city>_000000_000019_gtFine_labelIds.png ...\n"
              "    gtFine/val/<city>/...   (*_gtFine_labelIds.png or *_gtFine_labelTrainIds.png)")
    DOWNLOAD = ("https://www.cityscapes-dataset.com/downloads/ (free account): leftImg8bit_trainvaltest.zip "
                "and gtFine_trainvaltest.zip, unzipped into the same folder")

    def __init__(self, data_root: str | os.PathLike | None = None, label_type: str = "auto", **kwargs: Any) -> None:
        if label_type not in ("auto", *LABEL_SUFFIXES):
            raise ValueError(f"label_type must be auto, labelIds or labelTrainIds, got {label_type!r}")
        self.label_type = label_type
        self._luts = {
            "labelIds": make_lut(ID_TO_TRAIN_ID),
            "labelTrainIds": make_lut({**{t: t for t in range(len(CITYSCAPES_CLASSES))}, 255: 255}),
        }
        super().__init__(data_root=data_root, **kwargs)

    def scan(self) -> list[tuple[Path, Path]]:
        image_dir = self.require_dir(self.data_root / "leftImg8bit" / self.split, "image")
        label_dir = self.require_dir(self.data_root / "gtFine" / self.split, "label")
        images = {}
        for path in image_dir.glob("*/*" + IMAGE_SUFFIX):
            images[path.parent.name + "/" + path.name[:-len(IMAGE_SUFFIX)]] = path
        kinds = ("labelIds", "labelTrainIds") if self.label_type == "auto" else (self.label_type,)
        labels = {}
        for kind in reversed(kinds):         # the first kind wins when both files exist
            suffix = LABEL_SUFFIXES[kind]
            for path in label_dir.glob("*/*" + suffix):
                labels[path.parent.name + "/" + path.name[:-len(suffix)]] = path
        return self.pair_files(images, labels, image_dir, label_dir)

    def label_lut(self, label_path: str | os.PathLike | None) -> np.ndarray:
        if label_path is not None and str(label_path).endswith(LABEL_SUFFIXES["labelTrainIds"]):
            return self._luts["labelTrainIds"]
        return self._luts["labelIds"]

    def encode_train_ids(self, pred: np.ndarray) -> np.ndarray:
        """Train ids 0..18 -> Cityscapes label ids (uint8), as the evaluation server expects."""
        return TRAIN_ID_TO_ID[pred]
