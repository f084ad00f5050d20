"""The efficiency report: per-block MACs reproduce the paper's Table 1, and the command prints it."""

import math

import pytest

from mf_lightning.models.efficiency import PAPER_TABLE_1, block_costs, main, memory_table, meta_model, report


def test_block_macs_reproduce_paper_table_1_within_15_percent() -> None:
    costs = block_costs()
    assert {(c.preset, c.arch) for c in costs} == {(p, a) for p in PAPER_TABLE_1 for a in PAPER_TABLE_1[p]}
    for cost in costs:
        assert math.isclose(cost.total, cost.paper_total, rel_tol=0.15), cost
        assert math.isclose(cost.without_attention, cost.paper_formula_without_attention, rel_tol=0.15), cost
        if cost.arch == "transformer":
            assert math.isclose(cost.without_attention, cost.paper_without_attention, rel_tol=0.01), cost


def test_memory_block_counts_exact_table_rows() -> None:
    tiny = next(c for c in block_costs() if (c.preset, c.arch) == ("tiny", "memoryformer"))
    assert tiny.without_attention == 2048 * 64 * (4 * 512 + 640)


def test_main_prints_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--seq-len", "2048"])
    out = capsys.readouterr().out
    for preset in ("debug", "tiny", "small", "base"):
        assert f"| {preset} |" in out
    assert "| tiny | memoryformer | 0.35G | 0.40G | 0.4G | 4.65G | 4.7G |" in out


def test_main_rejects_bad_seq_len(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--seq-len", "0"])
    assert "--seq-len must be a positive integer, got 0" in capsys.readouterr().err


def test_memory_table_shards_the_training_state_over_the_gpus() -> None:
    rows = {tuple(cell.strip() for cell in row.strip("|").split("|")[:2]): row for row in memory_table() if "|" in row}
    base = [cell.strip() for cell in rows[("base", "memoryformer")].strip("|").split("|")]
    parameters = meta_model("base", "memoryformer").num_parameters()
    assert base[6] == base[7] == f"{parameters * 16 / 2**30:,.2f} GiB"  # DDP, and FSDP on one GPU: everything
    assert base[8] == f"{parameters * 16 / 8 / 2**30:,.2f} GiB"  # FSDP on 8 GPUs: an eighth
    assert "FSDP, 8 GPUs" in report()
