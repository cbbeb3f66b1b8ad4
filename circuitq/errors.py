"""The errors circuitq raises on purpose. Each one's message is a single line a user can act on:
what is wrong, where, and the fix. The CLI prints it as ``circuitq CMD: error: MESSAGE`` and
exits with 2; a notebook user catches :class:`CircuitqError`."""
from __future__ import annotations

import errno
import importlib.util


class CircuitqError(Exception):
    """Base of every error circuitq raises for bad input, a damaged file or a fault of the machine."""


class UsageError(CircuitqError, ValueError):
    """Bad input: a flag, a setting, a file or a combination the user can change."""


class NumericError(CircuitqError, FloatingPointError):
    """NaN/Inf where numbers must be finite (a corrupt model, a diverged quantization)."""


class OutOfSpace(CircuitqError, OSError):
    """The disk filled up while an output was written; nothing half-written is left behind."""

    def __init__(self, message: str):
        CircuitqError.__init__(self, message)
        self.errno = errno.ENOSPC

    def __str__(self) -> str:
        return self.args[0]


class Busy(CircuitqError):
    """Another circuitq process is writing the same output."""


def is_out_of_space(e: BaseException) -> bool:
    """An ``OSError`` with ``ENOSPC``, or a library's error that wraps one in its text
    (safetensors' ``SafetensorError: ... No space left on device``)."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


def human_bytes(x: float) -> str:
    """``2.06 GB``, ``340 MB``, ``24 kB``, ``12 bytes`` (decimal units, as disks are sold)."""
    if x >= 1e9:
        return f"{x / 1e9:.2f} GB"
    if x >= 1e6:
        return f"{x / 1e6:.0f} MB"
    if x >= 1e3:
        return f"{x / 1e3:.0f} kB"
    return f"{int(x)} bytes"


EXTRAS = {"plots": ("plotly", "matplotlib"), "app": ("streamlit",)}


class MissingExtra(CircuitqError):
    """An optional part of circuitq whose packages are not installed."""


def require_extra(extra: str, what: str) -> None:
    """Refuse, before any work, ``what`` when the packages of the optional ``extra`` are missing."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{what} needs {', '.join(missing)}: pip install 'circuitq[{extra}]'")
