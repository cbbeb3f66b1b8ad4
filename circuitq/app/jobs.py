"""Background jobs for the explorer: an export (quantize + evaluate) runs in a separate process so
the page never blocks. The process calls the library (``pipeline.stages.quantize_and_export`` and
``evaluate_task``, the same functions as ``circuitq quantize`` and ``circuitq eval``), not the CLI,
and reports progress as structured JSON events in ``.job-NAME.status.json`` beside the output;
its printed output goes to ``.job-NAME.log`` for people.

Run a job's spec by hand with ``python -m circuitq.app.jobs SPEC.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from circuitq.artifacts import inside, safe_name, write_json
from circuitq.config import EvalConfig, EvalJob, QuantizeJob, from_dict, to_dict
from circuitq.model.loading import load_model
from circuitq.pipeline.stages import evaluate_task, quantize_and_export, write_eval
from circuitq.saliency.masks import load_masks


@dataclass
class JobInfo:
    name: str
    out: str
    log: str
    pid: int
    spec: dict
    started: float

    @property
    def state_file(self) -> Path:
        return Path(self.out).parent / f".job-{self.name}.json"

    @property
    def status_file(self) -> Path:
        return Path(self.out).parent / f".job-{self.name}.status.json"


def export_spec(model: str, mask: Path, out: Path, job, eval_tasks: list[str], eval_limit: int) -> dict:
    """A job's spec: the model, the mask file, the output folder, the ``QuantizeJob`` settings (as
    data) and the tasks to evaluate on (their evaluation items, at most ``eval_limit``)."""
    return {"model": model, "mask": str(mask), "out": str(out), "job": to_dict(job), "eval_tasks": list(eval_tasks),
            "eval_limit": int(eval_limit)}


def start_job(name: str, out: Path, spec: dict, env: dict | None = None) -> JobInfo:
    """Start ``python -m circuitq.app.jobs SPEC`` in a new session; returns at once. ``name`` becomes
    part of file names beside ``out``: anything but letters, digits, ``-_.`` is replaced."""
    name = safe_name(name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f".job-{name}.log"
    spec_file = out.parent / f".job-{name}.spec.json"
    spec_file.write_text(json.dumps({**spec, "name": name}, indent=2))
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "circuitq.app.jobs", str(spec_file)], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
    info = JobInfo(name, str(out), str(log), proc.pid, spec, time.time())
    info.state_file.write_text(json.dumps(asdict(info)))
    return info


def list_jobs(models_dir: Path) -> list[JobInfo]:
    out = []
    for f in sorted(Path(models_dir).glob(".job-*.json")):
        if f.name.endswith((".status.json", ".spec.json")):
            continue
        try:
            out.append(JobInfo(**json.loads(f.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return out


def job_status(info: JobInfo) -> dict:
    """``{"state": running|done|failed, "percent": int|None, "last": str, "step": str}`` from the
    job's status events (a job that died without a final event is ``failed``)."""
    try:
        st = json.loads(info.status_file.read_text())
    except (OSError, ValueError):
        st = {}
    state = st.get("state", "running")
    if state == "running" and not _alive(info.pid):
        state = "failed"
    done, total = st.get("done", 0), st.get("total") or 0
    pct = int(100 * done / total) if total else None
    last = st.get("error") or st.get("step", "starting")
    return {"state": state, "percent": pct, "last": str(last)[-300:], "step": str(st.get("step", ""))}


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


def _event(path: Path, **kw) -> None:
    write_json(path, {**kw, "time": time.time()})


def run_spec(spec: dict, status: Path) -> None:
    """Execute a job spec through the library, writing status events to ``status``."""
    tasks = spec["eval_tasks"]
    total = 2 + len(tasks)
    _event(status, state="running", step="loading the model", done=0, total=total)
    job = from_dict(QuantizeJob, spec["job"])
    lm = load_model(spec["model"], device="cpu")
    mf = load_masks(spec["mask"])
    _event(status, state="running", step=f"quantizing to {job.quantize.bits} bits", done=1, total=total)
    out = Path(spec["out"])
    quantize_and_export(lm, job, out, masks=mf.masks, mask_meta={**mf.metadata, "path": spec["mask"]})
    ref = load_model(spec["model"], device="cpu")
    qm = load_model(str(out / "hf"), device="cpu")
    for i, t in enumerate(tasks):
        _event(status, state="running", step=f"evaluating on {t}", done=2 + i, total=total)

        ej = EvalJob(task=t, data=job.data, eval=EvalConfig(samples=spec["eval_limit"]))
        doc, items = evaluate_task(qm, ej, ref)
        write_eval(inside(out, f"eval-{safe_name(t)}.json"), doc, items, overwrite=True)
    _event(status, state="done", step="done", done=total, total=total)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_file = Path(argv[0])
    spec = json.loads(spec_file.read_text())
    status = spec_file.with_name(spec_file.name.replace(".spec.json", ".status.json"))
    try:
        run_spec(spec, status)
    except Exception as e:  # noqa: BLE001 - every failure becomes the job's final event
        traceback.print_exc()
        _event(status, state="failed", step="failed", error=f"{e.__class__.__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
