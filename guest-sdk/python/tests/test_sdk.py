"""The SDK's pure-Python half, under plain CPython: options, argument binding and outcomes.
(The component half is exercised through a real worker by host/tests/all/languages.rs.)"""

import json
import sys
import unittest
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stem_guest import Reject, Retry, StemError, TaskContext, task  # noqa: E402
from stem_guest import _registry  # noqa: E402
from stem_guest._options import OptionError  # noqa: E402


class FakeHost:
    def __init__(self):
        self.logs = []
        self.enqueued = []

    def log(self, level, message):
        self.logs.append((level, message))

    def enqueue(self, name, args, queue, priority, countdown_ms):
        if name == "refused":
            raise StemError("the sub-task budget is used up")
        self.enqueued.append((name, json.loads(args), queue, priority, countdown_ms))
        return "child-1"


def run(name, args, attempt=1, host=None):
    invocation = {"id": "t-1", "name": name, "args": json.dumps(args), "attempt": attempt,
                  "headers": []}
    return _registry.run(host or FakeHost(), invocation)


@dataclass
class Point:
    x: float
    y: float


@task(name="t.add")
def add(a: int, b: int = 1) -> int:
    return a + b


@task(name="t.norm")
def norm(ctx: TaskContext, p: Point, scale: Optional[float] = None) -> dict:
    ctx.info("norm")
    return {"norm": (p.x ** 2 + p.y ** 2) ** 0.5 * (scale or 1), "attempt": ctx.attempt}


@task(name="t.outcomes", max_retries=2, retry_backoff="250ms", time_limit=30)
def outcomes(kind: str):
    """Ends the way it is told to."""
    if kind == "reject":
        raise Reject("never")
    if kind == "retry":
        raise Retry("later", after="2s")
    if kind == "set":
        return {1, 2}
    raise KeyError(kind)


@task(name="t.tags")
def tags(tags: set) -> int:
    return len(tags)


@task(name="t.spawn")
def spawn(ctx: TaskContext, name: str) -> str:
    return ctx.enqueue(name, {"a": 1}, queue="q", countdown="5s")


class Arguments(unittest.TestCase):
    def test_an_object_binds_by_name_and_defaults_apply(self):
        self.assertEqual(run("t.add", {"a": 2, "b": 40}), ("ok", "42"))
        self.assertEqual(run("t.add", {"a": 2}), ("ok", "3"))
        self.assertEqual(run("t.add", [2, 5]), ("ok", "7"))

    def test_arguments_that_do_not_fit_reject(self):
        for args, expected in [
            ({"a": "2"}, "`a` is a string, expected int"),
            ({"a": True}, "`a` is a boolean, expected int"),
            ({}, "missing a required argument: 'a'"),
            ({"a": 1, "c": 2}, "unexpected keyword argument 'c'"),
        ]:
            kind, message = run("t.add", args)
            self.assertEqual(kind, "reject", args)
            self.assertIn(expected, message)

    def test_dataclasses_and_optionals_are_built_and_checked(self):
        kind, result = run("t.norm", {"p": {"x": 3, "y": 4}, "scale": 2}, attempt=3)
        self.assertEqual((kind, json.loads(result)), ("ok", {"norm": 10.0, "attempt": 3}))
        kind, message = run("t.norm", {"p": {"x": 3, "z": 4}})
        self.assertEqual(kind, "reject")
        self.assertIn("unknown field(s) z", message)
        self.assertEqual(run("t.norm", {"p": {"x": 3, "y": 4}, "scale": None})[0], "ok")
        self.assertEqual(run("t.norm", {"p": [3, 4]})[0], "reject")

    def test_arguments_that_are_not_json_reject(self):
        invocation = {"id": "t", "name": "t.add", "args": "{", "attempt": 1, "headers": []}
        kind, message = _registry.run(FakeHost(), invocation)
        self.assertEqual(kind, "reject")
        self.assertIn("not JSON", message)

    def test_arguments_too_deep_or_unhashable_reject(self):
        invocation = {"id": "t", "name": "t.add", "args": "[" * 100_000 + "]" * 100_000,
                      "attempt": 1, "headers": []}
        kind, message = _registry.run(FakeHost(), invocation)
        self.assertEqual(kind, "reject")
        self.assertIn("RecursionError", message)
        self.assertEqual(run("t.tags", {"tags": [{"a": 1}]})[0], "reject")

    def test_an_unknown_task_rejects(self):
        self.assertEqual(run("t.nope", {})[0], "reject")


class Outcomes(unittest.TestCase):
    def test_reject_retry_and_failure(self):
        self.assertEqual(run("t.outcomes", {"kind": "reject"}), ("reject", "never"))
        self.assertEqual(run("t.outcomes", {"kind": "retry"}), ("retry", 2000, "later"))
        kind, message = run("t.outcomes", {"kind": "boom"})
        self.assertEqual(kind, "fail")
        self.assertTrue(message.startswith("KeyError: 'boom'"), message)
        self.assertIn("Traceback (most recent call last)", message)
        self.assertIn("in outcomes", message)
        self.assertNotIn("_registry.py", message, "the SDK's own frames are left out")

    def test_a_result_json_cannot_encode_fails(self):
        kind, message = run("t.outcomes", {"kind": "set"})
        self.assertEqual(kind, "fail")
        self.assertIn("JSON cannot encode", message)

    def test_sub_tasks_go_through_the_host(self):
        host = FakeHost()
        self.assertEqual(run("t.spawn", {"name": "t.add"}, host=host), ("ok", '"child-1"'))
        self.assertEqual(host.enqueued, [("t.add", {"a": 1}, "q", None, 5000)])
        kind, message = run("t.spawn", {"name": "refused"})
        self.assertEqual(kind, "fail")
        self.assertIn("cannot enqueue sub-task `refused`: the sub-task budget is used up", message)


class Definitions(unittest.TestCase):
    def test_options_become_the_wit_definition(self):
        definition = next(d for d in _registry.definitions() if d["name"] == "t.outcomes")
        self.assertEqual(definition["description"], "Ends the way it is told to.")
        options = definition["options"]
        self.assertEqual(
            (options["max_retries"], options["retry_backoff_ms"], options["hard_time_limit_ms"]),
            (2, 250, 30_000),
        )
        self.assertEqual(definition["capabilities"], {"outbound": [], "secrets": [], "dirs": []})

    def test_bad_options_fail_at_import_naming_the_task(self):
        cases = [
            (dict(name="bad.priority", priority=10), "priority must be an integer from 0 to 9"),
            (dict(name="bad.duration", time_limit="5 minutes"), "is not a duration"),
            (dict(name="bad.limits", soft_time_limit="1m", time_limit="30s"), "above time_limit"),
            (dict(name="bad.rate", rate_limit="10 per second"), "is not a rate limit"),
            (dict(name="bad.queue", queue="a b"), "queue `a b` is not valid"),
            (dict(name="bad.dir", dirs=["data:ro"]), "is not a directory"),
            (dict(name="bad.url", outbound=["https://x.example/path"]), "is not an outbound"),
            (dict(name="bad.option", retries=3), "unknown option(s) retries"),
            (dict(name="bad name"), "is not valid"),
            (dict(name="t.add"), "declared twice"),
        ]
        for options, expected in cases:
            with self.subTest(options=options):
                with self.assertRaises(OptionError) as raised:
                    task(**options)(lambda: None)
                self.assertIn(expected, str(raised.exception))


if __name__ == "__main__":
    unittest.main()
