"""Segmentation datasets: ``build_dataset(name, ...)`` over the ``DATASETS`` registry.

Registered: "ade20k", "cityscapes", "folder" (your own images + masks) and "demo" (a synthetic
set generated on first use). See base.py for the common behaviour (batching through
``jittor.dataset.Dataset``, bad-input errors, ``skip_bad``) and transforms.py for augmentation.
"""
import warnings

from utils import runtime  # noqa: F401  (sets Jittor's environment before any dataset file imports it)

# `python -m datasets.demo` runs a module this package has already imported; runpy's warning
# about that is harmless here (registration tolerates the second run).
warnings.filterwarnings("ignore", message=r"'datasets\.\w+' found in sys.modules", category=RuntimeWarning)

from .base import (DATASETS, BadSampleError, BadSampleWarning, DatasetError,  # noqa: F401
                   DatasetNotFoundError, SegDataset, build_dataset, register_dataset)
from . import transforms  # noqa: F401
from .ade20k import ADE20KDataset  # noqa: F401
from .cityscapes import CityscapesDataset  # noqa: F401
from .folder import FolderDataset  # noqa: F401
from .demo import DemoDataset  # noqa: F401
from .demo_clips import DemoClipsDataset  # noqa: F401
