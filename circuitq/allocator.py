"""glibc's allocation threshold, set by the command line per stage (process-wide, so never by
``import circuitq``; a no-op off glibc or until ``take_over`` is called).

glibc serves an allocation above ``M_MMAP_THRESHOLD`` bytes from its own mapping, returned to the
system when freed; below it, from the heap, which keeps freed memory. Its default threshold adapts
upwards (to 32 MB), after which freed tensors stay in the heap and a process keeps its high-water mark
for good (measured on the default model's gradient pass: peak 2.56 -> 2.22 GiB, resident afterwards
2.35 -> 1.45 GiB with 256 kB). But every fresh mapping is page-faulted and zeroed again: with 256 kB a
48-item evaluation of the default model takes 31-34 s instead of 24 s (measured, 2-core CPU).

So the threshold is ``LEAN`` (256 kB) by default and in the stages that set the run's peak (the
gradient passes, the report), and ``FAST`` (16 MB: activations of an evaluation batch come from the
heap, logits blocks still from mappings) in the stages far below it (evaluations, Hessians, GPTQ),
whose heap is trimmed back when they end. Measured on the evaluation: 16 MB 24.1 s, +0.06 GB peak."""
from __future__ import annotations

import ctypes
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3     # glibc mallopt parameter
LEAN = 256 * 1024
FAST = 16 * 1024 * 1024
# the run's stages (budget.PeakMeter names) whose peak is far below the gradient pass's
FAST_STAGES = ("Hessians", "Q(W), scores and masks", "reference evaluation", "quantize + evaluate")

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def set_threshold(nbytes: int) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, nbytes)``; False where there is no glibc."""
    lib = _glibc()
    return bool(lib and lib.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def take_over() -> bool:
    """The command line's call: the threshold is ``LEAN`` from now on, ``FAST`` within the stages
    ``stage`` names fast. Returns whether glibc took it."""
    global _owned
    _owned = set_threshold(LEAN)
    return _owned


_owned = False


@contextmanager
def stage(name: str):
    """``FAST`` within a stage of ``FAST_STAGES`` when the command line owns the allocator; after
    it, ``LEAN`` again and the heap's free memory returned (``malloc_trim``)."""
    fast = _owned and name in FAST_STAGES
    if fast:
        set_threshold(FAST)
    try:
        yield
    finally:
        if fast:
            set_threshold(LEAN)
            _glibc().malloc_trim(0)
