"""Learning-rate schedules.

``poly_lr`` is the schedule of CCNet and mmsegmentation: the rate decays from ``base_lr`` to
``min_lr`` following ``(1 - it / max_iters) ** power``. With ``min_lr`` the decayed part is
rescaled so that iteration 0 still gets exactly ``base_lr`` (mmsegmentation's PolyLrUpdaterHook:
``(base - min) * (1 - t/T) ** power + min``).
"""
from typing import Any


def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float = 0.9, min_lr: float = 0.0) -> float:
    """Learning rate of iteration ``iteration`` (0-based) in a run of ``max_iters`` iterations."""
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")
    if not 0 <= iteration <= max_iters:
        raise ValueError(f"iteration must be in [0, {max_iters}], got {iteration}")
    if min_lr > base_lr:
        raise ValueError(f"min_lr ({min_lr}) is larger than base_lr ({base_lr})")
    progress = 1.0 - iteration / max_iters
    return (base_lr - min_lr) * progress ** power + min_lr


class PolyLR:
    """Sets the poly learning rate on a Jittor optimizer before each step.

    Every parameter group may carry its own ``lr_mult`` (e.g. 10x for a head); the schedule
    multiplies the base rate by it.
    """

    def __init__(self, optimizer: Any, base_lr: float, max_iters: int, power: float = 0.9,
                 min_lr: float = 0.0) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.max_iters = max_iters
        self.power = power
        self.min_lr = min_lr
        poly_lr(base_lr, 0, max_iters, power, min_lr)      # validate the arguments now

    def lr_at(self, iteration: int) -> float:
        return poly_lr(self.base_lr, iteration, self.max_iters, self.power, self.min_lr)

    def step(self, iteration: int) -> float:
        """Apply the rate for ``iteration`` to all parameter groups; returns the base rate."""
        lr = self.lr_at(iteration)
        self.optimizer.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr
