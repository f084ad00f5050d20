"""``requeue_slurm_job``: which job ``scontrol requeue`` gets, and one line when it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from mf_lightning.lit.slurm_requeue import is_first_task, requeue_slurm_job, slurm_job_id


def scontrol(folder: Path, status: int = 0) -> str:
    """A ``PATH`` holding only a fake ``scontrol`` that records its arguments in ``calls`` and exits ``status``."""
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "calls"}\necho "no such job" >&2\nexit {status}\n')
    script.chmod(0o755)
    return str(folder)


@pytest.mark.parametrize(
    ("environ", "job"),
    [
        ({}, None),
        ({"SLURM_JOB_ID": "4711"}, "4711"),
        ({"SLURM_JOB_ID": "4712", "SLURM_ARRAY_JOB_ID": "4700", "SLURM_ARRAY_TASK_ID": "3"}, "4700_3"),
        ({"SLURM_JOB_ID": "4711; rm -rf ~"}, None),
    ],
)
def test_the_job_id_is_slurms_own_or_none(environ, job):
    assert slurm_job_id(environ) == job


def test_the_first_task_is_global_rank_zero():
    assert is_first_task({}) and is_first_task({"SLURM_PROCID": "0"})
    assert not is_first_task({"SLURM_PROCID": "1"}) and not is_first_task({"RANK": "2", "SLURM_PROCID": "0"})


def test_scontrol_requeues_the_job(tmp_path):
    line = requeue_slurm_job({"SLURM_JOB_ID": "4711", "PATH": scontrol(tmp_path)})
    assert (tmp_path / "calls").read_text() == "requeue 4711\n"
    assert line == "requeued SLURM job 4711 (scontrol requeue 4711); it resumes from last.ckpt"


def test_without_scontrol_or_when_it_fails_one_line_says_so(tmp_path):
    assert requeue_slurm_job({}) is None
    missing = requeue_slurm_job({"SLURM_JOB_ID": "4711", "PATH": str(tmp_path)})
    assert missing == "SLURM job 4711 not requeued: no scontrol on PATH; resubmit it with the same command"
    failed = requeue_slurm_job({"SLURM_JOB_ID": "4711", "PATH": scontrol(tmp_path, status=1)})
    assert failed == "SLURM job 4711 not requeued: scontrol requeue 4711 failed (no such job); resubmit it"
