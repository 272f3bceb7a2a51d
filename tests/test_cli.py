"""Help that helps: every -h works, marks required options, documents every option, ends with an example."""

from __future__ import annotations

import re

import pytest

from medusa_cache.cli import build_parser, main

COMMANDS = ["dump", "inspect", "verify", "train", "eval", "ablate", "generate", "speculate", "demo", "export",
            "import", "export-features"]


def test_every_subcommand_is_covered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_documents_every_option_and_ends_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert re.search(r"examples?:\n  medusa-cache " + command + r" ", out), out[-400:]
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{command} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("command, required", [("dump", ["--model", "--data", "--out"]), ("train", ["--out"]),
                                               ("speculate", ["--model", "--heads", "--prompts"]),
                                               ("generate", ["--model", "--prompts", "--out"])])
def test_required_options_are_shown_as_required(command, required, capsys):
    with pytest.raises(SystemExit):
        main([command, "-h"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    for flag in required:
        assert re.search(rf"(?<!\[){flag}\s", usage), (flag, usage)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.fullmatch(r"medusa-cache \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_the_next_commands_train_prints_run_as_printed_with_a_space_in_the_path(tmp_path, dumped):
    """The `next:` lines are shell-quoted: the export line, split as a shell splits it, runs."""
    import shlex

    from conftest import run_cli

    out = tmp_path / "my heads"
    p = run_cli("train", "--cache", str(dumped), "--out", str(out), "--num-heads", "2", "--epochs", "1",
                "--batch-tokens", "512")
    export = next(x for x in p.stdout.splitlines() if "medusa-cache export" in x).strip()
    assert shlex.quote(str(out)) in export
    run_cli(*shlex.split(export)[1:])
    assert (tmp_path / "my heads-vllm" / "config.json").exists()
