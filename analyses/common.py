"""Helpers shared by the analysis scripts: the machine a measurement ran on, a git worktree of an
older commit to measure "before" with, and a child process's peak memory and wall time.
Importing this module does nothing."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def matmul_seconds(m: int, k: int, n: int, reps: int = 10) -> list[float]:
    """Sorted wall times of ``reps`` float32 ``[m, k] @ [k, n]`` products (after one warm-up)."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return sorted(times)


def machine() -> dict:
    """Platform, CPU count, Python and torch versions and torch's thread count."""
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def worktree(rev: str) -> tuple[Path, str]:
    """A detached git worktree of ``rev`` in a temporary folder, and ``rev``'s full hash; put the
    folder on ``PYTHONPATH`` to run that commit's code with this virtual environment."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    dest = Path(tempfile.mkdtemp(prefix=f"circuitq-{sha[:7]}-")) / "src"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(dest), sha],
                   check=True, capture_output=True)
    return dest, sha


def measure_child(argv: list[str], env: dict, cwd: str | Path, log: Path) -> dict:
    """Run ``python ARGV`` in a child; ``{"rc", "seconds", "peak_rss_bytes"}`` (the kernel's
    ``ru_maxrss`` of that one process, what ``/usr/bin/time -v`` prints) with its output in ``log``."""
    env = {**env, "PYTHONSAFEPATH": "1"}   # see run_circuitq
    t0 = time.perf_counter()
    with Path(log).open("w") as fh:
        p = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "log": str(log)}


def run_circuitq(cmd: list[str], env: dict, log: Path) -> float:
    """Run ``python -m circuitq CMD`` (with ``env``, e.g. a worktree on ``PYTHONPATH``), its output in
    ``log``; the seconds it took. Raises ``CalledProcessError`` when it fails."""
    import shlex

    print("$", shlex.join(cmd), flush=True)
    # `python -m` puts the current folder first on sys.path, ahead of PYTHONPATH: run from the repository root it
    # would import today's working tree instead of the worktree on PYTHONPATH (so before 0.8.6 a "before" run from
    # the root was the working tree's code). PYTHONSAFEPATH (Python 3.11+) leaves the current folder out.
    env = {**env, "PYTHONSAFEPATH": "1"}
    t0 = time.perf_counter()
    with Path(log).open("w") as fh:
        subprocess.run([sys.executable, "-m", "circuitq", *cmd], check=True, env=env, stdout=fh,
                       stderr=subprocess.STDOUT)
    return time.perf_counter() - t0
