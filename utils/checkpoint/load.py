"""Load checkpoints: read a file once, know what it is, build the model it describes.

``source`` everywhere is a path, an http(s) URL, a model zoo name (``utils.model_zoo``), or the
weights themselves (a dict, e.g. a state dict in memory).

* ``Checkpoint(source)``: the file read and converted to our names, with the build options it
  describes (``options``; ``config`` for a whole model).
* ``build_model_from_checkpoint(source, overrides)``: the one way to get a model from a
  checkpoint (test.py, demo.py, train.py --resume).
* ``load_checkpoint(model, source)``: a whole-model checkpoint into a model built already.
* ``load_backbone_weights(model, source)``: ImageNet weights into ``model.backbone``
  (train.py --pretrained).

Missing, unexpected or mis-shaped keys and variants the weights do not fit are a
``CheckpointError`` that lists them: Jittor's own ``load_state_dict`` only logs such problems.
"""
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

import jittor as jt
import models

from .. import model_zoo
from ..download import DownloadError
from .arch import options_from_weights
from .layouts import detect_layout, extract_state_dict, split_bn_counters
from .torchfile import CheckpointError, read_file

Source = str | os.PathLike | dict           # a path, a URL, a zoo name, or the weights themselves
Log = Callable[[str], None] | None         # where progress lines go (None: nowhere)


class UnknownSourceError(CheckpointError):
    """Neither an existing file, nor a URL, nor a model zoo name."""


def resolve_source(source: str | os.PathLike, progress: bool = True) -> Path:
    """Local path of a checkpoint given as an existing path, an http(s) URL or a zoo name
    (downloaded into the cache when needed)."""
    text = os.path.expanduser(os.fspath(source))
    try:
        if os.path.isfile(text):
            return Path(text)
        if re.match(r"^https?://", text):
            from ..download import cache_dir, download
            # one cache folder per URL: two URLs ending in the same file name are different files
            folder = cache_dir() / "urls" / hashlib.sha256(text.encode()).hexdigest()[:16]
            return Path(download(text, directory=folder, progress=progress))
        if model_zoo.canonical_name(text):
            return Path(model_zoo.download_entry(model_zoo.zoo_entry(text), progress=progress))
    except DownloadError as err:        # one exception type for the callers of this module
        raise CheckpointError(str(err)) from err
    looks_like_path = os.sep in text or "." in Path(text).name
    what = f"checkpoint file not found: {text}" if looks_like_path else f"unknown model zoo name {text!r}"
    raise UnknownSourceError(f"{what}. A checkpoint is an existing file, an http(s) URL, or one of the "
                             f"model zoo names: {', '.join(model_zoo.valid_names())}")


def read_checkpoint(source: str | os.PathLike) -> Any:
    """The object stored in a checkpoint (our Jittor pickle or a PyTorch file), tensors as numpy."""
    return read_file(resolve_source(source))


class Checkpoint:
    """A checkpoint read once and converted to our key names.

    ``path`` (None for weights given in memory), ``raw`` (the file's whole content: optimizer
    state, iteration, ...), ``layout`` (a ``models.weights.WeightLayout``), ``state`` (CCNet
    keys; a backbone file's under ``backbone.``), ``classifier`` (a backbone file's ImageNet
    classifier, in the backbone's own names), ``dropped`` / ``filled`` ({key: why}), and
    ``options``: the build_model options the file describes.
    """

    def __init__(self, source: Source) -> None:
        if isinstance(source, dict):
            self.path, self.raw = None, source
        else:
            self.path = resolve_source(source)
            self.raw = read_file(self.path)
        self.where = str(self.path) if self.path else "weights given in memory"
        state, self.dropped = split_bn_counters(extract_state_dict(self.raw, self.where))
        self.layout = detect_layout(state, self.where)
        state, self.filled = self.layout.convert(state)
        self.classifier = {}
        if self.layout.kind == "backbone":
            self.classifier = {k: v for k, v in state.items() if k.startswith(self.layout.classifier)}
            state = {"backbone." + k: v for k, v in state.items() if k not in self.classifier}
        self.state = state
        zoo_options = {}
        if isinstance(source, str) and self.path and not os.path.isfile(os.path.expanduser(source)):
            name = model_zoo.canonical_name(source)
            zoo_options = model_zoo.MODEL_ZOO[name]["arch"] if name else {}
        saved = self.raw.get("arch") if isinstance(self.raw, dict) else None
        # what the weights' shapes show is a fact and wins; the layout, the zoo entry and the
        # config saved with our own files add what shapes cannot show (activation, pooling, R)
        self.options = {**self.layout.implies, **zoo_options, **(saved if isinstance(saved, dict) else {}),
                        **options_from_weights(self.state, self.layout.kind)}

    def require_whole_model(self) -> None:
        """A CheckpointError unless this is a whole-model (segmentor) checkpoint."""
        if self.layout.kind != "segmentor":
            raise CheckpointError(f"{self.where} holds {self.layout.description} weights, a backbone only: "
                                  "use it with train.py --pretrained (load_backbone_weights), not as a full model")

    @property
    def config(self) -> models.ModelConfig:
        """The ``models.ModelConfig`` of a whole-model checkpoint."""
        self.require_whole_model()
        return models.ModelConfig.from_dict(self.options)

    def model_config(self, overrides: Mapping[str, Any] | None = None) -> models.ModelConfig:
        """``config`` with ``overrides`` (backbone, num_classes, recurrence or any option; None
        values are ignored). Another backbone keeps the head options only: the file's backbone
        options were for its own backbone."""
        config = self.config
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        backbone = overrides.pop("backbone", None)
        if backbone and models.resolve_backbone_name(backbone) != config.backbone:
            config = config.with_backbone(backbone)
        return config.replace(**overrides)


def build_model_from_checkpoint(source: "Source | Checkpoint", overrides: Mapping[str, Any] | None = None,
                                config: models.ModelConfig | None = None, log: Log = print) -> models.CCNet:
    """The model a whole-model checkpoint describes (``Checkpoint.model_config(overrides)``), or
    the given ``config``, with the checkpoint's weights loaded strictly; in eval mode.

    Every failure (unreadable file, a backbone-only file, a model that cannot be built or that
    the weights do not fit) is a ``CheckpointError`` with a message for the user.
    """
    checkpoint = source if isinstance(source, Checkpoint) else Checkpoint(source)
    try:
        config = config or checkpoint.model_config(overrides)
        model = config.build()
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as err:     # e.g. an unknown backbone in the overrides
        raise CheckpointError(f"cannot build a model for {checkpoint.where} with {overrides or config}: "
                              f"{err}") from None
    load_checkpoint(model, checkpoint, log=log)
    model.eval()
    return model


def find_mismatches(target: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of ``state`` against ``target``, in network order
    (the model's / the file's), so the first lines show where things diverge."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(target[k].shape)}"
              for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    return missing, unexpected, shapes


def describe_problems(missing: list[str], unexpected: list[str], shapes: list[str], limit: int = 12) -> str:
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}:\n    " + "\n    ".join(items[:limit]) + more)
    return "\n  ".join(parts)


def assign_state(target: Mapping[str, jt.Var], state: Mapping[str, np.ndarray]) -> int:
    """Copy numpy ``state`` into the Vars of ``target`` (a state dict); returns how many."""
    assigned = []
    for key, value in state.items():
        var = target[key]
        var.assign(jt.array(np.ascontiguousarray(value).astype(str(var.dtype))))
        assigned.append(var)
    for var in assigned:
        # A freshly assigned 1-element Var (cca.gamma) broadcast inside a fused expression can
        # fail to compile in Jittor 1.3.11 unless it was synced once.
        var.sync()
    return len(assigned)


def _check_variant(model: jt.Module, checkpoint: Checkpoint) -> None:
    """Refuse a model whose options differ from what the layout implies (head activation,
    contract dilation, pooling): such weights load without complaint but compute something else.
    An option a backbone resolves itself (None) is not checked."""
    config = getattr(model, "config", None)
    if config is None:
        return
    effective = config.effective_options()
    wrong = [f"{k}={v!r} (model has {effective[k]!r})" for k, v in checkpoint.layout.implies.items()
             if effective.get(k) is not None and effective[k] != v]
    if wrong:
        raise CheckpointError(
            f"{checkpoint.where} ({checkpoint.layout.description}) was trained with {', '.join(wrong)}: the "
            f"weights would load but compute something else. Build the model with "
            f"build_model_from_checkpoint(...) or these options.")


def _model_name(model: jt.Module) -> str:
    config = getattr(model, "config", None)
    return f"a CCNet with backbone {config.backbone}, {config.num_classes} classes" if config else "this model"


def _report(log: Log, checkpoint: Checkpoint, loaded: int, what: str, dropped: Mapping[str, str]) -> None:
    if log is None:
        return
    name = checkpoint.path.name if checkpoint.path else checkpoint.where
    log(f"loaded {loaded} tensors into the {what} from {name} ({checkpoint.layout.description})")
    notes = {}
    counters = [k for k in dropped if k.endswith("num_batches_tracked")]
    if counters:
        log(f"  ignored {len(counters)} BatchNorm num_batches_tracked counters (Jittor keeps none)")
    for key, reason in dropped.items():
        if key not in counters:
            notes.setdefault(f"dropped ({reason})", []).append(key)
    for key, reason in checkpoint.filled.items():
        notes.setdefault(f"filled with {reason}", []).append(key)
    for title, keys in notes.items():
        shown = ", ".join(keys[:6]) + (f" ... ({len(keys)} keys)" if len(keys) > 6 else "")
        log(f"  {title}: {shown}")


def load_checkpoint(model: jt.Module, source: "Source | Checkpoint", strict: bool = True,
                    log: Log = print) -> dict[str, Any]:
    """Load a whole-model checkpoint (ours, official CCNet, mmseg CCNet) into ``model``.

    strict: missing / unexpected / mis-shaped keys raise a CheckpointError listing them
    (strict=False loads the matching keys and reports the rest). The model must be the variant
    the file was trained with: options the layout implies are checked against ``model.config``.
    Returns a report: layout, loaded, dropped, filled, missing, unexpected, shape_mismatches.
    """
    checkpoint = source if isinstance(source, Checkpoint) else Checkpoint(source)
    checkpoint.require_whole_model()
    target = model.state_dict()
    missing, unexpected, shapes = find_mismatches(target, checkpoint.state)
    if strict and (missing or unexpected or shapes):
        raise CheckpointError(f"{checkpoint.where} ({checkpoint.layout.description}) does not fit "
                              f"{_model_name(model)}:\n  " + describe_problems(missing, unexpected, shapes))
    _check_variant(model, checkpoint)
    bad = set(unexpected) | {s.split(":")[0] for s in shapes}
    loaded = assign_state(target, {k: v for k, v in checkpoint.state.items() if k not in bad})
    _report(log, checkpoint, loaded, "model", checkpoint.dropped)
    if not strict and (missing or unexpected or shapes) and log is not None:
        log("  not loaded:\n  " + describe_problems(missing, unexpected, shapes))
    return dict(layout=checkpoint.layout.name, loaded=loaded, dropped=checkpoint.dropped, filled=checkpoint.filled,
                missing=missing, unexpected=unexpected, shape_mismatches=shapes)


# the options to name when backbone weights do not fit: how the weights' backbone was built
_BACKBONE_HINT = ("backbone", "stem", "stem_widths", "stem_pool_ceil", "base_channels", "embed_dims", "depths")


def load_backbone_weights(model: jt.Module, source: "Source | Checkpoint", log: Log = print) -> dict[str, Any]:
    """``train.py --pretrained``: ImageNet (or a segmentor's) backbone weights into
    ``model.backbone``, or into ``model`` itself when it is a bare backbone (or an ImageNet
    classifier, which then takes the classifier too). Every backbone parameter must be provided
    with the right shape; other keys are dropped and reported. A backbone of another variant
    (e.g. OpenMMLab V1c's narrower stem) is an error naming the options the weights need.
    Returns a report: layout, loaded, dropped, options.
    """
    checkpoint = source if isinstance(source, Checkpoint) else Checkpoint(source)
    target = getattr(model, "backbone", model).state_dict()
    state = {k[len("backbone."):]: v for k, v in checkpoint.state.items() if k.startswith("backbone.")}
    dropped = dict(checkpoint.dropped)
    dropped.update({k: "not part of the backbone" for k in checkpoint.state if not k.startswith("backbone.")})
    for key, value in checkpoint.classifier.items():
        if key in target:
            state[key] = value
        else:
            dropped[key] = "ImageNet classifier"
    missing, unexpected, shapes = find_mismatches(target, state)
    if missing or unexpected or shapes:
        needs = {k: checkpoint.options[k] for k in _BACKBONE_HINT if k in checkpoint.options}
        raise CheckpointError(f"{checkpoint.where} ({checkpoint.layout.description}) does not fit this backbone:\n  "
                              + describe_problems(missing, unexpected, shapes) + f"\n  the weights are for: {needs}")
    loaded = assign_state(target, state)
    _report(log, checkpoint, loaded, "backbone", dropped)
    return dict(layout=checkpoint.layout.name, loaded=loaded, dropped=dropped, options=checkpoint.options)
