"""The cross-language scenario in Python: the same tasks as tests/guests/scenario (Rust) and
tests/guests/scenario-js, under the prefix `py.`."""

import time

from stem_guest import Reject, TaskContext, task


@task(name="py.add")
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@task(name="py.fail", max_retries=2, retry_backoff="100ms")
def fail(message: str):
    """Raises, so the worker retries it twice, then records it failed."""
    raise ValueError(message)


@task(name="py.reject")
def reject(reason: str):
    raise Reject(reason)


@task(name="py.spin", time_limit="2s")
def spin():
    """Loops until the hard time limit stops it."""
    while True:
        pass


@task(name="py.hog", memory_limit="96MiB")
def hog():
    """Allocates until the memory limit stops it."""
    blocks = []
    while True:
        blocks.append(bytearray(1 << 20))


@task(name="py.spawn")
def spawn(ctx: TaskContext, n: int) -> str:
    """Enqueues py.add(n, n) and returns its id."""
    return ctx.enqueue("py.add", {"a": n, "b": n})


@task(name="py.sleep")
def sleep(ms: int) -> int:
    """Waits `ms` milliseconds without computing; returns `ms`."""
    time.sleep(ms / 1000)
    return ms


_calls = []


@task(name="py.calls", memory_limit="96MiB")
def calls(crash: bool = False) -> int:
    """How many runs this instance served: 1 with a fresh instance per run. With `crash`, it
    then allocates until the memory limit stops it."""
    _calls.append(1)
    if crash:
        hog()
    return len(_calls)
