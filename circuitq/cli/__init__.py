"""``circuitq`` command line: thin subcommands over the library (``commands``), flags generated
from the settings tree (``flags``). A ``CircuitqError`` (bad input, a damaged file) becomes one
line on stderr and exit code 2; a fault of the machine (full disk, permissions, memory) one line
and exit code 1; anything else is a bug and keeps its traceback (exit code 1)."""
from __future__ import annotations

import errno
import os
import sys
import time
import traceback

from circuitq import allocator
from circuitq.cli.commands import build_parser
from circuitq.errors import CircuitqError, is_out_of_space


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or e.__class__.__name__


def fault_line(e: BaseException) -> str | None:
    """One line for a fault of the machine that no circuitq code anticipated (full disk,
    permissions, memory, a file that vanished); None for anything else, which is a bug."""
    where = f" ({e.filename})" if isinstance(e, OSError) and getattr(e, "filename", None) else ""
    if is_out_of_space(e):
        return f"no space left on device{where}; nothing half-written was left behind: free some space or choose an " \
               "--out on another disk"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: {e.strerror}; check the path's permissions or choose another one"
    if isinstance(e, MemoryError):
        return "out of memory; lower --batch-tokens / --eval-seq-len, or use a machine with more memory"
    if isinstance(e, RecursionError):
        return f"input nested too deeply to read ({_one_line(e)})"
    if isinstance(e, OSError):
        return f"{e.strerror or _one_line(e)}{where}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    allocator.take_over()   # freed tensors go back to the system; faster where memory is far below the peak
    args._argv = list(argv) if argv is not None else sys.argv[1:]

    t0 = time.perf_counter()
    try:
        rc = args.func(args)
    except CircuitqError as e:       # bad input or a damaged file: the message says what to do
        print(f"circuitq {args.command}: error: {_one_line(e)}", file=sys.stderr)
        if os.environ.get("CIRCUITQ_DEBUG"):
            raise
        return 2
    except KeyboardInterrupt:
        print("circuitq: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a fault of the machine (one line) or a bug (its traceback too)
        line = fault_line(e)
        if line is None:
            traceback.print_exc()
            line = (f"internal error {e.__class__.__name__}: {_one_line(e)[:300]} — this is a bug in circuitq; "
                    "please report it with the traceback above")
        print(f"circuitq {args.command}: error: {line}", file=sys.stderr)
        if os.environ.get("CIRCUITQ_DEBUG"):
            raise
        return 1
    print(f"[circuitq] {args.command} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
