"""The settings of one training run: ``RunConfig``, built once from the flags, the dataset's preset
and (``--resume``) the checkpoint being continued, then handed to the ``Trainer``.

Precedence: a flag given on the command line > the resumed checkpoint's value > the dataset's
preset > the ADE20K recipe (mmsegmentation's: the field defaults below).
"""
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Collection, Mapping

import models
from utils.checkpoint import Checkpoint
from utils.threads import cpu_threads


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs to know. Field names are train.py's flags with '_' for '-'."""
    # data
    dataset: str = "ade20k"
    data_root: str | None = None
    crop_size: int = 512
    batch_size: int = 16
    num_workers: int = 4
    # model (``model_config`` turns these into the ModelConfig the model is built from)
    backbone: str = "resnet101"
    recurrence: int = 2
    dropout: float = 0.1
    model_opts: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    # optimisation
    iters: int = 80000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    min_lr: float = 1e-4
    aux_weight: float = 0.4
    ohem: bool = False
    ccl: bool = False
    amp: bool = False
    seed: int = 0
    threads: int | None = None              # CPU threads; None: OpenMP's default (filled in)
    # evaluation, logging, checkpoints
    work_dir: str | None = None
    eval_interval: int = 8000
    eval_mode: str = "whole"
    eval_window: int | None = None
    eval_stride: int | None = None
    eval_max_images: int | None = None
    save_interval: int = 8000
    log_interval: int = 10
    stop_at: int | None = None
    resume: str | None = None
    overwrite: bool = False
    no_progress: bool = False

    def __post_init__(self):
        checks = [("--iters", self.iters >= 1), ("--batch-size", self.batch_size >= 1),
                  ("--crop-size", self.crop_size >= 8), ("--lr", self.lr > 0),
                  ("--num-workers", self.num_workers >= 0), ("--recurrence", self.recurrence >= 0),
                  ("--eval-interval", self.eval_interval >= 0), ("--save-interval", self.save_interval >= 0),
                  ("--log-interval", self.log_interval >= 1), ("--min-lr", 0 <= self.min_lr <= self.lr),
                  ("--dropout", 0 <= self.dropout < 1), ("--threads", self.threads is None or self.threads >= 1)]
        for flag, ok in checks:
            if not ok:
                raise ValueError(f"invalid value for {flag}: {getattr(self, flag[2:].replace('-', '_'))}")
        if self.threads is None:             # recorded: the thread count is part of the result
            object.__setattr__(self, "threads", cpu_threads())
        if self.work_dir is None:
            object.__setattr__(self, "work_dir", os.path.join(
                "work_dirs", f"{self.dataset}_{self.backbone}_r{self.recurrence}"))

    def model_config(self, num_classes: int, backbone_weights: Mapping[str, Any] | None = None) -> models.ModelConfig:
        """The ``models.ModelConfig`` of this run for a dataset of ``num_classes`` classes.

        ``backbone_weights`` (the ``--pretrained`` file's build options): a deep stem takes the
        widths and pooling the weights were trained with (OpenMMLab V1c's stem is narrower and
        floors); every other option stays the run's.
        """
        options = dict(self.model_opts)
        options.setdefault("dropout", self.dropout)
        if self.ccl:
            options.setdefault("ccl_dim", 16)      # the TPAMI paper's projection
        planned = models.ModelConfig(self.backbone, num_classes, self.recurrence, options)
        if backbone_weights and backbone_weights.get("stem") == planned.effective_options().get("stem") == "deep":
            for key in ("stem_widths", "stem_pool_ceil"):
                if key in backbone_weights:
                    options.setdefault(key, backbone_weights[key])
        return models.ModelConfig(self.backbone, num_classes, self.recurrence, options)

    def record(self) -> dict[str, Any]:
        """The settings as a plain dict (logged, and saved in checkpoints for ``--resume``)."""
        return asdict(self)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], explicit: Collection[str],
                   resumed: Checkpoint | None = None) -> "RunConfig":
        """``flags``: train.py's parsed flags by field name (``model_opts``: the ``--model-opt``
        values); ``explicit``: the names given on the command line; ``resumed``: the
        ``utils.checkpoint.Checkpoint`` of ``--resume``.

        Resuming continues the checkpoint's run: its settings and its model (as saved, so every
        option it was built with) apply unless a flag says otherwise; explicit ``--model-opt``
        values change single options. The seed is always the checkpoint's: the data order and
        augmentation of the steps still to come depend on it.
        """
        given = {k: v for k, v in flags.items() if k in explicit}
        saved = {}
        if resumed is not None:
            recorded = dict((resumed.raw.get("meta") or {}).get("args") or {})
            saved = {RENAMED.get(k, k): v for k, v in recorded.items() if k not in NOT_INHERITED}
            saved.update(_model_settings(resumed, given))
            saved["seed"] = int(resumed.raw.get("seed", saved.get("seed", cls.seed)))
            given.pop("seed", None)
            given.pop("model_opts", None)           # merged into the resumed model's options
            saved["work_dir"] = os.path.dirname(os.path.abspath(resumed.path))
        dataset = given.get("dataset", saved.get("dataset", cls.dataset))
        preset = PRESETS.get(dataset, {})
        names = {f.name for f in fields(cls)}
        values = {**{k: v for k, v in preset.items() if k in names}, **{k: v for k, v in saved.items() if k in names},
                  **given}
        if resumed is None:
            values["model_opts"] = {**preset.get("model_opts", {}), **flags.get("model_opts", {})}
        return cls(**values)


# Settings recorded under their former names by earlier versions: old name -> field.
RENAMED = {"eval_crop": "eval_window", "val_images": "eval_max_images"}

# Settings of one invocation, not of the run: never taken from the checkpoint being resumed.
NOT_INHERITED = ("resume", "stop_at", "no_progress", "pretrained", "work_dir", "overwrite")


def _model_settings(resumed: Checkpoint, given: Mapping[str, Any]) -> dict[str, Any]:
    """backbone / recurrence / dropout / model_opts of the resumed run's model, changed by the
    model flags given explicitly."""
    overrides = {k: given[k] for k in ("backbone", "recurrence", "dropout") if k in given}
    config = resumed.model_config({**overrides, **given.get("model_opts", {})})
    options = dict(config.options)
    settings = dict(backbone=config.backbone, recurrence=config.recurrence, model_opts=options)
    if "dropout" in options:
        settings["dropout"] = options.pop("dropout")
    return settings


# The recipe: every field's default (train.py's help shows them).
RECIPE = {f.name: f.default for f in fields(RunConfig) if f.name != "model_opts"}

# Values that replace the recipe for a dataset (explicit flags still win).
PRESETS = {
    "cityscapes": dict(crop_size=769, batch_size=8, iters=60000, weight_decay=1e-4, min_lr=0.0,
                       eval_mode="slide", eval_window=769, eval_stride=513, eval_interval=6000,
                       save_interval=6000),
    # Small enough to train on a laptop CPU in minutes. The demo's context classes depend on
    # markers far along their row or column (datasets/demo.py). resnet10's receptive field does
    # not reach them, so only attention can (resnet18's dilated stages reach them in part, and
    # the plain head then leaves the attention unused); gamma starts at 1, not at the official
    # 0, because at gamma = 0 every attention weight starts with a zero gradient and a short
    # schedule does not get it moving (measured: README, "Training").
    "demo": dict(backbone="resnet10", crop_size=128, batch_size=8, iters=1000, lr=0.02,
                 weight_decay=1e-4, min_lr=1e-4, eval_interval=100, save_interval=100,
                 log_interval=5, num_workers=1,
                 model_opts={"base_channels": 16, "head_channels": 64, "aux_channels": 64,
                             "cca_gamma_init": 1.0}),
    # Clips of 3 frames (datasets/demo_clips.py): the class of a grey object is the colour it had in
    # frame 0, so the temporal model (models/ccnet3d.py) must look along T. A batch is 4 clips.
    # resnet10 and gamma = 1 as in "demo": with resnet18 or gamma = 0 the attention stayed uniform.
    "demo_clips": dict(backbone="resnet10", crop_size=96, batch_size=4, iters=600, lr=0.02,
                       weight_decay=1e-4, min_lr=1e-4, eval_interval=100, save_interval=100,
                       log_interval=5, num_workers=1,
                       model_opts={"temporal": True, "base_channels": 16, "head_channels": 64,
                                   "aux_channels": 64, "cca_gamma_init": 1.0}),
}
