"""benchmarks/ablations.py end to end on two tiny runs, and its verdicts on hand-made results."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ablations
from harness import RunResult, RunSpec, read_scalars

from mf_lightning.callbacks.bucket_usage import layer_usage_tag
from mf_lightning.callbacks.usage_metrics import USED_FRACTION

REMEDY = ablations.memoryformer(bucket_balance_weight=0.1)
TINY = ablations.Ablation("remedy", (("none", ablations.PAPER), ("balance", REMEDY)), "a < b", (("none", "balance"),))


def tiny_args(corpus: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--corpora",
        str(corpus),
        "--document-separator",
        "%",
        "--seeds",
        "1",
        "--jobs",
        "1",
        "--steps",
        "4",
        "--val-every",
        "2",
        "--val-batches",
        "1",
        "--log-every",
        "1",
        "--bucket-every",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--overrides",
        "{n_layer: 1, n_embd: 16, n_head: 2, max_seq_len: 16}",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]


@pytest.mark.slow
def test_study_runs_end_to_end_reads_the_monitor_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    corpus = tmp_path / "fortunes.txt"
    corpus.write_text(
        "\n%\n".join(f"Fortune number {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    )
    monkeypatch.setattr(ablations, "ABLATIONS", (TINY,))
    ablations.main(tiny_args(corpus, tmp_path))
    report = (tmp_path / "out" / "ablations_cpu.md").read_text()
    assert (tmp_path / "out" / "ablations_cpu_val.png").stat().st_size > 0
    assert "runs: 2 of 2 finished" in report and "not run" not in report
    assert "balance better than none:" in report and "one seed, no spread to judge by" in report
    assert "| model.blocks.0.qkv |" in report
    runs = tmp_path / "runs" / "fortunes" / "seed1"
    paper = read_scalars(runs / ablations.PAPER.folder / "tensorboard")
    remedy = read_scalars(runs / REMEDY.folder / "tensorboard")
    assert "train/balance_loss" in remedy and "train/balance_loss" not in paper
    used = paper[layer_usage_tag(USED_FRACTION, "model.blocks.0.qkv")][-1][1]
    cached = RunResult.from_json(json.loads((runs / ablations.PAPER.folder / "result.json").read_text())["result"])
    assert ablations.Summary([cached]).layer_mean(
        layer_usage_tag(USED_FRACTION, "").rstrip("/"), "qkv"
    ) == pytest.approx(used)
    assert ablations.Summary([cached]).layer_mean("sign_bias", "ffn_in") is not None
    capsys.readouterr()
    ablations.main(tiny_args(corpus, tmp_path, "--reuse"))
    assert capsys.readouterr().out.count("reusing") == 2

    def settled(text: str) -> list[str]:
        """The report without the command and the device line (which records the machine's load at writing)."""
        return [line for line in text.splitlines() if not line.startswith(("- command:", "- device:"))]

    assert settled((tmp_path / "out" / "ablations_cpu.md").read_text()) == settled(report)
    (runs / REMEDY.folder / "result.json").unlink()
    ablations.main(tiny_args(corpus, tmp_path, "--report-only"))
    partial = (tmp_path / "out" / "ablations_cpu.md").read_text()
    assert "runs: 1 of 2 finished (PARTIAL RESULTS" in partial and "| remedy | balance | 0 | not run |" in partial
    assert not (runs / REMEDY.folder / "result.json").exists()


def fake(loss: float) -> RunResult:
    points = [(0, loss + 1), (9, loss)]
    scalars = {
        "loss/val": points,
        "val/bpb": points,
        "train/time": [(0, 0.0), (1, 1.0), (2, 2.0)],
        "train/lengths": [(0, 0), (1, 10), (2, 20)],
    }
    return RunResult(RunSpec("memoryformer", 3e-3), 1, 1, 1.0, "", scalars)


def test_verdicts_weigh_the_gap_against_the_seed_spread(monkeypatch) -> None:
    monkeypatch.setattr(ablations, "ABLATIONS", (TINY,))
    resolved = {
        ablations.PAPER: ablations.Summary([fake(2.0), fake(2.2)]),
        REMEDY: ablations.Summary([fake(1.5), fake(1.6)]),
    }
    assert "holds (+0.5500, beyond the seed spread 0.1500)" in ablations.verdicts(resolved)[0]
    noisy = {
        ablations.PAPER: ablations.Summary([fake(2.0), fake(2.2)]),
        REMEDY: ablations.Summary([fake(2.15), fake(2.2)]),
    }
    assert "reversed, not resolved (-0.0750, within the seed spread 0.1250)" in ablations.verdicts(noisy)[0]
    assert "not every variant ran" in ablations.verdicts({ablations.PAPER: resolved[ablations.PAPER]})[0]


def test_bucket_window_must_end_at_the_last_step(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        ablations.parse_args(["--corpora", "demo", "--steps", "150", "--bucket-every", "40"])
    assert "--bucket-every=40 must be 0 or divide --steps=150" in capsys.readouterr().err
