"""`stem-guest-py build`: a Python module of `@task` functions in, a Stem component out.

It wraps componentize-py with the `stem:task` WIT shipped in this package: a small entry module
imports the task module (which registers its tasks) and exports the SDK's `Handler`.
componentize-py imports it all once, at build time, and freezes the initialised interpreter
into the component.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ENTRY = "stem_guest_component"
_WIT = Path(__file__).resolve().parent / "wit"

# A component can import only what was imported while it was built: the standard library's
# files are not there at run time. These pure-Python modules, which the standard library
# itself often imports inside functions (`Counter.most_common` imports heapq), are imported
# up front; `--preload` adds more. Together they add about 0.5MiB to a component.
PRELOADED = (
    "abc base64 binascii bisect calendar collections contextlib copy csv dataclasses datetime "
    "decimal difflib enum fnmatch fractions functools gzip hashlib heapq html inspect io "
    "ipaddress itertools json math numbers operator pprint random re secrets shlex statistics "
    "string struct textwrap time traceback typing unicodedata urllib.parse uuid warnings "
    "weakref zlib"
).split()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="stem-guest-py",
        description="Build a Python module of @task functions into a Stem task component.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build",
        help="build a component",
        description="Build MODULE (a .py file, a package directory, or a module name found on "
        "--python-path) into a WebAssembly component for `stem-host task upload`. The module "
        "is imported once, at build time: its module-level code runs then, not per task run.",
    )
    build.add_argument("module", help="tasks.py, a package directory, or a module name")
    build.add_argument("-o", "--output", help="the component to write (default: MODULE.wasm)")
    build.add_argument(
        "-p",
        "--python-path",
        action="append",
        default=[],
        metavar="DIR",
        help="another directory to find modules in (repeatable); an active virtualenv's "
        "site-packages is searched too",
    )
    build.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODULE",
        help="another module to import at build time, for code that imports it inside a "
        "function (repeatable; common standard-library modules always are)",
    )
    build.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    args = parser.parse_args(argv)
    try:
        output = build_component(
            args.module, args.output, args.python_path, args.quiet, args.preload
        )
    except BuildError as error:
        print(f"stem-guest-py: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(output)
    return 0


class BuildError(Exception):
    pass


def build_component(module, output=None, python_path=(), quiet=False, preload=()):
    """Builds `module` into a component and returns the path written."""
    path = Path(module)
    search = [Path(p).resolve() for p in python_path]
    if path.suffix == ".py" or path.is_dir():
        if not path.exists():
            raise BuildError(f"{module}: no such file or directory")
        path = path.resolve()
        name = path.stem if path.suffix == ".py" else path.name
        search.insert(0, path.parent)
        default_output = path.with_suffix(".wasm") if path.suffix == ".py" else path.parent / f"{name}.wasm"
    else:
        name = module
        default_output = Path(f"{module.rsplit('.', 1)[-1]}.wasm").resolve()
    for importable in [name, *preload]:
        if not all(part.isidentifier() for part in importable.split(".")):
            raise BuildError(f"`{importable}` is not an importable module name")
    if name.split(".")[0] in ("stem_guest", "wit_world", _ENTRY):
        raise BuildError(f"`{name}` clashes with a module of the SDK; rename it")
    output = Path(output).resolve() if output else default_output
    tool = _componentize_py()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stem-guest-py-") as entry_dir:
        Path(entry_dir, f"{_ENTRY}.py").write_text(
            "".join(f"import {preloaded}\n" for preloaded in [*PRELOADED, *preload])
            + f"import {name}\n"
            "from stem_guest import _registry\n"
            "from stem_guest._handler import Handler\n"
            "if not _registry.definitions():\n"
            f"    raise SystemExit('module `{name}` declares no @task function')\n"
        )
        command = [tool, "-d", str(_WIT), "-w", "task", "componentize", _ENTRY]
        for directory in [Path(entry_dir), *search, _WIT.parent.parent]:
            command += ["-p", str(directory)]
        command += ["-o", str(output)]
        if not quiet:
            print(f"building {output.name} from {name} with componentize-py ...", file=sys.stderr)
        completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise BuildError(
            f"componentize-py could not build `{name}`:\n{completed.stderr.strip() or completed.stdout.strip()}"
        )
    if not quiet:
        size = output.stat().st_size / (1 << 20)
        print(
            f"built {output} ({size:.1f} MiB) in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
        )
    return output


def _componentize_py():
    beside = Path(sys.executable).parent / "componentize-py"
    if beside.exists():
        return str(beside)
    found = shutil.which("componentize-py")
    if found is None:
        raise BuildError("componentize-py is not installed: `pip install componentize-py==0.25.1`")
    return found


if __name__ == "__main__":
    sys.exit(main())
