"""The backbone registry: ``register_backbone`` (used by resnet.py and van.py) and name lookup.

A backbone is a ``jittor.nn.Module`` whose ``execute(x)`` returns the four stage features
(strides 4, 8/16/32 depending on dilation) and which exposes ``out_channels`` (four ints) so
heads never hard-code channel counts.
"""
from typing import Callable, Iterable

BACKBONES: dict[str, Callable] = {}    # name -> factory(**opts) returning a backbone module
BACKBONE_ALIASES: dict[str, str] = {}   # alias -> registered name


def register_backbone(name: str, aliases: Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """Decorator: add a backbone factory to the registry under ``name`` (and its aliases)."""
    def wrap(factory: Callable) -> Callable:
        if name in BACKBONES or name in BACKBONE_ALIASES:
            raise KeyError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = factory
        for alias in aliases:
            BACKBONE_ALIASES[alias] = name
        return factory
    return wrap


def resolve_backbone_name(name: str) -> str:
    """Canonical backbone name for ``name`` or an alias; a clear error listing the valid ones."""
    name = BACKBONE_ALIASES.get(name, name)
    if name not in BACKBONES:
        valid = sorted(BACKBONES) + sorted(f"{a} (= {n})" for a, n in BACKBONE_ALIASES.items())
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(valid)}")
    return name
