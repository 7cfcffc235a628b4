"""Checkpoints: read any supported file without torch, build the model it describes, save ours.

torchfile (the numpy-only reader) -> layouts (which published layout, our key names) -> arch
(options the weight shapes show) -> load (``Checkpoint``, ``build_model_from_checkpoint``,
loading into built models); save (atomic writes). ``python -m utils.checkpoint FILE`` prints
what a file is.
"""
from .load import (Checkpoint, UnknownSourceError, build_model_from_checkpoint, load_backbone_weights,  # noqa: F401
                   load_checkpoint, read_checkpoint)
from .save import save_checkpoint  # noqa: F401
from .torchfile import CheckpointError, Placeholder  # noqa: F401
