"""Background jobs for the explorer: a quantization (and its evaluation) started as a separate
process, so the page never blocks; state lives in a JSON file next to the output, progress is
read from the job's log (the last tqdm percentage and the last circuitq line).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_PCT = re.compile(r"(\d{1,3})%\|")


@dataclass
class JobInfo:
    name: str
    out: str
    log: str
    pid: int
    commands: list[list[str]]
    started: float

    @property
    def state_file(self) -> Path:
        return Path(self.out).parent / f".job-{self.name}.json"


def start_job(name: str, out: Path, commands: list[list[str]], env: dict | None = None) -> JobInfo:
    """Run ``commands`` one after another (stopping at the first failure) in a new session, writing
    their output to ``out``'s sibling log file; returns at once."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f".job-{name}.log"
    script = " && ".join(shlex.join(c) for c in commands) + "; echo \"[job] exit $?\""
    with log.open("w") as fh:
        proc = subprocess.Popen(["bash", "-c", script], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})}, cwd=os.getcwd())
    info = JobInfo(name, str(out), str(log), proc.pid, commands, time.time())
    info.state_file.write_text(json.dumps(asdict(info)))
    return info


def list_jobs(models_dir: Path) -> list[JobInfo]:
    out = []
    for f in sorted(Path(models_dir).glob(".job-*.json")):
        try:
            out.append(JobInfo(**json.loads(f.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return out


def job_status(info: JobInfo) -> dict:
    """``{"state": running|done|failed, "percent": int|None, "last": str, "step": str}``."""
    try:
        text = Path(info.log).read_text(errors="replace")
    except OSError:
        text = ""
    chunks = re.split(r"[\r\n]+", text)
    last = next((c for c in reversed(chunks) if c.strip()), "")
    pct = None
    for c in reversed(chunks):
        m = _PCT.search(c)
        if m:
            pct = int(m.group(1))
            break
    step = next((c for c in reversed(chunks) if c.startswith("[circuitq")), "")
    m = re.search(r"\[job\] exit (\d+)", text)
    if m:
        state = "done" if m.group(1) == "0" else "failed"
    else:
        state = "running" if _alive(info.pid) else "failed"
    return {"state": state, "percent": pct, "last": last[-200:], "step": step[-200:]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a finished child we started is a zombie until reaped
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def quantize_commands(model: str, mask: Path, bits: int, group_size: int, out: Path, calib: str, samples: int,
                      seq_len: int, eval_tasks: list[str], eval_limit: int, data_dir: str | None = None) -> list[list[str]]:
    """``circuitq quantize`` (shared Hessians) then ``circuitq eval`` per task on its output."""
    py = [sys.executable, "-m", "circuitq"]
    dd = ["--data-dir", data_dir] if data_dir else []
    cmds = [py + ["quantize", "--model", model, "--mask", str(mask), "--bits", str(bits), "--group-size",
                  str(group_size), "--calib", calib, "--samples", str(samples), "--seq-len", str(seq_len),
                  "--hessian", "shared", "--ppl-windows", "4", "--out", str(out)] + dd]
    for t in eval_tasks:
        cmds.append(py + ["eval", "--model", str(out / "hf"), "--reference", model, "--task", t, "--limit",
                          str(eval_limit), "--out", str(out / f"eval-{t.replace(':', '-')}.json")] + dd)
    return cmds
