"""Find the weights inside a checkpoint object, recognise their layout, bring them to our names.

The layouts themselves (how to recognise one, how its keys map) belong to the model files and
are collected in ``models.WEIGHT_LAYOUTS``.
"""
from typing import Any

import numpy as np

import models
from models.weights import StateDict, WeightLayout

from .torchfile import CheckpointError, Placeholder

WRAPPER_KEYS = ("state_dict", "model")     # mmseg/VAN: "state_dict"; others: "model"


def _as_array(value: Any) -> np.ndarray | None:
    """numpy arrays as they are; jittor Vars and torch tensors (weights given in memory) as numpy."""
    if isinstance(value, np.ndarray):
        return value
    return np.asarray(value.numpy()) if callable(getattr(value, "numpy", None)) else None


def extract_state_dict(obj: Any, where: str = "checkpoint") -> StateDict:
    """The flat {key: numpy array} inside a checkpoint object: unwraps "state_dict"/"model"
    nesting, drops non-tensor entries, strips DataParallel's "module." prefix."""
    for _ in range(3):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: expected a dict of tensors, found {type(obj).__name__}"
                              + (f" ({obj.origin}: a pickled Python object, not a state dict; re-save it "
                                 "with torch.save(model.state_dict(), path))" if isinstance(obj, Placeholder) else ""))
    state = {}
    for key, value in obj.items():
        array = _as_array(value)
        if array is not None:
            state[key[len("module."):] if key.startswith("module.") else key] = array
    if not state:
        raise CheckpointError(f"{where}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:10]))})")
    return state


def split_bn_counters(state: StateDict) -> tuple[StateDict, dict[str, str]]:
    """(state without BatchNorm's num_batches_tracked, {dropped key: why})."""
    kept = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    dropped = {k: "BatchNorm step counter (Jittor keeps none)" for k in state if k not in kept}
    return kept, dropped


def detect_layout(state: StateDict, where: str = "checkpoint") -> WeightLayout:
    """The layout whose signature the keys show; whole-model layouts are tried first, since a
    whole model holds a backbone too."""
    keys = set(state)
    for kind in ("segmentor", "backbone"):
        for layout in models.WEIGHT_LAYOUTS.values():
            if layout.kind == kind and layout.matches(keys):
                return layout
    sample = ", ".join(sorted(keys)[:8])
    raise CheckpointError(f"{where}: unrecognised checkpoint layout (first keys: {sample}). Known layouts: "
                          + "; ".join(f"{l.name} = {l.description}" for l in models.WEIGHT_LAYOUTS.values()))
