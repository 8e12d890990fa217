"""Every `resurgence ...` command in docs/gpu_recipe.md and README.md names a real subcommand and
real options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer

from experiments.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "gpu_recipe.md"
README = ROOT / "README.md"


def _commands(text: str) -> list[list[str]]:
    """Commands of the doc's bash blocks: continuation lines joined, ``X="..."`` expanded."""
    out, env = [], {}
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().removeprefix(".venv/bin/")
            for name, value in re.findall(r'^(\w+)="([^"]*)"', line):
                env[name] = value
            if line.startswith("resurgence "):
                line = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), "VALUE"), line)
                out.append(shlex.split(line))
    return out


def _check(commands: list[list[str]]) -> None:
    root = typer.main.get_command(app)
    for argv in commands:
        cmd, words = root, argv[1:]
        while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
            cmd, words = cmd.commands[words[0]], words[1:]
        if words == ["--help"]:  # any command or group
            continue
        assert not hasattr(cmd, "commands"), f"not a command: {' '.join(argv[:4])}"
        known = {"--help", *(o for p in cmd.params for o in (*p.opts, *p.secondary_opts))}
        options = [w.split("=")[0] for w in words if w.startswith("--")]
        unknown = [o for o in options if o not in known]
        assert not unknown, f"{' '.join(argv[:3])}: unknown options {unknown}"


def test_every_documented_option_exists():
    commands = _commands(DOC.read_text())
    assert len(commands) >= 10, len(commands)  # the doc's unlearn / measure / finetune commands
    _check(commands)


def test_every_readme_command_exists():
    commands = _commands(README.read_text())
    assert len(commands) >= 9, len(commands)  # `Using it` and the audit / guard section
    assert {"audit", "finetune"} <= {argv[2] for argv in commands if len(argv) > 2}
    _check(commands)
