"""Training batches as a pure function of (seed, iteration).

Batch t of a run is a pure function of (seed, t): which samples (per-epoch permutations) and the
augmentation randomness of each sample (a seed per (t, slot)). So a resumed run replays exactly
what an uninterrupted run does, data-loader workers cannot reorder anything, and N MPI ranks
together see the same global batch as one process.
"""
import multiprocessing
import os
import random
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np


def sample_seed(seed: int, iteration: int, slot: int) -> int:
    """Seed of the augmentation of sample ``slot`` of global batch ``iteration``."""
    return int(np.random.SeedSequence([seed, iteration, slot]).generate_state(1)[0])


def _load_sample(dataset, index, sample_seed):
    """dataset[index] with its randomness fixed by ``sample_seed`` (whatever RNG it draws from)."""
    # The datasets draw their augmentation generator from NumPy's global RNG (python's `random`
    # too, for any transform that uses it), so seeding both here fixes the sample.
    random.seed(sample_seed)
    np.random.seed(sample_seed % (2 ** 32))
    image, label = dataset[index]
    return np.asarray(image, dtype=np.float32), np.asarray(label, dtype=np.int32)


_WORKER_DATASET = None


def _worker_init(dataset):
    global _WORKER_DATASET
    _WORKER_DATASET = dataset
    # Stopping is the main process's business: Ctrl-C in a terminal reaches the whole process
    # group, and the handler the main process installed would otherwise run here too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["OMP_NUM_THREADS"] = "1"


def _worker_load(index, sample_seed):
    return _load_sample(_WORKER_DATASET, index, sample_seed)


class BatchStream:
    """Global batch ``t`` = samples ``t*B .. t*B+B-1`` of an endless stream made of per-epoch
    permutations (epoch e shuffled by ``default_rng([seed, e])``); this rank loads its shard.

    Stateless in ``t``: resuming at iteration t needs only t. Workers load samples ahead
    (``prefetch`` batches) through a process pool; ``next_batch`` reports how long the main
    process had to wait for data.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, shard: tuple[int, int], num_workers: int = 0,
                 prefetch: int = 2) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shard = shard
        # Jittor's len(dataset) counts batches; the samples are what we shuffle.
        self.size = int(getattr(dataset, "num_samples", None) or len(dataset.samples))
        if self.size == 0:
            raise ValueError(f"the training set {type(dataset).__name__} is empty")
        self._perms = {}
        self._pool = None
        self._pending = deque()
        self._next_to_submit = None
        self.prefetch = max(1, prefetch)
        if num_workers > 0:
            # An executor, not multiprocessing.Pool: when a worker is killed (pkill, a scheduler's
            # SIGTERM to the whole job, the OOM killer) the executor reports it, where
            # Pool.terminate() would wait forever on a queue lock the dead worker held.
            self._pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=_worker_init, initargs=(dataset,))

    def _permutation(self, epoch):
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._perms[epoch]

    def indices(self, iteration: int) -> list[tuple[int, int]]:
        """(dataset index, augmentation seed) of each sample of this rank's shard of batch t."""
        out = []
        for slot in range(*self.shard):
            position = iteration * self.batch_size + slot
            epoch, offset = divmod(position, self.size)
            out.append((int(self._permutation(epoch)[offset]), sample_seed(self.seed, iteration, slot)))
        return out

    def _submit(self, iteration):
        tasks = self.indices(iteration)
        if self._pool is None:
            self._pending.append((iteration, tasks))
        else:
            self._pending.append((iteration, [self._pool.submit(_worker_load, *t) for t in tasks]))

    def next_batch(self, iteration: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(images [b,3,h,w] float32, labels [b,h,w] int32, seconds waited) for iteration t."""
        try:
            return self._next_batch(iteration)
        except BrokenProcessPool as err:
            raise RuntimeError("a data-loading worker died (killed by a signal or out of memory); "
                               "--num-workers 0 loads in the main process and shows any error") from err

    def _next_batch(self, iteration):
        if self._next_to_submit is None or not self._pending or self._pending[0][0] != iteration:
            self._pending.clear()              # first call, or a jump: start prefetching at t
            self._next_to_submit = iteration
        while self._next_to_submit < iteration + self.prefetch:
            self._submit(self._next_to_submit)
            self._next_to_submit += 1
        start = time.perf_counter()
        _, items = self._pending.popleft()
        if self._pool is None:
            samples = [_load_sample(self.dataset, index, s) for index, s in items]
        else:
            samples = [item.result() for item in items]
        images = np.stack([s[0] for s in samples])
        labels = np.stack([s[1] for s in samples])
        waited = time.perf_counter() - start
        return images, labels, waited

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
