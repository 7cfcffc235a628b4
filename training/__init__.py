"""Training: ``RunConfig`` (config.py: the run's settings, presets, resuming), ``Trainer``
(trainer.py: the loop, checkpoints, stopping), the SGD update of a step (step.py) and the
optimizer / RNG state it saves (state.py). train.py is the command-line front."""
from .config import PRESETS, RECIPE, RunConfig  # noqa: F401
from .trainer import Trainer, open_resume  # noqa: F401
