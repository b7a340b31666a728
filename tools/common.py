"""Small pieces the tools share: comma-separated choices on the command line, JSON reports
written atomically (through the runtime's own ``atomic_write``), and the main() of the
report-writing tools (benchmark, compare)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Callable

from runtime.video import atomic_write


def csv_choices(allowed):
    """argparse type: a comma-separated list of ``allowed`` values, de-duplicated in order."""
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: pass a comma-separated list of {', '.join(allowed)}")
        return list(dict.fromkeys(items))
    return parse


def write_json(data, path: Path, **dumps) -> Path:
    """Write ``data`` as indented JSON via a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, **dumps) + "\n"))


def report_main(name: str, args, argv, run: Callable, write: Callable, markdown: Callable,
                more: Callable | None = None) -> int:
    """Run ``run(args, command)`` and write its report: the table to stdout, ``--json`` with
    ``write``, ``--markdown`` appended with ``markdown(report)``, and ``more(report, say)``
    for any other output. Errors the user can fix print ``NAME: error: ...`` and return 2."""
    from foresight import ConfigError
    from runtime.errors import ForesightError

    def say(message: str) -> None:
        print(f"[{name}] {message}", file=sys.stderr, flush=True)

    command = f"python tools/{name}.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        report = run(args, command.strip())
    except (ForesightError, ConfigError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(report["table"])
    if args.json:
        write(report, args.json)
        say(f"wrote {args.json}")
    if more is not None:
        more(report, say)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown(report))
        say(f"appended to {args.markdown}")
    return 0
