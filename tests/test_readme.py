"""README's "On your own model" sequence runs as written (on the tiny Llama, with tiny configs swapped in)."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
from conftest import REPO, sharegpt_slice, write_jsonl

from medusa_cache.cli import main


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("On your own model:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    block = re.sub(r"\\\s*\n\s*", " ", block)  # continuation lines
    lines = [ln.split("#")[0].strip() for ln in block.splitlines()]
    return [c.strip() for ln in lines if ln for c in ln.split("&&")]


@pytest.mark.slow
def test_readme_sequence_runs_as_written(tmp_path, tiny_llama, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat.json").write_text(json.dumps(sharegpt_slice(40)))
    (tmp_path / "heldout.json").write_text(json.dumps(sharegpt_slice(12, start=200)))
    write_jsonl(tmp_path / "prompts.jsonl", [{"messages": r["messages"][:1]} for r in
                                             json.loads((REPO / "tests" / "fixtures" / "chat" / "kto_messages.json")
                                                        .read_text())[:2]])
    (tmp_path / "dump.json").write_text(json.dumps({"pipeline": "specforge", "specforge_template": "llama3",
                                                    "max_length": 256, "draft_vocab_size": 300, "dtype": "float32"}))
    (tmp_path / "train.json").write_text(json.dumps({"num_heads": 3, "epochs": 2, "lr": 1e-3, "grad_accum": 2,
                                                     "hidden_size": 32, "data_pipeline": "specforge"}))
    swap = {"PATH/TO/MODEL": str(tiny_llama), "configs/llama3-8B-dump.json": "dump.json",
            "configs/llama3-8B-medusa.json": "train.json", "--max-new-tokens 256": "--max-new-tokens 12",
            "--heldout-prompts prompts.jsonl": "--heldout-prompts prompts.jsonl --heldout-tokens 12",
            "--heldout-prompts question.jsonl": "--heldout-prompts question.jsonl --max-new-tokens 12"}
    commands = readme_commands()
    write_jsonl(tmp_path / "question.jsonl", [{"question_id": 1, "category": "writing", "turns": ["Hi.", "Again."]},
                                              {"question_id": 2, "category": "math", "turns": ["One plus one?"]}])
    assert [c.split()[1] for c in commands] == ["dump", "dump", "inspect", "verify", "train", "eval", "eval", "ablate",
                                                "ablate", "export", "speculate"]
    env = {**os.environ}
    for c in commands:
        for a, b in swap.items():
            c = c.replace(a, b)
        argv = shlex.split(c)[1:]
        rc = main(argv)
        assert rc == 0, (c, capsys.readouterr().err[-2000:])
        os.environ.update(env)
    out = capsys.readouterr().out
    assert "identical to greedy" in out and (tmp_path / "spec" / "results.json").exists()
    assert json.loads((tmp_path / "spec" / "results.json").read_text())["identical_to_greedy"]
