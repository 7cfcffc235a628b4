"""Models: ``build_model(backbone, num_classes, recurrence=2, **opts) -> CCNet``
(``TemporalCCNet`` for clips with ``temporal=True``) and the ``ModelConfig`` it records.

Backbones register themselves in ``BACKBONES`` (registry.py) when resnet.py / van.py are
imported; ``WEIGHT_LAYOUTS`` collects the published checkpoint layouts the model files read.
"""
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from utils import runtime  # noqa: F401  (sets Jittor's environment before any model file imports it)

from . import ccnet, resnet, van
from .ccnet import CCNet
from .ccnet3d import TemporalCCNet
from .registry import BACKBONE_ALIASES, BACKBONES, register_backbone, resolve_backbone_name  # noqa: F401

# Options consumed by the segmentor itself; everything else goes to the backbone factory.
# ``temporal`` picks the segmentor: True builds the clip model of ccnet3d.py (TemporalCCNet).
HEAD_OPTIONS = ("head_channels", "aux_channels", "head_act", "dropout", "ccl_dim", "cca_gamma_init",
                "temporal")


def _accepted_options(factory: Callable) -> tuple[set[str], bool]:
    """(names the factory takes as keywords, whether it takes **kwargs)."""
    params = inspect.signature(factory).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


@dataclass(frozen=True)
class ModelConfig:
    """What ``build_model`` was called with: enough to build the same model again.

    ``options`` holds the head and backbone options exactly as given (defaults left out), so
    ``build_model(**config.to_dict())`` rebuilds the model. Checkpoints store ``to_dict()``.
    """
    backbone: str
    num_classes: int
    recurrence: int = 2
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "options", dict(self.options))    # never shared with the caller

    def to_dict(self) -> dict[str, Any]:
        """The flat ``build_model`` keywords: backbone, num_classes, recurrence and the options."""
        return {"backbone": self.backbone, "num_classes": self.num_classes, "recurrence": self.recurrence,
                **self.options}

    @classmethod
    def from_dict(cls, arch: Mapping[str, Any]) -> "ModelConfig":
        """The inverse of ``to_dict``; a missing backbone or num_classes is a ValueError."""
        arch = dict(arch)
        missing = [k for k in ("backbone", "num_classes") if arch.get(k) is None]
        if missing:
            raise ValueError(f"a model config needs {' and '.join(missing)}, got {arch}")
        return cls(arch.pop("backbone"), int(arch.pop("num_classes")), int(arch.pop("recurrence", 2)), arch)

    def build(self) -> CCNet:
        """``build_model`` with this config: the same architecture, new random weights."""
        return build_model(**self.to_dict())

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields or options changed (an option set to None is removed)."""
        arch = self.to_dict()
        arch.update(changes)
        return ModelConfig.from_dict({k: v for k, v in arch.items() if v is not None})

    def with_backbone(self, backbone: str) -> "ModelConfig":
        """The same head on another backbone: this config's backbone options do not apply to it."""
        head = {k: v for k, v in self.options.items() if k in HEAD_OPTIONS}
        return ModelConfig(backbone, self.num_classes, self.recurrence, head)

    def effective_options(self) -> dict[str, Any]:
        """Every option of this model, defaults filled in (None: the backbone decides)."""
        return {**option_defaults(self.backbone), **self.options}


def option_defaults(backbone: str) -> dict[str, Any]:
    """The default of every head and backbone option ``build_model`` accepts for ``backbone``."""
    defaults = {}
    for function in (BACKBONES[resolve_backbone_name(backbone)], CCNet.__init__):
        for param in inspect.signature(function).parameters.values():
            if param.default is not param.empty and param.name not in ("num_classes", "recurrence"):
                defaults[param.name] = param.default
    defaults["temporal"] = False
    return defaults


def build_model(backbone: str, num_classes: int, recurrence: int = 2, **opts: Any) -> CCNet:
    """CCNet on a registered backbone; its ``config`` (``ModelConfig``) records these arguments.

    ``opts`` holds head options (``HEAD_OPTIONS``, see ``CCNet``) and backbone options (e.g.
    ``output_stride``, ``stem``, ``stem_widths``, ``base_channels`` for ResNets); an option
    neither takes raises a TypeError naming it. ``temporal=True`` builds ``TemporalCCNet``
    (models/ccnet3d.py): input clips [B, T, 3, H, W], space-time criss-cross attention,
    per-frame outputs [B*T, ...].
    """
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
    model = segmentors[temporal](factory(**backbone_opts), num_classes, recurrence=recurrence, **head_opts)
    model.config = ModelConfig(name, num_classes, recurrence, opts)
    return model


# name -> WeightLayout of every published checkpoint layout the model files can read
WEIGHT_LAYOUTS = {layout.name: layout for module in (ccnet, resnet, van) for layout in module.WEIGHT_LAYOUTS}
