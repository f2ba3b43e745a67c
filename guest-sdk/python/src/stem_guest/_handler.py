"""The component's `handler` export and its line to the host's `context` interface.

`wit_world` is the package componentize-py generates from the WIT shipped in this package; it
exists only while a component is built, so only the build's entry module imports this file.
"""

import sys

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import context, types

from . import _registry
from ._context import StemError

_LEVELS = {
    "trace": types.LogLevel.TRACE,
    "debug": types.LogLevel.DEBUG,
    "info": types.LogLevel.INFO,
    "warn": types.LogLevel.WARN,
    "error": types.LogLevel.ERROR,
}


class _Host:
    """The host calls a `TaskContext` makes, with the host's refusals as `StemError`."""

    def log(self, level, message):
        context.log(_LEVELS[level], message)

    def progress(self, percent, message):
        context.progress(percent, message)

    def heartbeat(self):
        context.heartbeat()

    def is_revoked(self):
        return context.is_revoked()

    def soft_time_limit_exceeded(self):
        return context.soft_time_limit_exceeded()

    def enqueue(self, name, args, queue, priority, countdown_ms):
        options = types.EnqueueOptions(queue=queue, priority=priority, countdown_ms=countdown_ms)
        try:
            return context.enqueue(name, args, options)
        except Err as error:
            raise StemError(error.value) from None

    def submit_canvas(self, spec):
        try:
            return context.submit_canvas(spec)
        except Err as error:
            raise StemError(error.value) from None

    def secret(self, name):
        try:
            return context.secret(name)
        except Err as error:
            raise StemError(error.value) from None


_HOST = _Host()


def _definition(entry):
    options = entry["options"]
    return types.TaskDefinition(
        name=entry["name"],
        description=entry["description"],
        options=types.TaskOptions(**options),
        capabilities=types.Capabilities(**entry["capabilities"]),
    )


class Handler(exports.Handler):
    def describe(self):
        return [_definition(entry) for entry in _registry.definitions()]

    def run(self, invocation):
        try:
            outcome = _registry.run(
                _HOST,
                {
                    "id": invocation.id,
                    "name": invocation.name,
                    "args": invocation.args,
                    "attempt": invocation.attempt,
                    "headers": invocation.headers,
                },
            )
        except BaseException as error:  # an SDK bug must fail the run, not trap the instance
            outcome = ("fail", f"the Python SDK failed: {error!r}")
        finally:
            # Output a run printed belongs to its own log, not to a later run's.
            sys.stdout.flush()
            sys.stderr.flush()
        kind = outcome[0]
        if kind == "ok":
            return outcome[1]
        if kind == "retry":
            raise Err(types.TaskError_Retry(types.RetryRequest(after_ms=outcome[1], message=outcome[2])))
        if kind == "reject":
            raise Err(types.TaskError_Reject(outcome[1]))
        raise Err(types.TaskError_Fail(outcome[1]))
