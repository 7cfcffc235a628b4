"""How the model files describe published checkpoints whose key names are not ours.

Each model file lists the layouts it can read in ``WEIGHT_LAYOUTS`` (ccnet.py: this project's,
the official CCNet and mmsegmentation's; resnet.py: torchvision, MIT CSAIL, OpenMMLab V1c; van.py:
official VAN), so the knowledge of a network's parameter names stays beside the network.
``models.WEIGHT_LAYOUTS`` collects them; ``utils.checkpoint`` reads files and applies them.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import numpy as np

StateDict = dict[str, np.ndarray]     # parameter name -> array


@dataclass(frozen=True)
class WeightLayout:
    """One checkpoint layout: how to recognise it and how its keys map onto ours.

    ``kind``: "segmentor" (a whole CCNet; ``convert`` gives CCNet keys) or "backbone" (ImageNet
    weights; ``convert`` gives the backbone's own keys, the classifier's under ``classifier``).
    ``matches(keys)``: whether a state dict with these keys has this layout (layouts of one kind
    exclude each other; segmentor files hold a backbone too, so they are tried first).
    ``convert(state)``: ``(state in our names, {key: why it was filled in})``.
    ``implies``: build options the layout fixes although its weights cannot show them.
    """
    name: str
    kind: str
    description: str
    matches: Callable[[set[str]], bool]
    convert: Callable[[StateDict], tuple[StateDict, dict[str, str]]]
    implies: dict[str, Any] = field(default_factory=dict)
    classifier: str = ""


def rename(key: str, table: Sequence[tuple[str, str]]) -> str | None:
    """Apply the first matching (old prefix, new prefix) pair of ``table``; None when none matches."""
    for old, new in table:
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def unchanged(state: StateDict) -> tuple[StateDict, dict[str, str]]:
    """``convert`` of a layout whose names are already ours."""
    return dict(state), {}


def has_all(keys: Collection[str], *names: str) -> bool:
    return all(n in keys for n in names)
