"""Write checkpoints atomically (``utils.outputs.atomic_write``: a temp file in the same folder,
renamed over the target when complete), so an interrupted save never leaves a torn file behind."""
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import jittor as jt
import models

from ..outputs import atomic_write


def _to_numpy(obj: Any) -> Any:
    if isinstance(obj, jt.Var):
        return obj.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _to_numpy(v)) for k, v in obj.items()) if isinstance(obj, OrderedDict) \
            else {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike, state: jt.Module | Mapping[str, Any],
                    config: models.ModelConfig | None = None) -> Path:
    """Write ``state`` (a model, or a dict such as {"state_dict", "optimizer", "iteration"}).

    ``config``: the ``models.ModelConfig`` the weights belong to (a model brings its own), stored
    as ``"arch"`` so that ``build_model_from_checkpoint`` needs the file alone. Returns the path.
    """
    if isinstance(state, jt.Module):
        config = config or getattr(state, "config", None)
        state = {"state_dict": state.state_dict()}
    state = dict(_to_numpy(state))
    if config is not None:
        state["arch"] = config.to_dict()
    state.setdefault("format", "ccnet-jittor")
    return atomic_write(path, lambda tmp: jt.save(state, tmp))
