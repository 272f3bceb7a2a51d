"""Is a store whole and self-consistent? Every chunk that must exist and every array's shape, by the declared array
table (``spec.ARRAYS``); every checksum; the mapping, labels and counts against what they were derived from."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import UserError
from .rows import needed_rows, seq_of
from .spec import ARRAYS, SMALL_ARRAYS, STATES, expected_shape, shard_key

if TYPE_CHECKING:
    from .reader import Cache


def listing(cache: Cache) -> set[str]:
    """Every key in the store, through the store's own listing (works for local paths and fsspec URLs)."""
    from zarr.core.sync import sync

    async def collect() -> set[str]:
        return {k async for k in cache.group.store.list_prefix("")}

    return sync(collect())


def expected_chunks(cache: Cache, name: str) -> list[tuple[str, str]]:
    """(key, description) of every chunk (outer shard when sharded) of array ``name`` that must exist."""
    a = cache.group[name]
    grid = a.metadata.chunk_grid.chunk_shape
    shape = tuple(-(-int(s) // int(c)) for s, c in zip(a.shape, grid, strict=True))
    per_unit = next(s.per_unit for s in ARRAYS if s.name == name)
    done = cache.done_units() if per_unit and not cache.complete else None
    out = []
    for coords in np.ndindex(*shape) if all(shape) else []:
        if done is not None and not done[coords[0]]:
            continue
        key = f"{name}/{a.metadata.encode_chunk_key(coords)}"
        if per_unit and name != "unit_done":
            lo, hi = cache.unit_tokens(coords[0])
            out.append((key, f"{name}: shard {key} (unit {coords[0]}, token rows {lo}:{hi}) is missing"))
        else:
            out.append((key, f"{name}: chunk {key} is missing"))
    return out


def missing_chunks(cache: Cache) -> list[str]:
    """One message per chunk that must exist and is not in the store (empty when whole).

    Format 1 stores skipped chunks equal to their fill value 0 (e.g. an all-zero ``bad_rows`` shard), so for them
    only ``hidden`` and ``unit_done`` are checked."""
    keys = listing(cache)
    names = [s.name for s in ARRAYS if s.present(cache.meta)]
    if cache.meta.medusa_cache < 2:
        names = ["hidden", "unit_done"]
    problems = []
    for name in names:
        if name not in cache.group:
            problems.append(f"array {name} is missing")
            continue
        problems += [msg for key, msg in expected_chunks(cache, name) if key not in keys]
    return problems


def check_checksums(cache: Cache) -> None:
    """Read every chunk of the small arrays and every done shard's index once: a checksum failure is named here,
    before any output is written (the shards' chunks are checked by every later read)."""
    for name in SMALL_ARRAYS:
        if name in cache.group:
            cache.stored(name)
    for name in STATES:
        r = cache.reads.reader(name) if name in cache.group else None
        for k in (np.flatnonzero(cache.done_units()) if r is not None else []):
            r.shard_file(int(k))


def chunk_checksums(cache: Cache) -> tuple[list[str], bool]:
    """(problems, whether the hidden shards' bytes were read): every chunk of every done shard of ``hidden`` (and
    ``hidden_scale``) checked against its CRC32C from the bytes alone, nothing decoded (plain ``verify``). Stores on
    object storage are not read here (False): ``verify --deep`` decodes them through zarr."""
    problems, read = [], True
    for name in STATES:
        if name not in cache.group:
            continue
        r = cache.reads.reader(name)
        if r is None:
            read = False
            continue
        for k in np.flatnonzero(cache.done_units()):
            problems += r.check_shard(int(k))
    return problems, read


def structure(cache: Cache) -> list[str]:
    """Offsets, every present array's shape (``spec.ARRAYS``), and ``row_kept`` against the loss mask."""
    problems = []
    off = cache.offsets
    if off[0] != 0 or (np.diff(off) <= 0).any():
        problems.append("seq_offsets must start at 0 and strictly increase")
    m = cache.meta
    dims = {"N": cache.n_tokens, "S": cache.n_seqs, "H": m.hidden_size, "V": m.vocab_size, "D": m.draft_vocab_size,
            "g": max(m.int8_group, 1), "n_units": m.n_units, "A": len(m.aux_layers),
            "M": cache.n_tokens if cache.row_kept is None else int(cache.row_kept.sum())}
    for spec in ARRAYS:
        if not spec.present(m):
            continue
        if spec.name not in cache.group:
            problems.append(f"array {spec.name} is missing")
        elif tuple(cache.group[spec.name].shape) != (want := expected_shape(spec, dims)):
            problems.append(f"array {spec.name} has shape {tuple(cache.group[spec.name].shape)}, expected {want}")
    if cache.row_kept is not None and not np.array_equal(
            cache.row_kept, needed_rows(cache.array("loss_mask"), off, m.max_heads)):
        problems.append(f"row_kept disagrees with loss_mask for --max-heads {m.max_heads}")
    return problems


def consistency(cache: Cache) -> list[str]:
    """The vocabulary mapping, labels and counts agree with the ids and the loss mask they were derived from."""
    problems = []
    try:
        mp = cache.mapping()
        mp.validate("d2t/t2d")
        if mp.target_size != cache.meta.vocab_size or mp.draft_size != cache.meta.draft_vocab_size:
            problems.append("d2t/t2d sizes disagree with the vocab_size/draft_vocab_size attributes")
        ids, mask, labels = cache.array("input_ids"), cache.array("loss_mask").astype(bool), cache.array("labels")
        bad = np.flatnonzero(mp.labels(ids, mask) != labels)
        if len(bad):
            problems.append(f"{len(bad)} labels disagree with input_ids/loss_mask/mapping (first at token {bad[0]})")
        counts = cache.array("token_counts")
        if counts.sum() != mask.sum():
            problems.append(f"token_counts sum {counts.sum()} != assistant tokens {mask.sum()}")
        if cache.meta.counts.get("assistant_tokens") not in (None, int(mask.sum())):
            problems.append("the counts attribute disagrees with loss_mask")
    except UserError as e:
        problems.append(str(e))
    except Exception as e:  # noqa: BLE001 - an unreadable array
        problems.append(f"cannot read metadata arrays: {e}")
    done = cache.done_units()
    if cache.complete and not done.all():
        problems.append(f"marked complete but units {np.flatnonzero(~done)[:10].tolist()} are not done")
    for key in ("model", "tokenizer", "chat_template", "data", "vocab"):
        if key not in cache.meta.fingerprints:
            problems.append(f"fingerprint '{key}' is missing")
    return problems


def decode_units(cache: Cache) -> tuple[list[str], int]:
    """(problems, NaN/Inf rows): every done unit decoded through zarr (its chunk checksums checked), its
    non-finite rows located by sequence (``verify --deep``)."""
    problems, nonfinite, bad_seqs = [], 0, set()
    for k in np.flatnonzero(cache.done_units()):
        a, b = cache.unit_range(int(k))
        broken = False
        for name in (s.name for s in ARRAYS if s.name in STATES and s.present(cache.meta)):
            try:
                cache.reads.read(name, a, b, direct=False)
            except UserError as e:
                problems.append(f"unit {k} ({name} rows {a}:{b}, shard {shard_key(name, k)}) cannot be decoded: "
                                f"{str(e).split('cannot be read ', 1)[-1]}")
                broken = True
        if broken:
            continue
        h = cache.reads.rows(a, b, direct=False).float()
        rows = cache.token_of_row(np.flatnonzero(~torch.isfinite(h).all(dim=1).numpy()) + a)
        nonfinite += len(rows)
        bad_seqs.update(seq_of(cache.offsets, rows).tolist())
    if nonfinite:
        problems.append(f"{nonfinite} token rows hold NaN/Inf, in sequences {sorted(bad_seqs)[:20]}")
    return problems, nonfinite


def require_complete(cache: Cache, allow_partial: bool = False, partial_flag: str | None = "--allow-partial") -> None:
    """Refuse an incomplete store (unless ``allow_partial``) and any store with a chunk missing or damaged."""
    if not cache.complete and not allow_partial:
        done = int(cache.done_units().sum())
        hint = f", or pass {partial_flag}" if partial_flag else ""
        raise UserError(f"{cache.path}: cache is incomplete ({done}/{cache.n_units} units dumped); finish it with "
                        f"`medusa-cache dump ... --resume`{hint}")
    missing = missing_chunks(cache)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"{cache.path}: {'; '.join(missing[:3])}{more}; the store is damaged: "
                        "run `medusa-cache verify` and re-dump the named units")
    check_checksums(cache)
