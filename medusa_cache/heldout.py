"""Held-out prompts decoded the way users decode them, and the cache of the model's own answers that ``eval`` scores.

Prompt files (``--prompts``, ``--heldout-prompts``): ``{"text"}`` rows are continued; chat rows are answered (their
trailing assistant turns dropped, the chat template's generation prompt added); Spec-Bench's and MT-Bench's question
files (``{"question_id", "category", "turns": [...]}``, not shipped here: see README) are answered turn by turn, every
next user turn appended after the model's own previous answer and the whole conversation rendered again through the
chat template, as Spec-Bench's harness does. ``walk_turns`` is that walk, the one used by ``speculate`` and by
``answer_cache``, so the prompt ids of every turn are the same in both.

``answer_cache`` writes each turn's prompt plus the model's greedy answer (its ids, never re-tokenised: token rows) and
dumps them with a given draft vocabulary. On that cache ``eval``'s tokens per step (the decoding walk over the heads'
teacher-forced ranks) is what ``speculate`` measures on the same prompts: equal step counts prompt by prompt in
float32 (tests/test_heldout.py), up to kernel rounding at near-ties elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import stop_ids
from .data import Row, RowError, read_rows
from .errors import UserError


@dataclass
class Turn:
    """One decoding run: a prompt (all turns before it answered by the model) to be answered."""

    question: int
    """index of the question (row) in the prompts file"""
    turn: int
    """0-based turn within the question"""
    category: str | None
    """the question's category (question files), else None"""
    ids: torch.Tensor
    """prompt token ids [L]"""


def read_prompts(path: str, limit: int | None = None, flag: str = "--prompts") -> list[Row]:
    """The rows of a prompts file (text, chat or question rows), each checked; at most ``limit``."""
    rows = []
    for row in read_rows(Path(path), 0, flag=flag):
        if isinstance(row, RowError):
            raise UserError(f"{flag}: {row}")
        if row.messages is None and row.text is None and row.turns is None:
            raise UserError(f"{flag}: {row.where}: a token row has no prompt to decode from; give {{\"text\"}}, chat "
                            "or question rows")
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{flag}: {path} holds no prompts")
    return rows


def _chat_ids(tok, messages: list[dict], flag: str) -> torch.Tensor:
    if not getattr(tok, "chat_template", None):
        raise UserError(f"{flag}: chat and question rows need a tokenizer with a chat template")
    return torch.tensor(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])


def walk_turns(tok, rows: list[Row], answer: Callable[[Turn], list[int]], flag: str = "--prompts"
               ) -> list[tuple[Turn, list[int]]]:
    """Every turn of every row with ``answer(turn)``'s token ids, in order; a question's next turn sees the text of
    the answers before it (decoded without special tokens and stripped, as Spec-Bench's harness keeps them)."""
    out = []
    for q, row in enumerate(rows):
        if row.text is not None:
            t = Turn(q, 0, row.category, tok(row.text, return_tensors="pt")["input_ids"][0])
            out.append((t, answer(t)))
        elif row.turns is not None:
            msgs: list[dict] = []
            for k, user in enumerate(row.turns):
                msgs.append({"role": "user", "content": user})
                t = Turn(q, k, row.category, _chat_ids(tok, msgs, flag))
                a = answer(t)
                out.append((t, a))
                msgs.append({"role": "assistant", "content": tok.decode(a, skip_special_tokens=True).strip()})
        else:
            msgs = list(row.messages)
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
            t = Turn(q, 0, row.category, _chat_ids(tok, msgs, flag))
            out.append((t, answer(t)))
    return out


@torch.inference_mode()
def greedy(model, prompt: torch.Tensor, max_new: int, stop: set[int]) -> list[int]:
    """The model's greedy answer to one prompt (batch 1, up to and including its first end-of-sequence token)."""
    gen = model.generate(prompt[None].to(model.device), attention_mask=torch.ones_like(prompt[None]).to(model.device),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=sorted(stop) or None,
                         pad_token_id=sorted(stop)[0] if stop else 0)
    return gen[0, len(prompt):].tolist()


@dataclass
class HeldOut:
    """The answered held-out prompts: their cache and each sequence's category."""

    cache: str
    categories: dict[int, str]
    """sequence index -> category (question files; empty for plain prompt files)"""
    questions: dict[int, int]
    """sequence index -> question (a question of several turns has a sequence per turn)"""
    prompts: int
    turns: int


def answer_cache(model_dir: str, prompts: str, out: Path, vocab_source: str | None, max_new: int = 256,
                 dtype: str = "float32", device: str = "cpu", limit: int | None = None) -> HeldOut:
    """``out/answers.jsonl`` (every turn's prompt + the model's greedy answer, token rows) and ``out/cache.zarr`` (their
    dump with ``vocab_source``'s draft vocabulary, a store or heads directory; None: the full vocabulary, in ``dtype``);
    reused when ``out/heldout.json`` records the same model, prompts and settings and the cache is complete (a copy of
    another command's ``heldout/`` directory is reused too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .dump import DumpConfig, run_dump
    from .fingerprint import file_hash, model_fingerprint
    from .store import Cache, is_store

    flag = "--heldout-prompts"
    rows = read_prompts(prompts, limit, flag)
    # what fixes the answers (the vocabulary does not: eval and ablate re-map the cache to the heads' own)
    settings = {"model": model_fingerprint(model_dir), "prompts": file_hash(Path(prompts)), "max_new_tokens": max_new,
                "dtype": dtype, "limit": limit}
    out.mkdir(parents=True, exist_ok=True)
    marker, answers, cache = out / "heldout.json", out / "answers.jsonl", out / "cache.zarr"
    reuse = marker.exists() and json.loads(marker.read_text()).get("settings") == settings and is_store(cache)
    if not reuse:
        try:
            tok = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32 if dtype == "float32" else torch.bfloat16).to(device).eval()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"--model: cannot load {model_dir}: {e}") from None
        stop = stop_ids(tok, model)
        from .progress import progress

        turns = walk_turns(tok, progress(rows, "answer held-out prompts", "prompt"),
                           lambda t: greedy(model, t.ids.to(device), max_new, stop), flag)
        with answers.open("w", encoding="utf-8") as f:
            for t, a in turns:
                f.write(json.dumps({"input_ids": t.ids.tolist() + a, "trained": [0] * len(t.ids) + [1] * len(a),
                                    "question": t.question, "turn": t.turn, "category": t.category}) + "\n")
        longest = max(len(t.ids) + len(a) for t, a in turns)
        run_dump(DumpConfig(model=model_dir, data=[str(answers)], out=str(cache), format="tokens", dtype=dtype,
                            vocab_mapping=vocab_source and str(vocab_source), max_length=longest,
                            overwrite=cache.exists(),
                            device=device))
        marker.write_text(json.dumps({"written_by": "medusa-cache held-out answers", "settings": settings}, indent=1))
    meta = [json.loads(x) for x in answers.read_text().splitlines()]
    source = Cache(str(cache)).array("seq_source")[:, 1]
    cats = {s: meta[int(r)]["category"] for s, r in enumerate(source) if meta[int(r)]["category"] is not None}
    questions = {s: int(meta[int(r)]["question"]) for s, r in enumerate(source)}
    return HeldOut(str(cache), cats, questions, len({m["question"] for m in meta}), len(meta))
