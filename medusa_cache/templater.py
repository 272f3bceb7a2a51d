"""Chat template rendering and the assistant-only loss mask.

Assistant spans, for any template: render the conversation once, and render each prefix that ends
just before an assistant turn (with ``add_generation_prompt=True``) and just after it. The characters
between the two renders are the assistant's span (its content and the end-of-turn marker the template
puts after it). The full text is tokenised once with character offsets, and a token is trained when
it starts inside an assistant span. A template that rewrites earlier turns when later ones are added
is not prefix-stable and is refused (the error says so). Templates with ``{% generation %}`` markers
give the same mask through transformers' ``return_assistant_tokens_mask`` (tested).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .data import Example, Row, RowError, tokens_example
from .errors import UserError


class Templater:
    """Renders conversations with a chat template and finds the assistant token mask."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None, max_length: int = 2048):
        self.tok = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        self.max_length = max_length

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool, tools: list | None = None) -> str:
        if not self.template:
            raise UserError(
                "the tokenizer has no chat template; pass --chat-template FILE (a Jinja template), "
                "or use rows of format 'text'"
            )
        return self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt,
            **({"tools": tools} if tools else {}),
        )

    def check_fields(self, row: Row) -> None:
        """A field the template would not render is an error, never a silent drop."""
        if row.tools and "tools" not in self.template:
            raise RowError(f"{row.where}: field 'tools' is set but the chat template does not render tools (they "
                           "would be dropped); use a template that renders them (--chat-template), remove the "
                           "field, or --skip-bad-rows")
        if any("tool_calls" in m for m in row.messages or []) and "tool_calls" not in self.template:
            raise RowError(f"{row.where}: an assistant turn has 'tool_calls' but the chat template does not render "
                           "them (they would be dropped); use a template that does (--chat-template)")

    def assistant_char_spans(self, messages: list[dict[str, str]], where: str, tools: list | None = None
                             ) -> tuple[str, list[tuple[int, int]]]:
        render = functools.partial(self.render, tools=tools)
        full = render(messages, add_generation_prompt=False)
        spans = []
        prev = ""
        for i, m in enumerate(messages):
            upto = render(messages[: i + 1], add_generation_prompt=False)
            if upto.startswith(prev) and m["content"].strip() not in upto[len(prev):]:
                raise RowError(f"{where}: the chat template drops the text of turn {i} (role {m['role']}): it "
                               "renders to nothing or without its content; use a template that has this role, or "
                               "--skip-bad-rows to skip such rows")
            prev = upto
            if m["role"] != "assistant":
                continue
            before = render(messages[:i], add_generation_prompt=True) if i else ""
            after = render(messages[: i + 1], add_generation_prompt=False)
            if not (full.startswith(after) and after.startswith(before)):
                raise RowError(
                    f"{where}: the chat template is not prefix-stable (rendering turn {i} changes earlier "
                    "text), so assistant spans cannot be found by prefix rendering"
                )
            start = len(before)
            if i == 0:  # assistant-first: the template's preamble (BOS, header, default prompt) is not the turn's
                start = after.find(m["content"].strip())
            if len(after) > start:
                spans.append((start, len(after)))
        return full, spans

    def encode(self, row: Row) -> Example:
        out = self.encode_many([row])[0]
        if isinstance(out, RowError):
            raise out
        return out

    def encode_many(self, rows: list[Row]) -> list[Example | RowError]:
        """Render each row, then tokenise them in two batched calls (the Rust tokenizer runs them in parallel)."""
        rendered: list[tuple[str, list[tuple[int, int]] | None] | RowError | None] = []
        for row in rows:
            if row.token_ids is not None:
                rendered.append(None)  # used verbatim below
                continue
            if row.text is not None:
                rendered.append((row.text, None))
                continue
            try:
                self.check_fields(row)
                rendered.append(self.assistant_char_spans(row.messages or [], row.where, row.tools))
            except RowError as e:
                rendered.append(e)
        out: list[Example | RowError | None] = [r if isinstance(r, RowError) else None for r in rendered]
        for i, row in enumerate(rows):
            if row.token_ids is not None:
                out[i] = tokens_example(row, self.max_length)
        for plain in (True, False):
            idx = [i for i, r in enumerate(rendered) if r is not None and not isinstance(r, RowError)
                   and (r[1] is None) == plain]
            if not idx:
                continue
            enc = self.tok([rendered[i][0] for i in idx], add_special_tokens=plain,  # type: ignore[index]
                           return_offsets_mapping=not plain)
            for j, i in enumerate(idx):
                ids = np.asarray(enc["input_ids"][j], dtype=np.int32)
                if plain:
                    mask = np.ones(len(ids), dtype=bool)
                else:
                    starts = np.asarray([st for st, _ in enc["offset_mapping"][j]], dtype=np.int64)
                    mask = np.zeros(len(ids), dtype=bool)
                    for lo, hi in rendered[i][1]:  # type: ignore[index,union-attr]
                        mask |= (starts >= lo) & (starts < hi)
                out[i] = Example(ids[: self.max_length], mask[: self.max_length], rows[i].file_index, rows[i].row_index)
        return out  # type: ignore[return-value]
