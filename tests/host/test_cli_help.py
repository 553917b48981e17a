"""The keel command line explains itself: every argument of every command has help text,
and `keel --version` answers."""

import argparse

from keel.cli import make_parser


def _undocumented(parser, path):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _undocumented(sub, path + [name])
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
            yield " ".join(path), action.option_strings or [action.dest]


def test_every_argument_has_help():
    assert list(_undocumented(make_parser(), ["keel"])) == []


def test_version(keel_cli):
    proc = keel_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("keel ") and "system" in proc.stdout


def test_serve_names_the_cloud_directory_once(keel_cli):
    text = keel_cli("cloud", "serve", "--help").stdout
    assert "--cloud DIR" in text and "--data" not in text
