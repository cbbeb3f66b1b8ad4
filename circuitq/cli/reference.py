"""The CLI reference (``docs/cli-reference.md``), generated from the parsers themselves, so it
cannot drift from the flags: ``python -m circuitq.cli.reference > docs/cli-reference.md``
(a test checks the committed page equals this output)."""
from __future__ import annotations

import os
import sys

from circuitq.cli.commands import build_parser

WIDTH = 100


def markdown() -> str:
    """Every subcommand's ``--help``, at a fixed width, as one markdown page."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)   # argparse wraps to the terminal's width
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parts = ["# CLI reference", "",
                 "Generated from the parsers by `python -m circuitq.cli.reference`; do not edit by hand.", ""]
        for name, p in sub.choices.items():
            parts += [f"## `circuitq {name}`", "", "```text", p.format_help().rstrip(), "```", ""]
        return "\n".join(parts)
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


if __name__ == "__main__":
    sys.stdout.write(markdown())
