"""What a running task knows about its invocation, and its line to the host."""

import json
from enum import Enum

from . import _options, canvas


class LogLevel(Enum):
    TRACE = "trace"
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class StemError(RuntimeError):
    """The host refused a request: a sub-task, a canvas or a secret. Left uncaught, it fails
    the run like any other exception."""


class TaskContext:
    """Passed to a task whose first parameter is annotated `TaskContext` (or named `ctx`)."""

    def __init__(self, host, invocation):
        self._host = host
        self.id = invocation["id"]
        """The id of this task, stable across retries."""
        self.name = invocation["name"]
        self.attempt = invocation["attempt"]
        """1 for the first run, 2 for the first retry, and so on."""
        self.headers = dict(invocation["headers"])

    def log(self, level, message):
        self._host.log(LogLevel(level).value, str(message))

    def debug(self, message):
        self.log(LogLevel.DEBUG, message)

    def info(self, message):
        self.log(LogLevel.INFO, message)

    def warn(self, message):
        self.log(LogLevel.WARN, message)

    def error(self, message):
        self.log(LogLevel.ERROR, message)

    def progress(self, percent, message=""):
        """Reports progress (0-100); counts as a heartbeat."""
        self._host.progress(max(0, min(100, int(percent))), str(message))

    def heartbeat(self):
        self._host.heartbeat()

    def is_revoked(self):
        """True once the task was revoked: a task that checks can stop cleanly."""
        return self._host.is_revoked()

    def soft_time_limit_exceeded(self):
        """True once the soft time limit passed: time to wrap up before the hard limit."""
        return self._host.soft_time_limit_exceeded()

    def enqueue(self, name, args=None, *, queue=None, priority=None, countdown=None):
        """Enqueues the task `name` with `args` (anything JSON can encode; default `{}`) and
        returns the new task's id. `countdown` delays it (seconds, or e.g. "5m")."""
        try:
            encoded = json.dumps({} if args is None else args)
        except (TypeError, ValueError) as error:
            raise StemError(f"cannot encode arguments of sub-task `{name}`: {error}") from None
        countdown_ms = None
        if countdown is not None:
            countdown_ms = _options.duration_ms(name, "countdown", countdown)
        try:
            return self._host.enqueue(name, encoded, queue, priority, countdown_ms)
        except StemError as error:
            raise StemError(f"cannot enqueue sub-task `{name}`: {error}") from None

    def submit(self, node):
        """Submits a canvas built with `stem_guest.canvas` as a child of this task and
        returns its id; the workers run it on their own."""
        spec = node.spec() if hasattr(node, "spec") else node
        try:
            return self._host.submit_canvas(json.dumps(spec))
        except StemError as error:
            raise StemError(f"cannot submit the canvas: {error}") from None

    def chain(self, steps):
        return self.submit(canvas.chain(steps))

    def group(self, members):
        return self.submit(canvas.group(members))

    def chord(self, header, callback):
        return self.submit(canvas.chord(header, callback))

    def secret(self, name):
        """The value of a secret this task declares (`secrets=["NAME"]`) and an operator
        granted. The host masks it wherever this run writes it."""
        return self._host.secret(name)
