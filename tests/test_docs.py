"""The README documents every command, and its usage commands run as written."""

import re
import shlex
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_has_exactly_the_two_commands():
    text = README.read_text()
    quick = text.split("## Quickstart", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    assert block.split("\n")[:-1] == ["make demo", "make test"]


def test_every_command_is_documented():
    text = README.read_text()
    for name in cli.commands:
        assert f"pipeline {name}" in text, name


def test_usage_block_runs(tmp_path, monkeypatch):
    text = README.read_text()
    usage = text.split("## Usage", 1)[1]
    block = re.search(r"```bash\n(.*?)```", usage, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    for line in block.strip().splitlines():
        args = shlex.split(line)
        assert args[0] == "pipeline"
        result = CliRunner().invoke(cli, args[1:], catch_exceptions=False)
        assert result.exit_code == 0, (line, result.stderr)
    assert (tmp_path / "ws" / "catalog.db").exists()
