"""glibc's allocation threshold, set by the command line per stage (process-wide, so never by
``import circuitq``; a no-op off glibc or until ``take_over`` is called).

glibc serves an allocation above ``M_MMAP_THRESHOLD`` bytes from its own mapping, returned to the
system when freed; below it, from the heap, which keeps freed memory. Its default threshold adapts
upwards (to 32 MB), after which freed tensors stay in the heap and a process keeps its high-water mark
for good (measured on the default model's gradient pass: peak 2.56 -> 2.22 GiB, resident afterwards
2.35 -> 1.45 GiB with 256 kB). But every fresh mapping is page-faulted and zeroed again: with 256 kB a
48-item evaluation of the default model takes 31-34 s instead of 24 s (measured, 2-core CPU).

So the threshold is ``LEAN`` (256 kB) everywhere but inside an evaluation (``fast``: 16 MB, so
an evaluation batch's activations come from the heap while logits blocks still come from mappings),
and the heap's free memory is returned when the evaluation ends. Measured on the default run: a
48-item evaluation 31-34 s -> 24 s; with 16 MB over whole stages (GPTQ and Hessians too) the jobs'
peak rose 1.66 -> 2.15 GB (the heap fragments around GPTQ's blocks), inside evaluations alone it
does not set the peak (docs/memory.md)."""
from __future__ import annotations

import ctypes
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3     # glibc mallopt parameter
LEAN = 256 * 1024
FAST = 16 * 1024 * 1024
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
    """The command line's call: the threshold is ``LEAN`` from now on, ``FAST`` within ``fast()``.
    Returns whether glibc took it."""
    global _owned
    _owned = set_threshold(LEAN)
    return _owned


_owned = False


@contextmanager
def fast():
    """``FAST`` within the block when the command line owns the allocator (an evaluation); after
    it, ``LEAN`` again and the heap's free memory returned (``malloc_trim``)."""
    on = _owned
    if on:
        set_threshold(FAST)
    try:
        yield
    finally:
        if on:
            set_threshold(LEAN)
            _glibc().malloc_trim(0)
