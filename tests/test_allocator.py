"""The command line's allocator policy: lean (256 kB mmap threshold) by default, fast (16 MB) inside
an evaluation, trimmed after; nothing without ``take_over``."""
import subprocess
import sys

import pytest

from circuitq import allocator
from circuitq.pipeline import stages


def test_fast_only_inside_an_evaluation_and_only_when_taken_over(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "set_threshold", lambda n: calls.append(n) or True)
    monkeypatch.setattr(allocator, "_owned", False)
    with allocator.fast():
        pass
    assert calls == []                                      # a library user's process is left alone
    monkeypatch.setattr(allocator, "_owned", True)
    with allocator.fast():
        assert calls == [allocator.FAST]
    assert calls == [allocator.FAST, allocator.LEAN]        # lean again after, the heap trimmed
    calls.clear()
    with pytest.raises(KeyError):
        with allocator.fast():
            raise KeyError("x")
    assert calls == [allocator.FAST, allocator.LEAN]        # restored on an error too
    calls.clear()
    seen = []
    monkeypatch.setattr(stages, "_evaluate", lambda *a, **k: seen.append(list(calls)))
    stages.evaluate(None, None, [], "gsm8k")
    assert seen == [[allocator.FAST]] and calls == [allocator.FAST, allocator.LEAN]   # the evaluation runs fast


def _freed_block_stays(take_over: bool) -> list[str]:
    code = f"""
import torch
from circuitq import allocator
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
if {take_over}:
    assert allocator.take_over()
w = torch.ones(2 * 1024 * 1024); del w      # a freed 8 MB mapping: glibc's adaptive threshold rises past it
base = rss()
ts, keep = [], []
for _ in range(16):
    ts.append(torch.ones(2 * 1024 * 1024)); keep.append(torch.ones(1000))   # small blocks pin the heap's top
grown = rss()
del ts
print(grown - base > 100e6, rss() - base > 100e6)
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_take_over_reaches_glibc_and_freed_tensors_go_back():
    """In fresh processes: with glibc's own adaptive threshold 16 freed 8 MB tensors stay resident
    (the high-water mark kept for good); after ``take_over`` they go back to the system."""
    assert _freed_block_stays(False) == ["True", "True"]
    assert _freed_block_stays(True) == ["True", "False"]
