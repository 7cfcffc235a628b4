"""Multi-process training helpers on Jittor's MPI (``mpirun -np N python train.py ...``).

What Jittor already does under MPI: ``optimizer.step`` averages the
gradients over ranks, BatchNorm averages its batch statistics over ranks (``sync=True``). What
it does not do, and this module does:

* identical start: every rank must hold rank 0's initial weights *and buffers* (BN running
  statistics are buffers, which ``optimizer.step`` never broadcasts) -> ``broadcast_module``;
* one global batch split in equal shards -> ``shard_bounds``; equal shards keep
  "mean of per-rank means" equal to the full-batch mean that a single process computes;
* only rank 0 writes logs and checkpoints -> ``is_main``;
* scalars for logging averaged over ranks -> ``all_reduce_mean``.

Every function also works without MPI (one process = rank 0 of 1).
"""
from typing import Sequence

import numpy as np

import jittor as jt


def in_mpi() -> bool:
    return bool(jt.in_mpi)


def rank() -> int:
    return jt.rank if jt.in_mpi else 0


def world_size() -> int:
    return jt.world_size if jt.in_mpi else 1


def is_main() -> bool:
    """True on the one process that writes files and prints progress."""
    return rank() == 0


def shard_bounds(global_batch: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's part of a global batch of ``global_batch`` samples."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if global_batch % world:
        raise ValueError(f"--batch-size {global_batch} is not divisible by the number of MPI "
                         f"processes ({world}): every rank needs an equal share of the batch")
    per_rank = global_batch // world
    return rank_ * per_rank, (rank_ + 1) * per_rank


def broadcast_module(module: jt.Module, root: int = 0) -> None:
    """Copy ``root``'s parameters and buffers (BN running stats) to every rank, in place."""
    if not jt.in_mpi:
        return
    for value in module.state_dict().values():
        if isinstance(value, jt.Var):
            value.assign(value.mpi_broadcast(root))
    jt.sync_all(True)


def broadcast_int(value: int, root: int = 0) -> int:
    """``root``'s integer on every rank (e.g. a seed drawn from the clock on rank 0)."""
    if not jt.in_mpi:
        return int(value)
    buf = np.array([value], dtype=np.int64)
    jt.mpi.broadcast(buf, root)
    return int(buf[0])


def all_reduce_mean(value: float | Sequence[float]) -> float | list[float]:
    """Mean over ranks of a float, or elementwise of a list of floats (one collective for all of
    them; training losses for the log equal the full-batch losses)."""
    values = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if jt.in_mpi:
        values = jt.array(values.astype(np.float32)).mpi_all_reduce("mean").numpy().astype(np.float64)
    return float(values[0]) if np.ndim(value) == 0 else [float(v) for v in values]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a NaN loss somewhere)."""
    if not jt.in_mpi:
        return bool(flag)
    return all_reduce_mean(1.0 if flag else 0.0) > 0
