"""``mf prepare``: the tokenizer and token cache of a config's data section, built ahead of ``mf fit``."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import zstandard
from cli_support import QUICKSTART, WORDS, run, tiny_run_args, write_corpus

from mf_lightning.cli import main


def test_prepare_builds_what_fit_then_finds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_corpus(tmp_path / "corpus", documents=30)
    cache = tmp_path / "cache"
    config = tmp_path / "data.yaml"
    config.write_text(f"data:\n  source: {corpus}\n  tokenizer: bpe:300\n  val_fraction: 0.2\n  cache_dir: {cache}\n")
    main(["prepare", "--config", str(QUICKSTART), "--config", str(config), "--data.prepare_workers", "2"])
    out, err = capsys.readouterr()
    assert re.search(
        r"prepared 30 documents \(train 22, val 6, test 2\), \d+ tokens of a 300-token vocabulary; "
        r"tokenized 0\.0 MB of text in [\d.]+ s \([\d.]+ MB/s\)",
        out,
    )
    assert f"token cache: {cache / 'tokens'}" in out
    assert "training a byte-level BPE" in err

    main(["prepare", "--config", str(QUICKSTART), "--config", str(config)])
    assert "found ready (nothing to do)" in capsys.readouterr().out

    args = tiny_run_args(
        tmp_path / "run", corpus, max_steps=1, **{"data.tokenizer": "bpe:300", "data.cache_dir": cache}
    )
    run("fit", args)
    err = capsys.readouterr().err
    assert "training a byte-level BPE" not in err and "tokenizing the corpus" not in err


def test_prepare_with_a_missing_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--config", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mf: error: config file {tmp_path / 'missing.yaml'} does not exist")


def test_fit_trains_on_compressed_jsonl_with_a_sampled_bpe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    texts = [" ".join(WORDS[(index * 7 + offset) % len(WORDS)] for offset in range(60)) for index in range(40)]
    lines = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines[: len(lines) // 2]))
    (tmp_path / "corpus" / "b.jsonl.gz").write_bytes(gzip.compress(lines[len(lines) // 2 :]))
    overrides = {
        "data.source": str(tmp_path / "corpus" / "*.jsonl.*"),
        "data.tokenizer": "bpe:300",
        "data.bpe_sample_bytes": 3000,
        "data.prepare_workers": 2,
    }
    cli = run("fit", tiny_run_args(tmp_path / "run", tmp_path / "corpus", max_steps=1, **overrides))
    assert cli.trainer.global_step == 1
    assert "training a byte-level BPE with 300 tokens on at most 3,000 bytes of the corpus" in capsys.readouterr().err


@pytest.mark.parametrize("log_every_s", [0, 3600])
def test_prepare_logs_at_the_configs_progress_interval(
    tmp_path: Path, capsys: pytest.CaptureFixture, log_every_s: int
) -> None:
    corpus = write_corpus(tmp_path / "corpus", documents=30)
    config = tmp_path / "data.yaml"
    config.write_text(
        f"data:\n  source: {corpus}\n  tokenizer: bpe:300\n  cache_dir: {tmp_path / 'cache'}\n"
        f"progress:\n  log_every_s: {log_every_s}\n"
    )
    main(["prepare", "--config", str(QUICKSTART), "--config", str(config)])
    read = re.findall(r"^reading text for bpe:300: .*, (\d+) documents, ", capsys.readouterr().err, re.MULTILINE)
    assert [int(documents) for documents in read] == (list(range(1, 31)) if log_every_s == 0 else [30])


def test_prepare_refuses_a_negative_progress_interval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    config = tmp_path / "progress.yaml"
    config.write_text(f"data:\n  source: {corpus}\n  cache_dir: {tmp_path / 'cache'}\nprogress:\n  log_every_s: -5\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--config", str(QUICKSTART), "--config", str(config)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(
        "mf: error: progress.log_every_s must be a number of seconds >= 0, got -5"
    )
