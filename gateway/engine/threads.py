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
raises its own count. It does that through the C entry points torch's own library links,
`omp_set_num_threads` and MKL's `MKL_Set_Num_Threads_Local` (float32 matmuls without prepacking run
on MKL), both per thread; `torch.set_num_threads` would also raise the default for every thread that
starts later. They are looked up through `libtorch_cpu`'s handle, which searches the libraries it
depends on: a name search of the process could find another OpenMP copy first (scikit-learn ships
its own libgomp).

Work that should compute on all cores outside the engine (the trainer process trains before it
evaluates; the knowledge base is embedded at startup) runs on a thread of its own that ends with the
work (`in_own_thread`, `on_all_cores`): its team goes with it, instead of staying beside the
engine's.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from functools import lru_cache
from pathlib import Path
from typing import Callable, TypeVar

import structlog

log = structlog.get_logger(__name__)
T = TypeVar("T")

# torch is imported in the functions: the CLI and an upstream-mode gateway import this module early
_default_threads: int | None = None  # torch's own choice (physical cores), before it was lowered


def default_threads() -> int:
    """torch's default thread count as it was before `serve_single_threaded` lowered it."""
    import torch

    return _default_threads if _default_threads is not None else torch.get_num_threads()


def serve_single_threaded() -> None:
    """Every thread that has not run a torch op yet will use one OpenMP thread (the serving
    process's default, set before its executor threads compute anything)."""
    global _default_threads
    import torch

    if _default_threads is None:
        _default_threads = torch.get_num_threads()
    torch.set_num_threads(1)


@lru_cache(maxsize=1)
def _torch_library() -> ctypes.CDLL | None:
    import torch

    lib = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        try:
            return ctypes.CDLL(str(lib / name))  # already loaded: the same handle
        except OSError:
            continue
    return None


def use_threads_here(threads: int) -> bool:
    """Give the calling thread `threads` OpenMP (and MKL) threads without changing torch's default
    for other threads. Where the entry points are not found, falls back to `torch.set_num_threads`
    (which changes both) and returns False."""
    import torch

    torch.get_num_threads()  # torch's lazy per-thread set-up runs now, not after the calls below
    library = _torch_library()
    try:
        library.omp_set_num_threads(ctypes.c_int(threads))
    except AttributeError:  # no library (None has no attribute either) or no OpenMP in it
        log.warning("engine.per_thread_threads_unavailable", threads=threads,
                    hint="torch.set_num_threads used instead: threads started later get the same count")
        torch.set_num_threads(threads)
        return False
    try:
        library.MKL_Set_Num_Threads_Local(ctypes.c_int(threads))  # the C entry point: takes the value
    except AttributeError:
        pass  # a torch built without MKL
    return torch.get_num_threads() == threads


def on_all_cores(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, computing on torch's default thread count: for bulk work beside the engine (embedding a
    whole knowledge base at startup), run with `in_own_thread` so that its team goes when it ends."""

    def run(*args: object) -> T:
        use_threads_here(default_threads())
        return fn(*args)

    run.__name__ = getattr(fn, "__name__", "work")
    return run


async def in_own_thread(fn: Callable[..., T], *args: object) -> T:
    """`asyncio.to_thread`, on a thread that ends with `fn`: whatever OpenMP team it builds goes with it."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - raised again in the awaiting coroutine
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=getattr(fn, "__name__", "work"), daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join)  # the team is released when the thread exits
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
