"""What the tools share for talking to the user: arguments (comma-separated choices, the report
outputs), the command line a report records, ``[tool]`` log lines, number formatting, markdown
tables, JSON reports written atomically (through the runtime's own ``atomic_write``), and the
main() of the report-writing tools (benchmark, compare, evaluate). Measuring lives in harness.py."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Callable

from foresight import POLICIES as ALL_POLICIES
from runtime.outputs import atomic_write

# The policies a tool can run on its own: replay needs a saved trace to follow.
POLICIES = tuple(p for p in ALL_POLICIES if p != "replay")


def csv_choices(allowed):
    """argparse type: a comma-separated list of ``allowed`` values, de-duplicated in order."""
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: pass a comma-separated list of {', '.join(allowed)}")
        return list(dict.fromkeys(items))
    return parse


def add_report_args(ap: argparse.ArgumentParser, json_help: str) -> None:
    """``--json`` and ``--markdown``, what report_main writes."""
    ap.add_argument("--json", type=Path, default=None, help=json_help)
    ap.add_argument("--markdown", type=Path, default=None,
                    help="append a dated section with the command, machine and table (e.g. BENCHMARKS.md)")


def command_line(name: str, argv: list[str] | None) -> str:
    """The command that reruns tool ``name`` with ``argv`` (default: this process's arguments)."""
    return (f"python -m tools.{name} " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()


def logger(name: str) -> Callable[[str], None]:
    """A ``[name] message`` printer to stderr, where progress goes so that stdout holds only the table."""
    def log(message: str) -> None:
        print(f"[{name}] {message}", file=sys.stderr, flush=True)
    return log


def utc_now() -> str:
    """A report's date: now, UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def fmt(value, spec: str) -> str:
    """A table cell: "-" for a missing value, "inf" for an infinite one (identical frames' PSNR)."""
    if value is None:
        return "-"
    return "inf" if isinstance(value, float) and math.isinf(value) else format(value, spec)


def rotated(items: list, k: int) -> list:
    """``items`` rotated left by ``k``: run in this order in round ``k``, every configuration takes each
    place in turn, so drift in machine load spreads over all of them."""
    k %= len(items)
    return items[k:] + items[:k]


def markdown_table(head: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A markdown table; ``align`` defaults to the first column left, the numbers right."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [head, *rows]]
    lines.insert(1, "|" + "|".join(align or ["---"] + ["---:"] * (len(head) - 1)) + "|")
    return "\n".join(lines)


def markdown_section(report: dict, title: str, about: str, after: str = "") -> str:
    """A report's dated section for a results file (``--markdown``): ``title``, the command, ``about``
    (machine and inputs), the table, then ``after``."""
    return f"### {report['date']}: {title}\n\n`{report['command']}`\n\n{about}\n\n{report['table']}\n\n{after}"


def json_safe(value):
    """``value`` with every infinite float as the string "inf" (JSON has no infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_json(data, path: Path, **dumps) -> Path:
    """Write ``data`` as indented JSON via a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, **dumps) + "\n"))


def write_report(report: dict, path: Path) -> None:
    write_json(json_safe(report), path)


def report_main(name: str, args, argv, run: Callable, markdown: Callable | None = None,
                more: Callable | None = None) -> int:
    """Run ``run(args, command)`` and write its report: the table to stdout, ``--json`` (infinite
    values as "inf"), ``--markdown`` appended with ``markdown(report)`` for the tools that take it,
    and ``more(report, say)`` for any other output. Errors the user can fix print
    ``NAME: error: ...`` and return 2."""
    from foresight import ConfigError
    from runtime.errors import ForesightError

    say = logger(name)
    try:
        report = run(args, command_line(name, argv))
    except (ForesightError, ConfigError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(report["table"])
    if args.json:
        write_report(report, args.json)
        say(f"wrote {args.json}")
    if more is not None:
        more(report, say)
    if markdown is not None and args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown(report))
        say(f"appended to {args.markdown}")
    return 0
