"""The Table 1 style tables built from harness results dicts."""

import json

import pytest

from mf_lightning.eval.report import comparison_table, format_table, read_json, result_rows


def harness_results(piqa: float, wsc: float) -> dict:
    return {
        "results": {
            "piqa": {
                "alias": "piqa",
                "acc,none": piqa,
                "acc_stderr,none": 0.01,
                "acc_norm,none": 0.6,
                "acc_norm_stderr,none": 0.02,
            },
            "wsc": {"alias": "wsc", "acc,none": wsc, "acc_stderr,none": 0.05},
            "wikitext": {"alias": "wikitext", "word_perplexity,none": 80.5, "word_perplexity_stderr,none": "N/A"},
        }
    }


def test_table_lists_every_metric_and_averages_accuracy_only() -> None:
    table = format_table(result_rows(harness_results(0.6, 0.4)))
    assert table.splitlines()[2:] == [
        "| piqa | acc | 0.6000 | 0.0100 |",
        "| piqa | acc_norm | 0.6000 | 0.0200 |",
        "| wsc | acc | 0.4000 | 0.0500 |",
        "| wikitext | word_perplexity | 80.5000 |  |",
        "| **average** (2 tasks) | acc | 0.5000 | |",
    ]


def test_comparison_puts_models_side_by_side(tmp_path) -> None:
    for name, values in (("transformer_tiny", (0.6, 0.4)), ("memoryformer_tiny", (0.7, 0.5))):
        (tmp_path / f"{name}.json").write_text(json.dumps(harness_results(*values)))
    table = comparison_table(
        {name: read_json(tmp_path / f"{name}.json") for name in ("transformer_tiny", "memoryformer_tiny")}
    )
    assert table.splitlines() == [
        "| task | transformer_tiny | memoryformer_tiny |",
        "|---|---:|---:|",
        "| piqa | 0.6000 | 0.7000 |",
        "| wsc | 0.4000 | 0.5000 |",
        "| **average** (acc) | 0.5000 | 0.6000 |",
    ]


def test_unreadable_results_files_are_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="results file .*none.json does not exist"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="results file .*bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
