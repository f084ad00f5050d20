"""A config the parser refuses is one ``mf: error:`` line naming the key and value, in every subcommand that reads one;
``--model.overrides`` on the command line merges into the config's overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_support import QUICKSTART, tiny_run_args, write_corpus

from mf_lightning import cli
from mf_lightning.config_errors import ConfigError
from mf_lightning.lit.override_arguments import merge_overrides, split_overrides


def error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The whole stderr of ``mf <argv>``, checked to be one ``mf: error:`` line with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    (line,) = err.splitlines()
    assert line.startswith("mf: error: ")
    return line


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_an_unknown_flag_is_one_line_with_the_closest_options(subcommand, capsys):
    line = error_line(capsys, [subcommand, "--config", str(QUICKSTART), "--model.lrr", "0.1"])
    assert "unknown option --model.lrr (given 0.1)" in line
    assert "did you mean --model.lr?" in line
    assert line.endswith(f"`mf {subcommand} --help` lists every option")


def test_an_unknown_yaml_key_names_the_key_its_value_and_its_file(tmp_path, capsys):
    extra = write(tmp_path / "extra.yaml", "model:\n  warmup_fractoin: 0.1\n")
    line = error_line(capsys, ["fit", "--config", str(QUICKSTART), "--config", str(extra)])
    assert f"unknown option model.warmup_fractoin (= 0.1 in config {extra})" in line
    assert "did you mean --model.warmup_fraction?" in line


@pytest.mark.parametrize("where", ["flag", "yaml"])
def test_a_wrong_type_names_the_key_the_value_and_the_type(where, tmp_path, capsys):
    extra = ["--data.batch_size", "lots"]
    if where == "yaml":
        extra = ["--config", str(write(tmp_path / "extra.yaml", "data:\n  batch_size: lots\n"))]
    line = error_line(capsys, ["fit", "--config", str(QUICKSTART), *extra])
    assert "data.batch_size='lots' is not valid: expected int;" in line


def test_a_union_type_lists_what_is_valid(capsys):
    line = error_line(capsys, ["fit", "--config", str(QUICKSTART), "--trainer.precision", "fast"])
    assert "trainer.precision='fast' is not valid: expected int, " in line
    assert "'bf16-mixed'" in line and line.count("'32-true'") == 1 and "or null;" in line


def test_bad_yaml_names_the_file_line_and_column(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "trainer:\n  max_steps: [1,\n")
    line = error_line(capsys, ["fit", "--config", str(bad)])
    assert line.startswith(f"mf: error: config {bad} is not valid YAML: ")
    assert "(line 3, column 1)" in line


def test_an_option_without_its_value_is_one_line(capsys):
    assert "option --ckpt_path needs a value" in error_line(
        capsys, ["test", "--config", str(QUICKSTART), "--ckpt_path"]
    )


@pytest.mark.parametrize("subcommand", ["prepare", "generate", "eval"])
def test_the_tools_reading_a_config_refuse_it_in_one_line(subcommand, tmp_path, capsys):
    extra = write(tmp_path / "extra.yaml", "data:\n  batch_sise: 4\n")
    prompt = ["def main("] if subcommand == "generate" else []
    line = error_line(capsys, [subcommand, "--config", str(extra), *prompt])
    assert f"unknown option data.batch_sise (= 4 in config {extra}); did you mean --data.batch_size?" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prepare", "--config", str(QUICKSTART), "--data.seq_len", "long"], "data.seq_len='long' is not valid"),
        (["generate", "--temperature", "hot", "hi"], "argument --temperature: invalid float value: 'hot'"),
        (
            ["export", "--ckpt_path", "x.ckpt", "--out", "x", "--bogus"],
            "unknown option --bogus; `mf export --help` lists every option",
        ),
    ],
)
def test_the_tools_own_options_are_refused_in_one_line(argv, message, capsys):
    assert message in error_line(capsys, argv)


def test_command_line_overrides_merge_into_the_configs_key_by_key():
    config = cli.read_config([QUICKSTART])
    assert config.model.overrides == {"max_seq_len": 256}
    with pytest.raises(cli.ParsedConfig) as parsed:
        cli.build_cli(["fit", "--config", str(QUICKSTART), "--model.overrides", "{n_layer: 4}"], cli.ConfigReader)
    assert parsed.value.config.model.overrides == {"max_seq_len": 256, "n_layer": 4}


def test_null_overrides_clear_and_later_ones_merge_in_order():
    argv, given = split_overrides(["fit", "--model.overrides=null", "--model.overrides", "{n_layer: 2}", "--x", "1"])
    assert argv == ["fit", "--x", "1"]
    assert merge_overrides({"max_seq_len": 256}, given) == {"n_layer": 2}
    assert merge_overrides({"max_seq_len": 256}, given[:1]) is None
    assert merge_overrides(None, [{"n_layer": 4}, {"n_layer": 3, "n_head": 2}]) == {"n_layer": 3, "n_head": 2}


@pytest.mark.parametrize("value", ["[1, 2]", "4", "{1: 2}"])
def test_overrides_that_are_not_a_mapping_are_refused(value):
    with pytest.raises(ConfigError, match="expected a mapping of ModelConfig fields"):
        split_overrides(["--model.overrides", value])


def test_an_unknown_key_of_a_group_is_named_whole(tmp_path, capsys):
    config = write(tmp_path / "class_form.yaml", "data:\n  class_path: x.Y\n  init_args:\n    source: demo\n")
    line = error_line(capsys, ["fit", "--config", str(config), "--print_config"])
    assert line.startswith(f"mf: error: unknown option data.init_args.source (= 'demo' in config {config});")


def test_print_config_shows_the_merged_overrides(capsys):
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", str(QUICKSTART), "--model.overrides", "{n_layer: 4}", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["overrides"] == {"max_seq_len": 256, "n_layer": 4}


def test_a_fit_trains_and_saves_the_merged_overrides(tmp_path):
    args = tiny_run_args(tmp_path / "run", write_corpus(tmp_path / "corpus"), max_steps=1)
    cli_object = cli.main(["fit", *args, "--model.overrides", "{n_layer: 1}"])
    assert cli_object.model.config.n_layer == 1 and cli_object.model.config.max_seq_len == 64
    saved = yaml.safe_load((tmp_path / "run" / "tensorboard" / "config.yaml").read_text())
    assert saved["model"]["overrides"] == {"max_seq_len": 64, "n_layer": 1}
