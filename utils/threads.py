"""The number of CPU threads Jittor's OpenMP kernels and oneDNN run with.

It is part of what a training run computes, not only of its speed: oneDNN splits the reduction
of some convolution weight gradients by thread (measured: the gradient of a 1x1 conv 64 -> 11 on
[8, 64, 16, 16] differs by 1.5e-5 between 1 and 2 threads), so runs agree bit for bit only with
the same thread count. The count can change at run time: Jittor's kernels and oneDNN ask OpenMP
for it at every parallel region.
"""
import ctypes
from functools import lru_cache


@lru_cache(maxsize=1)
def _openmp() -> ctypes.CDLL:
    # the GNU OpenMP runtime Jittor's kernels and the oneDNN wheels are linked against
    return ctypes.CDLL("libgomp.so.1")


def cpu_threads() -> int:
    """Threads the next parallel region will use (``OMP_NUM_THREADS``, else every core)."""
    return int(_openmp().omp_get_max_threads())


def set_cpu_threads(count: int) -> None:
    """Run the following CPU kernels with ``count`` threads."""
    if count < 1:
        raise ValueError(f"the thread count must be at least 1, got {count}")
    _openmp().omp_set_num_threads(int(count))
