"""A config the parser refuses, said in one line: the key, the value, what is valid, and where the full list is.

jsonargparse reports a refused config in its own words, often over many lines (a union type lists every
member's failure) and, when it exits itself, after 100 lines of usage. ``describe_parse_error`` turns each
kind it reports (an unknown option on the command line or in a YAML file, a value of the wrong type, a YAML
file that does not parse, a missing config file, an option without its value) into one sentence that ends
pointing at ``mf <subcommand> --help``; the usage is printed only when asked for with ``--help``.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

UNRECOGNIZED = re.compile(r"^unrecognized arguments: (?P<arguments>.+)$", re.DOTALL)
NOT_ACCEPTED = re.compile(r"^(?P<kind>Subcommand|Group) '(?P<scope>[^']+)' does not accept option '(?P<key>[^']+)'")
"""An unknown key of a YAML file: in a subcommand (the key is whole) or in a group (the key is the group's)."""
PARSER_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":\s*(?P<reason>.*)$', re.DOTALL)
MISSING_FILE = re.compile(r"File does not exist: '?(?P<path>[^']+)'?")
EXPECTED = re.compile(r"Expected an? (?P<type>.+?)(?:\. Got value: .*)?$")
GIVEN_VALUE = re.compile(r"(?:Given value|Got value): (?P<value>.*)$", re.MULTILINE)
MISSING_VALUE = re.compile(r"^argument (?P<option>\S+): expected one argument")
BAD_YAML = "Problems parsing config"
CLASS_NAME = re.compile(r"<class '(?:[\w.]+\.)?(?P<name>\w+)'>")
LITERAL = re.compile(r"typing\.Literal\[(?P<members>[^\]]*)\]")


MISSING = object()


class ConfigError(ValueError):
    """A config or command line that the parser refuses; its message is the whole one-line report."""


def describe_parse_error(message: str, subcommand: str, argv: Sequence[str], options: Sequence[str]) -> str:
    """One line saying what is wrong in the parser's error ``message`` for ``mf <subcommand> <argv>``, whose
    valid options are ``options`` (dotted names without dashes: the closest is suggested for an unknown one)."""
    full_list = f"`mf {subcommand} --help` lists every option"
    if match := UNRECOGNIZED.match(message):
        arguments = match["arguments"].split()
        option = next((arg for arg in arguments if arg.startswith("-")), arguments[0]).split("=", 1)[0]
        given = " ".join(arguments[1:]) if len(arguments) > 1 else None
        value = f" (given {given})" if given else ""
        return f"unknown option {option}{value}{suggestion(option.lstrip('-'), options)}; {full_list}"
    if match := NOT_ACCEPTED.match(message):
        key = match["key"] if match["kind"] == "Subcommand" else f"{match['scope']}.{match['key']}"
        return f"unknown option {key}{where_set(key, argv)}{suggestion(key, options)}; {full_list}"
    if message.startswith(BAD_YAML):
        return f"{bad_yaml(argv) or ' '.join(message.split())}; {full_list}"
    if match := PARSER_KEY.match(message):
        key, reason = match["key"], match["reason"]
        if key == "config" and (missing := MISSING_FILE.search(reason)):
            return f"config file {missing['path']} does not exist"
        given = GIVEN_VALUE.search(reason)
        value = f"={given['value'].strip()!r}" if given else ""
        return f"{key}{value} is not valid: expected {expected_types(reason)}; {full_list}"
    if match := MISSING_VALUE.match(message):
        return f"option {match['option']} needs a value; {full_list}"
    return f"{' '.join(message.split())}; {full_list}"


def suggestion(key: str, options: Sequence[str]) -> str:
    """``; did you mean --x?`` for the one of ``options`` closest to ``key``, or nothing."""
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.75)
    return f"; did you mean --{close[0]}?" if close else ""


def expected_types(reason: str) -> str:
    """What the parser expected, from its ``Expected a <type>`` lines, in a user's words (``int or null``)."""
    kinds: list[str] = []
    for line in reason.splitlines():
        if match := EXPECTED.search(line.strip()):
            kind = CLASS_NAME.sub(lambda named: "null" if named["name"] == "NoneType" else named["name"], match["type"])
            literal = LITERAL.fullmatch(kind)
            kinds.extend(literal["members"].split(", ") if literal else [kind.replace("typing.", "")])
    kinds = list(dict.fromkeys(kinds))
    if not kinds:
        return " ".join(reason.split())
    return kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"


def where_set(key: str, argv: Sequence[str]) -> str:
    """`` (= VALUE in config F)`` for the last ``--config`` file of ``argv`` that sets the dotted ``key``."""
    found = ""
    for file in config_files(argv):
        try:
            value: Any = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        for part in key.split("."):
            value = value.get(part, MISSING) if isinstance(value, dict) else MISSING
        if value is not MISSING:
            found = f" (= {value!r} in config {file})"
    return found


def bad_yaml(argv: Sequence[str]) -> str | None:
    """``config F is not valid YAML: ... (line L, column C)`` for the first ``--config`` file of ``argv`` that
    does not parse, or None when every one does (the YAML was given inline)."""
    for file in config_files(argv):
        try:
            yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            return f"config {file} is not valid YAML: {problem}{where}"
        except OSError:
            continue
    return None


def config_files(argv: Sequence[str]) -> list[str]:
    """The files given with ``--config FILE`` or ``--config=FILE`` in ``argv``."""
    files = [value for flag, value in itertools.pairwise(argv) if flag == "--config"]
    return files + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse``'s parser for a subcommand's own options (``prog`` is ``mf <subcommand>``): an argument it
    refuses ends the program, as argparse's does (status 2), with one ``mf: error:`` line naming it instead of
    usage and an error line, however the subcommand was started; ``-h`` still prints help."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        options = re.findall(r"--([\w.-]+)", self.format_usage())
        print(f"mf: error: {describe_parse_error(message, self.prog.split()[-1], (), options)}", file=sys.stderr)
        raise SystemExit(2)
