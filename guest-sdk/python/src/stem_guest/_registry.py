"""The table of `@task` functions, and one run: arguments in, an outcome out.

Nothing here touches the component bindings, so it can be exercised with plain CPython; the
component's `Handler` (in `_handler`) only translates between these outcomes and the WIT types.
"""

import dataclasses
import inspect
import json
import traceback
import types
import typing

from . import _options
from ._context import TaskContext

_TASKS = {}


class Reject(Exception):
    """The invocation can never succeed (bad input, say): it is not retried."""


class Retry(Exception):
    """Run this task again after `after` (seconds, or e.g. "30s"); counts as an attempt."""

    def __init__(self, message="", *, after=1):
        super().__init__(message)
        self.message = str(message)
        self.after_ms = _options.duration_ms("retry", "after", after)


def task(name=None, **options):
    """Marks a function as the task `name` (default: `MODULE.FUNCTION`).

    Options, as the Rust SDK's `#[task]`: queue, priority (0-9), max_retries, retry_backoff,
    retry_backoff_max, retry_jitter, soft_time_limit, time_limit, rate_limit ("10/s"),
    memory_limit ("64MiB"), args_encoder, result_encoder, and the capabilities outbound,
    secrets and dirs. Durations are seconds or strings such as "500ms" and "5m".
    """

    def register(function):
        task_name = name or f"{function.__module__}.{function.__name__}"
        if task_name in _TASKS:
            raise _options.OptionError(f"task `{task_name}` is declared twice")
        description = inspect.getdoc(function)
        _TASKS[task_name] = _Task(
            function, _options.definition(task_name, description, options)
        )
        return function

    return register


def definitions():
    return [entry.definition for entry in _TASKS.values()]


def run(host, invocation):
    """Runs one invocation; returns ("ok", json) or ("fail" | "reject", message) or
    ("retry", after_ms, message)."""
    entry = _TASKS.get(invocation["name"])
    if entry is None:
        return ("reject", f"this component has no task `{invocation['name']}`")
    return entry.run(TaskContext(host, invocation), invocation["args"])


class _Task:
    def __init__(self, function, definition):
        self.function = function
        self.definition = definition
        self.name = definition["name"]
        signature = inspect.signature(function)
        parameters = list(signature.parameters.values())
        try:
            hints = typing.get_type_hints(function)
        except Exception:  # a hint that cannot be resolved is simply not checked
            hints = {}
        self.wants_context = bool(parameters) and (
            hints.get(parameters[0].name) is TaskContext or parameters[0].name in ("ctx", "context")
        )
        if self.wants_context:
            parameters = parameters[1:]
        self.signature = signature.replace(parameters=parameters)
        self.hints = {p.name: hints[p.name] for p in parameters if p.name in hints}

    def run(self, context, args):
        try:
            bound = self._bind(args)
        except _BadArguments as error:
            return ("reject", f"task `{self.name}`: {error}")
        except Exception as error:  # too deep, unhashable, a dataclass's own checks, ...
            return ("reject", f"task `{self.name}`: the arguments do not fit: {error!r}")
        try:
            if self.wants_context:
                result = self.function(context, *bound.args, **bound.kwargs)
            else:
                result = self.function(*bound.args, **bound.kwargs)
        except Reject as error:
            return ("reject", str(error))
        except Retry as error:
            return ("retry", error.after_ms, error.message)
        except Exception as error:
            return ("fail", _failure(error))
        try:
            return ("ok", json.dumps(_plain(result)))
        except (TypeError, ValueError) as error:
            return ("fail", f"task `{self.name}` returned a value JSON cannot encode: {error}")

    def _bind(self, args):
        try:
            value = json.loads(args)
        except ValueError as error:
            raise _BadArguments(f"the arguments are not JSON: {error}") from None
        if isinstance(value, dict):
            positional, named = (), value
        elif isinstance(value, list):
            positional, named = value, {}
        else:
            positional, named = (value,), {}
        try:
            bound = self.signature.bind(*positional, **named)
        except TypeError as error:
            raise _BadArguments(f"the arguments do not fit the parameters: {error}") from None
        for parameter, argument in list(bound.arguments.items()):
            hint = self.hints.get(parameter)
            if hint is not None:
                bound.arguments[parameter] = _convert(argument, hint, parameter)
        return bound


class _BadArguments(Exception):
    pass


def _failure(error):
    """The error a failed run reports: the exception and its traceback without this SDK's
    own frames."""
    frames = traceback.extract_tb(error.__traceback__)[1:]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(error), error)
    hint = ""
    if isinstance(error, ModuleNotFoundError) and error.name:
        hint = (
            f"\n(a component imports only what was imported when it was built: import "
            f"{error.name} at the top of the task module, or build with --preload {error.name})"
        )
    return (
        f"{type(error).__name__}: {error}{hint}\nTraceback (most recent call last):\n"
        + "".join(lines).rstrip()
    )


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _convert(value, hint, where):
    """Checks a decoded JSON value against a parameter's annotation, building dataclasses from
    objects; raises _BadArguments naming the parameter."""
    if hint is typing.Any or hint is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(hint)
    arguments = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        for option in arguments:
            try:
                return _convert(value, option, where)
            except _BadArguments:
                continue
        raise _BadArguments(f"`{where}` is {_json_kind(value)}, expected {_describe(hint)}")
    if hint is type(None):
        if value is None:
            return None
        raise _BadArguments(f"`{where}` is {_json_kind(value)}, expected null")
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set, frozenset):
        if not isinstance(value, list):
            raise _BadArguments(f"`{where}` is {_json_kind(value)}, expected an array")
        if arguments and origin is list:
            value = [_convert(item, arguments[0], f"{where}[{i}]") for i, item in enumerate(value)]
        return (origin or hint)(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _BadArguments(f"`{where}` is {_json_kind(value)}, expected an object")
        if len(arguments) == 2:
            value = {k: _convert(v, arguments[1], f"{where}.{k}") for k, v in value.items()}
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _BadArguments(f"`{where}` is {_json_kind(value)}, expected an object")
        fields = {field.name: field for field in dataclasses.fields(hint)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise _BadArguments(f"`{where}` has unknown field(s) {', '.join(unknown)}")
        try:
            field_hints = typing.get_type_hints(hint)
        except Exception:
            field_hints = {}
        converted = {
            k: _convert(v, field_hints.get(k, typing.Any), f"{where}.{k}") for k, v in value.items()
        }
        try:
            return hint(**converted)
        except TypeError as error:
            raise _BadArguments(f"`{where}`: {error}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value  # an annotation this SDK does not check
    raise _BadArguments(f"`{where}` is {_json_kind(value)}, expected {_describe(hint)}")


def _json_kind(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _describe(hint):
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
