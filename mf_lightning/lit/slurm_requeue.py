"""Requeueing the SLURM job after SIGUSR1, the signal SLURM sends ahead of a time limit (``--signal=USR1@90``).

Once ``last.ckpt`` is saved, the first task runs ``scontrol requeue <job>`` (``<array job>_<task>`` for an array
job); the requeued job runs the same ``mf fit ... --ckpt_path last`` and continues. Without SLURM's variables
nothing is requeued; without ``scontrol`` on ``PATH``, or when it fails, the log says so and the job ends as
preempted (exit status 143), to be resubmitted by hand.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")


def slurm_job_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """The id ``scontrol requeue`` takes for this SLURM job, or None outside SLURM (or for an id SLURM never gives)."""
    array_job, array_task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else environ.get("SLURM_JOB_ID")
    return job if job and JOB_ID.fullmatch(job) else None


def is_first_task(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is the job's global rank 0 (``RANK`` under torchrun, else ``SLURM_PROCID``)."""
    return environ.get("RANK", environ.get("SLURM_PROCID", "0")) == "0"


def requeue_slurm_job(environ: Mapping[str, str] = os.environ) -> str | None:
    """Runs ``scontrol requeue`` for this SLURM job and returns the line saying what happened; None outside SLURM."""
    job = slurm_job_id(environ)
    if job is None:
        return None
    scontrol = shutil.which("scontrol", path=environ.get("PATH"))
    if scontrol is None:
        return f"SLURM job {job} not requeued: no scontrol on PATH; resubmit it with the same command"
    result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = " ".join((result.stderr or result.stdout).split()) or f"exit status {result.returncode}"
        return f"SLURM job {job} not requeued: scontrol requeue {job} failed ({reason}); resubmit it"
    return f"requeued SLURM job {job} (scontrol requeue {job}); it resumes from last.ckpt"
