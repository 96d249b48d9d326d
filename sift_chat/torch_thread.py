"""One thread for the models' work in a server: every forward, step and encode runs on it.

torch's CPU ops run on OpenMP, which gives each OS thread that runs a parallel op its own team of
worker threads; once a process has more such threads than cores, libgomp stops letting the idle
workers spin between ops, and every op pays for waking them. A server answers on many threads
(Gradio's and the API's workers, the ingest's), so left alone every thread that touched a model
would add a team. Measured on 2 cores (README: Several users), a decoding step of the default
model took 75 ms on a second thread once the first had run a matmul, against 47 ms with all the
work on one thread.

`enable()` (the server calls it before loading the models) starts the thread with torch's thread
count and sets every other thread's to 1, again whenever one hands work over (a thread on one
torch thread starts no team: a copy of 10 MB or a 200 × 384 matmul in another thread was enough
to slow the models' thread for good);
`run(fn, ...)` then calls fn there and returns its result (or raises its exception) in the
caller's thread. Without
`enable()` (the CLI, the tests, the benchmarks: one thread does everything anyway) `run` calls fn
in place. Thread-local state (grad mode, `lora.base_matmuls`, `lora.row_scales`) belongs to the
thread that runs fn: set it inside fn.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_thread: threading.Thread | None = None
_starting = threading.Lock()


def enable() -> None:
    """From now on `run` hands its work to the one models' thread (started here; again: no-op)."""
    global _executor, _thread
    with _starting:
        if _executor is None:
            import torch

            threads = torch.get_num_threads()
            executor = ThreadPoolExecutor(1, thread_name_prefix="sift-chat-torch",
                                          initializer=_use_threads, initargs=(threads,))
            _thread = executor.submit(threading.current_thread).result()
            _executor = executor
            # torch's count for every thread that first touches it from now on, and for this one: a
            # thread with one torch thread never starts a team (the small ops of a request stay there)
            torch.set_num_threads(1)


def _use_threads(count: int) -> None:
    import torch

    torch.get_num_threads()  # torch's lazy per-thread set-up first: it would reset the count to the global one
    torch.set_num_threads(count)


def disable() -> None:
    """Back to running in place (at the models' thread count); the thread ends once the work
    handed to it is done."""
    global _executor, _thread
    with _starting:
        executor, _executor, _thread = _executor, None, None
    if executor is not None:
        import torch

        threads = executor.submit(torch.get_num_threads).result()
        executor.shutdown(wait=True)
        torch.set_num_threads(threads)


def enabled() -> bool:
    return _executor is not None


def run(fn: Callable[..., T], /, *args, **kwargs) -> T:
    """fn(*args, **kwargs) on the models' thread when enabled (in place when not, or when called
    from that thread), its result or its exception here."""
    if _executor is None or threading.current_thread() is _thread:
        return fn(*args, **kwargs)
    one_torch_thread_here()
    return _executor.submit(fn, *args, **kwargs).result()


def one_torch_thread_here() -> None:
    """When enabled and called elsewhere than on the models' thread: this thread on one torch
    thread, whatever it started with (the models' thread may have set torch's count for new
    threads back to its own: `decoding.at_most_threads` restores it, the start-up probe tries 1
    and 2). Called before a request's own small ops (and by `run`)."""
    if _executor is None or threading.current_thread() is _thread:
        return
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
