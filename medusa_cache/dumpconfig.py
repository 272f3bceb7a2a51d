"""``DumpConfig``: every option of ``medusa-cache dump``, typed, with its flag's help as the field's docstring and
its checks naming the flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from .config import check, check_common
from .data import FORMATS


@dataclass
class DumpConfig:
    REQUIRED: ClassVar[tuple[str, ...]] = ('model', 'data', 'out')  # shown and enforced as required by the CLI

    model: str | None = None
    """Local path of a Hugging Face causal LM (config.json + safetensors). Nothing is downloaded."""
    data: list[str] = field(default_factory=list)
    """JSON or JSONL files: ShareGPT, OpenAI messages, SpecForge rows, or {"text": ...} rows."""
    out: str | None = None
    """Output store (a directory; created)."""
    tokenizer: str | None = None
    """Tokenizer directory, if not the model's own."""
    chat_template: str | None = None
    """Jinja chat template file to use instead of the tokenizer's own."""
    format: Literal["auto", "sharegpt", "specforge", "messages", "text", "tokens"] = "auto"
    """Data format; 'auto' detects it per file from the first row."""
    pipeline: Literal["medusa-cache", "specforge"] = "medusa-cache"
    """How chats become ids and masks: ours (tool calls trained, no inserted prompt) or exactly SpecForge's
    Eagle3 preprocessing (docs/data-pipeline.md)."""
    system_prompt: str | None = None
    """--pipeline specforge: replace the template's default system prompt with this text ('none': no prompt)."""
    specforge_template: Literal["llama3", "qwen"] | None = None
    """--pipeline specforge: SpecForge template name (default: detected from the tokenizer's chat template)."""
    max_length: int = 2048
    """Truncate each tokenised conversation to this many tokens."""
    draft_vocab_size: int | None = None
    """Draft vocabulary size (Eagle3 top-N by assistant-token frequency). Default: the full vocabulary.
    With --vocab-mapping: checked against the mapping's size."""
    vocab_mapping: str | None = None
    """Use this mapping unchanged instead of building one: ours (.safetensors), SpecForge's vocab_mapping.pt, a
    cache store or a heads directory (a held-out dump reuses the training cache's vocabulary this way)."""
    forward_tokens: int = 16384
    """Padded tokens per forward pass of the model (sequences are length-bucketed, never split; unlike train's
    --batch-tokens, which cuts pieces of sequences)."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Model compute dtype and stored hidden-state dtype (bf16 stored bit-exact as uint16)."""
    hidden_codec: Literal["lossless", "int8"] = "lossless"
    """How hidden states are stored: lossless (--dtype as computed) or int8 with a scale per --int8-group channels
    (about half the bytes of bf16; relative error ~0.5%, see docs/cache-format.md)."""
    int8_group: int | None = None
    """--hidden-codec int8: channels sharing one scale (must divide the hidden size; default: the largest divisor
    of the hidden size that is <= 128, e.g. 128 for 4096, 96 for 576)."""
    hidden_compression: Literal["zstd", "lz4", "none"] = "zstd"
    """Lossless compression of the `hidden` chunks: zstd (smallest), lz4, none (fastest to read on few cores;
    README's read-speed table)."""
    keep_rows: Literal["all", "needed"] = "all"
    """all: a hidden row per token. needed: only the rows heads (up to K = --max-heads), eval and distillation read:
    row t when a token t-K+1 .. t+K+1 of its sequence is an assistant token (docs/cache-format.md); ids, masks and
    labels stay complete."""
    max_heads: int = 5
    """--keep-rows needed: the most heads the cache will serve; train/eval/ablate refuse more."""
    aux_layers: str | None = None
    """Also store Eagle3's auxiliary states, so one capture serves Medusa and Eagle3 (`export-features`): eagle3
    (SpecForge's default layers 1, N/2-1, N-4), speculators (those and N-1, the last layer before the final norm) or
    ids like 1,15,28 (0-based decoder layers; their outputs before any norm), in --hidden-codec's codec. Medusa
    training does not read them."""
    device: str = "cpu"
    """Device for the model pass: cpu, cuda, cuda:N."""
    threads: int | None = None
    """CPU threads for torch (default: torch's own, one per core); lower it on a machine other jobs share."""
    resume: bool = False
    """Continue an interrupted dump in --out (refused if model, tokenizer, template, data or settings differ)."""
    overwrite: bool = False
    """Delete an existing store at --out first."""
    skip_bad_rows: bool = False
    """Skip and count rows with problems (malformed line, unknown role, empty text) instead of stopping."""
    strict: bool = False
    """Stop on NaN/Inf hidden states (default: record the sequence as bad; training then excludes it)."""
    chunk_tokens: int | None = None
    """Tokens per Zarr chunk (default: ~1 MiB of hidden states)."""
    shard_tokens: int | None = None
    """Tokens per shard = per write unit (default: >= 16 x --max-length); a multiple of --chunk-tokens."""

    def __post_init__(self) -> None:
        check_common(self)
        check(1 <= self.max_length <= 1 << 20, "max_length", f"must be in 1..{1 << 20}, got {self.max_length}")
        check(self.draft_vocab_size is None or self.draft_vocab_size >= 1, "draft_vocab_size",
              f"must be >= 1, got {self.draft_vocab_size}")
        check(self.forward_tokens >= 1, "forward_tokens", f"must be >= 1, got {self.forward_tokens}")
        check(self.int8_group is None or self.int8_group >= 1, "int8_group", f"must be >= 1, got {self.int8_group}")
        check(1 <= self.max_heads <= 32, "max_heads", f"must be in 1..32, got {self.max_heads}")
        check(not (self.aux_layers and self.keep_rows == "needed"), "aux_layers",
              "Eagle3's features need every row: it cannot be combined with --keep-rows needed")
        check(self.format in FORMATS, "format", f"must be one of {FORMATS}")
        seen: dict[str, str] = {}
        for f in self.data:  # a file given twice would be dumped twice, every row a duplicate
            key = str(Path(f).resolve()) if "://" not in str(f) else str(f)
            check(key not in seen, "data", f"{f} is given twice (as {seen.get(key)} and {f}); every row would be "
                  "dumped twice: give each file once")
            seen[key] = f


