"""Task options as the `@task` decorator takes them, checked the way the Rust macro checks them.

Everything here runs when the task module is imported, which `stem-guest-py build` does while
it builds the component: a bad option fails the build with a message naming the task, instead
of failing later at upload or on a worker.
"""

import re

_DURATION_UNITS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000}
_SIZE_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1
_TASK_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class OptionError(ValueError):
    """A `@task` option that the host would refuse."""


def _number_and_unit(text):
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    return (int(match.group(1)), match.group(2)) if match else None


def duration_ms(task, option, value):
    """Milliseconds from a number of seconds or a string such as "500ms", "30s", "5m", "1h"."""
    if isinstance(value, bool):
        raise OptionError(f"task `{task}`: {option} must be a duration, not a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise OptionError(f"task `{task}`: {option} must not be negative")
        return _bounded(task, option, round(value * 1000), _U64_MAX)
    parsed = _number_and_unit(value) if isinstance(value, str) else None
    if parsed is None or parsed[1] not in _DURATION_UNITS:
        raise OptionError(
            f'task `{task}`: {option} `{value}` is not a duration; write seconds as a number '
            f'or e.g. "500ms", "30s", "5m" or "1h"'
        )
    return _bounded(task, option, parsed[0] * _DURATION_UNITS[parsed[1]], _U64_MAX)


def size_bytes(task, option, value):
    """Bytes from an integer or a string such as "512KiB", "64MiB", "1GiB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise OptionError(f"task `{task}`: {option} must be positive")
        return _bounded(task, option, value, _U64_MAX)
    parsed = _number_and_unit(value) if isinstance(value, str) else None
    if parsed is None or parsed[1] not in _SIZE_UNITS:
        raise OptionError(
            f'task `{task}`: {option} `{value}` is not a size; write bytes as an integer '
            f'or e.g. "512KiB", "64MiB" or "1GiB"'
        )
    return _bounded(task, option, parsed[0] * _SIZE_UNITS[parsed[1]], _U64_MAX)


def _bounded(task, option, value, maximum):
    if value > maximum:
        raise OptionError(f"task `{task}`: {option} is too large")
    return value


def integer(task, option, value, maximum):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise OptionError(f"task `{task}`: {option} must be an integer from 0 to {maximum}")
    return value


def text(task, option, value, pattern=None, hint=""):
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"task `{task}`: {option} must be a non-empty string")
    if pattern is not None and not pattern.match(value):
        raise OptionError(f"task `{task}`: {option} `{value}` is not valid{hint}")
    return value


def rate_limit(task, value):
    count, _, per = str(value).partition("/")
    if not (count.strip().isdigit() and int(count) > 0 and per.strip() in ("s", "m", "h")):
        raise OptionError(
            f'task `{task}`: `{value}` is not a rate limit; write e.g. "10/s", "100/m" or "1000/h"'
        )
    return value


def strings(task, option, values, check):
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise OptionError(f'task `{task}`: {option} must be a list of strings, e.g. ["a", "b"]')
    for value in values:
        if not isinstance(value, str) or not check(value):
            raise OptionError(f"task `{task}`: {option}: `{value}` {_HINTS[option]}")
    return list(values)


def _outbound(pattern):
    scheme, sep, rest = pattern.partition("://")
    return (
        sep == "://"
        and scheme in ("http", "https", "*")
        and rest != ""
        and not any(c in rest.rstrip("/") for c in "/?#@ ")
    )


def _directory(entry):
    path, sep, mode = entry.rpartition(":")
    return (
        sep == ":"
        and path.startswith("/")
        and mode in ("ro", "rw")
        and ":" not in path
        and (path == "/" or all(part not in ("", ".", "..") for part in path[1:].split("/")))
    )


_HINTS = {
    "outbound": 'is not an outbound pattern; write `scheme://host[:port]`, e.g. '
    '"https://api.example.com" or "https://*.example.com"',
    "secrets": "is not a secret name: use letters, digits and `_`",
    "dirs": 'is not a directory; write an absolute path and a mode, e.g. "/data/in:ro"',
}

_CHECKS = {
    "outbound": _outbound,
    "secrets": lambda name: bool(_SECRET_NAME.match(name)),
    "dirs": _directory,
}


def definition(name, description, options):
    """The task's definition as `describe` reports it, from the decorator's keyword options."""
    text(name, "name", name, _TASK_NAME, ": use up to 200 letters, digits, `.`, `_`, `-` and `:`")
    known = {
        "queue", "priority", "max_retries", "retry_backoff", "retry_backoff_max", "retry_jitter",
        "soft_time_limit", "time_limit", "rate_limit", "memory_limit", "args_encoder",
        "result_encoder", "outbound", "secrets", "dirs",
    }
    unknown = sorted(set(options) - known)
    if unknown:
        raise OptionError(
            f"task `{name}`: unknown option(s) {', '.join(unknown)}; "
            f"known options are {', '.join(sorted(known))}"
        )
    get = options.get
    soft = _maybe(get("soft_time_limit"), lambda v: duration_ms(name, "soft_time_limit", v))
    hard = _maybe(get("time_limit"), lambda v: duration_ms(name, "time_limit", v))
    if soft is not None and hard is not None and soft > hard:
        raise OptionError(
            f"task `{name}`: soft_time_limit ({soft}ms) is above time_limit ({hard}ms)"
        )
    jitter = get("retry_jitter")
    if jitter is not None and not isinstance(jitter, bool):
        raise OptionError(f"task `{name}`: retry_jitter must be True or False")
    queue_hint = ": use 1 to 128 letters, digits, `.`, `_` and `-`"
    return {
        "name": name,
        "description": description,
        "options": {
            "queue": _maybe(get("queue"), lambda v: text(name, "queue", v, _QUEUE_NAME, queue_hint)),
            "priority": _maybe(get("priority"), lambda v: integer(name, "priority", v, 9)),
            "max_retries": _maybe(
                get("max_retries"), lambda v: integer(name, "max_retries", v, _U32_MAX)
            ),
            "retry_backoff_ms": _maybe(
                get("retry_backoff"), lambda v: duration_ms(name, "retry_backoff", v)
            ),
            "retry_backoff_max_ms": _maybe(
                get("retry_backoff_max"), lambda v: duration_ms(name, "retry_backoff_max", v)
            ),
            "retry_jitter": jitter,
            "soft_time_limit_ms": soft,
            "hard_time_limit_ms": hard,
            "rate_limit": _maybe(get("rate_limit"), lambda v: rate_limit(name, v)),
            "memory_limit_bytes": _maybe(
                get("memory_limit"), lambda v: size_bytes(name, "memory_limit", v)
            ),
            "args_encoder": _maybe(get("args_encoder"), lambda v: text(name, "args_encoder", v)),
            "result_encoder": _maybe(
                get("result_encoder"), lambda v: text(name, "result_encoder", v)
            ),
        },
        "capabilities": {
            kind: strings(name, kind, get(kind) or [], _CHECKS[kind])
            for kind in ("outbound", "secrets", "dirs")
        },
    }


def _maybe(value, convert):
    return None if value is None else convert(value)
