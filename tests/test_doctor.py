"""``mf doctor``: the report's sections and verdict, a backend disagreement failing it, and its errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mf_lightning import cli
from mf_lightning.doctor import report
from mf_lightning.kernels import embedding_bag

SECTIONS = [f"## {title}" for title in report.STAGES]


def only_stages(monkeypatch, stages: dict) -> None:
    """Run only ``stages`` (title: function), so a test of the verdict does not time speeds and training."""
    monkeypatch.setattr(report, "STAGES", tuple(stages))
    monkeypatch.setattr(report, "STAGE_FUNCTIONS", tuple(stages.values()))


@pytest.mark.slow
def test_quick_doctor_through_the_cli_reports_every_stage_and_passes(tmp_path, capsys):
    out = tmp_path / "report.md"
    cli.main(["doctor", "--quick", "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    text = out.read_text()
    assert [line for line in text.splitlines() if line.startswith("## ")] == SECTIONS
    assert "**PASS**" in text and "FAIL" not in text
    for title in ("| embedding_bag | float32 |", "| embedding_bag | bfloat16 |", "hot row", "not available on cpu"):
        assert title in text
    for table in ("| tiny | 512 | nn.Linear |", "| memoryformer | debug |", "| transformer | debug |"):
        assert table in text
    verdict = captured.out.strip().splitlines()[-1]
    assert verdict.startswith("mf doctor: PASS on ") and "kernel checks agree with the reference" in verdict
    progress = [line for line in captured.err.splitlines() if line.startswith("mf doctor: [")]
    assert len(progress) == 2 * len(report.STAGES), "a line before and after each stage"


def test_a_backend_disagreement_fails_the_verdict_and_the_exit_status(tmp_path, capsys, monkeypatch):
    real = embedding_bag.embedding_bag_memory_layer

    def off_by_one_percent(*args):
        y, buckets = real(*args)
        return y * 1.01, buckets

    monkeypatch.setattr(embedding_bag, "embedding_bag_memory_layer", off_by_one_percent)
    only_stages(monkeypatch, {"Environment": report.environment_stage, "Backends": report.agreement_stage})
    out = tmp_path / "report.md"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["doctor", "--quick", "--device", "cpu", "--out", str(out)])
    assert exit_info.value.code == 1
    text = out.read_text()
    assert "**FAIL**" in text
    failing = [line for line in text.splitlines() if line.startswith("| embedding_bag | float32 |")]
    assert failing and all("**FAIL** (worst" in line for line in failing), "1% is 10^5 float32 roundoffs"
    assert all("| pass |" in line for line in text.splitlines() if line.startswith("| fused_cpu |"))
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith("mf doctor: FAIL on ") and "embedding_bag float32 uniform: worst" in verdict


def test_a_stage_that_raises_is_reported_and_fails_the_verdict(tmp_path, capsys, monkeypatch):
    def broken(found: report.Report) -> list[str]:
        raise RuntimeError("no kernel image is available for execution on the device")

    only_stages(monkeypatch, {"Environment": report.environment_stage, "Training": broken})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["doctor", "--device", "cpu"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "**FAILED**" in out and "RuntimeError: no kernel image is available" in out
    assert out.strip().splitlines()[-1].startswith("mf doctor: FAIL on ")
    assert "Training failed: RuntimeError: no kernel image" in out.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_a_gpu_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["doctor", "--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "mf: error: --device cuda: no CUDA device is visible to torch" in err and "use --device cpu" in err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--out", "/nonexistent/folder/report.md"], "--out /nonexistent/folder/report.md: folder /nonexistent/folder"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(arguments, message, capsys, monkeypatch):
    monkeypatch.setattr(report, "run", lambda *args: pytest.fail("the stages ran"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["doctor", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_out_folder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["doctor", "--out", str(tmp_path)])
    assert f"--out {tmp_path} is a folder; give a file name" in capsys.readouterr().err


def test_doctor_help_imports_neither_torch_nor_lightning():
    code = (
        "import sys\nfrom mf_lightning.doctor import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "usage: mf doctor" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"
