"""Chat data: formats, roles, and the assistant-only loss mask on real templates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medusa_cache.data import RowError, read_rows
from medusa_cache.errors import UserError
from medusa_cache.templater import Templater

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green, or maybe red."},
]


def _row(messages):
    from medusa_cache.data import Row

    return Row(0, 0, "test", messages=[dict(m) for m in messages])


def masked_text(tok, ex) -> list[str]:
    """Decode each maximal run of trained tokens."""
    runs, cur = [], []
    for t, m in zip(ex.input_ids, ex.loss_mask, strict=True):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_llama3_mask_is_exactly_the_assistant_turns(llama_tok):
    ex = Templater(llama_tok).encode(_row(CONV))
    assert masked_text(llama_tok, ex) == ["Blue.<|eot_id|>", "Green, or maybe red.<|eot_id|>"]
    assert ex.input_ids[0] == llama_tok.convert_tokens_to_ids("<|begin_of_text|>")


def test_qwen2_mask_is_exactly_the_assistant_turns(qwen_tok):
    ex = Templater(qwen_tok).encode(_row(CONV))
    assert masked_text(qwen_tok, ex) == ["Blue.<|im_end|>\n", "Green, or maybe red.<|im_end|>\n"]


def test_generation_markers_agree_with_prefix_rendering(llama_tok):
    """A template with {% generation %} markers: transformers' mask equals ours."""
    tpl = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}"
        "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    ours = Templater(llama_tok, tpl).encode(_row(CONV))
    theirs = llama_tok.apply_chat_template(CONV, chat_template=tpl, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert ours.input_ids.tolist() == list(theirs["input_ids"])
    assert ours.loss_mask.astype(int).tolist() == list(theirs["assistant_masks"])
    assert ours.loss_mask.sum() > 0


def test_truncation_keeps_the_prefix(llama_tok):
    full = Templater(llama_tok).encode(_row(CONV))
    cut = Templater(llama_tok, max_length=20).encode(_row(CONV))
    assert len(cut.input_ids) == 20
    assert np.array_equal(cut.input_ids, full.input_ids[:20])
    assert np.array_equal(cut.loss_mask, full.loss_mask[:20])


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sharegpt"),
        ({"id": "1", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
         "specforge"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
    ],
)
def test_formats_normalise_to_the_same_messages(tmp_path, row, fmt):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(row) + "\n")
    (r,) = list(read_rows(p, 0))
    assert r.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_text_rows_train_every_token(tmp_path, llama_tok):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "Once upon a time"}) + "\n")
    (r,) = list(read_rows(p, 0))
    ex = Templater(llama_tok).encode(r)
    assert ex.loss_mask.all() and len(ex.input_ids) > 3


def test_tool_roles_are_handled_deliberately(tmp_path):
    row = {"conversations": [{"from": "human", "value": "weather?"}, {"from": "function_call", "value": "{\"f\": 1}"},
                             {"from": "observation", "value": "{\"t\": 20}"}, {"from": "gpt", "value": "20C"}]}
    p = tmp_path / "d.json"
    p.write_text(json.dumps([row]))
    (r,) = list(read_rows(p, 0))
    assert [m["role"] for m in r.messages] == ["user", "assistant", "tool", "assistant"]


def test_real_toolcall_file_reads_without_errors(llama_tok):
    from conftest import CHAT, FIXTURES

    rows = list(read_rows(CHAT / "glaive_toolcall_sharegpt.json", 0))
    assert len(rows) == 300 and not any(isinstance(r, RowError) for r in rows)
    assert rows[0].tools and rows[0].tools[0]["name"] == "search_recipes"  # the row's `tools` field is kept
    with pytest.raises(RowError, match="field 'tools' is set but the chat template does not render tools"):
        Templater(llama_tok).encode(rows[0])  # the fixture Llama-3 template has no tools: refused, not dropped
    template = (FIXTURES / "templates" / "llama3_tools.jinja").read_text()
    ex = Templater(llama_tok, template).encode(rows[0])
    assert ex.loss_mask.any() and "search_recipes" in llama_tok.decode(ex.input_ids[~ex.loss_mask])


def test_no_field_of_a_row_is_silently_dropped(tmp_path, llama_tok):
    from conftest import FIXTURES

    template = (FIXTURES / "templates" / "llama3_tools.jinja").read_text()
    call = [{"type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]
    rows = [{"system": "Be brief.",
             "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                       {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": None, "tool_calls": call},
                          {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "Noon."}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                          {"role": "assistant", "content": "ok"}]}]
    a, b, c = [next(read_rows(_one(tmp_path, r), 0)) for r in rows]
    assert a.messages[0] == {"role": "system", "content": "Be brief."}
    assert b.messages[0]["content"] == "Hello there" and b.messages[1]["tool_calls"] == call
    assert isinstance(c, RowError) and "content part 0 is of type 'image_url'" in str(c)
    ex = Templater(llama_tok, template).encode(b)
    text = llama_tok.decode(ex.input_ids[ex.loss_mask])
    assert "get_time" in text and "Noon." in text  # the tool call is the assistant's text: trained
    with pytest.raises(RowError, match="'tool_calls' but the chat template does not render them"):
        Templater(llama_tok).encode(b)


def _one(tmp_path, row):
    p = tmp_path / f"r{abs(hash(json.dumps(row)))}.jsonl"
    p.write_text(json.dumps(row) + "\n")
    return p


@pytest.mark.parametrize(
    "content, expect",
    [
        ('{"conversations": [{"from": "wizard", "value": "x"}]}\n', ":1: turn 0 has unknown role 'wizard'"),
        ('{"conversations": [{"from": "human", "value": "  "}]}\n', ":1: turn 0 (human) has empty content"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [oops\n', ":2: malformed JSON line"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, content, expect):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    errors = [r for r in read_rows(p, 0) if isinstance(r, RowError)]
    assert errors and expect in str(errors[-1]) and str(p) in str(errors[-1])


def test_unknown_format_and_bad_utf8(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"prompt": "a"}\n')
    with pytest.raises(UserError, match="unknown data format"):
        list(read_rows(p, 0))
    q = tmp_path / "y.jsonl"
    q.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    rows = list(read_rows(q, 0))
    assert isinstance(rows[1], RowError) and ":2: not valid UTF-8" in str(rows[1])


def test_template_missing_is_a_clear_error():
    from conftest import STORIES
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    with pytest.raises(UserError, match="no chat template"):
        Templater(tok).encode(_row(CONV))


def test_a_template_that_renders_a_turn_to_nothing_is_an_error_naming_row_and_role(qwen_tok):
    """The fixture Qwen2 template has no tool role: a tool turn would vanish and glue the next reply on."""
    from conftest import CHAT

    from medusa_cache.data import RowError
    from medusa_cache.templater import Templater

    rows = [r for r in read_rows(CHAT / "glaive_toolcall_sharegpt.json", 0)
            if any(m["role"] == "tool" for m in r.messages)][:3]
    for r in rows:
        r.tools = None  # (the fixture template cannot render tools either: that is refused first)
    out = Templater(qwen_tok).encode_many(rows)
    assert all(isinstance(e, RowError) for e in out)
    assert "glaive_toolcall_sharegpt.json" in str(out[0]) and "(role tool)" in str(out[0])
    assert "drops the text of turn" in str(out[0])


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_an_assistant_first_conversation_trains_only_the_assistant_turn(which, llama_tok, qwen_tok):
    tok = llama_tok if which == "llama" else qwen_tok
    from medusa_cache.data import Row

    row = Row(0, 0, "f:1", messages=[{"role": "assistant", "content": "Hello! How can I help?"},
                                     {"role": "user", "content": "Tell me a joke."},
                                     {"role": "assistant", "content": "Why did the chicken cross the road?"}])
    ex = Templater(tok).encode(row)
    first = np.flatnonzero(ex.loss_mask)[0]
    trained = tok.decode(ex.input_ids[ex.loss_mask])
    assert tok.decode(ex.input_ids[:first]).endswith(("assistant<|end_header_id|>\n\n", "<|im_end|>\n"))
    assert trained.startswith("Hello! How can I help?") and "system" not in trained and "<|begin_of_text|>" not in \
        trained
    assert "Why did the chicken cross the road?" in trained and "Tell me a joke" not in trained
