"""One multi-threaded OpenMP team in the serving process: the engine's.

PyTorch's CPU kernels (its own `parallel_for` and oneDNN's matmuls) run on OpenMP. Every OS thread
that runs a multi-threaded torch op gets its own team of OpenMP workers, kept for that thread's life:
the executor thread that loaded the model, the ones that embedded the knowledge base or a query.
libgomp (PyTorch's OpenMP runtime on Linux) lets a worker spin for the next parallel region only
while it manages no more threads than the process has CPUs; past that it spins 100 times and sleeps,
so each of a decode step's ~900 parallel regions pays a futex wake-up. On a 2-core machine a single
extra team, idle, turned a 1-row decode step from 48 ms into 74 ms and left the second core mostly
unused (measured, docs/benchmarks.md "One OpenMP team"): the gateway served one stream at 0.6× the
engine's own speed.

So the serving process runs every thread with one OpenMP thread (torch's process-wide default,
which a thread reads when it first runs an op: no teams form), and the engine's worker thread alone
raises its own count. It does that through the runtime's `omp_set_num_threads`, which is per thread;
`torch.set_num_threads` would also raise the default for every thread that starts later.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import structlog
import torch

log = structlog.get_logger(__name__)

DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice (physical cores), read before anything lowers it
_RUNTIMES = ("libgomp", "libiomp5", "libomp")


def serve_single_threaded() -> None:
    """Every thread that has not run a torch op yet will use one OpenMP thread (call before the
    serving process starts its executor threads)."""
    torch.set_num_threads(1)


@lru_cache(maxsize=1)
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (its own copy, found in the process's mappings), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        return None
    for name in _RUNTIMES:
        for path in sorted(paths):
            if path.rsplit("/", 1)[-1].startswith(name):
                try:
                    return ctypes.CDLL(path)  # already loaded: the same handle, no second runtime
                except OSError:
                    continue
    return None


def use_threads_here(threads: int) -> bool:
    """Give the calling thread `threads` OpenMP threads without changing torch's default for other
    threads. Returns False (and falls back to `torch.set_num_threads`, which changes both) where the
    runtime is not found."""
    torch.get_num_threads()  # torch's lazy per-thread init runs now, not after the call below
    runtime = _openmp_runtime()
    if runtime is None:
        log.warning("engine.openmp_runtime_not_found", threads=threads,
                    hint="torch.set_num_threads used instead: other threads get the same count")
        torch.set_num_threads(threads)
        return False
    runtime.omp_set_num_threads(ctypes.c_int(threads))
    return torch.get_num_threads() == threads
