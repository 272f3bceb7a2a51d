"""``medusa-cache dump``: run the backbone once and write post-norm hidden states into a Zarr cache.

Stages:
1. *Prepare* (once, by rank 0): read and template every row, build the draft vocabulary, compute labels
   and offsets, and create the store with every array except the hidden states. All shapes are known
   here, so the store is preallocated.
2. *Units* (each rank its own): unit k is one shard of ``hidden``. Ranks take units k with
   ``k % world_size == rank``; a unit is computed, written whole, then marked done. A sequence that
   crosses a unit's end is run only up to that end (causal model: the prefix is all it needs); a unit
   that starts inside a sequence runs that sequence from its start for context and keeps only its own
   rows. So a unit's bytes depend only on the data, never on which rank or which run wrote it, and a
   killed dump resumed with ``--resume`` is bit-identical to an uninterrupted one.
3. Within a unit, sequences are sorted by length and packed into batches of at most ``forward_tokens``
   padded tokens (right padding, attention mask), so few pad tokens are computed; only real rows are
   written. The write of unit k runs in a background thread while unit k+1 is computed.

The decoder alone runs (``model.base_model``): its ``last_hidden_state`` is after the final norm, and
no logits are computed (with a 152K vocabulary they would cost ~12x the forward on a CPU).
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from . import dist, store
from . import fingerprint as fp
from .backbone import ModelPass, load_tokenizer, plan_batches
from .config import check, to_dict
from .data import FORMATS, RowError, Templater, read_rows
from .errors import UserError
from .progress import Progress
from .vocab import build_mapping, count_tokens, load_mapping


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
        check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        check(self.model is not None, "model", "is required")
        check(bool(self.data), "data", "at least one data file is required")
        check(self.out is not None, "out", "is required")
        check(1 <= self.max_length <= 1 << 20, "max_length", f"must be in 1..{1 << 20}, got {self.max_length}")
        check(self.draft_vocab_size is None or self.draft_vocab_size >= 1, "draft_vocab_size",
              f"must be >= 1, got {self.draft_vocab_size}")
        check(self.forward_tokens >= 1, "forward_tokens", f"must be >= 1, got {self.forward_tokens}")
        check(self.int8_group is None or self.int8_group >= 1, "int8_group", f"must be >= 1, got {self.int8_group}")
        check(1 <= self.max_heads <= 32, "max_heads", f"must be in 1..32, got {self.max_heads}")
        check(not (self.resume and self.overwrite), "resume", "--resume and --overwrite exclude each other")
        check(self.format in FORMATS, "format", f"must be one of {FORMATS}")
        for name in ("chunk_tokens", "shard_tokens"):
            v = getattr(self, name)
            check(v is None or v >= 1, name, f"must be >= 1, got {v}")
        if self.chunk_tokens and self.shard_tokens:
            check(self.shard_tokens % self.chunk_tokens == 0, "shard_tokens", "must be a multiple of --chunk-tokens")


# --------------------------------------------------------------------------------------------------
def _fingerprints(cfg: DumpConfig, template: str) -> dict[str, str]:
    vocab = f"mapping:{_mapping_hash(cfg.vocab_mapping)}" if cfg.vocab_mapping else f"top:{cfg.draft_vocab_size}"
    return {
        "model": fp.model_fingerprint(cfg.model),
        "tokenizer": fp.tokenizer_fingerprint(cfg.tokenizer or cfg.model),
        "chat_template": fp.sha(template or ""),
        "data": fp.data_fingerprint(cfg.data),
        "max_length": str(cfg.max_length),
        "vocab_mapping": vocab,
        "dtype": cfg.dtype,
        "hidden_codec": cfg.hidden_codec if cfg.hidden_codec == "lossless" else f"int8:{cfg.int8_group}",
        "keep_rows": cfg.keep_rows if cfg.keep_rows == "all" else f"needed:{cfg.max_heads}",
        "hidden_compression": cfg.hidden_compression,
        "format": cfg.format,
        "skip_bad_rows": str(cfg.skip_bad_rows),
        "pipeline": cfg.pipeline if cfg.pipeline == "medusa-cache" else
        f"specforge:{cfg.specforge_template or 'auto'}:{fp.sha(cfg.system_prompt or '')}",
    }


# fingerprints added after 0.1.0: a store written before one existed was dumped with its default setting
FINGERPRINT_DEFAULTS = {"hidden_codec": "lossless", "keep_rows": "all", "hidden_compression": "zstd"}


def _mapping_hash(path: str) -> str:
    """Fingerprint of --vocab-mapping: a file's bytes, a heads directory's mapping file, or a store's d2t/t2d."""
    p = Path(path)
    if p.is_dir() and store.is_store(p):
        return store.Cache(p).mapping().fingerprint()
    if p.is_dir():
        p = p / "vocab_mapping.safetensors"
    return fp.file_hash(p) if p.is_file() else "missing"


def _check_inputs(cfg: DumpConfig) -> None:
    if not Path(cfg.model, "config.json").exists():
        raise UserError(f"--model: {cfg.model} is not a model directory (no config.json)")
    for f in cfg.data:
        if not Path(f).is_file():
            raise UserError(f"--data: file not found: {f}")
    if cfg.chat_template and not Path(cfg.chat_template).is_file():
        raise UserError(f"--chat-template: file not found: {cfg.chat_template}")
    out = cfg.out
    from .rundir import check_apart

    check_apart(out, {"--model": cfg.model, "--data": cfg.data, "--tokenizer": cfg.tokenizer,
                      "--chat-template": cfg.chat_template, "--vocab-mapping": cfg.vocab_mapping})
    if not store.is_empty(out) and not cfg.resume and not cfg.overwrite:
        raise UserError(f"--out: {out} already exists; pass --resume to continue it or --overwrite to replace it")
    if store.is_url(out):
        return
    out = Path(out)
    parent = out.parent if not out.exists() else out
    if parent.exists() and not _writable(parent):
        raise UserError(f"--out: {parent} is not writable")


def _writable(p: Path) -> bool:
    import os

    return os.access(p, os.W_OK)


def prepare(cfg: DumpConfig, fingerprints: dict[str, str], template: str | None, vocab_size: int,
            hidden_size: int, tokenizer, max_positions: int | None = None) -> store.Cache:
    """Stage 1: tokenise everything, build the vocabulary, and create the store (all but the hidden states)."""
    examples, tally, bad = tokenise(cfg, template, tokenizer, vocab_size)
    longest = max(examples, key=lambda e: len(e.input_ids))
    if max_positions and len(longest.input_ids) > max_positions:
        f, r = cfg.data[longest.file_index], longest.row_index + 1
        raise UserError(f"--max-length {cfg.max_length}: {f} row {r} has {len(longest.input_ids)} tokens, beyond the "
                        f"model's max_position_embeddings {max_positions}; pass --max-length {max_positions} or less")
    counts = count_tokens(examples, vocab_size)
    mapping, unseen_filled = draft_vocabulary(cfg, counts, vocab_size)
    offsets = np.concatenate([[0], np.cumsum([len(e.input_ids) for e in examples])]).astype(np.int64)
    ids = np.concatenate([e.input_ids for e in examples])
    mask = np.concatenate([e.loss_mask for e in examples])
    labels = mapping.labels(ids, mask)
    row_kept = store.needed_rows(mask, offsets, cfg.max_heads) if cfg.keep_rows == "needed" else None
    counts_attr = {
        **tally, "sequences": len(examples), "tokens": int(offsets[-1]), "assistant_tokens": int(mask.sum()),
        "assistant_tokens_in_draft_vocab": int((labels != -100).sum()), "skipped_input_rows": len(bad),
        "truncated": int(sum(1 for e in examples if len(e.input_ids) == cfg.max_length)),
        "draft_vocab_unseen_filled": unseen_filled,
        **({"stored_rows": int(row_kept.sum())} if row_kept is not None else {}),
    }
    return store.create(
        cfg.out, hidden_size=hidden_size, hidden_dtype=cfg.dtype, hidden_codec=cfg.hidden_codec,
        int8_group=cfg.int8_group, hidden_compression=cfg.hidden_compression, layout=layout_for(cfg, hidden_size),
        input_ids=ids, loss_mask=mask, labels=labels,
        offsets=offsets, sources=np.array([[e.file_index, e.row_index] for e in examples], dtype=np.int64),
        mapping=mapping, token_counts=counts, row_kept=row_kept, max_heads=cfg.max_heads,
        attrs={"vocab_size": vocab_size, "draft_vocab_size": mapping.draft_size,
               "data_files": [str(Path(f).name) for f in cfg.data], "pipeline": cfg.pipeline,
               "fingerprints": {**fingerprints, "vocab": mapping.fingerprint()}, "dump_args": to_dict(cfg),
               "counts": counts_attr, "bad_row_examples": bad[:20]},
    )


def tokenise(cfg: DumpConfig, template: str | None, tokenizer, vocab_size: int) -> tuple[list, dict, list[str]]:
    """(examples with at least one trained token, {rows, dropped_no_assistant}, skipped rows' messages)."""
    if cfg.pipeline == "specforge":
        from .specforge_pipeline import SpecForgeTemplater, detect_template

        if template:
            tokenizer.chat_template = template
        templater = SpecForgeTemplater(tokenizer, detect_template(tokenizer, cfg.specforge_template), cfg.max_length,
                                       cfg.system_prompt)
    else:
        templater = Templater(tokenizer, template, cfg.max_length)
    examples, bad, tally = [], [], {"rows": 0, "dropped_no_assistant": 0}

    def handle(results) -> None:
        for ex in results:
            if isinstance(ex, RowError):
                if not cfg.skip_bad_rows:
                    raise UserError(f"{ex} (pass --skip-bad-rows to skip such rows)")
                bad.append(str(ex))
            elif not ex.loss_mask.any():
                tally["dropped_no_assistant"] += 1
            elif ex.input_ids.max(initial=0) >= vocab_size:
                where = f"{cfg.data[ex.file_index]} row {ex.row_index + 1}"
                raise UserError(f"--tokenizer: token id {int(ex.input_ids.max())} in {where} is >= the model's "
                                f"vocabulary size {vocab_size}")
            else:
                examples.append(ex)

    for fi, f in enumerate(cfg.data):
        pending: list = []
        for row in tqdm(read_rows(Path(f), fi, cfg.format, cfg.pipeline), desc=f"tokenise {Path(f).name}", unit="row",
                        leave=False, disable=None):
            tally["rows"] += 1
            if isinstance(row, RowError):  # keep file order: flush what came before, then this error
                handle(templater.encode_many(pending) + [row])
                pending = []
                continue
            pending.append(row)
            if len(pending) == 512:  # batched: the Rust tokenizer encodes a batch in parallel
                handle(templater.encode_many(pending))
                pending = []
        handle(templater.encode_many(pending))
    if not examples:
        raise UserError(f"--data: no usable conversations ({tally['rows']} rows, {len(bad)} bad, "
                        f"{tally['dropped_no_assistant']} without an assistant token)")
    return examples, tally, bad


def draft_vocabulary(cfg: DumpConfig, counts: np.ndarray, vocab_size: int):
    """(mapping, never-seen ids that filled it): --vocab-mapping as given, else Eagle3's top-N."""
    if cfg.vocab_mapping:
        mapping = load_mapping(cfg.vocab_mapping, vocab_size)
        if cfg.draft_vocab_size and cfg.draft_vocab_size != mapping.draft_size:
            raise UserError(f"--vocab-mapping: {cfg.vocab_mapping} has a draft vocabulary of {mapping.draft_size}, "
                            f"but --draft-vocab-size is {cfg.draft_vocab_size}")
        return mapping, 0
    if cfg.draft_vocab_size and cfg.draft_vocab_size > vocab_size:
        raise UserError(f"--draft-vocab-size {cfg.draft_vocab_size} is larger than the model's vocabulary "
                        f"({vocab_size}); give at most {vocab_size}, or leave it out for the full vocabulary")
    mapping = build_mapping(counts, cfg.draft_vocab_size or vocab_size)
    seen = int((counts > 0).sum())
    unseen = 0
    if cfg.draft_vocab_size and seen < cfg.draft_vocab_size < vocab_size:
        unseen = cfg.draft_vocab_size - seen
        print(f"warning: --draft-vocab-size {cfg.draft_vocab_size} exceeds the {seen} distinct assistant tokens in "
              f"the data; {unseen} never-seen ids (lowest first, as SpecForge) fill the draft vocabulary",
              file=sys.stderr)
    return mapping, unseen


def layout_for(cfg: DumpConfig, hidden_size: int) -> store.Layout:
    layout = store.Layout.default(hidden_size, 2 if cfg.dtype == "bfloat16" else 4, cfg.max_length)
    if cfg.chunk_tokens:
        layout.chunk_tokens = cfg.chunk_tokens
        if not cfg.shard_tokens:
            layout.shard_tokens = max(layout.shard_tokens // cfg.chunk_tokens, 1) * cfg.chunk_tokens
    if cfg.shard_tokens:
        layout.shard_tokens = cfg.shard_tokens
        if not cfg.chunk_tokens and layout.shard_tokens % layout.chunk_tokens:
            layout.chunk_tokens = layout.shard_tokens
    return layout


# --------------------------------------------------------------------------------------------------
def compute_unit(cache: store.Cache, ids: np.ndarray, k: int, mp: ModelPass, forward_tokens: int) -> torch.Tensor:
    """Unit k's stored rows: its token range computed (each sequence from its start), then the kept rows."""
    a, b = cache.unit_tokens(k)
    buf = torch.empty((b - a, cache.hidden_size), dtype=store.TORCH_DTYPES[cache.hidden_dtype])
    for batch in plan_batches(cache.offsets, a, b, forward_tokens):
        for (_, e, keep), rows in zip(batch, mp.run(ids, batch), strict=True):
            buf[keep - a : e - a] = rows
    return buf if cache.row_kept is None else buf[torch.from_numpy(cache.row_kept[a:b])]


def open_or_prepare(cfg: DumpConfig) -> store.Cache:
    """Check inputs, then resume (fingerprints must match) or create the store. Rank 0 only."""
    _check_inputs(cfg)
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(cfg.model)
    mcfg = getattr(mcfg, "text_config", None) or mcfg
    resolve_model_options(cfg, mcfg.hidden_size)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    template = Path(cfg.chat_template).read_text(encoding="utf-8") if cfg.chat_template else None
    fps = _fingerprints(cfg, template or getattr(tokenizer, "chat_template", None) or "")
    out = cfg.out
    if cfg.overwrite:
        store.remove_store(out)
    if cfg.resume and store.is_store(out):
        cache = store.Cache(out, mode="r+")
        old = {**FINGERPRINT_DEFAULTS, **cache.meta.fingerprints}
        diff = [k for k in fps if old.get(k) != fps[k]]
        if diff:
            raise UserError(f"--resume: {out} was dumped with a different {', '.join(diff)}; "
                            "use --overwrite to start again or a new --out")
        return cache
    if cfg.resume and not store.is_empty(out) and not store.is_store(out, partial=True):
        raise UserError(f"--resume: {out} is not a medusa-cache store")
    return prepare(cfg, fps, template, mcfg.vocab_size, mcfg.hidden_size, tokenizer,
                   getattr(mcfg, "max_position_embeddings", None))


def default_int8_group(hidden_size: int) -> int:
    """The largest divisor of the hidden size that is <= 128 (128 for 4096 and 3584, 96 for SmolLM2's 576)."""
    return max(g for g in range(1, min(128, hidden_size) + 1) if hidden_size % g == 0)


def resolve_model_options(cfg: DumpConfig, hidden_size: int) -> None:
    """Options that depend on the model, checked and filled in before anything is tokenised or created."""
    if cfg.hidden_codec != "int8":
        return
    if cfg.int8_group is None:
        cfg.int8_group = default_int8_group(hidden_size)
    elif cfg.hidden_codec == "int8" and hidden_size % cfg.int8_group:
        raise UserError(f"--int8-group: {cfg.int8_group} does not divide the model's hidden size {hidden_size}; "
                        f"pass a divisor (e.g. {default_int8_group(hidden_size)}) or leave it out")


def run_dump(cfg: DumpConfig, rank: int = 0, world_size: int = 1) -> dict:
    """Dump ``cfg.data`` through ``cfg.model`` into ``cfg.out``; this process computes units k % world == rank.

    Under torchrun every rank calls this: rank 0 prepares the store, then all ranks write their own units,
    and rank 0 marks the store complete after a barrier. Returns this rank's summary.
    """
    t0 = time.perf_counter()
    lock: store.WriterLock | None = None

    def rank0() -> store.Cache:
        nonlocal lock
        _check_inputs(cfg)
        lock = store.WriterLock(cfg.out)
        try:
            return open_or_prepare(cfg)
        except BaseException:
            lock.release(failed=True)
            raise

    try:
        cache = dist.on_rank0(rank0, rank)
        return _run_units(cfg, cache, rank, world_size, t0)
    finally:
        if lock is not None:
            lock.release()


def _run_units(cfg: DumpConfig, cache: store.Cache | None, rank: int, world_size: int, t0: float) -> dict:
    """The unit loop of every rank (the store exists: prepared or opened by rank 0)."""
    if rank != 0:
        cache = store.Cache(cfg.out, mode="r+")
    out = cfg.out
    if cache.complete:
        if rank == 0:
            print(f"{out}: already complete", file=sys.stderr)
        return summary(cache, t0, 0, 0)
    done = cache.done_units()
    todo = [k for k in range(cache.n_units) if k % world_size == rank and not done[k]]
    ids = cache.array("input_ids")
    t_prepared = time.perf_counter()
    mp = ModelPass(cfg.model, cfg.dtype, cfg.device)
    t_loaded = time.perf_counter()
    tokens_todo = sum(cache.unit_tokens(k)[1] - cache.unit_tokens(k)[0] for k in todo)
    bar = Progress(tokens_todo, "dump", "token", enabled=rank == 0)
    pending: Future | None = None

    nonfinite = 0
    sources = cache.array("seq_source")

    def write(k: int, h: torch.Tensor) -> None:
        nonlocal nonfinite
        if cfg.strict and not torch.isfinite(h).all():
            a, _ = cache.unit_range(k)
            row = cache.token_of_row(a + int(np.flatnonzero(~torch.isfinite(h).all(dim=1).numpy())[0]))
            s = int(np.searchsorted(cache.offsets, row, side="right") - 1)
            f, r = sources[s]
            raise UserError(f"--strict: NaN/Inf hidden state at token {row} (sequence {s}, {cfg.data[f]} row "
                            f"{r + 1}); unit {k} not written")
        try:
            nonfinite += cache.write_unit(k, h)
            cache.mark_done(k)
        except OSError as e:
            raise UserError(f"--out: writing unit {k} to {cache.path} failed: {e.strerror or e}; finished units "
                            "are kept: free space, then rerun with --resume") from None

    error = None
    try:
        with ThreadPoolExecutor(1) as pool:
            for k in todo:
                h = compute_unit(cache, ids, k, mp, cfg.forward_tokens)
                if pending is not None:
                    pending.result()
                pending = pool.submit(write, k, h)
                a, b = cache.unit_tokens(k)
                bar.update(b - a)
            if pending is not None:
                pending.result()
    except Exception as e:  # noqa: BLE001 - any failure is agreed, so no rank waits in a collective forever
        if not dist.active() and not isinstance(e, UserError):
            raise
        error = str(e) if isinstance(e, UserError) else f"rank {rank}: {type(e).__name__}: {e}"
    bar.close()
    dist.agree(error)  # every rank stops with the same message if any rank failed
    dist.barrier()
    if nonfinite:
        print(f"warning: {nonfinite} token rows had NaN/Inf hidden states; their sequences are recorded in "
              "'bad_rows' and excluded from training (--strict makes this an error)", file=sys.stderr)
    if rank == 0 and cache.done_units().all():
        cache.set_attrs(complete=True)
    return {**summary(cache, t0, tokens_todo, mp.computed_tokens), "nonfinite_rows": nonfinite,
            "seconds_prepare": round(t_prepared - t0, 2), "seconds_model_load": round(t_loaded - t_prepared, 2),
            "seconds_units": round(time.perf_counter() - t_loaded, 2)}


def summary(cache: store.Cache, t0: float, written: int, computed: int) -> dict:
    c = cache.meta.counts
    return {
        "store": cache.path,
        "complete": cache.complete,
        **c,
        "hidden_size": cache.hidden_size,
        "hidden_dtype": cache.hidden_dtype,
        "hidden_codec": cache.codec,
        **({"int8_group": cache.int8_group} if cache.codec == "int8" else {}),
        "draft_vocab_size": cache.meta.draft_vocab_size,
        "written_tokens": written,
        "real_over_computed": round(written / computed, 4) if computed else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def print_summary(s: dict) -> None:
    print(json.dumps(s, indent=2))
    print("legend: real_over_computed = real tokens written / tokens the model computed (padding and the context "
          "re-run at unit edges make it < 1); skipped_input_rows = data rows skipped by --skip-bad-rows; "
          "nonfinite_rows = hidden rows with NaN/Inf (kept, flagged in bad_rows, excluded from training)")
    state = "complete" if s.get("complete") else "INCOMPLETE (rerun with --resume)"
    print(f"cache {state}: {s['store']}\nnext: medusa-cache verify {s['store']} --deep && "
          f"medusa-cache train --cache {s['store']} --out heads")
