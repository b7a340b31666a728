"""Small pieces the tools share: comma-separated choices on the command line, JSON reports
written atomically (through the runtime's own ``atomic_write``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
