"""Chains, groups and chords a task submits as its child (the README's Canvas section).

    from stem_guest.canvas import task as step

    ctx.chord([step("reports.render", {"week": w}) for w in weeks],
              step("billing.email-receipt", {"to": "finance@example.com"}).queue("emails"))
"""


class Node:
    def __init__(self, spec):
        self._spec = spec

    def spec(self):
        return self._spec

    def queue(self, queue):
        self._spec["queue"] = queue
        return self

    def priority(self, priority):
        self._spec["priority"] = priority
        return self

    def max_retries(self, max_retries):
        self._spec["max_retries"] = max_retries
        return self

    def immutable(self):
        """The step does not receive the previous step's result as `input`."""
        self._spec["immutable"] = True
        return self

    def link(self, callback):
        """A task that receives this node's result as `input`."""
        self._spec["link"] = callback.spec()
        return self

    def link_error(self, callback):
        """A task that receives this node's error as `error`."""
        self._spec["link_error"] = callback.spec()
        return self


def task(name, args=None):
    return Node({"task": name, "args": {} if args is None else args})


def chain(steps):
    return Node({"chain": [step.spec() for step in steps]})


def group(members):
    return Node({"group": [member.spec() for member in members]})


def chord(header, callback):
    return Node({"chord": {"header": [node.spec() for node in header], "callback": callback.spec()}})
