"""`nm COMMAND --help` explains every option and states its default."""

from __future__ import annotations

import argparse

import pytest

from nmgen.cli import build_parser as build_nmgen_parser
from torchbridge.cli import build_parser


def _commands(parser: argparse.ArgumentParser, prefix: str = "nm"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, f"{prefix} {name}")


COMMANDS = list(_commands(build_parser())) + list(_commands(build_nmgen_parser(), "nmgen"))


def test_every_command_is_walked():
    names = {name for name, _ in COMMANDS}
    assert {"nm table2", "nm fig3", "nm bench floor", "nm bench propagate"} <= names
    assert {"nmgen verify", "nmgen check-points"} <= names
    assert len(names) > 20


@pytest.mark.parametrize("name,parser", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_has_help_with_its_default(name, parser):
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if not action.option_strings:  # a required positional: needs help, has no default
            assert action.help, f"{name}: positional {action.dest} has no help"
            continue
        text = formatter._get_help_string(action) if action.help else ""
        if not text.strip() or "default" not in text.lower():
            missing.append("/".join(action.option_strings) or action.dest)
    assert not missing, f"{name}: options without help or default: {missing}"
    parser.format_help()  # "%" in a help text would raise here


def test_default_is_appended_once_and_percent_safe():
    parser = build_parser()
    table4 = next(p for n, p in COMMANDS if n == "nm table4")
    text = table4.format_help()
    assert "(default: 25,50,100,250,1000)" in text
    assert text.count("test images clustered (default 1000)") == 1
    assert "(default: 1000) (default" not in text
    assert parser.format_help()
