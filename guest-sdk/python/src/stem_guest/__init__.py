"""Write Stem tasks in Python and build them into WebAssembly components.

A task is a plain function marked with `@task`. Its JSON arguments arrive as the function's
parameters; what it returns is stored as its JSON result::

    from stem_guest import TaskContext, task

    @task(name="text.word-count", max_retries=3, time_limit="30s")
    def word_count(ctx: TaskContext, text: str, top: int = 3) -> dict:
        ctx.info(f"counting {len(text)} characters")
        ...

`stem-guest-py build tasks.py -o tasks.wasm` turns the module into a component that
`stem-host task upload` accepts. How a run ends:

- the function returns: the task succeeded, with the return value as its JSON result;
- arguments that do not fit the parameters (missing, unknown, of the wrong JSON type): the
  run is rejected and never retried;
- `raise Reject("...")`: rejected too;
- `raise Retry("...", after=5)`: run again in 5 seconds (counts as an attempt);
- any other exception: the run failed, with the traceback as its error; the worker retries
  it while retries are left.

The module is imported once, when the component is built (its module-level code and imports
run then, and their state is frozen into the component); every run starts from that state in a
fresh instance, so nothing a run changes is seen by the next one, unless the worker's operator
turned on warm instances (`worker start --warm-runs N`) for speed.
"""

from ._context import LogLevel, StemError, TaskContext
from ._registry import Reject, Retry, task
from . import canvas

__all__ = ["LogLevel", "Reject", "Retry", "StemError", "TaskContext", "canvas", "task"]
