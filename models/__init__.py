"""Model zoo entry point: ``build_model(backbone, num_classes, recurrence=2, **opts) -> CCNet``
(``TemporalCCNet`` for clips with ``temporal=True``).

Backbones register themselves in ``BACKBONES`` with the ``register_backbone`` decorator (see
resnet.py / van.py). A backbone is a ``jittor.nn.Module`` whose ``execute(x)`` returns the four
stage features (strides 4, 8/16/32 depending on dilation) and which exposes ``out_channels``
(four ints) so heads never hard-code channel counts.
"""
import inspect

import utils  # noqa: F401  (configures Jittor before it is imported)

BACKBONES = {}          # name -> factory(**opts) returning a backbone module
BACKBONE_ALIASES = {}   # alias -> registered name


def register_backbone(name, aliases=()):
    """Decorator: add a backbone factory to the registry under ``name`` (and its aliases)."""
    def wrap(factory):
        if name in BACKBONES or name in BACKBONE_ALIASES:
            raise KeyError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = factory
        for alias in aliases:
            BACKBONE_ALIASES[alias] = name
        return factory
    return wrap


def resolve_backbone_name(name):
    """Canonical backbone name for ``name`` or an alias; a clear error listing the valid ones."""
    name = BACKBONE_ALIASES.get(name, name)
    if name not in BACKBONES:
        valid = sorted(BACKBONES) + sorted(f"{a} (= {n})" for a, n in BACKBONE_ALIASES.items())
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(valid)}")
    return name


# Options consumed by the segmentor itself; everything else goes to the backbone factory.
# ``temporal`` picks the segmentor: True builds the clip model of ccnet3d.py (TemporalCCNet).
HEAD_OPTIONS = ("head_channels", "aux_channels", "head_act", "dropout", "ccl_dim", "cca_gamma_init",
                "temporal")


def _accepted_options(factory):
    """(names the factory takes as keywords, whether it takes **kwargs)."""
    params = inspect.signature(factory).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def build_model(backbone, num_classes, recurrence=2, **opts):
    """CCNet on a registered backbone.

    ``opts`` holds head options (``HEAD_OPTIONS``, see ``CCNet``) and backbone options (e.g.
    ``output_stride``, ``stem``, ``base_channels`` for ResNets); an option neither takes raises
    a TypeError naming it. ``temporal=True`` builds ``TemporalCCNet`` (models/ccnet3d.py): input
    clips [B, T, 3, H, W], space-time criss-cross attention, per-frame outputs [B*T, ...].
    """
    from .ccnet import CCNet
    from .ccnet3d import TemporalCCNet
    segmentors = {False: CCNet, True: TemporalCCNet}

    name = resolve_backbone_name(backbone)
    factory = BACKBONES[name]
    head_opts = {k: v for k, v in opts.items() if k in HEAD_OPTIONS}
    backbone_opts = {k: v for k, v in opts.items() if k not in HEAD_OPTIONS}
    accepted, takes_any = _accepted_options(factory)
    unknown = sorted(set(backbone_opts) - accepted)
    if unknown and not takes_any:
        raise TypeError(
            f"build_model: unknown option(s) {', '.join(unknown)} for backbone {name!r}; "
            f"backbone options: {', '.join(sorted(accepted)) or 'none'}; "
            f"head options: {', '.join(HEAD_OPTIONS)}")
    temporal = head_opts.pop("temporal", False)
    if not isinstance(temporal, bool):
        raise ValueError(f"build_model: temporal must be True or False, got {temporal!r}")
    return segmentors[temporal](factory(**backbone_opts), num_classes, recurrence=recurrence, **head_opts)


# Importing the backbone modules registers them.
from . import resnet  # noqa: E402,F401
from . import van  # noqa: E402,F401
