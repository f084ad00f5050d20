"""One answer to where a run's config, checkpoints and logs live, following ``trainer.logger``; and one config
reader: every subcommand that takes ``--config`` parses it with ``mf fit``'s parser and defaults."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from cli_support import QUICKSTART, run, tiny_run_args, write_corpus

from mf_lightning.cli import main, read_config
from mf_lightning.data import TextDataModule
from mf_lightning.lit.run_folders import RunFolders, run_folders

CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"


def test_the_default_layout_is_tensorboard_and_checkpoints_under_the_root() -> None:
    folders = run_folders(read_config([QUICKSTART]))
    assert folders == RunFolders(
        Path("runs/quickstart"),
        Path("runs/quickstart/checkpoints"),
        Path("runs/quickstart/tensorboard"),
        "TensorBoardLogger",
    )
    assert folders.config == Path("runs/quickstart/tensorboard/config.yaml") and folders.tensorboard


@pytest.mark.parametrize(
    ("logger", "logs", "name"),
    [
        (False, "run", None),
        ([], "run", None),
        (
            {"class_path": CSV_LOGGER, "init_args": {"save_dir": "run", "name": "csv", "version": 3}},
            "run/csv/version_3",
            "CSVLogger",
        ),
        (
            {"class_path": CSV_LOGGER, "init_args": {"save_dir": "run", "version": "mine"}},
            "run/lightning_logs/mine",
            "CSVLogger",
        ),
        (
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "tb", "name": ""}},
            "tb/version_0",
            "TensorBoardLogger",
        ),
        (
            [{"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": {"save_dir": "ml"}}],
            "ml",
            "MLFlowLogger",
        ),
    ],
)
def test_the_logs_follow_the_configured_logger(logger, logs: str, name: str | None) -> None:
    folders = run_folders({"trainer": {"default_root_dir": "run", "logger": logger}, "checkpoint": {"dirpath": None}})
    assert (folders.logs, folders.logger, folders.checkpoints) == (Path(logs), name, Path("run/checkpoints"))
    assert folders.tensorboard is (name == "TensorBoardLogger")


def test_a_version_left_to_the_logger_is_the_newest_on_disk(tmp_path: Path) -> None:
    for version in ("version_0", "version_2", "version_10", "version_x"):
        (tmp_path / "csv" / version).mkdir(parents=True)
    logger = {"class_path": CSV_LOGGER, "init_args": {"save_dir": str(tmp_path), "name": "csv"}}
    assert run_folders({"trainer": {"logger": logger}}).logs == tmp_path / "csv" / "version_10"


def test_a_saved_config_places_relative_folders_from_any_working_directory(tmp_path: Path) -> None:
    saved = tmp_path / "started_here" / "run" / "csv" / "version_1" / "config.yaml"
    logger = {"class_path": CSV_LOGGER, "init_args": {"save_dir": "run", "name": "csv"}}
    config = {"trainer": {"default_root_dir": "run", "logger": logger}, "checkpoint": {"dirpath": "run/ckpts"}}
    folders = run_folders(config, saved)
    start = tmp_path / "started_here"
    assert folders == RunFolders(start / "run", start / "run" / "ckpts", saved.parent, "CSVLogger")
    unsaved = run_folders(config, tmp_path / "my_config.yaml")  # the file a run was started with: paths stay as given
    assert unsaved.checkpoints == Path("run/ckpts")


def test_a_run_logged_as_csv_is_found_from_its_saved_config_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The saved config lies in the CSV logger's folder, not in tensorboard/; relative paths are the run's."""
    corpus = write_corpus(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    args = tiny_run_args(Path("run"), corpus, max_steps=2, **{"data.cache_dir": tmp_path / "cache"})
    run("fit", [*args, "--trainer.logger", CSV_LOGGER, "--trainer.logger.save_dir", "run"])
    saved = tmp_path / "run" / "lightning_logs" / "version_0" / "config.yaml"
    assert saved.is_file() and not (tmp_path / "run" / "tensorboard").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    main(["generate", "--config", str(saved), "--ckpt_path", "last", "--max_new_tokens", "3", "--seed", "0", "the"])
    assert " tokens in " in capsys.readouterr().err


def test_the_config_reader_has_the_datamodules_defaults() -> None:
    data = read_config([QUICKSTART]).data
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(TextDataModule).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    assert set(data.as_dict()) == set(defaults)
    assert data.bpe_sample_bytes == defaults["bpe_sample_bytes"] and data.verify_cache is False


def test_mf_prepare_refuses_a_config_mf_fit_refuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  max_stepz: 3\ndata:\n  source: demo\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"mf: error: unknown option trainer.max_stepz (= 3 in config {config}); did you mean --trainer.max_steps?; "
        "`mf fit --help` lists every option\n"
    )


def test_mf_prepare_reads_the_data_section_exactly_as_mf_fit_does(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The class form ``data: {class_path, init_args}`` is not one ``mf fit`` accepts for its fixed data module, so
    ``mf prepare`` refuses it too, with the same reason, instead of preparing data a fit could never use."""
    config = tmp_path / "class_form.yaml"
    config.write_text("data:\n  class_path: mf_lightning.data.TextDataModule\n  init_args:\n    source: demo\n")
    for subcommand in ("prepare", "fit"):
        with pytest.raises(SystemExit) as exit_info:
            main([subcommand, "--config", str(config), *(["--print_config"] if subcommand == "fit" else [])])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("mf: error: unknown option data.init_args.source (= 'demo' in config ")


def test_mf_prepare_prints_the_data_settings_of_its_configs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  source: demo\n  val_fraction: 0.2\n")
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["prepare", "--config", str(QUICKSTART), "--config", str(config), "--data.seq_len", "64", "--print_config"]
        )
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "source: demo" in printed and "val_fraction: 0.2" in printed and "seq_len: 64" in printed
    assert "verify_cache: false" in printed and "bpe_sample_bytes: 1073741824" in printed


def test_a_missing_config_is_named(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--config", str(tmp_path / "nope.yaml"), "--ckpt_path", "last", "x"])
    assert capsys.readouterr().err.startswith(f"mf: error: config file {tmp_path / 'nope.yaml'} does not exist")
