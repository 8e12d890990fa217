"""The console script's top level, as a user meets it."""

from typer.testing import CliRunner

from experiments.cli import app


def test_help_lists_the_command_groups():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for group in ("theory", "bridge", "figures"):
        assert group in result.output


def test_unknown_command_fails_with_usage():
    result = CliRunner().invoke(app, ["nonsense"])
    assert result.exit_code != 0
