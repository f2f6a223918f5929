"""The README's commands run as written, in their fast forms: a newcomer's first steps must not fail.

Fast forms, and nothing else changed: searches run 3 trials instead of the README's 60 (`--trials N`, `trials=N`),
the trial the README picks is one such a search has (the front's most accurate), `pip install` and the test
suite itself are skipped (CI has just run them), and `my_policy.json` is a policy the search wrote, as a user's
would be."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAST_TRIALS = 3


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def readme_commands() -> list[str]:
    """Each shell command of the README's bash blocks, comments dropped, `a && b` split."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            command = " ".join(shlex.quote(w) for w in words)
            commands.extend(part.strip() for part in command.split(" '&&' "))
    return commands


def fast(command: str, trial: int | None) -> str:
    command = re.sub(r"--trials \d+", f"--trials {FAST_TRIALS}", command)
    return re.sub(r"--trial \d+", f"--trial {trial}", command) if trial is not None else command


def test_the_readme_has_the_commands_this_test_runs() -> None:
    commands = readme_commands()
    assert commands[0].startswith("pip install") and commands[1] == "squeezer demo"
    assert any(c.startswith("squeezer search") for c in commands) and readme_blocks("python")


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    squeezer = [sys.executable, "-m", "squeezer.cli"] if shutil.which("squeezer") is None else ["squeezer"]
    trial = None
    for command in readme_commands():
        if command.startswith(("pip ", "python -m pytest")):
            continue
        if command == "squeezer demo":
            command += f" --trials {FAST_TRIALS} --out runs/demo"
        if "--policy my_policy.json" in command:
            shutil.copy(tmp_path / "runs/r20/policies" / f"trial_{trial:05d}.json", tmp_path / "my_policy.json")
        args = shlex.split(fast(command, trial))
        done = subprocess.run(squeezer + args[1:], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        if command.startswith("squeezer demo"):  # it ends with the applied model timed beside the base
            demo = tmp_path / "runs/demo"
            assert "base beside compressed" in done.stdout and (demo / "base.onnx").is_file()
            assert (demo / "compressed.onnx").stat().st_size < (demo / "base.onnx").stat().st_size
        if args[:2] == ["squeezer", "search"]:
            trial = _most_accurate(tmp_path / "runs/r20")
        if args[:2] == ["squeezer", "apply"] and "--trial" in args:  # the applied model has the searched MACs
            _assert_searched_macs(tmp_path / "runs/r20", trial, tmp_path / args[args.index("--out") + 1])
    python = fast(readme_blocks("python")[0].replace("trials=60", f"trials={FAST_TRIALS}"), trial)
    (tmp_path / "example.py").write_text(python)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]


def _assert_searched_macs(run: Path, trial: int, saved: Path) -> None:
    import squeezer
    from squeezer.evaluators.cost import count_macs
    from squeezer.models import load_checkpoint

    row = next(r for r in squeezer.front(str(run)).front if r.number == trial)
    model, _ = load_checkpoint(saved)
    assert count_macs(model, torch.randn(1, 1, 8, 8))[0] == row.macs


def _most_accurate(run: Path) -> int:
    import squeezer

    front = squeezer.front(str(run)).front
    return max(front, key=lambda r: r.accuracy).number


def docs_commands() -> list[tuple[str, str]]:
    """(page, command) for each `squeezer` line of the docs' bash blocks; `...` stands for options shown earlier."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == ["squeezer"]:
                    found.append((page.name, " ".join(shlex.quote(w) for w in words)))
    return found


def test_every_squeezer_command_in_the_docs_is_one_the_cli_accepts() -> None:
    """The docs' commands name clusters, databases and folders a test machine lacks, so they are parsed, not run:
    every subcommand, flag and choice they use is one the CLI has (a renamed flag fails here, not for a reader)."""
    from squeezer.cli import build_parser

    commands = docs_commands()
    assert commands
    for page, command in commands:
        words = shlex.split(command)[1:]
        if "..." in words:  # "squeezer search ... --flag": the options shown before it, here the required ones
            words.remove("...")
            for flag, value in (("--model", "resnet20"), ("--budget", "macs<=50%"), ("--out", "runs/x")):
                words += [flag, value] if flag not in words else []
        try:
            build_parser().parse_args(words)
        except SystemExit:
            pytest.fail(f"docs/{page}: `{command}` is not a command the CLI accepts")
