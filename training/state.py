"""The parts of a training checkpoint beyond the weights: optimizer momentum and RNG states."""
import random
from typing import Any, Mapping

import numpy as np

import jittor as jt


def optimizer_state(optimizer: jt.optim.Optimizer, names: Mapping[int, str]) -> dict[str, Any]:
    """Momentum buffers by parameter name (Jittor's own optimizer.state_dict() omits them)."""
    buffers = {}
    for group in optimizer.param_groups:
        for param, value in zip(group["params"], group["values"]):
            buffers[names[id(param)]] = value.numpy().copy()
    return {"momentum_buffers": buffers, "n_step": optimizer.n_step}


def load_optimizer_state(optimizer: jt.optim.Optimizer, names: Mapping[int, str], state: Any,
                         source: object) -> None:
    """Put the momentum buffers ``optimizer_state`` saved back; any missing or mis-shaped one is a
    ValueError naming ``source`` and the parameter (the run could not continue exactly)."""
    buffers = state.get("momentum_buffers") if isinstance(state, dict) else None
    if buffers is None:
        raise ValueError(f"{source}: checkpoint has no optimizer momentum buffers; cannot resume exactly")
    for group in optimizer.param_groups:
        for param, value in zip(group["params"], group["values"]):
            name = names[id(param)]
            if name not in buffers:
                raise ValueError(f"{source}: optimizer state lacks the momentum buffer of {name}")
            array = np.asarray(buffers[name].numpy() if isinstance(buffers[name], jt.Var) else buffers[name])
            if tuple(array.shape) != tuple(value.shape):
                raise ValueError(f"{source}: momentum buffer of {name} has shape {tuple(array.shape)}, "
                                 f"the model needs {tuple(value.shape)}")
            value.update(jt.array(array.astype(np.float32)))
            value.sync()
    optimizer.n_step = int(state.get("n_step", 0))


def rng_state() -> dict[str, Any]:
    """NumPy's and Python's global RNG states (anything a transform may draw from)."""
    return {"numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: Mapping[str, Any] | None) -> None:
    """The inverse of ``rng_state`` (checkpoints without it leave the RNGs alone)."""
    if not state:
        return
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "python" in state:
        python = state["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
