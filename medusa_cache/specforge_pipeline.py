"""``--pipeline specforge``: the token ids and loss mask SpecForge's Eagle3 data path produces, per conversation.

What SpecForge (0.2.0, main at a6b6b02) does, stated here as behaviour (docs/data-pipeline.md has the side by
side with our own pipeline, and ``tests/test_specforge.py`` checks golden files written by SpecForge's own code):

1. ShareGPT conversion (its ``scripts/prepare_data.py``): ``from`` human -> user; gpt, chatgpt, bing, bard ->
   assistant; **every other turn is dropped** (system, function_call, observation, tool, ...). Rows already in
   role/content form (its own format, OpenAI messages) are passed on unchanged.
2. Turns (its ``GeneralParser``): role from ``role`` (or ``from``), content from ``content`` (or ``value``, or
   ""), human/gpt renamed. A leading system turn is kept; otherwise the template's default system prompt is
   inserted (Llama-3: a ~106-token "You are a helpful, respectful and honest assistant..."; Qwen: "You are a
   helpful assistant."). Leading turns before the first user turn are dropped. The conversation is cut at the
   first assistant turn not preceded by user/tool, or tool turn not preceded by assistant/tool.
3. Rendering: the tokenizer's own chat template (``add_generation_prompt=False``, no tools); tokenised without
   special tokens and truncated at ``--max-length`` (2048 by default, as SpecForge).
4. Mask: every match of ``assistant_header (.*?) (end_of_turn | end of text)`` is trained, from token
   ``len(encode(text[:start]))`` to ``len(encode(text[:end]))`` (so the end-of-turn token is trained), capped at
   the truncated length.

``--system-prompt TEXT`` replaces the template's default (``none``: no default prompt).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .data import Example, Row, RowError, tokens_example
from .errors import UserError


@dataclass(frozen=True)
class SpecForgeTemplate:
    """The fields of SpecForge's template registry that its general parser uses."""

    assistant_header: str
    user_header: str
    system_prompt: str
    end_of_turn: str


TEMPLATES = {
    "llama3": SpecForgeTemplate(
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        user_header="<|start_header_id|>user<|end_header_id|>",
        system_prompt="You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
        "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
        "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in "
        "nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why instead of "
        "answering something not correct. If you don't know the answer to a question, please don't share false "
        "information.",
        end_of_turn="<|eot_id|>",
    ),
    "qwen": SpecForgeTemplate(
        assistant_header="<|im_start|>assistant\n",
        user_header="<|im_start|>user\n",
        system_prompt="You are a helpful assistant.",
        end_of_turn="<|im_end|>\n",
    ),
}


def detect_template(tokenizer, name: str | None) -> SpecForgeTemplate:
    if name:
        if name not in TEMPLATES:
            raise UserError(f"--specforge-template: unknown template {name!r} (known: {', '.join(TEMPLATES)})")
        return TEMPLATES[name]
    text = getattr(tokenizer, "chat_template", None) or ""
    if "<|start_header_id|>" in text:
        return TEMPLATES["llama3"]
    if "<|im_start|>" in text:
        return TEMPLATES["qwen"]
    raise UserError("--pipeline specforge: cannot tell which SpecForge template this tokenizer's chat template "
                    f"corresponds to; pass --specforge-template ({', '.join(TEMPLATES)})")


def arrange(turns: list[dict], system_prompt: str | None) -> list[dict]:
    """Step 2: the messages SpecForge hands to the chat template."""
    conv = []
    for t in turns:
        role = t.get("role", t.get("from", ""))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        conv.append({"role": role, "content": t.get("content") or t.get("value") or "",
                     **({"tool_calls": t["tool_calls"]} if "tool_calls" in t else {})})
    messages = []
    if conv and conv[0]["role"] == "system":
        messages.append({"role": "system", "content": conv[0]["content"]})
        conv = conv[1:]
    elif system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    while conv and conv[0]["role"] != "user":
        conv = conv[1:]
    for j, m in enumerate(conv):
        prev = conv[j - 1]["role"] if j else None
        if (m["role"] == "tool" and prev not in ("assistant", "tool")) or \
                (m["role"] == "assistant" and j and prev not in ("user", "tool")):
            break
        messages.append(m)
    return messages


class SpecForgeTemplater:
    """Steps 3 and 4 for rows read with ``read_rows(..., pipeline="specforge")``."""

    def __init__(self, tokenizer, template: SpecForgeTemplate, max_length: int, system_prompt: str | None = None):
        self.tok, self.t, self.max_length = tokenizer, template, max_length
        self.system_prompt = template.system_prompt if system_prompt is None else (
            "" if system_prompt.lower() == "none" else system_prompt)
        self.pattern = re.compile(re.escape(template.assistant_header) + r"([\s\S]*?(?:" +
                                  re.escape(template.end_of_turn) + "|$))", re.DOTALL)
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--pipeline specforge: the tokenizer has no chat template (SpecForge renders with it)")

    def _count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"])

    def encode_row(self, row: Row) -> Example | RowError:
        if row.token_ids is not None:
            return tokens_example(row, self.max_length)
        if row.text is not None:
            ids = self.tok(row.text, add_special_tokens=True)["input_ids"][: self.max_length]
            return Example(np.asarray(ids, np.int32), np.ones(len(ids), bool), row.file_index, row.row_index)
        messages = arrange(row.messages or [], self.system_prompt)  # no assistant left: an all-zero mask, dropped
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        ids = self.tok(text, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
        mask = np.zeros(len(ids), dtype=bool)
        for m in self.pattern.finditer(text):
            lo = min(self._count(text[: m.start(1)]), len(ids))
            hi = min(self._count(text[: m.end(1)]), len(ids))
            mask[lo:hi] = True
        return Example(np.asarray(ids, np.int32), mask, row.file_index, row.row_index)

    def encode_many(self, rows: list[Row]) -> list[Example | RowError]:
        return [self.encode_row(r) for r in rows]
