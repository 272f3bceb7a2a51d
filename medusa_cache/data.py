"""Reading chat data and turning it into token ids plus an assistant-only loss mask.

Formats (detected per file from the first row, or forced with ``--format``):
- ``sharegpt``:  ``{"conversations": [{"from": "human"|"gpt"|..., "value": ...}]}``
- ``specforge``: ``{"id", "conversations": [{"role", "content"}]}`` (SpecForge's preformatted rows)
- ``messages``:  ``{"messages": [{"role", "content"}]}`` (OpenAI)
- ``text``:      ``{"text": ...}``: the whole row is trained (no chat template).
- ``tokens``:    ``{"input_ids": [...], "trained": [0/1 ...]}`` (what ``generate`` writes, any extra ``text`` is
  ignored): stored verbatim, no tokeniser involved; ``trained`` (or ``loss_mask``) marks the trained tokens.
- ``questions``: Spec-Bench's and MT-Bench's question files, ``{"question_id", "category", "turns": [str, ...]}``:
  user turns only, answered turn by turn (``generate``, ``speculate``, ``eval --heldout-prompts``); nothing to
  train on until ``generate`` has answered them.

Roles are normalised to system / user / assistant / tool (table ``ROLE_MAP``). Deliberate choices:
ShareGPT ``function_call`` is text the assistant generates, so it becomes an *assistant* turn and is
trained; ``observation`` / ``tool`` / ``function`` / ``ipython`` are tool outputs the model reads, so
they become ``tool`` turns and are never trained. Any other role is an error naming file and row.
The chat template and the assistant-token mask: ``templater.Templater``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

FORMATS = ("auto", "sharegpt", "specforge", "messages", "text", "tokens", "questions")

ROLE_MAP = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}


class RowError(UserError):
    """A problem with one data row; skippable with ``--skip-bad-rows``."""


@dataclass
class Row:
    file_index: int
    row_index: int
    where: str  # "file:line" for messages
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    dropped_turns: int = 0  # --pipeline specforge: ShareGPT turns its conversion drops
    tools: list | None = None  # the row's tool specs, rendered through the chat template's `tools`
    token_ids: list[int] | None = None  # format "tokens": ids and trained mask, used verbatim
    token_mask: list[int] | None = None
    turns: list[str] | None = None  # format "questions": the user turns, answered one after another
    category: str | None = None  # format "questions": the benchmark's category of the question
    question_id: Any = None


@dataclass
class Example:
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]
    file_index: int
    row_index: int


def read_rows(path: Path, file_index: int, fmt: str = "auto", pipeline: str = "medusa-cache", flag: str = "--data"
              ) -> Iterator[Row | RowError]:
    """Yield normalised rows of one JSON/JSONL file; per-row problems are yielded as RowError values.

    ``pipeline="specforge"``: chat turns are converted as SpecForge converts them (``specforge_pipeline``)
    instead of by ``ROLE_MAP``.
    """
    if not path.exists():
        raise UserError(f"{flag}: file not found: {path}")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raise UserError(f"{path}:1: the file starts with a UTF-8 byte-order mark (BOM); JSON does not allow one: "
                        "save it as UTF-8 without BOM (e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' FILE`)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        if not path.suffix == ".jsonl":
            raise UserError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
        text = None
    records: list[tuple[int, Any]] = []
    stripped = (text or "").lstrip()
    if text is not None and path.suffix != ".jsonl" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        records = [(i + 1, r) for i, r in enumerate(data)]
        where_kind = "row"
    else:
        where_kind = "line"
        if text is not None and stripped[:1] in ("[", "{"):
            _refuse_json_in_jsonl(path, text, stripped)
        for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
            if not line_bytes.strip():
                continue
            try:
                line = line_bytes.decode("utf-8")
            except UnicodeDecodeError:
                records.append((lineno, RowError(f"{path}:{lineno}: not valid UTF-8")))
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                records.append((lineno, RowError(f"{path}:{lineno}: malformed JSON line: {e.msg}")))
    file_fmt = fmt
    for n, (lineno, rec) in enumerate(records):
        where = f"{path}:{lineno}" if where_kind == "line" else f"{path} row {lineno}"
        if isinstance(rec, RowError):
            yield rec
            continue
        if file_fmt == "auto":
            file_fmt = detect_format(rec, where)
        try:
            if pipeline == "specforge" and file_fmt not in ("text", "tokens", "questions"):
                yield _specforge_row(rec, file_fmt, Row(file_index, n, where))
            else:
                yield normalise(rec, file_fmt, Row(file_index, n, where))
        except RowError as e:
            yield e


def _refuse_json_in_jsonl(path: Path, text: str, stripped: str) -> None:
    """A .jsonl file that holds one JSON document (an array, or a pretty-printed object) rather than lines."""
    first = stripped.splitlines()[0].strip()
    try:
        json.loads(first)
        return  # the first line is a JSON value on its own: JSON Lines
    except json.JSONDecodeError:
        pass
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return  # genuinely malformed lines: reported line by line
    kind = "a JSON array" if isinstance(doc, list) else "one pretty-printed JSON object"
    fix = "rename it to .json (a JSON array of rows is read as such)" if isinstance(doc, list) else \
        "wrap it in [...] and name it .json"
    raise UserError(f"{path}:1: this file holds {kind} spread over several lines, not one JSON value per "
                    f"line (JSON Lines); {fix}, or write one row per line")


def detect_format(rec: Any, where: str) -> str:
    if isinstance(rec, dict):
        if "input_ids" in rec:
            return "tokens"
        if "turns" in rec:
            return "questions"
        if isinstance(rec.get("conversations"), list) and rec["conversations"]:
            first = rec["conversations"][0]
            if isinstance(first, dict) and "from" in first:
                return "sharegpt"
            if isinstance(first, dict) and "role" in first:
                return "specforge"
        if isinstance(rec.get("messages"), list):
            return "messages"
        if "text" in rec:
            return "text"
    raise UserError(
        f"{where}: unknown data format (expected 'conversations' with from/value or role/content, "
        "'messages', 'text', 'input_ids' or 'turns'); use --format to force one"
    )


def normalise(rec: Any, fmt: str, row: Row) -> Row:
    """One input record as a ``Row`` of its format (token ids, text, or chat messages and tools), or ``RowError``
    naming the file, the row and what is wrong."""
    if not isinstance(rec, dict):
        raise RowError(f"{row.where}: expected a JSON object, got {type(rec).__name__}")
    if fmt == "tokens":
        return _tokens_row(rec, row)
    if fmt == "questions":
        return _question_row(rec, row)
    if fmt == "text":
        text = rec.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"{row.where}: empty or missing 'text'")
        row.text = text
        return row
    return _chat_row(rec, fmt, row)


def _tokens_row(rec: dict, row: Row) -> Row:
    ids, mask = rec.get("input_ids"), rec.get("trained", rec.get("loss_mask"))
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise RowError(f"{row.where}: 'input_ids' must be a non-empty list of token ids (non-negative integers)")
    if not isinstance(mask, list) or len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
        raise RowError(f"{row.where}: 'trained' must be a list of 0/1, one per input id ({len(ids)})")
    row.token_ids, row.token_mask = ids, mask
    return row


def _question_row(rec: dict, row: Row) -> Row:
    turns, category = rec.get("turns"), rec.get("category")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise RowError(f"{row.where}: 'turns' must be a non-empty list of non-empty strings (the user turns of a "
                       "Spec-Bench / MT-Bench question)")
    if category is not None and not isinstance(category, str):
        raise RowError(f"{row.where}: 'category' must be a string, got {type(category).__name__}")
    row.turns, row.category, row.question_id = turns, category, rec.get("question_id")
    return row


def _chat_row(rec: dict, fmt: str, row: Row) -> Row:
    key, role_key, content_key = {
        "sharegpt": ("conversations", "from", "value"),
        "specforge": ("conversations", "role", "content"),
        "messages": ("messages", "role", "content"),
    }[fmt]
    turns = rec.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"{row.where}: missing or empty '{key}' for format {fmt}")
    messages = []
    system = rec.get("system")  # ShareGPT's top-level system prompt
    if system is not None:
        if not isinstance(system, str):
            raise RowError(f"{row.where}: field 'system' must be a string, got {type(system).__name__}")
        if system.strip():
            messages.append({"role": "system", "content": system})
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or (content_key not in turn and "tool_calls" not in turn):
            raise RowError(f"{row.where}: turn {j} lacks '{role_key}'/'{content_key}' (format {fmt})")
        role = ROLE_MAP.get(str(turn[role_key]).lower())
        if role is None:
            raise RowError(
                f"{row.where}: turn {j} has unknown role {turn[role_key]!r} "
                f"(known: {', '.join(sorted(ROLE_MAP))})"
            )
        content = _content_text(turn.get(content_key), f"{row.where}: turn {j} field '{content_key}'")
        tool_calls = turn.get("tool_calls")
        if not content.strip() and not tool_calls:
            raise RowError(f"{row.where}: turn {j} ({turn[role_key]}) has empty content")
        if messages and messages[-1]["role"] == role == "assistant" and not tool_calls and \
                "tool_calls" not in messages[-1]:
            # function_call right after a gpt turn: one assistant turn, as the model generates it
            messages[-1]["content"] += "\n" + content
            continue
        messages.append({"role": role, "content": content, **({"tool_calls": tool_calls} if tool_calls else {})})
    if messages and messages[0]["role"] == "system" and system and len(messages) > 1 and \
            messages[1]["role"] == "system":
        raise RowError(f"{row.where}: both a top-level 'system' field and a system turn; keep one")
    row.tools = _tools(rec, row)
    row.messages = messages
    return row


def _tools(rec: dict, row: Row) -> list | None:
    """The row's tool specs (a list, or a JSON string of one, as glaive writes them), or None."""
    tools = rec.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            raise RowError(f"{row.where}: field 'tools' is a string that is not JSON") from None
    if tools is not None and not isinstance(tools, list):
        raise RowError(f"{row.where}: field 'tools' must be a list of tool specs, got {type(tools).__name__}")
    return tools or None


def _content_text(content: Any, where: str) -> str:
    """A message's text: a string, or OpenAI content parts whose text parts are joined (as templates join them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError(f"{where}: content part {k} is of type {kind!r}; only text parts can be trained on")
        return "".join(texts)
    raise RowError(f"{where}: expected a string or a list of content parts, got {type(content).__name__}")


# SpecForge's step 1 (docs/data-pipeline.md) lives here, with the other formats: specforge_pipeline builds on data,
# never the other way round
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant"}


def convert_turns(turns: list[dict], fmt: str) -> tuple[list[dict], int]:
    """SpecForge's step 1: (turns as role/content dicts, number of ShareGPT turns dropped)."""
    if fmt != "sharegpt":
        return [dict(t) for t in turns], 0
    kept = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns if t.get("from") in
            SHAREGPT_ROLES]
    return kept, len(turns) - len(kept)



def _specforge_row(rec: Any, fmt: str, row: Row) -> Row:
    key = "messages" if fmt == "messages" else "conversations"
    turns = rec.get(key) if isinstance(rec, dict) else None
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise RowError(f"{row.where}: missing or empty '{key}' for format {fmt}")
    row.messages, row.dropped_turns = convert_turns(turns, fmt)
    return row


def tokens_example(row: Row, max_length: int) -> Example:
    ids = np.asarray(row.token_ids, dtype=np.int32)[:max_length]
    return Example(ids, np.asarray(row.token_mask, dtype=bool)[:max_length], row.file_index, row.row_index)
