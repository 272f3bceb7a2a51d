"""The first steps on an instruct chat model (SmolLM2-135M-Instruct's kind: ChatML, default system prompt), on a
tiny random Llama with that template: generate batches chat rows and answers user-only rows, long commands log
progress without a terminal, dump checks model-dependent options before writing anything, export writes the
reference layout once."""

from __future__ import annotations

import json

import pytest
import transformers
from conftest import run_cli, write_jsonl

from medusa_cache.errors import UserError
from medusa_cache.generate import GenerateConfig, generate

CHATS = [
    {"messages": [{"role": "user", "content": "Name three colours."}]},
    {"messages": [{"role": "user", "content": "Write a long and careful explanation of why the sky is blue."}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "old answer"},
                  {"role": "user", "content": "And then, what happened next in the story?"},
                  {"role": "assistant", "content": "old"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]},
    {"messages": [{"role": "user", "content": "Translate 'cat' to French."}, {"role": "assistant", "content": "x"},
                  {"role": "user", "content": "And to German?"}]},
]


def _count_generate_calls(monkeypatch) -> list:
    calls = []
    real = transformers.GenerationMixin.generate

    def counting(self, *a, **k):
        calls.append(k["input_ids"].shape[0] if "input_ids" in k else a[0].shape[0])
        return real(self, *a, **k)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", counting)
    return calls


def test_generate_batches_chat_rows_with_the_answers_of_one_at_a_time(tmp_path, tiny_chatml, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", CHATS)
    one = tmp_path / "one.jsonl"
    generate(GenerateConfig(model=str(tiny_chatml), prompts=str(prompts), out=str(one), max_new_tokens=6,
                            batch_size=1))
    calls = _count_generate_calls(monkeypatch)
    many = tmp_path / "many.jsonl"
    generate(GenerateConfig(model=str(tiny_chatml), prompts=str(prompts), out=str(many), max_new_tokens=6,
                            batch_size=8))
    # 7 assistant turns to write (2 regenerated, 5 answered): round 1 answers every row's first turn in one
    # batch, round 2 the second turns of the two multi-turn rows
    assert calls == [5, 2]
    assert one.read_text() == many.read_text()
    rows = [json.loads(x) for x in many.read_text().splitlines()]
    assert [[m["role"] for m in r["messages"]] for r in rows] == [
        ["user", "assistant"], ["user", "assistant"], ["user", "assistant", "user", "assistant"],
        ["system", "user", "assistant"], ["user", "assistant", "user", "assistant"]]
    assert all(m["content"] not in ("old", "old answer", "x") for r in rows for m in r["messages"])
    assert [m["content"] for m in rows[3]["messages"][:2]] == ["Be brief.", "2+2?"]


def test_a_chat_row_that_can_yield_nothing_is_refused_by_name(tmp_path, tiny_chatml):
    rows = CHATS[:2] + [{"messages": [{"role": "system", "content": "You are terse."}]}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(UserError, match=r"--prompts: .*p\.jsonl:3: nothing to generate"):
        generate(GenerateConfig(model=str(tiny_chatml), prompts=str(prompts), out=str(tmp_path / "o.jsonl")))
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_logs_plain_progress_lines_without_a_terminal(tmp_path, tiny_chatml):
    prompts = write_jsonl(tmp_path / "p.jsonl", CHATS * 2)
    p = run_cli("generate", "--model", str(tiny_chatml), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                "--max-new-tokens", "3", "--batch-size", "2", "--threads", "1")
    lines = [x for x in p.stderr.splitlines() if x.startswith("generate: ")]
    assert lines and lines[-1].startswith("generate: 10/10 rows (100%)") and "ETA" in lines[-1]


def test_dump_int8_default_group_divides_the_hidden_size_and_a_bad_group_writes_nothing(tmp_path, tiny_chatml):
    from medusa_cache.dump import DumpConfig, default_int8_group, run_dump
    from medusa_cache.store import Cache

    assert (default_int8_group(576), default_int8_group(4096), default_int8_group(3584)) == (96, 128, 128)
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a b c"},
                                                            {"role": "assistant", "content": "d e f g"}]}] * 3)
    common = dict(model=str(tiny_chatml), data=[str(data)], hidden_codec="int8", dtype="float32")
    with pytest.raises(UserError, match="--int8-group: 24 does not divide the model's hidden size 32"):
        run_dump(DumpConfig(out=str(tmp_path / "bad"), int8_group=24, **common))
    assert not (tmp_path / "bad").exists()
    s = run_dump(DumpConfig(out=str(tmp_path / "ok"), **common))  # hidden size 32: the old default 128 failed
    assert s["int8_group"] == 32 and Cache(tmp_path / "ok").int8_group == 32
