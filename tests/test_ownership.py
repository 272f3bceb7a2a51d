"""An output belongs to the command that wrote it: every writing command x every kind of existing target, run.

`--overwrite` (where a command has it) replaces only what the same command wrote; commands without it write only
into a new directory or one they wrote. A file, an input, another command's output, a foreign directory and a
cache (for anything but dump) are refused by name with exit 2, and nothing is changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import write_jsonl

from medusa_cache.cli import main
from medusa_cache.export import export
from medusa_cache.train import TrainConfig, train

TARGETS = ["other-command", "input", "foreign-dir", "file", "cache"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, dumped, tiny_llama):
    d = tmp_path_factory.mktemp("owned")
    train(TrainConfig(cache=str(dumped), out=str(d / "heads"), num_heads=2, epochs=1, max_steps=1))
    export(d / "heads", "vllm", d / "exported")
    prompts = write_jsonl(d / "p.jsonl", [{"text": "Once upon a time"}])
    return {"heads": d / "heads", "exported": d / "exported", "prompts": prompts, "cache": dumped, "model": tiny_llama}


def _command(name: str, out: str, o: dict) -> list[str]:
    return {
        "dump": ["dump", "--model", str(o["model"]), "--data", str(o["prompts"]), "--out", out, "--overwrite"],
        "train": ["train", "--cache", str(o["cache"]), "--out", out, "--overwrite", "--max-steps", "1"],
        "ablate": ["ablate", "--cache", str(o["cache"]), "--out", out, "--overwrite", "--heads", "1", "--epochs", "1",
                   "--verify-cost", "0.01"],
        "export": ["export", str(o["heads"]), "--format", "vllm", "--out", out, "--overwrite"],
        "speculate": ["speculate", "--model", str(o["model"]), "--heads", str(o["heads"]), "--prompts",
                      str(o["prompts"]), "--chain", "--max-new-tokens", "2", "--out", out],
        "eval": ["eval", "--heads", str(o["heads"]), "--cache", str(o["cache"]), "--tree-budget", "2", "--trees-out",
                 out],
        "demo": ["demo", "--out", out],
        "generate": ["generate", "--model", str(o["model"]), "--prompts", str(o["prompts"]), "--out", out,
                     "--overwrite", "--max-new-tokens", "2"],
    }[name]


def _target(kind: str, command: str, tmp: Path, o: dict) -> str:
    if kind == "other-command":
        src = o["exported"] if command != "export" else o["heads"]
        shutil.copytree(src, tmp / "t")
        return str(tmp / "t")
    if kind == "input":
        return {"dump": str(o["prompts"]), "train": str(o["cache"]), "ablate": str(o["cache"]),
                "export": str(o["heads"]), "speculate": str(o["heads"]), "eval": str(o["heads"]),
                "demo": str(o["heads"]), "generate": str(o["prompts"])}[command]
    if kind == "foreign-dir":
        (tmp / "t").mkdir()
        (tmp / "t" / "notes.txt").write_text("mine")
        return str(tmp / "t")
    if kind == "file":
        (tmp / "t").write_text('{"text": "a file of mine"}\n')
        return str(tmp / "t")
    shutil.copytree(o["cache"], tmp / "t")  # a cache store
    return str(tmp / "t")


def _snapshot(*roots) -> dict:
    out = {}
    for r in roots:
        r = Path(r)
        for f in ([r] if r.is_file() else sorted(r.rglob("*"))):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


CASES = [(c, t) for c in ("dump", "train", "ablate", "export", "speculate", "eval", "demo", "generate")
         for t in TARGETS if not (c == "dump" and t == "cache")]


@pytest.mark.parametrize("command, target", CASES)
def test_a_command_never_writes_over_what_is_not_its_own(command, target, tmp_path, outputs, capsys):
    out = _target(target, command, tmp_path, outputs)
    before = _snapshot(tmp_path, *[v for v in outputs.values()])
    rc = main(_command(command, out, outputs))
    err = capsys.readouterr().err
    assert rc == 2, (command, target, err)
    lines = [x for x in err.splitlines() if x.startswith("medusa-cache ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert _snapshot(tmp_path, *[v for v in outputs.values()]) == before, (command, target, "changed")


def test_commands_replace_their_own_output(tmp_path, outputs, capsys):
    for command in ("export", "speculate", "eval", "generate"):
        out = str(tmp_path / command)
        assert main(_command(command, out, outputs)) == 0
        assert main(_command(command, out, outputs)) == 0, capsys.readouterr().err  # again: its own output


def test_generate_resume_continues_only_the_same_run(tmp_path, outputs, capsys):
    out = tmp_path / "g.jsonl"
    args = ["generate", "--model", str(outputs["model"]), "--prompts", str(outputs["prompts"]), "--out", str(out)]
    assert main(args + ["--max-new-tokens", "2"]) == 0
    assert main(args + ["--max-new-tokens", "3", "--resume"]) == 2
    assert "generated with a different max_new_tokens" in capsys.readouterr().err
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "A dragon"}])
    args[4] = str(other)
    assert main(args + ["--max-new-tokens", "2", "--resume"]) == 2
    assert "different prompts" in capsys.readouterr().err
    assert json.loads(out.read_text().splitlines()[0])["text"].startswith("Once upon a time")


def test_generate_refuses_an_output_file_inside_a_store_or_another_commands_output(tmp_path, dumped):
    """A rows file inside a cache (or an ablate's best/) would be deleted by that output's --overwrite: refused."""
    import shutil

    from medusa_cache.demo import DEMO
    from medusa_cache.errors import UserError
    from medusa_cache.generate import GenerateConfig, generate
    from medusa_cache.rundir import claim

    shutil.copytree(dumped, tmp_path / "c")
    claim(tmp_path / "abl", kind="ablate")
    (tmp_path / "abl" / "best").mkdir()
    for out, what in ((tmp_path / "c" / "rows.jsonl", "a cache store"),
                      (tmp_path / "abl" / "best" / "rows.jsonl", "the output of `medusa-cache ablate`")):
        with pytest.raises(UserError, match=f"--out: .* lies inside .*, {what}; its --overwrite would delete"):
            generate(GenerateConfig(model=str(DEMO / "stories260K"), prompts=str(DEMO / "heldout_prompts.jsonl"),
                                    out=str(out)))
        assert not out.exists()
