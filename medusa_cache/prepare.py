"""Stage 1 of ``dump``: tokenise every conversation, build the draft vocabulary, and create the store with
everything but the hidden states (ids, masks, labels, offsets, mapping, counts)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import store
from .config import to_dict
from .data import RowError, read_rows
from .dumpconfig import DumpConfig
from .errors import UserError
from .templater import Templater
from .vocab import build_mapping, count_tokens, load_mapping


def prepare(cfg: DumpConfig, fingerprints: dict[str, str], template: str | None, tokenizer, model_config
            ) -> store.CacheWriter:
    """Stage 1: tokenise everything, build the vocabulary, and create the store (all but the hidden states).
    ``model_config``: the model's (text) config: vocabulary, hidden size, positions, layers."""
    vocab_size, hidden_size = model_config.vocab_size, model_config.hidden_size
    max_positions = getattr(model_config, "max_position_embeddings", None)
    examples, tally, bad = tokenise(cfg, template, tokenizer, vocab_size)
    warn_repeats(examples, cfg)
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
    sources = np.array([[e.file_index, e.row_index] for e in examples], dtype=np.int64)
    return store.create(
        cfg.out, store.HiddenFormat(hidden_size, cfg.dtype, cfg.hidden_codec, cfg.int8_group, cfg.hidden_compression,
                                    cfg.max_heads, aux_layers(cfg)),
        layout_for(cfg, hidden_size), store.Contents(ids, mask, labels, offsets, sources, mapping, counts, row_kept),
        {"vocab_size": vocab_size, "draft_vocab_size": mapping.draft_size,
               "model_layers": int(model_config.num_hidden_layers),
               "data_files": [str(Path(f).name) for f in cfg.data], "pipeline": cfg.pipeline,
               "fingerprints": {**fingerprints, "vocab": mapping.fingerprint()}, "dump_args": to_dict(cfg),
               "counts": counts_attr, "bad_row_examples": bad[:20]},
    )


def aux_layers(cfg: DumpConfig) -> tuple[int, ...]:
    """--aux-layers as ``dump.resolve_model_options`` resolved it (ids, comma-separated)."""
    return tuple(int(x) for x in cfg.aux_layers.split(",")) if cfg.aux_layers else ()


def warn_repeats(examples: list, cfg: DumpConfig) -> None:
    """One warning line when rows repeat earlier rows exactly (same ids and mask): each copy is trained again and a
    held-out copy is not held out."""
    import hashlib
    import sys

    first: dict[bytes, object] = {}
    repeats, example = 0, None
    for e in examples:
        key = hashlib.sha1(e.input_ids.tobytes() + np.packbits(e.loss_mask).tobytes()).digest()
        if key in first:
            repeats += 1
            example = example or (first[key], e)
        else:
            first[key] = e
    if repeats:
        (a, b) = example
        print(f"warning: {repeats} of {len(examples)} rows repeat an earlier row exactly (e.g. "
              f"{cfg.data[b.file_index]} row {b.row_index + 1} = {cfg.data[a.file_index]} row {a.row_index + 1}); "
              "each copy is trained again",
              file=sys.stderr)


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
            if row.turns is not None:
                raise UserError(f"{row.where}: a question (Spec-Bench / MT-Bench format) holds no answers to train on: "
                                f"answer it first (medusa-cache generate --prompts {f} --out answers.jsonl), then dump "
                                "the answers")
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
        if store.is_store(cfg.vocab_mapping):
            mapping = store.Cache(cfg.vocab_mapping).mapping()
            if mapping.target_size != vocab_size:
                raise UserError(f"--vocab-mapping: the store {cfg.vocab_mapping} covers a vocabulary of "
                                f"{mapping.target_size} tokens, the model has {vocab_size}")
        else:
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
    return store.Layout.choose(hidden_size, 2 if cfg.dtype == "bfloat16" else 4, cfg.max_length, cfg.chunk_tokens,
                               cfg.shard_tokens)


