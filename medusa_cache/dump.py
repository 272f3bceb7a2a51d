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
import shlex
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import dist, store
from . import fingerprint as fp
from .backbone import ModelPass, load_tokenizer, plan_batches
from .dumpconfig import DumpConfig
from .errors import UserError
from .prepare import prepare
from .progress import Progress
from .store.codec import default_int8_group


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
        "aux_layers": cfg.aux_layers or "none",
        "format": cfg.format,
        "skip_bad_rows": str(cfg.skip_bad_rows),
        "pipeline": cfg.pipeline if cfg.pipeline == "medusa-cache" else
        f"specforge:{cfg.specforge_template or 'auto'}:{fp.sha(cfg.system_prompt or '')}",
    }


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
    if not store.is_url(out) and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out: {out} is a file, not a store (a store is a directory): choose another --out")
    if not store.is_empty(out) and not cfg.resume and not cfg.overwrite:
        hint = "pass --resume to continue it or --overwrite to replace it" if store.is_store(out, partial=True) else \
            "it is not a medusa-cache store, so --overwrite would refuse to delete it: choose another --out"
        raise UserError(f"--out: {out} already exists; {hint}")
    if store.is_url(out):
        return
    out = Path(out)
    parent = out.parent if not out.exists() else out
    if parent.exists() and not _writable(parent):
        raise UserError(f"--out: {parent} is not writable")


def _writable(p: Path) -> bool:
    import os

    return os.access(p, os.W_OK)


def compute_unit(cache: store.Cache, ids: np.ndarray, k: int, mp: ModelPass, forward_tokens: int) -> torch.Tensor:
    """Unit k's stored rows: its token range computed (each sequence from its start), then the kept rows."""
    a, b = cache.unit_tokens(k)
    width = cache.hidden_size * (1 + len(cache.meta.aux_layers))  # aux layers: their columns after the hidden state
    buf = torch.empty((b - a, width), dtype=store.TORCH_DTYPES[cache.hidden_dtype])
    for batch in plan_batches(cache.offsets, a, b, forward_tokens):
        for (_, e, keep), rows in zip(batch, mp.run(ids, batch), strict=True):
            buf[keep - a : e - a] = rows
    return buf if cache.row_kept is None else buf[torch.from_numpy(cache.row_kept[a:b])]


def open_or_prepare(cfg: DumpConfig) -> store.CacheWriter:
    """Check inputs, then resume (fingerprints must match) or create the store. Rank 0 only."""
    _check_inputs(cfg)
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(cfg.model)
    mcfg = getattr(mcfg, "text_config", None) or mcfg
    resolve_model_options(cfg, mcfg.hidden_size, mcfg.num_hidden_layers)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    template = Path(cfg.chat_template).read_text(encoding="utf-8") if cfg.chat_template else None
    fps = _fingerprints(cfg, template or getattr(tokenizer, "chat_template", None) or "")
    out = cfg.out
    if cfg.overwrite:
        store.remove_store(out)
    if cfg.resume and store.is_store(out):
        cache = store.CacheWriter(out)
        old = cache.meta.fingerprints  # store.upgrade gave older stores the defaults of later fingerprints
        diff = [k for k in fps if old.get(k) != fps[k]]
        if diff:
            raise UserError(f"--resume: {out} was dumped with a different {', '.join(diff)}; "
                            "use --overwrite to start again or a new --out")
        return cache
    if cfg.resume and not store.is_empty(out) and not store.is_store(out, partial=True):
        raise UserError(f"--resume: {out} is not a medusa-cache store")
    return prepare(cfg, fps, template, tokenizer, mcfg)


def resolve_model_options(cfg: DumpConfig, hidden_size: int, num_layers: int) -> None:
    """Options that depend on the model, checked and filled in before anything is tokenised or created: the int8
    group, and --aux-layers as the layer ids it names (a preset becomes its ids, so resume compares ids)."""
    from .backbone import resolve_aux_layers

    if cfg.aux_layers:
        cfg.aux_layers = ",".join(map(str, resolve_aux_layers(cfg.aux_layers, num_layers)))
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

    def rank0() -> store.CacheWriter:
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


class UnitWriter:
    """Writes a computed unit and marks it done (on the writer thread); counts NaN/Inf rows, or refuses them with
    ``--strict`` naming the token, sequence and input row; a failed write keeps every finished unit."""

    def __init__(self, cfg: DumpConfig, cache: store.CacheWriter):
        self.cfg, self.cache, self.nonfinite = cfg, cache, 0
        self.sources = cache.array("seq_source")

    def __call__(self, k: int, h: torch.Tensor) -> None:
        cache = self.cache
        if self.cfg.strict and not torch.isfinite(h[:, : cache.hidden_size]).all():
            a, _ = cache.unit_range(k)
            row = cache.token_of_row(a + int(np.flatnonzero(~torch.isfinite(h).all(dim=1).numpy())[0]))
            s = int(store.seq_of(cache.offsets, row))
            f, r = self.sources[s]
            raise UserError(f"--strict: NaN/Inf hidden state at token {row} (sequence {s}, {self.cfg.data[f]} row "
                            f"{r + 1}); unit {k} not written")
        hs = cache.hidden_size
        try:
            self.nonfinite += cache.write_unit(k, h[:, :hs], h[:, hs:] if cache.meta.aux_layers else None)
            cache.mark_done(k)
        except OSError as e:
            raise UserError(f"--out: writing unit {k} to {cache.path} failed: {e.strerror or e}; finished units "
                            "are kept: free space, then rerun with --resume") from None


def _run_units(cfg: DumpConfig, cache: store.Cache | None, rank: int, world_size: int, t0: float) -> dict:
    """The unit loop of every rank (the store exists: prepared or opened by rank 0)."""
    if rank != 0:
        cache = store.CacheWriter(cfg.out)
    out = cfg.out
    if cache.complete:
        if rank == 0:
            print(f"{out}: already complete", file=sys.stderr)
        return summary(cache, t0, 0, 0)
    done = cache.done_units()
    todo = [k for k in range(cache.n_units) if k % world_size == rank and not done[k]]
    ids = cache.array("input_ids")
    t_prepared = time.perf_counter()
    mp = ModelPass(cfg.model, cfg.dtype, cfg.device, tuple(cache.meta.aux_layers))
    t_loaded = time.perf_counter()
    tokens_todo = sum(cache.unit_tokens(k)[1] - cache.unit_tokens(k)[0] for k in todo)
    bar = Progress(tokens_todo, "dump", "token", enabled=rank == 0)
    pending: Future | None = None
    write = UnitWriter(cfg, cache)

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
    nonfinite = write.nonfinite
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
    q = shlex.quote(str(s["store"]))  # the next commands as they can be pasted into a shell
    print(f"cache {state}: {s['store']}\nnext: medusa-cache verify {q} --deep && "
          f"medusa-cache train --cache {q} --out heads")
