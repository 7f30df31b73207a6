"""The README's shell blocks name commands that exist, with flags they accept (nothing is run here).

Every ```bash (or sh / shell / console) block is split into commands. A ``dearli ...`` command must parse
with the real command line (``dearli.cli.build_parser``), its KEY=VALUE overrides must be valid config keys;
``python jobs/X.py ...`` needs the file and the flags its ``--help`` lists; a pipe must feed a program,
not a list of subcommand names; a block that starts or reaches a Ray cluster sets the token-auth mode.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from dearli.cli import OVERRIDE, build_parser, prepare_argv
from dearli.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "2>"}
JOB = re.compile(r"^jobs/[\w-]+\.py$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")  # RAY_ADDRESS=... before a command (not key.sub=value)
PRESETS = ("tiny", "base", "large")
RAY_CLUSTER_COMMANDS = (("ray", "start"), ("ray", "job"), ("ray", "up"), ("ray", "submit"), ("ray", "attach"))


def shell_blocks(text: str) -> list[str]:
    """The bodies of the fenced shell blocks, continuation lines joined, console prompts dropped."""
    blocks = []
    for lang, body in re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        if lang.lower() in SHELL_LANGS:
            body = body.replace("\\\n", " ")
            blocks.append("\n".join(line.removeprefix("$ ") for line in body.splitlines()))
    return blocks


def split_commands(line: str) -> list[tuple[list[str], str | None]]:
    """One line -> [(words, separator that ends it)]: comments and redirections dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, skip = [], [], False
    for token in lexer:
        if skip:
            skip = False
        elif token in REDIRECTS or re.fullmatch(r"\d?>>?&?", token):
            skip = True
        elif token in SEPARATORS:
            commands.append((words, token))
            words = []
        else:
            words.append(token)
    commands.append((words, None))
    return [(w, sep) for w, sep in commands if w]


def block_commands(block: str) -> list[list[str]]:
    return [words for line in block.splitlines() for words, _ in split_commands(line)]


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    return [words for block in shell_blocks(text) for words in block_commands(block)]


def invocation(words: list[str]) -> list[str]:
    """The command a line really runs: without ``VAR=value`` prefixes; after ``ray job submit ... --``
    the entry point."""
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if len(words) > 2 and words[:3] == ["ray", "job", "submit"] and "--" in words:
        return invocation(words[words.index("--") + 1:])
    return words


def dearli_calls() -> list[list[str]]:
    calls = [invocation(w) for w in readme_commands()]
    return [w[1:] for w in calls if w and Path(w[0]).name == "dearli"]


def job_calls() -> list[tuple[str, list[str]]]:
    calls = []
    for words in map(invocation, readme_commands()):
        if len(words) > 1 and Path(words[0]).name.startswith("python") and JOB.match(words[1]):
            calls.append((words[1], words[2:]))
    return calls


def _subcommand_names(parser: argparse.ArgumentParser) -> set[str]:
    names = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                names |= {name} | _subcommand_names(sub)
    return names


@cache
def dearli_parser() -> argparse.ArgumentParser:
    return build_parser()


def parse_like_main(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """What ``dearli.cli.main`` parses: ``dearli train --dataset ...`` names the default stage first."""
    return dearli_parser().parse_known_args(prepare_argv(argv))


def check_overrides(overrides: list[str], preset: str) -> None:
    bad = [o for o in overrides if not OVERRIDE.match(o)]
    assert not bad, f"not KEY=VALUE: {bad}"
    load_config(preset if preset in PRESETS else "tiny", overrides)  # unknown keys, bad values: ConfigError


def test_readme_has_the_blocks_this_test_reads():
    calls = dearli_calls()
    assert len(calls) >= 10, calls
    assert {c[0] for c in calls} >= {"synth", "train", "predict", "cache", "baseline", "bench"}
    assert any(script == "jobs/supervised.py" for script, _ in job_calls())


@pytest.mark.parametrize("argv", dearli_calls(), ids=lambda argv: " ".join(argv[:2]))
def test_dearli_commands_parse(argv, capsys):
    try:
        args, extra = parse_like_main(argv)
    except SystemExit:
        pytest.fail(f"dearli {' '.join(argv)}: {capsys.readouterr().err.strip()}")
    assert getattr(args, "handler", None), f"dearli {' '.join(argv)}: names no command"
    # what dearli.cli.main accepts beyond the parser: KEY=VALUE overrides, for commands that take them
    overrides = [*getattr(args, "overrides", []), *extra]
    if extra:
        assert hasattr(args, "overrides"), f"dearli {' '.join(argv)}: unrecognized arguments {extra}"
    if overrides:
        check_overrides(overrides, getattr(args, "preset", "tiny") or "tiny")


@cache
def job_flags(script: str) -> set[str]:
    """The option strings ``python jobs/X.py --help`` lists."""
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{script} --help failed: {result.stderr[-2000:]}"
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", result.stdout))


@pytest.mark.parametrize(("script", "args"), job_calls(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_job_files_exist_and_accept_their_flags(script, args):
    assert (ROOT / script).is_file(), f"{script} does not exist"
    flags = [a.split("=", 1)[0] for a in args if a.startswith("-") and not re.fullmatch(r"-[\d.]+", a)]
    unknown = [f for f in flags if f not in job_flags(script)]
    assert not unknown, f"{script} does not accept {unknown}"
    overrides = [a for a in args if OVERRIDE.match(a)]
    if overrides:
        preset = args[args.index("--preset") + 1] if "--preset" in args else "tiny"
        check_overrides(overrides, preset)


def test_pipes_feed_programs_not_subcommand_names():
    subcommands = _subcommand_names(dearli_parser())
    for block in shell_blocks((ROOT / "README.md").read_text()):
        for line in block.splitlines():
            commands = split_commands(line)
            for (_, sep), (words, _) in zip(commands, commands[1:]):
                if sep != "|":
                    continue
                target = words[0]
                assert target not in subcommands, f"'| {target}' pipes into a dearli subcommand name: {line}"
                assert shutil.which(target), f"'| {target}' is not a program: {line}"


def test_blocks_that_reach_a_ray_cluster_set_the_auth_mode():
    """Ray >= 2.59 enables token auth on a head when a token exists; client and head must agree."""
    for block in shell_blocks((ROOT / "README.md").read_text()):
        commands = block_commands(block)
        ray_at = [i for i, w in enumerate(commands) if tuple(w[:2]) in RAY_CLUSTER_COMMANDS]
        if not ray_at:
            continue
        modes = [i for i, w in enumerate(commands) if w[:1] == ["export"] and any(
            a.startswith("RAY_AUTH_MODE=") for a in w[1:])]
        assert modes and modes[0] < ray_at[0], f"block without 'export RAY_AUTH_MODE=...' first:\n{block}"


def test_the_checks_catch_what_a_newcomer_hit():
    """The parsing above is strict enough to see the README mistakes it exists for."""
    assert split_commands("dearli bench evaluate | step | cache  # benchmarks") == [
        (["dearli", "bench", "evaluate"], "|"), (["step"], "|"), (["cache"], None)]
    assert {"step", "cache", "evaluate"} <= _subcommand_names(dearli_parser())
    with pytest.raises(SystemExit):
        dearli_parser().parse_known_args(["predict", "--dataset", "d", "--out", "o"])  # --checkpoint missing
    args, extra = dearli_parser().parse_known_args(["synth", "--out", "o", "--no-such-flag"])
    assert extra == ["--no-such-flag"] and not hasattr(args, "overrides")
    with pytest.raises(Exception, match="no_such_key"):
        check_overrides(["train.no_such_key=1"], "tiny")
    assert block_commands('export RAY_AUTH_MODE=token\nray get-auth-token --generate > /dev/null') == [
        ["export", "RAY_AUTH_MODE=token"], ["ray", "get-auth-token", "--generate"]]
    assert invocation(["RAY_ADDRESS=auto", "dearli", "cache", "sam"]) == ["dearli", "cache", "sam"]
    assert invocation(["ray", "job", "submit", "--working-dir", ".", "--", "python", "jobs/ssl.py", "x.y=1"]) == [
        "python", "jobs/ssl.py", "x.y=1"]
