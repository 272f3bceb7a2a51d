"""``medusa-cache generate``: self-distilled data, the base model's own continuations.

Plain prompts (``{"text": ...}`` rows) are continued and written back as ``{"text": prompt + continuation,
"input_ids": [...], "trained": [0/1 ...]}``: the text is decoded whole (no lost space at the prompt boundary), and
the ids are exactly the model's (text does not always re-tokenise to them), with ``trained`` marking the model's
own tokens. ``dump`` reads such rows verbatim (format ``tokens``) and trains only the model's tokens.
Chat files (any format ``dump`` reads) get every assistant turn
regenerated from the conversation up to it (chat template required) and are written as OpenAI
``messages`` rows. Batched with left padding; greedy at ``--temperature 0``.

Resumable: rows are appended one batch at a time and flushed; a rerun counts the complete lines already
in ``--out`` (dropping a torn last line) and continues after them, so no row is written twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from tqdm.auto import tqdm

from .config import check
from .data import RowError, read_rows
from .errors import UserError


@dataclass
class GenerateConfig:
    REQUIRED: ClassVar[tuple[str, ...]] = ('model', 'prompts', 'out')  # shown and enforced as required by the CLI

    model: str | None = None
    """Local model directory."""
    prompts: str | None = None
    """JSON/JSONL prompts: {"text": ...} rows, or chat rows whose assistant turns are regenerated."""
    out: str | None = None
    """Output JSONL file."""
    max_new_tokens: int = 256
    """Tokens generated per prompt or assistant turn."""
    temperature: float = 0.0
    """0 = greedy."""
    batch_size: int = 32
    """Prompts per generate() call."""
    seed: int = 0
    """Sampling seed (temperature > 0)."""
    resume: bool = False
    """Continue an interrupted --out."""
    overwrite: bool = False
    """Replace an existing --out."""
    device: str = "cpu"
    """cpu or cuda."""
    pipeline: Literal["medusa-cache", "specforge"] = "medusa-cache"
    """Chat rows: turns converted as `dump --pipeline` does (specforge: SpecForge's roles, dropped turns and
    default system prompt), so the regenerated conversation is the one that pipeline will train on."""
    system_prompt: str | None = None
    """--pipeline specforge: replace the template's default system prompt ('none': no prompt)."""

    def __post_init__(self) -> None:
        check(self.model is not None, "model", "is required")
        check(self.prompts is not None, "prompts", "is required")
        check(self.out is not None, "out", "is required")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(not (self.resume and self.overwrite), "resume", "--resume and --overwrite exclude each other")


def _complete_lines(path: Path) -> int:
    """Count complete JSON lines; truncate a torn last line left by a kill."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    return data[:keep].count(b"\n")


def generate(cfg: GenerateConfig) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .dist import check_device
    from .rundir import check_apart

    check_device(cfg.device)
    out = Path(cfg.out)
    check_apart(out, {"--prompts": cfg.prompts, "--model": cfg.model})
    if out.exists() and not out.is_file():
        raise UserError(f"--out: {out} exists and is not a file (generate writes one JSONL file)")
    if out.exists() and not (cfg.resume or cfg.overwrite):
        raise UserError(f"--out: {out} already exists; pass --resume to continue it or --overwrite to replace it")
    rows = [r for r in read_rows(Path(cfg.prompts), 0, pipeline=cfg.pipeline)]
    bad = [r for r in rows if isinstance(r, RowError)]
    if bad:
        raise UserError(str(bad[0]))
    done = _complete_lines(out) if (cfg.resume and out.exists()) else 0
    if cfg.overwrite or not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
    tok = AutoTokenizer.from_pretrained(cfg.model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model).to(cfg.device).eval()
    torch.manual_seed(cfg.seed)
    todo = rows[done:]
    bar = tqdm(total=len(rows), initial=done, desc="generate", unit="row", disable=None)
    with out.open("a", encoding="utf-8") as f:
        for i in range(0, len(todo), cfg.batch_size):
            batch = todo[i : i + cfg.batch_size]
            if any(r.text is None for r in batch):
                results = [_regenerate_chat(model, tok, r, cfg) for r in batch]
            else:
                results = [{"text": text, "input_ids": ids, "trained": mask} for text, ids, mask in
                           _continue_with_ids(model, tok, [r.text for r in batch], cfg)]
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return len(rows)


@torch.inference_mode()
def _generate_ids(model, tok, prompts: list[str], cfg: GenerateConfig, add_special_tokens: bool = True
                  ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the model's ids up to and including its first end-of-sequence token) per prompt."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(cfg.device)
    kw = dict(do_sample=True, temperature=cfg.temperature) if cfg.temperature > 0 else dict(do_sample=False)
    gen = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
    width = enc["input_ids"].shape[1]
    eos = {tok.eos_token_id} | set(model.generation_config.eos_token_id if isinstance(
        model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])
    out = []
    for i in range(len(prompts)):
        pad = int((enc["attention_mask"][i] == 0).sum())
        new = gen[i, width:].tolist()
        cut = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))
        out.append((enc["input_ids"][i, pad:].tolist(), new[:cut]))
    return out


def _continue_with_ids(model, tok, prompts: list[str], cfg: GenerateConfig) -> list[tuple[str, list[int], list[int]]]:
    """(text, ids, trained mask): the whole sequence decoded at once, so no space is lost at the prompt boundary."""
    rows = []
    for prompt, (p_ids, new) in zip(prompts, _generate_ids(model, tok, prompts, cfg), strict=True):
        rows.append((prompt + _continuation(tok, p_ids, new), p_ids + new, [0] * len(p_ids) + [1] * len(new)))
    return rows


def _continuation(tok, prompt_ids: list[int], new: list[int]) -> str:
    """The text the model added: decode prompt + continuation together and cut the decoded prompt (decoding the
    continuation alone drops a leading space: "ball.She")."""
    whole = tok.decode(prompt_ids + new, skip_special_tokens=True)
    head = tok.decode(prompt_ids, skip_special_tokens=True)
    return whole[len(head):] if whole.startswith(head) else tok.decode(new, skip_special_tokens=True)


def _continue(model, tok, prompts: list[str], cfg: GenerateConfig, add_special_tokens: bool = True) -> list[str]:
    return [_continuation(tok, p, n) for p, n in _generate_ids(model, tok, prompts, cfg, add_special_tokens)]


def _regenerate_chat(model, tok, row, cfg: GenerateConfig) -> dict:
    if not getattr(tok, "chat_template", None):
        raise UserError("--prompts: chat rows need a tokenizer with a chat template")
    messages = row.messages
    if cfg.pipeline == "specforge":  # the conversation SpecForge's parser will render (prompt inserted, turns cut)
        from .specforge_pipeline import arrange, detect_template

        default = detect_template(tok, None).system_prompt
        prompt = default if cfg.system_prompt is None else ("" if cfg.system_prompt.lower() == "none" else
                                                             cfg.system_prompt)
        messages = arrange(messages, prompt)
    msgs = []
    for m in messages:
        if m["role"] == "assistant":
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            m = {"role": "assistant", "content": _continue(model, tok, [prompt], cfg, add_special_tokens=False)[0]}
        msgs.append(m)
    return {"messages": msgs}
